"""Evaluation, ROC/bootstrap metrics, attention heatmaps and their CLIs.

Whole-slide inference itself (``predict_slide``, saved predictions, the ``predict``
command) is tested in ``tests/test_predict.py``.

Oracles: a brute-force threshold sweep for the ROC points and the trapezoid area under
them against ``torch_impl.pipeline.metrics.roc_auc``; plain loops over pixels for where an attention
cell lands on a thumbnail and in the TIFF; a rectangle lesion drawn exactly over one cell;
a second run for determinism. Slides are the tiny synthetic CAMELYON16 (1024 px at
0.25 um/px, read at 0.5 um/px), the model a 2-channel-wide ResNet-34 with a tiny head.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given
from hypothesis import strategies as st

from tests.data_fixtures import TINY, make_tiny_camelyon
from tests.model_fixtures import CONFIG, MPP, cpu_options, save_tiny_checkpoint, tiny_model
from torch_impl.pipeline.checkpoint import load_model
from torch_impl.pipeline.cli import main as cli_main
from torch_impl.pipeline.evaluate import bootstrap_auc_ci, evaluate_run, main_evaluate, roc_curve
from torch_impl.pipeline.heatmap import (
    attention_auc,
    attention_on_image,
    attention_to_uint8,
    lesion_fraction,
    main_heatmap,
    sample_attention,
    write_attention_tiff,
    write_heatmap,
)
from torch_impl.pipeline.metrics import roc_auc
from torch_impl.pipeline.predict import load_prediction, predict_file, save_prediction
from torch_impl.pipeline.runtime import BadSlideError
from torch_impl.slides import discover, make_splits, read_lesions
from torch_impl.slides.synthetic import slide_seed, synthesize_slide


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("camelyon_eval")
    make_tiny_camelyon(root)
    return root


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", model)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root, checkpoint) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eval")
    return out, evaluate_run(checkpoint, data_root, out, device="cpu")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- ROC and bootstrap
@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=2, max_size=30).filter(
        lambda pairs: len({y for y, _ in pairs}) == 2
    )
)
def test_roc_curve_matches_threshold_sweep(pairs):
    labels = np.array([y for y, _ in pairs])
    scores = np.array([s for _, s in pairs], dtype=float) / 3  # few values: many ties
    fpr, tpr, thresholds = roc_curve(labels, scores)

    distinct = np.unique(scores)[::-1]  # brute force: "score >= t" for every distinct t
    want_tpr = [0.0] + [np.mean(scores[labels == 1] >= t) for t in distinct]
    want_fpr = [0.0] + [np.mean(scores[labels == 0] >= t) for t in distinct]
    np.testing.assert_array_equal(thresholds, np.r_[np.inf, distinct])
    np.testing.assert_allclose(tpr, want_tpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fpr, want_fpr, rtol=0, atol=1e-12)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    # the trapezoid area under the points is the AUC with ties counted as 1/2
    trapezoids = np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2
    assert abs(trapezoids.sum() - roc_auc(labels, scores)) < 1e-12


def test_roc_curve_rejects_one_class_and_bad_labels():
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="0 or 1"):
        roc_curve([0, 2], [0.1, 0.2])


def test_bootstrap_ci_contains_auc_and_is_deterministic():
    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(25, int), np.zeros(35, int)]
    scores = labels * 0.8 + rng.normal(size=labels.size)  # overlapping classes, AUC ~0.7
    auc = roc_auc(labels, scores)
    lo, hi = bootstrap_auc_ci(labels, scores, n_resamples=500, seed=0)
    assert 0.0 <= lo < auc < hi <= 1.0
    assert hi - lo < 0.5
    assert bootstrap_auc_ci(labels, scores, n_resamples=500, seed=0) == (lo, hi)
    assert bootstrap_auc_ci(labels, scores, n_resamples=500, seed=1) != (lo, hi)
    # wider intervals at higher confidence
    lo99, hi99 = bootstrap_auc_ci(labels, scores, n_resamples=500, confidence=0.99, seed=0)
    assert lo99 <= lo and hi <= hi99


def test_bootstrap_ci_of_perfect_separation_is_one():
    assert bootstrap_auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_resamples=50) == (1.0, 1.0)


# ---------------------------------------------------------------- evaluate_run
def test_evaluate_run_writes_predictions_metrics_roc(run, data_root):
    out, metrics = run
    rows = _read_csv(out / "predictions.csv")
    assert [r["slide_id"] for r in rows] == ["test_001", "test_002", "test_003", "test_004"]
    reference = dict(line.split(",")[:2] for line in (data_root / "testing" / "reference.csv").read_text().split())
    for r in rows:
        assert int(r["label"]) == (reference[r["slide_id"]] == "Tumor")
        assert 0.0 <= float(r["prob_tumor"]) <= 1.0
        assert int(r["prediction"]) == (float(r["prob_tumor"]) >= 0.5)

    assert json.loads((out / "metrics.json").read_text()) == metrics
    labels = np.array([int(r["label"]) for r in rows])
    probs = np.array([float(r["prob_tumor"]) for r in rows])
    assert metrics["n_slides"] == 4 and metrics["n_tumor"] == 2 and metrics["n_normal"] == 2
    assert metrics["auc"] == pytest.approx(roc_auc(labels, probs))
    lo, hi = metrics["auc_ci95"]
    assert lo <= metrics["auc"] <= hi
    assert metrics["accuracy"] == pytest.approx(np.mean((probs >= 0.5) == labels))
    assert metrics["bootstrap"]["n_resamples"] == 2000 and metrics["skipped"] == []
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for r in rows:  # attention maps, with the placement that the heatmap needs
        att = np.load(out / "attention" / f"{r['slide_id']}.npy")
        meta = json.loads((out / "attention" / f"{r['slide_id']}.json").read_text())
        assert att.shape == tuple(math.ceil(n / CONFIG.pool_size) for n in meta["feature_hw"])
        assert meta["prob_tumor"] == float(r["prob_tumor"]) and meta["cell_size"] == 64
        assert abs(att.sum() - 1) < 1e-5


def test_evaluate_run_is_deterministic(run, data_root, checkpoint, tmp_path):
    out, metrics = run
    again = evaluate_run(checkpoint, data_root, tmp_path, device="cpu")
    assert (tmp_path / "predictions.csv").read_bytes() == (out / "predictions.csv").read_bytes()
    assert again == metrics
    for npy in (out / "attention").glob("*.npy"):
        np.testing.assert_array_equal(np.load(npy), np.load(tmp_path / "attention" / npy.name))


def test_evaluate_val_split_from_splits_csv(data_root, checkpoint, tmp_path):
    splits = tmp_path / "splits.csv"
    make_splits(discover(data_root), splits, val_fraction=0.5, seed=0)
    metrics = evaluate_run(
        checkpoint, data_root, tmp_path / "out", split="val", splits_csv=splits, device="cpu", n_bootstrap=100
    )
    rows = _read_csv(tmp_path / "out" / "predictions.csv")
    val = {line.split(",")[0] for line in splits.read_text().split()[1:] if line.endswith(",val")}
    assert {r["slide_id"] for r in rows} == val and len(val) == 2
    assert metrics["split"] == "val" and metrics["n_slides"] == 2
    with pytest.raises(FileNotFoundError, match="splits CSV"):
        evaluate_run(checkpoint, data_root, tmp_path / "out2", split="val", device="cpu")


def test_bad_slide_raises_or_is_skipped_cli(data_root, checkpoint, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    bad = root / "testing" / "images" / "test_002.tif"
    bad.write_bytes(b"II*\x00 this is not a slide")
    with pytest.raises(BadSlideError, match="test_002.tif"):
        evaluate_run(checkpoint, root, tmp_path / "strict", device="cpu")

    out = tmp_path / "lenient"
    assert (
        main_evaluate(
            [
                "--data",
                str(root),
                *cpu_options(checkpoint, out),
                "--skip-bad-slides",
                "--bootstrap",
                "50",
            ]
        )
        == 0
    )
    rows = _read_csv(out / "predictions.csv")
    assert [r["slide_id"] for r in rows] == ["test_001", "test_003", "test_004"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["slide_id"] for s in metrics["skipped"]] == ["test_002"]
    assert metrics["mpp"] == MPP  # from the checkpoint's train_config


def test_evaluate_without_the_slide_cache_gives_the_same_probabilities(run, data_root, checkpoint, tmp_path):
    """``--slide-cache none`` (every tile read from the file) against the default ``auto`` (the
    crop decoded once): the same predictions.csv, digit for digit, and the same attention."""
    out, _ = run  # evaluate_run's default: auto
    argv = ["--data", str(data_root), *cpu_options(checkpoint, tmp_path), "--slide-cache", "none", "--bootstrap", "50"]
    assert main_evaluate(argv) == 0
    assert (tmp_path / "predictions.csv").read_bytes() == (out / "predictions.csv").read_bytes()
    for npy in (out / "attention").glob("*.npy"):
        np.testing.assert_array_equal(np.load(npy), np.load(tmp_path / "attention" / npy.name))
    with pytest.raises(SystemExit):  # not a mode: a usage error
        main_evaluate(["--data", str(data_root), *cpu_options(checkpoint, tmp_path), "--slide-cache", "disk"])


@pytest.mark.parametrize("verb", ["evaluate", "heatmap", "predict"])
def test_every_inference_verb_offers_the_slide_cache(verb, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main([verb, "--help"], prog="streamingclam")
    text = capsys.readouterr().out
    assert e.value.code == 0 and "--slide-cache {auto,device,host,none}" in text


# ---------------------------------------------------------------- cells -> pixels
def _brute_cell(coord: float, start: int, length: int, cell: int, n: int) -> int:
    """The cell index of one working coordinate, the slow obvious way; -1 outside."""
    if not start <= coord < start + length:
        return -1
    for i in range(n):
        if start + i * cell <= coord < start + (i + 1) * cell:
            return i
    return -1


def test_one_hot_cell_lands_under_its_pixels():
    box, cell = (37, 53, 300, 350), 64  # crop (y, x, h, w) in working px; 5 x 6 cells
    grid = (math.ceil(300 / cell), math.ceil(350 / cell))
    scale, out_hw = (3.7, 3.3), (120, 140)  # working px per thumbnail px, thumbnail size
    for hot in [(2, 3), (4, 5), (0, 0)]:  # (4, 5): the clipped bottom-right corner cell
        attention = np.full(grid, 0.01)
        attention[hot] = 1.0
        on_thumb = attention_on_image(attention, box, cell, out_hw, scale)
        for u in range(out_hw[0]):
            i = _brute_cell((u + 0.5) * scale[0], box[0], box[2], cell, grid[0])
            for v in range(out_hw[1]):
                j = _brute_cell((v + 0.5) * scale[1], box[1], box[3], cell, grid[1])
                want = np.nan if i < 0 or j < 0 else (1.0 if (i, j) == hot else 0.01)
                np.testing.assert_equal(on_thumb[u, v], want)
        # and in numbers: the hot pixels span the cell's working extent divided by the scale
        rows, cols = np.nonzero(on_thumb == 1.0)
        y_lo, y_hi = box[0] + hot[0] * cell, min(box[0] + (hot[0] + 1) * cell, box[0] + box[2])
        x_lo, x_hi = box[1] + hot[1] * cell, min(box[1] + (hot[1] + 1) * cell, box[1] + box[3])
        assert rows.min() == math.ceil(y_lo / scale[0] - 0.5) and rows.max() == math.ceil(y_hi / scale[0] - 0.5) - 1
        assert cols.min() == math.ceil(x_lo / scale[1] - 0.5) and cols.max() == math.ceil(x_hi / scale[1] - 0.5) - 1


def test_sample_attention_outside_value_and_uint8_scaling():
    att = np.array([[0.0, 0.2], [0.5, 0.3]])  # 0 = background cell
    u8 = attention_to_uint8(att)
    np.testing.assert_array_equal(u8, [[0, 1], [255, round(1 + 254 * 0.1 / 0.3)]])
    np.testing.assert_array_equal(attention_to_uint8(np.array([[0.0, 0.5], [0.5, 0.0]])), [[0, 255], [255, 0]])
    got = sample_attention(
        u8, (10, 10, 20, 20), 10, np.array([5.0, 15.0, 25.0, 35.0]), np.array([15.0, 29.9]), outside=0
    )
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, [[0, 0], [0, 1], [255, u8[1, 1]], [0, 0]])


def test_attention_tiff_pyramid_and_placement(tmp_path):
    box, cell, slide_hw, mpp = (70, 45, 400, 300), 64, (700, 600), 0.5
    grid = (math.ceil(400 / cell), math.ceil(300 / cell))
    attention = np.zeros(grid)
    attention[1:, :] = 0.1  # row 0 is background
    attention[3, 2] = 1.0
    path = tmp_path / "att.tif"
    shapes = write_attention_tiff(path, attention, box, cell, slide_hw, mpp, downsample=2)
    assert shapes == [(350, 300), (175, 150)]
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert [lvl.shape for lvl in levels] == shapes
        page = tif.pages[0]
        assert page.is_tiled and page.dtype == np.uint8
        px_per_cm = page.tags["XResolution"].value
        assert px_per_cm[0] / px_per_cm[1] == pytest.approx(1e4 / (mpp * 2))
        assert json.loads(page.description)["downsample"] == 2
        base, second = levels[0].asarray(), levels[1].asarray()
    for arr, d in ((base, 2), (second, 4)):  # every pixel against the brute-force cell
        for u in range(0, arr.shape[0], 3):
            i = _brute_cell((u + 0.5) * d, box[0], box[2], cell, grid[0])
            for v in range(0, arr.shape[1], 3):
                j = _brute_cell((v + 0.5) * d, box[1], box[3], cell, grid[1])
                want = 0 if i < 0 or j < 0 or attention[i, j] == 0 else (255 if (i, j) == (3, 2) else 1)
                assert arr[u, v] == want, (d, u, v)


def test_lesion_fraction_of_a_rectangle_over_one_cell():
    box, cell, grid = (40, 60, 300, 300), 64, (5, 5)
    level0_to_working = (0.5, 0.5)  # level 0 is twice as fine as the working resolution
    # cell (1, 2) covers working y [104, 168), x [188, 252) = level-0 y [208, 336), x [376, 504)
    rect = np.array([[376, 208], [504, 208], [504, 336], [376, 336]], dtype=float)
    frac = lesion_fraction([rect], [], grid, box, cell, level0_to_working)
    assert frac[1, 2] == pytest.approx(1.0)
    others = np.delete(frac.ravel(), 1 * 5 + 2)
    assert others.max() <= 1 / 16 + 1e-12  # at most PIL's one-sub-pixel outline spill
    # a hole over the left half of the cell halves it, to within PIL's inclusive edge column
    hole = np.array([[376, 208], [440, 208], [440, 336], [376, 336]], dtype=float)
    frac = lesion_fraction([rect], [hole], grid, box, cell, level0_to_working)
    assert 7 / 16 <= frac[1, 2] <= 9 / 16


def test_attention_auc_rule():
    att = np.array([[0.0, 0.1, 0.2], [0.3, 0.15, 0.12]])
    frac = np.array([[1.0, 0.0, 0.6], [0.5, 0.49, 0.0]])
    # tissue: 5 cells; lesion (frac >= 0.5): 0.2, 0.3 -> above every non-lesion value
    assert attention_auc(att, frac) == {"attention_auc": 1.0, "n_lesion_cells": 2, "n_tissue_cells": 5}
    # 1 - frac: lesion 0.1, 0.3, 0.15, 0.12 vs non-lesion 0.2: one of four pairs ordered
    assert attention_auc(att, 1 - frac)["attention_auc"] == pytest.approx(0.25)
    assert attention_auc(att, np.zeros_like(frac))["attention_auc"] is None


# ---------------------------------------------------------------- write_heatmap
def test_write_heatmap_png_tiff_and_lesion_auc(run, data_root, checkpoint, tmp_path):
    slide = data_root / "testing" / "images" / "test_001.tif"
    xml = data_root / "testing" / "lesion_annotations" / "test_001.xml"
    net, _ = load_model(checkpoint, device="cpu")  # the caller runs the model; write_heatmap draws
    pred = predict_file(net, slide, MPP, "cpu")
    save_prediction(pred, tmp_path / "attention")
    res = write_heatmap(pred, tmp_path, annotation=xml)
    png, tiff = Path(res["png"]), Path(res["tiff"])
    assert png == tmp_path / "test_001_heatmap.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert tiff == tmp_path / "test_001_attention.tif"
    assert res["attention_auc"] is not None and 0.0 <= res["attention_auc"] <= 1.0
    assert 0 < res["n_lesion_cells"] < res["n_tissue_cells"]

    out, _ = run  # same slide, same model: the evaluation's attention and probability
    saved = np.load(out / "attention" / "test_001.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "attention" / "test_001.npy"), saved)
    pred = {r["slide_id"]: r for r in _read_csv(out / "predictions.csv")}["test_001"]
    assert res["prob_tumor"] == float(pred["prob_tumor"])

    with tifffile.TiffFile(tiff) as tif:
        levels = tif.series[0].levels
        assert len(levels) >= 2
        base = levels[0].asarray()
    # slide 512 px at 0.5 um/px: the automatic downsample keeps the base at working pixels
    assert res["tiff_downsample"] == 1 and base.shape == (512, 512)
    y0, x0, h, w = res["box"]
    u8 = attention_to_uint8(saved)
    rng = np.random.default_rng(0)
    for y, x in rng.integers(0, 512, size=(300, 2)):
        inside = y0 <= y < y0 + h and x0 <= x < x0 + w
        want = u8[(y - y0) // 64, (x - x0) // 64] if inside else 0
        assert base[y, x] == want

    # the same drawing from the saved map, without the model
    again = write_heatmap(load_prediction(out / "attention" / "test_001.npy"), tmp_path / "saved", annotation=xml)
    assert again["attention_auc"] == res["attention_auc"] and again["prob_tumor"] == res["prob_tumor"]
    with tifffile.TiffFile(again["tiff"]) as tif:
        np.testing.assert_array_equal(tif.series[0].levels[0].asarray(), base)


def test_write_heatmap_with_model_lesion_cells_match_ground_truth(data_root, model, tmp_path):
    """The lesion cells agree with the generator's lesion mask."""
    slide = data_root / "testing" / "images" / "test_004.tif"
    xml = data_root / "testing" / "lesion_annotations" / "test_004.xml"
    save_prediction(predict_file(model, slide, MPP), tmp_path / "attention")
    res = write_heatmap(load_prediction(tmp_path / "attention" / "test_004.npy"), tmp_path, annotation=xml)
    assert res["attention_auc"] is None or 0.0 <= res["attention_auc"] <= 1.0

    # oracle: the painted lesion mask (level 0, 0.25 um/px) averaged over each cell's
    # level-0 footprint: cell (i, j) = level-0 rows 2 [y0 + 64 i, y0 + 64 (i+1)), clipped
    truth = synthesize_slide(TINY["size"], True, slide_seed(TINY["seed"], "test_004"), TINY["mpp"]).lesion
    lesions, holes = read_lesions(xml)
    att = np.load(tmp_path / "attention" / "test_004.npy")
    y0, x0, h, w = res["box"]
    frac = lesion_fraction(lesions, holes, att.shape, res["box"], 64, (0.5, 0.5))
    want = np.zeros(att.shape)
    for i in range(att.shape[0]):
        for j in range(att.shape[1]):
            rows = slice(2 * (y0 + 64 * i), 2 * min(y0 + 64 * (i + 1), y0 + h))
            cols = slice(2 * (x0 + 64 * j), 2 * min(x0 + 64 * (j + 1), x0 + w))
            want[i, j] = truth[rows, cols].mean()
    assert want.max() > 0.5  # the slide has a lesion covering whole cells
    # 16 x 16 sub-pixels per cell; PIL's inclusive outline only ever adds lesion
    assert (frac - want).max() <= 0.1 and (frac - want).min() >= -0.01


def test_main_heatmap_cli(run, data_root, checkpoint, tmp_path):
    out, _ = run
    slide = data_root / "testing" / "images" / "test_003.tif"
    assert (
        main_heatmap(
            ["--slide", str(slide), "--out", str(tmp_path), "--attention", str(out / "attention" / "test_003.npy")]
        )
        == 0
    )
    assert (tmp_path / "test_003_heatmap.png").is_file() and (tmp_path / "test_003_attention.tif").is_file()
    assert json.loads((tmp_path / "test_003_attention.geojson").read_text())["type"] == "FeatureCollection"
    # with the checkpoint: runs the model (mpp from the checkpoint), saves the attention evaluate saved
    assert (
        main_heatmap(
            [
                "--slide",
                str(slide),
                *cpu_options(checkpoint, tmp_path / "model"),
                "--amp",
                "off",
                "--slide-cache",
                "none",  # evaluate (the `run` fixture) read through the cache
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(
        np.load(tmp_path / "model" / "attention" / "test_003.npy"), np.load(out / "attention" / "test_003.npy")
    )
    with (
        tifffile.TiffFile(tmp_path / "model" / "test_003_attention.tif") as a,
        tifffile.TiffFile(tmp_path / "test_003_attention.tif") as b,
    ):
        np.testing.assert_array_equal(a.series[0].levels[0].asarray(), b.series[0].levels[0].asarray())
    with pytest.raises(SystemExit):
        main_heatmap(["--slide", str(slide), "--out", str(tmp_path)])  # neither model nor map
    with pytest.raises(ValueError, match="test_001"):  # another slide's map
        write_heatmap(load_prediction(out / "attention" / "test_001.npy"), tmp_path, slide_path=slide)
    with pytest.raises(ValueError, match="test_001"):  # the same through the command line
        main_heatmap(
            ["--slide", str(slide), "--out", str(tmp_path), "--attention", str(out / "attention" / "test_001.npy")]
        )


def test_a_failed_plot_leaves_the_previous_png_and_no_temporary_file(tmp_path, monkeypatch):
    """Figures are written through atomic_write, like every other output of a run."""
    from matplotlib.figure import Figure

    from torch_impl.pipeline.plots import plot_roc

    path = tmp_path / "roc.png"
    plot_roc(np.array([0.0, 0.5, 1.0]), np.array([0.0, 1.0, 1.0]), 0.75, path)
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def half_written(self, f, **kwargs):
        f.write(b"\x89PNG partial")
        raise OSError("disk went away")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk went away"):
        plot_roc(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["roc.png"]
