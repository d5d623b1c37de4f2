"""Training: augmentation on lazy sources, metrics, configuration, checkpoints, the training loop.

Oracles: the whole-image transform of a small in-memory image (augmentation), a per-pixel
brute force (augmented tissue masks), pair counting (AUC), Python's colorsys (HSV), and an
uninterrupted run (resume must reproduce it bit for bit).

Training runs use a tiny synthetic data set (6 slides of 1024 x 1024 px at 0.25 um/px, read
at 1 um/px: ~200 x 200 px crops) and a ResNet-34 of width 4, one CPU thread.
"""

from __future__ import annotations

import colorsys
import csv
import functools
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.model_fixtures import tiny_train_config
from tests.strategies import augment_params
from torch_impl.models.streaming_clam import ModelConfig, StreamingCLAM
from torch_impl.pipeline.calibration import calibrate_batchnorm
from torch_impl.pipeline.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from torch_impl.pipeline.config import TrainConfig, config_from_dict, load_config, validate_config
from torch_impl.pipeline.distributed import shard
from torch_impl.pipeline.metrics import accuracy, roc_auc, roc_auc_pairs
from torch_impl.pipeline.train import (
    BadSlideError,
    NonFiniteLossError,
    TrainingError,
    epoch_order,
    train,
)
from torch_impl.slides import ArrayImage, make_demo_data
from torch_impl.slides.augment import (
    AugmentedView,
    AugmentParams,
    draw_augmentation,
    hsv_to_rgb,
    jitter_hsv,
    rgb_to_hsv,
)
from torch_impl.slides.synthetic import write_pyramid_tiff

pytestmark = pytest.mark.usefixtures("single_torch_thread")


# ============================================================================ augmentation
def whole_transform(image: np.ndarray, p: AugmentParams) -> np.ndarray:
    """The slow obvious version: transform the whole (3, H, W) array with numpy."""
    a = image
    if p.flip_v:
        a = a[:, ::-1, :]
    if p.flip_h:
        a = a[:, :, ::-1]
    a = np.rot90(a, p.rot90_k, axes=(1, 2))
    a = np.ascontiguousarray(a)
    return jitter_hsv(a, p.hsv_shift) if any(p.hsv_shift) else a


params_strategy = augment_params(saturation_value=0.9)


@given(
    hw=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    params=params_strategy,
    region=st.tuples(st.integers(-4, 16), st.integers(-4, 16), st.integers(0, 16), st.integers(0, 16)),
    seed=st.integers(0, 2**16),
)
def test_augmented_reads_equal_the_whole_image_transform(hw, params, region, seed):
    image = np.random.default_rng(seed).integers(0, 256, size=(3, *hw), dtype=np.uint8)
    view = AugmentedView(ArrayImage(image), params)
    expected = whole_transform(image, params)  # (3, H', W')
    assert view.shape == expected.shape
    got = view.read(*region)
    assert got.shape == (3, region[2], region[3]) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, ArrayImage(expected).read(*region))


def test_augmented_view_never_reads_outside_the_region():
    """Lazy: each read asks the source only for the pixels it needs."""

    class Spy(ArrayImage):
        def __init__(self, a):
            super().__init__(a)
            self.areas = []

        def read(self, y, x, h, w):
            self.areas.append(h * w)
            return super().read(y, x, h, w)

    spy = Spy(np.zeros((3, 50, 70), np.uint8))
    view = AugmentedView(spy, flip_v=True, rot90_k=1)
    view.read(10, 5, 8, 9)
    assert spy.areas == [72]


def test_transform_array_copies_only_what_torch_cannot_take():
    """Without flips or turns an array of any positive strides comes back itself (a reader's
    interleaved view, a window: no copy); with them, a copy without negative strides, equal to
    the NumPy transform of the whole image."""
    interleaved = np.random.default_rng(3).integers(0, 256, (6, 9, 3), dtype=np.uint8).transpose(2, 0, 1)
    window = np.random.default_rng(4).integers(0, 256, (3, 12, 15), dtype=np.uint8)[:, 2:8, 1:10]
    for a in (interleaved, window):
        assert not a.flags.c_contiguous
        assert AugmentedView(ArrayImage(a), AugmentParams()).transform_array(a) is a
        assert AugmentedView(ArrayImage(a), hsv_shift=(0.1, 0.0, 0.0)).transform_array(a) is a  # colour: not here
        for p in (AugmentParams(flip_v=True), AugmentParams(flip_h=True), AugmentParams(rot90_k=1)):
            got = AugmentedView(ArrayImage(a), p).transform_array(a)
            assert all(s >= 0 for s in got.strides) and not np.shares_memory(got, a)
            np.testing.assert_array_equal(got, whole_transform(a, p))
            torch.from_numpy(got)  # raises for negative strides

    class Interleaved(ArrayImage):  # reads like a slide reader
        def read(self, y, x, h, w):
            self.last = interleaved[:, y : y + h, x : x + w]
            return self.last

    source = Interleaved(interleaved)
    assert AugmentedView(source, AugmentParams()).read(1, 2, 4, 5) is source.last


def test_hsv_round_trip_and_colorsys():
    rgb = np.random.default_rng(0).random((3, 500)).astype(np.float32)
    hsv = rgb_to_hsv(rgb)
    for k in range(0, 500, 7):
        h, s, v = colorsys.rgb_to_hsv(*rgb[:, k])
        np.testing.assert_allclose(hsv[:, k], (h, s, v), atol=1e-6)
    np.testing.assert_allclose(hsv_to_rgb(hsv), rgb, atol=1e-6)
    pixels = np.random.default_rng(1).integers(0, 256, size=(3, 20, 20), dtype=np.uint8)
    np.testing.assert_array_equal(jitter_hsv(pixels, (0.0, 0.0, 0.0)), pixels)
    white = np.full((3, 2, 2), 255, np.uint8)
    np.testing.assert_array_equal(jitter_hsv(white, (0.3, 0.5, 0.0)), white)  # no hue, no saturation


def test_draw_augmentation_uses_a_fixed_number_of_draws():
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    draw_augmentation(a, flip=True, rot90=True, hue_shift=0.1)
    draw_augmentation(b, flip=False, rot90=False)
    assert a.random() == b.random()


@dataclass
class FakeSlideInput:
    """What AugmentedView.feature_mask reads from a SlideInput."""

    box: tuple[int, int, int, int]
    scale: tuple[float, float]
    thumbnail_mask: np.ndarray


@given(
    data=st.data(),
    params=params_strategy.map(lambda p: replace(p, hsv_shift=(0.0, 0.0, 0.0))),
    stride=st.integers(2, 5),
    scale=st.integers(1, 3),
)
def test_augmented_feature_mask_matches_per_pixel_brute_force(data, params, stride, scale):
    th, tw = data.draw(st.integers(2, 10)), data.draw(st.integers(2, 10))
    mask = np.random.default_rng(data.draw(st.integers(0, 999))).random((th, tw)) < 0.3
    H, W = th * scale, tw * scale  # working pixels of the whole slide
    y0, x0 = data.draw(st.integers(0, H - 1)), data.draw(st.integers(0, W - 1))
    h, w = data.draw(st.integers(1, H - y0)), data.draw(st.integers(1, W - x0))
    slide = FakeSlideInput((y0, x0, h, w), (float(scale), float(scale)), mask)
    view = AugmentedView(ArrayImage(np.zeros((3, h, w), np.uint8)), params)
    fh, fw = -(-view.shape[1] // stride), -(-view.shape[2] // stride)
    got = view.feature_mask(slide, (fh, fw), stride)
    assert got.shape == (1, fh, fw) and got.dtype == torch.bool

    expected = np.zeros((fh, fw), bool)
    for a in range(fh * stride):
        for b in range(fw * stride):
            ys, xs, _, _ = view.source_region(a, b, 1, 1)  # this augmented pixel in the crop's frame
            ty, tx = (y0 + ys) // scale, (x0 + xs) // scale
            if 0 <= ty < th and 0 <= tx < tw and mask[ty, tx]:
                expected[a // stride, b // stride] = True
    np.testing.assert_array_equal(got[0].numpy(), expected)


# ============================================================================ metrics
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5)), min_size=1, max_size=40))
def test_roc_auc_equals_pair_counting(pairs):
    labels, scores = [p[0] for p in pairs], [p[1] / 5 for p in pairs]  # few distinct scores: ties
    fast, slow = roc_auc(labels, scores), roc_auc_pairs(labels, scores)
    if 0 < sum(labels) < len(labels):
        assert abs(fast - slow) <= 1e-12
    else:
        assert np.isnan(fast) and np.isnan(slow)


def test_metrics_values_and_errors():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    assert accuracy([0, 1, 1], [0.2, 0.5, 0.4]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0, 1], [0.1, float("nan")])


# ============================================================================ config
def test_config_json_round_trip_and_errors(tmp_path):
    config = TrainConfig(data_dir="d", out_dir="o", model=ModelConfig(width=4), exclude=["a", "b"], grad_clip=1.0)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config.to_dict()))
    assert load_config(path) == config
    assert config_from_dict({"epochs": 3, "model": {"width": 8}}) == TrainConfig(epochs=3, model=ModelConfig(width=8))
    with pytest.raises(ValueError, match="unknown key.*'epoch'"):
        config_from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="model: unknown key.*'widht'"):
        config_from_dict({"model": {"widht": 3}})
    with pytest.raises(ValueError, match="lr must be float or int"):
        config_from_dict({"lr": "fast"})
    with pytest.raises(ValueError, match="accumulate must be int"):
        config_from_dict({"accumulate": True})
    (tmp_path / "bad.json").write_text("{epochs: 3")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_validate_lists_every_problem():
    with pytest.raises(ValueError) as e:
        validate_config(TrainConfig(mpp=-1, amp="fp8", accumulate=0, model=ModelConfig(tile_size=8)))
    text = str(e.value)
    for fragment in (
        "data_dir is required",
        "out_dir is required",
        "mpp must be > 0",
        "accumulate must be >= 1",
        "amp must be one of",
        "model.tile_size (--tile-size) 8 is smaller than the smallest tile",
    ):
        assert fragment in text


def test_demo_config_is_valid():
    from torch_impl.pipeline.demo import demo_config

    config = validate_config(demo_config("data", "out"))
    assert config.head_only_epochs < config.epochs  # both phases of the recipe


# ============================================================================ orders
def test_epoch_order_is_balanced_and_deterministic():
    from torch_impl.slides import SlideRecord

    records = [SlideRecord(f"normal_{i}", Path(f"n{i}"), 0, "train") for i in range(7)]
    records += [SlideRecord(f"tumor_{i}", Path(f"t{i}"), 1, "train") for i in range(3)]
    order = epoch_order(records, epoch=4, seed=1)
    assert len(order) == 14 and sum(r.label for r in order) == 7
    assert {r.slide_id for r in order if r.label == 0} == {f"normal_{i}" for i in range(7)}
    assert order == epoch_order(list(reversed(records)), epoch=4, seed=1)  # input order irrelevant
    assert order != epoch_order(records, epoch=5, seed=1)
    assert sorted(r.slide_id for r in epoch_order(records, 0, 0, "shuffle")) == sorted(r.slide_id for r in records)


@given(n=st.integers(1, 30), world=st.integers(1, 5))
def test_shard_gives_every_rank_the_same_count_and_covers_the_order(n, world):
    parts = [shard(list(range(n)), r, world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1
    assert set().union(*parts) == set(range(n))
    assert sum(len(p) for p in parts) == n + (-n % world)


def test_phases_freeze_the_trunk_and_set_the_backward_tile():
    from torch_impl.models.streaming_clam import build_model
    from torch_impl.pipeline.train import _set_phase, learning_rate_factor

    config = TrainConfig(
        epochs=4,
        head_only_epochs=2,
        phase2_tile_size=640,
        lr_schedule="cosine",
        model=ModelConfig(width=2, tile_size=1024, backward_tile_size=800),
    )
    model = build_model(config.model)
    assert _set_phase(model, config, 1) == 1
    assert not model.trunk_trainable and model.trunk.backward_tile_size == 800
    assert _set_phase(model, config, 2) == 2
    assert model.trunk_trainable and model.trunk.backward_tile_size == 640 and model.trunk.tile_size == 1024
    assert [learning_rate_factor(config, e) for e in (0, 2)] == [1.0, pytest.approx(0.5)]


# ============================================================================ checkpoints
def _tiny_state():
    return {"model": {"w": torch.arange(4.0)}, "model_config": {"width": 2}, "epoch": 3}


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, **_tiny_state())
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, **{**_tiny_state(), "epoch": 4})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 3


def test_corrupt_checkpoint_error_names_the_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(path)
    save_checkpoint(path, **_tiny_state())
    path.write_bytes(path.read_bytes()[:-50])  # truncated
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_calibrate_batchnorm_standardises_every_batchnorm_input():
    from torch_impl.models.resnet import freeze_batchnorm, resnet34, trunk

    torch.manual_seed(0)
    body = freeze_batchnorm(trunk(resnet34(width=2)))
    x = torch.rand(2, 3, 64, 64)
    calibrate_batchnorm(body, x)
    stats = []
    hooks = [
        m.register_forward_pre_hook(lambda m, i: stats.append((i[0], m)))
        for m in body.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        body(x)
    for h in hooks:
        h.remove()
    assert len(stats) == 36
    for inp, bn in stats:
        z = (inp - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None])
        torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(z.shape[1]), atol=1e-4, rtol=0)


# ============================================================================ training runs
@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """6 training slides (3 normal, 3 tumour), 1024 x 1024 px at 0.25 um/px; no test slides."""
    root = tmp_path_factory.mktemp("train_data")
    make_demo_data(root, n_normal=3, n_tumor=3, n_test_normal=0, n_test_tumor=0, size=(1024, 1024), seed=3)
    return root


#: tiny_config(data_root, out, **changes): width-4 ResNet-34 at 1 um/px for 2 epochs; on
#: data_root, 2 + 2 training and 1 + 1 validation slides.
tiny_config = functools.partial(tiny_train_config, width=4, epochs=2)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_epochs_write_the_run_folder_and_the_loss_goes_down(data_root, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    config = tiny_config(
        data_root,
        out,
        head_only_epochs=2,
        flip=False,
        rot90=False,
        hue_shift=0.0,
        saturation_scale=0.0,
        value_scale=0.0,
    )
    result = train(config)
    for name in ("config.json", "splits.csv", "metrics.csv", "last.pt", "best.pt"):
        assert (out / name).is_file(), name
    assert load_config(out / "config.json") == config
    rows = read_metrics(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # no augmentation, whole-tissue crops: both epochs see the same four slides
    # (measured: 0.688 -> 0.636; deterministic, seeded)
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"]) - 0.02
    assert result["epochs"] == 2 and int(rows[0]["train_slides"]) == 4 and int(rows[0]["val_slides"]) == 2
    assert "epoch 2/2" in caplog.text

    state = load_checkpoint(out / "last.pt")
    assert state["epoch"] == 2 and state["slide_index"] == 0 and state["train_config"]["mpp"] == 1.0
    caplog.clear()
    model, model_config = load_model(out / "best.pt")
    assert isinstance(model, StreamingCLAM) and model_config == config.model
    assert "no weights given" not in caplog.text  # load_model builds without the random-init warning

    with pytest.raises(TrainingError, match="already holds last.pt"):
        train(config)
    assert train(config, resume=True)["epochs"] == 2  # finished: nothing left to do
    with pytest.raises(TrainingError, match="no last.pt"):
        train(tiny_config(data_root, tmp_path / "other"), resume=True)


def test_resume_mid_epoch_is_bitwise_identical(data_root, tmp_path):
    # augmentation on and random crops (max_size below the tissue size): every random
    # stream must be restored for the weights to agree bit for bit.
    changes = dict(epochs=3, head_only_epochs=1, max_size=150, checkpoint_every=2, accumulate=1, lr_schedule="cosine")
    reference = tiny_config(data_root, tmp_path / "reference", **changes)
    train(reference)

    class Interrupted(Exception):
        pass

    seen = []

    def interrupt_at_slide_7(event):  # raised before slide 7's step: epoch 2, after its checkpoint at slide 2
        seen.append(event)
        if len(seen) == 7:
            raise Interrupted

    interrupted = tiny_config(data_root, tmp_path / "interrupted", **changes)
    with pytest.raises(Interrupted):
        train(interrupted, on_slide=interrupt_at_slide_7)
    state = load_checkpoint(tmp_path / "interrupted" / "last.pt")
    assert (state["epoch"], state["slide_index"]) == (1, 2)
    train(interrupted, resume=True)

    a, b = weights(tmp_path / "reference" / "last.pt"), weights(tmp_path / "interrupted" / "last.pt")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra = read_metrics(tmp_path / "reference" / "metrics.csv")
    rb = read_metrics(tmp_path / "interrupted" / "metrics.csv")
    for x, y in zip(ra, rb, strict=True):
        assert x["train_loss"] == y["train_loss"] and x["val_loss"] == y["val_loss"]
    sa = load_checkpoint(tmp_path / "reference" / "last.pt")["optimizer"]["state"]
    sb = load_checkpoint(tmp_path / "interrupted" / "last.pt")["optimizer"]["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)


def test_nan_loss_stops_naming_the_slide_and_keeps_the_checkpoint(data_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = tiny_config(data_root, out, epochs=2)
    snapshot = {}

    def on_slide(event):
        if event["epoch"] == 1 and "bytes" not in snapshot:
            snapshot["bytes"] = (out / "last.pt").read_bytes()
            snapshot["slide"] = event["slide_id"]

    real_loss = StreamingCLAM.loss
    calls = {"n": 0}

    def poisoned_loss(self, output, label):
        loss = real_loss(self, output, label)
        if self.training:  # validation runs in eval mode
            calls["n"] += 1
            if calls["n"] == 6:  # 4 slides per epoch: the second slide of epoch 2
                return loss * float("nan")
        return loss

    monkeypatch.setattr(StreamingCLAM, "loss", poisoned_loss)
    with pytest.raises(NonFiniteLossError) as e:
        train(config, on_slide=on_slide)
    order = load_checkpoint(out / "last.pt")  # the epoch-1 checkpoint, untouched
    assert (out / "last.pt").read_bytes() == snapshot["bytes"] and order["epoch"] == 1
    message = str(e.value)
    assert "non-finite training loss" in message and "epoch 2, position 1" in message
    assert ".tif" in message and "_00" in message  # names the slide id and file
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def _write_splits(path: Path, rows: list[tuple[str, int, str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "label", "split"])
        writer.writerows(rows)


@pytest.mark.parametrize("kind", ["corrupt", "no_tissue"])
def test_bad_slide_errors_naming_the_file_or_is_skipped(data_root, tmp_path, caplog, kind):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    bad = root / "training" / "tumor" / "tumor_002.tif"
    if kind == "corrupt":
        bad.write_bytes(b"this is not a TIFF file" * 100)
    else:
        write_pyramid_tiff(bad, np.full((512, 512, 3), 242, np.uint8), mpp=0.25)  # blank glass
    splits = tmp_path / "splits.csv"
    _write_splits(
        splits,
        [
            ("normal_001", 0, "train"),
            ("normal_002", 0, "train"),
            ("normal_003", 0, "val"),
            ("tumor_001", 1, "train"),
            ("tumor_002", 1, "train"),
            ("tumor_003", 1, "val"),
        ],
    )
    config = tiny_config(root, tmp_path / "strict", splits_csv=str(splits), epochs=1)
    with pytest.raises(BadSlideError, match="tumor_002.tif"):
        train(config)

    caplog.set_level(logging.WARNING)
    lenient = replace(config, out_dir=str(tmp_path / "lenient"), skip_bad_slides=True)
    train(lenient)
    rows = read_metrics(tmp_path / "lenient" / "metrics.csv")
    assert int(rows[0]["skipped"]) >= 1 and int(rows[0]["train_slides"]) >= 2
    assert "skipping" in caplog.text and "tumor_002.tif" in caplog.text
