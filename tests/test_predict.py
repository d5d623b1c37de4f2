"""Whole-slide inference (one path for validation, evaluation, heatmaps and ``predict``), its
saved form, the ``predict`` command, the attention GeoJSON, and the pipeline's vocabulary
(device, mixed precision, atomic files).

Oracles: the trunk's real output shape and the two masks the pipeline used to compute
separately (``SlideInput.feature_mask`` on the geometry's grid, training's identity
``AugmentedView``); a plain forward pass with a hand-computed cross-entropy for
validation; ``evaluate_run``'s numbers for ``predict``; two processes against one for
validation's gather; matplotlib's point-in-polygon test (independent of the contour
tracer) at every cell centre for the GeoJSON, and OpenSlide's level-0 size for its bounds.
Slides are the tiny synthetic CAMELYON16 (1024 px at 0.25 um/px, read at 0.5 um/px).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import openslide
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.path import Path as MplPath

from tests.data_fixtures import make_tiny_camelyon
from tests.model_fixtures import CONFIG, MPP, cpu_options, save_tiny_checkpoint, tiny_model
from torch_impl.pipeline import predict as predict_module
from torch_impl.pipeline.cli import main as cli_main
from torch_impl.pipeline.config import TrainConfig
from torch_impl.pipeline.evaluate import evaluate_run
from torch_impl.pipeline.heatmap import attention_geojson, region_polygons, top_attention_cells
from torch_impl.pipeline.predict import (
    SlidePrediction,
    feature_grid,
    feature_mask,
    find_slides,
    load_prediction,
    predict_file,
    predict_run,
    predict_slide,
    save_prediction,
)
from torch_impl.pipeline.runtime import BadSlideError, atomic_write, autocast_dtype, resolve_device
from torch_impl.pipeline.train import TrainingError, validate
from torch_impl.slides import discover
from torch_impl.slides.augment import AugmentedView
from torch_impl.slides.crop_cache import CropCache
from torch_impl.slides.inputs import open_slide_input
from torch_impl.slides.synthetic import synthesize_slide, write_pyramid_tiff


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("camelyon_predict")
    make_tiny_camelyon(root)
    return root


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", model)


def _images(root: Path) -> Path:
    return root / "testing" / "images"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- predict_slide
def test_predict_slide_deterministic_and_restores_mode(data_root, model):
    path = _images(data_root) / "test_001.tif"
    model.train()
    try:
        preds = []
        for _ in range(2):
            slide_input = open_slide_input(path, mpp=MPP)
            try:
                preds.append(predict_slide(model, slide_input, "cpu"))
            finally:
                slide_input.close()
        assert model.training  # put back as it was
    finally:
        model.eval()
    a, b = preds
    assert a.slide_id == "test_001" and a.prob_tumor == b.prob_tumor
    np.testing.assert_array_equal(a.attention, b.attention)
    assert a.cell_size == 32 * CONFIG.pool_size and a.mpp == pytest.approx(MPP)
    assert a.slide_path == str(path)
    # grid shapes: trunk output over the crop, then ceil-pooling
    _, _, h, w = a.box
    assert a.feature_hw == (math.ceil(h / 32), math.ceil(w / 32))
    assert a.attention.shape == tuple(math.ceil(n / CONFIG.pool_size) for n in a.feature_hw)
    assert abs(a.attention.sum() - 1) < 1e-5 and (a.attention >= 0).all()
    # P(tumour) is the softmax of the logits
    assert a.logits.shape == (2,) and a.logits.dtype == np.float32
    assert a.prob_tumor == pytest.approx(float(torch.softmax(torch.from_numpy(a.logits), 0)[1]), abs=1e-6)


class CountingSource:
    """A lazy source that counts, per pixel, how often it was read (thread-safe)."""

    def __init__(self, source):
        self.source, self.shape, self.dtype = source, source.shape, source.dtype
        self.counts = np.zeros(source.shape[1:], dtype=np.int64)  # (h, w)
        self._lock = threading.Lock()

    def read(self, y, x, h, w):
        with self._lock:
            self.counts[max(y, 0) : max(y + h, 0), max(x, 0) : max(x + w, 0)] += 1
        return self.source.read(y, x, h, w)


def test_the_slide_cache_gives_the_same_prediction_and_decodes_each_pixel_once(model, tmp_path):
    """A crop of several overlapping tiles (a synthetic slide read at its own 0.25 um/px, tile
    1024): every slide_cache mode predicts the same, bit for bit; with a cache each pixel is
    decoded once, without it the tiles' halos are decoded again (the plan's tile areas)."""
    path = tmp_path / "slide.tif"
    write_pyramid_tiff(path, synthesize_slide((1536, 1536), True, 4).rgb, 0.25)
    slide_input = open_slide_input(path, mpp=0.25)
    try:
        _, h, w = slide_input.source.shape
        plan = model.trunk.plan((h, w))
        assert len(plan.tiles) > 1
        preds, counts = {}, {}
        for mode in ("none", "device", "host"):  # on the CPU "auto" is "device"
            counting = CountingSource(slide_input.source)
            preds[mode] = predict_slide(
                model, dataclasses.replace(slide_input, source=counting), "cpu", slide_cache=mode
            )
            counts[mode] = counting.counts
    finally:
        slide_input.close()
    for mode, pred in preds.items():
        assert pred.prob_tumor == preds["none"].prob_tumor, mode
        np.testing.assert_array_equal(pred.logits, preds["none"].logits, err_msg=mode)
        np.testing.assert_array_equal(pred.attention, preds["none"].attention, err_msg=mode)
        if mode != "none":
            assert (counts[mode] == 1).all(), mode
    tile_area = sum(t.row.length * t.col.length for t in plan.tiles)
    assert counts["none"].sum() == tile_area > h * w and counts["none"].max() >= 2
    with pytest.raises(ValueError, match="slide cache mode must be one of auto, device, host, none, got 'fast'"):
        predict_file(model, path, 0.25, slide_cache="fast")


def test_predict_slide_refuses_other_device(data_root, model):
    slide_input = open_slide_input(_images(data_root) / "test_002.tif", mpp=MPP)
    try:
        with pytest.raises(ValueError, match="model.to"):
            predict_slide(model, slide_input, "meta")
    finally:
        slide_input.close()


def test_one_feature_grid_for_training_validation_and_evaluation(data_root, model):
    """feature_grid/feature_mask equal the trunk's real output grid and both masks used before."""
    stride = model.trunk.geometry[0].stride
    for name in ("test_001.tif", "test_003.tif", "test_004.tif"):
        slide_input = open_slide_input(_images(data_root) / name, mpp=MPP)
        try:
            hw = slide_input.source.shape[1:]
            grid = feature_grid(model, hw)
            rows, cols = model.trunk.geometry
            assert grid == (rows.output_size(hw[0]), cols.output_size(hw[1]))  # evaluation's old grid
            with torch.no_grad():
                assert tuple(model.features(slide_input.source).shape[2:]) == grid  # what the trunk returns
            mask = feature_mask(model, slide_input)
            assert mask.shape == (1, *grid) and mask.dtype == torch.bool and mask.any()
            assert torch.equal(mask, slide_input.feature_mask(grid, stride))  # evaluation's old mask
            view = AugmentedView(slide_input.source)  # validation's old mask (identity view)
            assert torch.equal(
                mask, view.feature_mask(slide_input, model.trunk.plan(view.shape[1:]).output_size, stride)
            )
        finally:
            slide_input.close()


def test_predict_file_names_a_bad_file(data_root, model, tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00 this is not a slide")
    with pytest.raises(BadSlideError, match="broken.tif"):
        predict_file(model, bad, MPP)
    with pytest.raises(BadSlideError, match="finer than"):  # the file cannot serve 0.1 um/px
        predict_file(model, _images(data_root) / "test_001.tif", 0.1)
    assert issubclass(BadSlideError, TrainingError)  # training's `except TrainingError` catches it


# ---------------------------------------------------------------- validation = prediction
def _test_records(root: Path):
    return [r for r in discover(root) if r.split == "test"]


def test_validate_is_the_plain_forward_pass(data_root, model):
    records = _test_records(data_root)
    config = TrainConfig(mpp=MPP)
    got = validate(model, records, config, torch.device("cpu"), None)

    losses, probs = [], []  # oracle: the forward pass written out, loss by hand
    for r in records:
        slide_input = open_slide_input(r.path, mpp=MPP)
        try:
            rows, cols = model.trunk.geometry
            _, h, w = slide_input.source.shape
            mask = slide_input.feature_mask((rows.output_size(h), cols.output_size(w)), rows.stride)
            with torch.no_grad():
                out = model(slide_input.source, mask)
        finally:
            slide_input.close()
        logp = torch.log_softmax(out.logits[0].double(), 0)
        losses.append(-float(logp[r.label]))
        probs.append(float(out.probs[0, 1]))
    labels = np.array([r.label for r in records])
    assert got["val_slides"] == 4 and got["val_skipped"] == 0
    assert got["val_loss"] == pytest.approx(np.mean(losses), rel=1e-6)
    want_auc = np.mean(
        [(p > q) + 0.5 * (p == q) for p, y in zip(probs, labels) if y == 1 for q, z in zip(probs, labels) if z == 0]
    )
    assert got["val_auc"] == pytest.approx(want_auc, abs=1e-12)
    assert got["val_accuracy"] == pytest.approx(np.mean((np.array(probs) >= 0.5) == labels), abs=1e-12)


def test_validate_reads_each_slide_through_the_configured_cache(data_root, model, monkeypatch):
    """Validation opens every slide's crop with the training config's slide_cache (with a cache
    each pixel is decoded once); the metrics are those of mode "none", bit for bit."""
    records = _test_records(data_root)
    opened, counters = [], []
    open_cache = CropCache.open

    def spy(source, mode="auto", *args, **kwargs):
        counters.append(CountingSource(source))
        opened.append(mode)
        return open_cache(counters[-1], mode, *args, **kwargs)

    monkeypatch.setattr(predict_module.CropCache, "open", spy)
    got = {}
    for mode in ("none", "host"):
        opened.clear()
        counters.clear()
        got[mode] = validate(model, records, TrainConfig(mpp=MPP, slide_cache=mode), torch.device("cpu"), None)
        assert opened == [mode] * len(records)
        if mode == "host":
            assert all((c.counts == 1).all() for c in counters)
    assert got["host"] == got["none"]


def test_validate_skips_or_raises_on_a_bad_slide(data_root, model, tmp_path):
    records = _test_records(data_root)
    bad = tmp_path / "test_002.tif"
    bad.write_bytes(b"not a slide at all" * 10)
    records = [dataclasses.replace(r, path=bad) if r.slide_id == "test_002" else r for r in records]
    with pytest.raises(BadSlideError, match="test_002.tif"):
        validate(model, records, TrainConfig(mpp=MPP), torch.device("cpu"), None)
    got = validate(model, records, TrainConfig(mpp=MPP, skip_bad_slides=True), torch.device("cpu"), None)
    assert got["val_slides"] == 3 and got["val_skipped"] == 1


def _validate_worker(rank: int, world_size: int, store: str, root: str, ckpt: str, out: str) -> None:
    """One of two gloo processes: validate the shared records, write what rank 0 gathered."""
    import torch.distributed as dist

    from torch_impl.pipeline.checkpoint import load_model
    from torch_impl.pipeline.distributed import DistInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        net, _ = load_model(ckpt)
        got = validate(
            net.eval(),
            _test_records(Path(root)),
            TrainConfig(mpp=MPP),
            torch.device("cpu"),
            None,
            DistInfo(rank, world_size, rank),
        )
        if rank == 0:
            Path(out).write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


def test_validate_two_processes_gather_the_one_process_result(data_root, checkpoint, tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "gathered.json"
    mp.spawn(
        _validate_worker,
        args=(2, str(tmp_path / "store"), str(data_root), str(checkpoint), str(out)),
        nprocs=2,
        join=True,
    )
    from torch_impl.pipeline.checkpoint import load_model

    net, _ = load_model(checkpoint)
    single = validate(net.eval(), _test_records(data_root), TrainConfig(mpp=MPP), torch.device("cpu"), None)
    gathered = json.loads(out.read_text())
    assert gathered["val_slides"] == single["val_slides"] == 4
    for key in ("val_loss", "val_auc", "val_accuracy"):  # the mean runs over another order
        assert gathered[key] == pytest.approx(single[key], rel=1e-12, abs=1e-12)


# ---------------------------------------------------------------- saved predictions
def test_save_and_load_prediction_round_trip(data_root, model, tmp_path):
    pred = predict_file(model, _images(data_root) / "test_003.tif", MPP)
    npy = save_prediction(pred, tmp_path / "attention", label=1)
    assert npy == tmp_path / "attention" / "test_003.npy"
    assert json.loads(npy.with_suffix(".json").read_text())["label"] == 1
    for path in (npy, npy.with_suffix(".json")):
        back = load_prediction(path)
        for field in dataclasses.fields(SlidePrediction):
            a, b = getattr(pred, field.name), getattr(back, field.name)
            if isinstance(a, np.ndarray):
                assert a.dtype == b.dtype and np.array_equal(a, b), field.name
            else:
                assert a == b, field.name
    assert not [p for p in (tmp_path / "attention").iterdir() if p.name.endswith(".tmp")]
    npy.with_suffix(".json").write_text(json.dumps({"slide_id": "test_003"}))
    with pytest.raises(ValueError, match="older version"):
        load_prediction(npy)


# ---------------------------------------------------------------- the predict command
def test_find_slides_folders_files_and_clashes(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    for name in ("s2.tif", "s1.SVS", "notes.txt", ".hidden.tif", "s3.ndpi"):
        (a / name).write_bytes(b"x")
    (a / "sub").mkdir()
    (a / "sub" / "deep.tif").write_bytes(b"x")
    assert [p.name for p in find_slides([a])] == ["s1.SVS", "s2.tif", "s3.ndpi"]
    other = tmp_path / "other.dat"  # a file named explicitly is used whatever its extension
    other.write_bytes(b"x")
    assert [p.name for p in find_slides([a / "s2.tif", other])] == ["s2.tif", "other.dat"]
    with pytest.raises(ValueError, match="distinct file stems"):
        find_slides([a, a / "s2.tif"])
    with pytest.raises(FileNotFoundError, match="missing.tif"):
        find_slides([tmp_path / "missing.tif"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no slide files"):
        find_slides([tmp_path / "empty"])


def _slide_level0_hw(path: Path) -> tuple[int, int]:
    with openslide.OpenSlide(str(path)) as osr:
        w, h = osr.dimensions
    return h, w


def _inside(points: np.ndarray, rings: list[np.ndarray]) -> np.ndarray:
    """(n,) bool: inside an odd number of rings (the union of polygons with holes)."""
    count = np.zeros(len(points), dtype=int)
    for ring in rings:
        count += MplPath(ring).contains_points(points)
    return count % 2 == 1


def _clipped_centres(start: float, length: float, cell: float, n: int) -> np.ndarray:
    edges = np.minimum(np.arange(n + 1) * cell, length)
    return start + (edges[:-1] + edges[1:]) / 2


def _check_geojson(
    collection: dict,
    attention: np.ndarray,
    box,
    cell: int,
    scale: tuple[float, float],
    fractions=(0.10, 0.01),
    bounds_hw: tuple[float, float] | None = None,
) -> None:
    """Every cell centre is inside the level's polygons exactly when the cell is a top cell."""
    assert collection["type"] == "FeatureCollection"
    y0, x0, h, w = box
    fy, fx = scale
    cy = _clipped_centres(y0, h, cell, attention.shape[0]) * fy  # level-0 centres
    cx = _clipped_centres(x0, w, cell, attention.shape[1]) * fx
    centres = np.array([(x, y) for y in cy for x in cx])  # (h' w', 2) (x, y), row-major
    for q in fractions:
        name = f"attention top {100 * q:g}%"
        features = [f for f in collection["features"] if f["properties"]["classification"]["name"] == name]
        rings = []
        for f in features:
            assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
            props = f["properties"]
            assert props["objectType"] == "annotation"
            color = props["classification"]["color"]
            assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
            for k, ring in enumerate(f["geometry"]["coordinates"]):
                ring = np.array(ring, dtype=float)
                assert ring.shape[1] == 2 and np.array_equal(ring[0], ring[-1]) and len(ring) >= 4
                # inside the crop's level-0 extent (and so inside the slide)
                assert ring[:, 0].min() >= x0 * fx - 1e-9 and ring[:, 0].max() <= (x0 + w) * fx + 1e-9
                assert ring[:, 1].min() >= y0 * fy - 1e-9 and ring[:, 1].max() <= (y0 + h) * fy + 1e-9
                if bounds_hw is not None:
                    assert ring[:, 0].max() <= bounds_hw[1] and ring[:, 1].max() <= bounds_hw[0]
                    assert ring.min() >= 0
                area = 0.5 * np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1])
                assert (area > 0) == (k == 0)  # exterior counter-clockwise, holes clockwise
                rings.append(ring)
        want, _ = top_attention_cells(attention, q)
        got = _inside(centres, rings).reshape(attention.shape) if rings else np.zeros(attention.shape, bool)
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_predict_cli_gives_evaluates_probabilities_and_heatmaps(data_root, checkpoint, tmp_path):
    evaluate_run(checkpoint, data_root, tmp_path / "eval", device="cpu", n_bootstrap=20)
    out = tmp_path / "predict"
    assert (
        cli_main(
            [
                "predict",
                str(_images(data_root)),
                *cpu_options(checkpoint, out),
                "--amp",
                "off",
                "--heatmaps",
                "--slide-cache",
                "none",  # evaluate_run above read through the cache (its default, auto)
            ]
        )
        == 0
    )

    lines = (out / "predictions.csv").read_text().splitlines()
    assert lines[0] == "image,probability"  # CAMELYON16 submission header
    got = dict(line.split(",") for line in lines[1:])
    want = {r["slide_id"]: r["prob_tumor"] for r in _read_csv(tmp_path / "eval" / "predictions.csv")}
    assert got == want  # one inference path: the same numbers, digit for digit
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mpp"] == MPP and summary["n_slides"] == 4 and summary["skipped"] == []
    for image in got:
        np.testing.assert_array_equal(
            np.load(out / "attention" / f"{image}.npy"), np.load(tmp_path / "eval" / "attention" / f"{image}.npy")
        )
        heat = out / "heatmaps"
        assert (heat / f"{image}_heatmap.png").read_bytes()[:4] == b"\x89PNG"
        assert (heat / f"{image}_attention.tif").is_file()
        pred = load_prediction(out / "attention" / f"{image}.npy")
        collection = json.loads((heat / f"{image}_attention.geojson").read_text())
        assert collection["features"], image  # at least the most attended cell
        # level 0 is 0.25 um/px, the working resolution 0.5: two level-0 pixels per working pixel
        _check_geojson(
            collection,
            pred.attention,
            pred.box,
            pred.cell_size,
            (2.0, 2.0),
            bounds_hw=_slide_level0_hw(_images(data_root) / f"{image}.tif"),
        )


def test_predict_run_list_of_files_and_bad_slides(data_root, checkpoint, tmp_path):
    folder = tmp_path / "slides"
    shutil.copytree(_images(data_root), folder)
    (folder / "test_002.tif").write_bytes(b"II*\x00 this is not a slide")
    files = [folder / "test_004.tif", folder / "test_002.tif", folder / "test_001.tif"]
    with pytest.raises(BadSlideError, match="test_002.tif.*--skip-bad-slides"):
        predict_run(checkpoint, files, tmp_path / "strict", device="cpu")
    with pytest.raises(ValueError, match="slide_cache must be one of auto, device, host, none, got 'disk'"):
        predict_run(checkpoint, files, tmp_path / "strict", device="cpu", slide_cache="disk")
    summary = predict_run(checkpoint, files, tmp_path / "lenient", device="cpu", skip_bad_slides=True)
    rows = _read_csv(tmp_path / "lenient" / "predictions.csv")
    assert [r["image"] for r in rows] == ["test_004", "test_001"]  # the order given
    assert [s["slide_id"] for s in summary["skipped"]] == ["test_002"]
    assert json.loads((tmp_path / "lenient" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for r in rows:
        assert float(r["probability"]) == summary["predictions"][r["image"]]


# ---------------------------------------------------------------- the GeoJSON
@st.composite
def attention_grids(draw):
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    values = draw(st.lists(st.sampled_from([0.0, 0.0, 0.1, 0.2, 0.3, 0.5, 0.9]), min_size=h * w, max_size=h * w))
    cell = draw(st.sampled_from([32, 64]))
    # the last row and column of cells clipped to 1 .. cell pixels
    crop_h, crop_w = (h - 1) * cell + draw(st.integers(1, cell)), (w - 1) * cell + draw(st.integers(1, cell))
    box = (draw(st.integers(0, 500)), draw(st.integers(0, 500)), crop_h, crop_w)
    scale = (draw(st.sampled_from([0.5, 1.0, 2.0, 4.0])), draw(st.sampled_from([0.5, 1.0, 2.0, 4.0])))
    fractions = tuple(draw(st.lists(st.sampled_from([1.0, 0.5, 0.3, 0.1, 0.01]), min_size=1, max_size=3, unique=True)))
    return np.array(values).reshape(h, w), box, cell, scale, fractions


@settings(max_examples=400)  # cheap, and staircases next to a thin clipped cell are rare draws
@given(attention_grids())
def test_geojson_polygons_rasterise_back_to_the_top_cells(case):
    attention, box, cell, scale, fractions = case
    pred = SlidePrediction("s", 0.5, np.zeros(2, np.float32), attention, (1, 1), box, cell, 0.5, "s.tif")
    collection = json.loads(json.dumps(attention_geojson(pred, scale, fractions)))  # as read from a file
    _check_geojson(collection, attention, box, cell, scale, fractions)


def test_region_polygons_hole_and_top_cells_rule():
    ring = np.ones((5, 5), dtype=bool)
    ring[2, 2] = False  # a region with a hole
    (polygon,) = region_polygons(ring)
    assert len(polygon) == 2  # exterior and one hole
    exterior, hole = polygon
    assert {tuple(p) for p in exterior[:-1]} == {
        (0.0, 0.5),
        (0.5, 0.0),
        (4.5, 0.0),
        (5.0, 0.5),
        (5.0, 4.5),
        (4.5, 5.0),
        (0.5, 5.0),
        (0.0, 4.5),
    }  # corners cut by 1/2
    assert {tuple(p) for p in hole[:-1]} == {(2.5, 2.0), (3.0, 2.5), (2.5, 3.0), (2.0, 2.5)}
    assert region_polygons(np.zeros((3, 3), dtype=bool)) == []

    att = np.array([[0.0, 0.4, 0.1], [0.2, 0.2, 0.05], [0.0, 0.03, 0.02]])  # 7 tissue cells
    cells, t = top_attention_cells(att, 0.3)  # ceil(2.1) = 3 cells: 0.4, 0.2 and its tie
    assert t == 0.2 and cells.sum() == 3 and cells[0, 1] and cells[1, 0] and cells[1, 1]
    cells, t = top_attention_cells(att, 0.01)  # at least one cell
    assert t == 0.4 and cells.sum() == 1
    assert top_attention_cells(np.zeros((2, 2)), 0.1)[0].sum() == 0
    with pytest.raises(ValueError, match="fraction"):
        top_attention_cells(att, 0.0)


# ---------------------------------------------------------------- vocabulary
def test_resolve_device_and_autocast_dtype():
    cpu = torch.device("cpu")
    auto = torch.device("cuda:0") if torch.cuda.is_available() else cpu
    assert resolve_device("auto") == resolve_device(None) == auto
    assert resolve_device("cpu") == cpu and resolve_device(cpu) == cpu
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("off", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16  # as training always did on the CPU
    assert autocast_dtype("auto", torch.device("cuda:0")) is torch.bfloat16
    assert autocast_dtype("off", torch.device("cuda:0")) is None
    with pytest.raises(ValueError, match="amp must be one of"):
        autocast_dtype(True, cpu)


def test_atomic_write_all_or_nothing(tmp_path):
    path = tmp_path / "sub" / "file.txt"
    with atomic_write(path) as f:
        f.write("first")
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as f:
            f.write("half of the second")
            raise RuntimeError("boom")
    assert path.read_text() == "first"  # untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.txt"]  # no temporary left
    with atomic_write(path, "wb") as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # a plain open's permissions
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(path, "a"):
            pass
