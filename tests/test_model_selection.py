"""Model selection: which epoch best.pt holds (select_by, select_after_epoch), on resume too.

Oracles: a NumPy ranking over the rows of metrics.csv as read back from the file (argmin,
lexsort: written independently of the package's sort key), the rule the package used
before ``select_by`` existed (higher AUC wins, ties by lower loss, applied epoch by epoch as
the old training loop did), the epoch stored inside best.pt itself, and an uninterrupted run
(a resumed run must leave the same best.pt).

Training runs use the tiny synthetic data set of tests/test_train.py (3 normal + 3 tumour
slides, 1 + 1 for validation) and a width-4 ResNet-34 on one CPU thread.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.model_fixtures import tiny_train_config
from torch_impl.pipeline import train as train_module
from torch_impl.pipeline.checkpoint import load_checkpoint
from torch_impl.pipeline.config import CHOICES, TrainConfig, load_config, validate_config
from torch_impl.pipeline.resume import check_selection
from torch_impl.pipeline.runtime import PipelineError
from torch_impl.pipeline.selection import SELECT_RULES, effective_rule, select_epoch
from torch_impl.pipeline.train import _parser, main_train, train
from torch_impl.slides import SlideRecord, discover, make_demo_data, make_splits

pytestmark = pytest.mark.usefixtures("single_torch_thread")

NAN = math.nan


# ============================================================================ the oracles
def oracle_epoch(rows: list[dict], rule: str, after: int, has_validation: bool = True) -> int | None:
    """The epoch best.pt should hold, computed with NumPy from metrics rows (numbers or CSV strings)."""
    epochs = np.array([int(r["epoch"]) for r in rows])
    loss = np.array([float(r["val_loss"]) for r in rows])
    auc = np.array([float(r["val_auc"]) for r in rows])
    eligible = np.flatnonzero(epochs > after)
    if eligible.size == 0:
        return None
    if rule == "last" or not has_validation:
        return int(epochs[eligible].max())
    loss_rank = np.where(np.isnan(loss), np.inf, loss)[eligible]
    if rule == "val_loss":
        return int(epochs[eligible][np.argmin(loss_rank)])  # argmin: the first of equal minima
    # val_auc: the highest AUC (NaN lowest), then the lowest loss, then the earliest epoch
    auc_rank = np.where(np.isnan(auc), -np.inf, auc)[eligible]
    order = np.lexsort((epochs[eligible], loss_rank, -auc_rank))
    return int(epochs[eligible][order[0]])


def previous_rule_epoch(rows: list[dict]) -> int | None:
    """The selection before select_by existed: train.py's ``_is_better`` applied epoch by epoch."""
    best_epoch = best_auc = best_loss = None
    for row in rows:
        auc, loss = row["val_auc"], row["val_loss"]
        key = (auc if math.isfinite(auc) else -math.inf, -loss if math.isfinite(loss) else -math.inf)
        old_auc = best_auc if best_auc is not None else -math.inf
        old_loss = best_loss if best_loss is not None else math.inf
        if best_epoch is None or key > (old_auc, -old_loss):
            best_auc = auc if math.isfinite(auc) else None
            best_loss = loss if math.isfinite(loss) else None
            best_epoch = row["epoch"]
    return best_epoch


# values from small sets, so that ties and NaNs are common (as with 2 validation slides)
metric_rows = st.lists(
    st.tuples(st.sampled_from([0.05, 0.3, 0.3001, 0.7, NAN]), st.sampled_from([0.0, 0.5, 1.0, NAN])),
    min_size=0,
    max_size=12,
).map(lambda values: [{"epoch": i + 1, "val_loss": v[0], "val_auc": v[1]} for i, v in enumerate(values)])


# ============================================================================ the rule
@given(metric_rows, st.sampled_from(SELECT_RULES), st.integers(0, 13), st.booleans())
def test_select_epoch_agrees_with_the_numpy_oracle(rows, rule, after, as_csv_strings):
    if as_csv_strings:  # as csv.DictReader gives metrics.csv back
        rows = [{k: str(v) for k, v in r.items()} for r in rows]
    chosen = select_epoch(rows, rule, after)
    expected = oracle_epoch(rows, rule, after)
    assert (None if chosen is None else int(chosen["epoch"])) == expected
    if chosen is not None:
        assert int(chosen["epoch"]) > after


@given(metric_rows)
def test_val_auc_rule_is_the_rule_of_older_versions(rows):
    chosen = select_epoch(rows, "val_auc", 0)
    assert (None if chosen is None else chosen["epoch"]) == previous_rule_epoch(rows)


@given(metric_rows, st.sampled_from(SELECT_RULES), st.integers(0, 13))
def test_best_pt_written_when_the_newest_epoch_is_picked_ends_at_the_overall_pick(rows, rule, after):
    """The training loop writes best.pt whenever select_epoch over the epochs so far picks the
    newest one; the last epoch written must be the pick over all epochs."""
    written = None
    for n in range(1, len(rows) + 1):
        pick = select_epoch(rows[:n], rule, after)
        if pick is rows[n - 1]:
            written = pick["epoch"]
        else:  # the pick can only stay where it was
            assert (pick is None and written is None) or pick["epoch"] == written
    assert written == oracle_epoch(rows, rule, after)


def test_no_validation_slides_means_the_last_epoch_and_bad_rules_are_refused():
    assert effective_rule("val_loss", has_validation=False) == "last"
    assert effective_rule("val_auc", has_validation=True) == "val_auc"
    rows = [{"epoch": 1, "val_loss": 0.1, "val_auc": 1.0}, {"epoch": 2, "val_loss": 0.9, "val_auc": 0.0}]
    assert select_epoch(rows, "val_loss")["epoch"] == 1 and select_epoch(rows, "last")["epoch"] == 2
    assert select_epoch(rows, "val_auc", select_after_epoch=1)["epoch"] == 2
    assert select_epoch(rows, "val_auc", select_after_epoch=2) is None
    with pytest.raises(ValueError, match=r"select_by must be one of \['val_loss', 'val_auc', 'last'\], got 'auc'"):
        select_epoch(rows, "auc")
    with pytest.raises(ValueError, match="select_by must be one of"):
        effective_rule("best", True)
    with pytest.raises(ValueError, match="select_after_epoch must be >= 0"):
        select_epoch(rows, "last", -1)


# ============================================================================ configuration
def test_select_settings_are_validated_and_on_the_command_line():
    assert TrainConfig().select_by == "val_loss" and TrainConfig().select_after_epoch == 0
    assert CHOICES["select_by"] == SELECT_RULES
    base = TrainConfig(data_dir="d", out_dir="o", epochs=5)
    validate_config(replace(base, select_by="last", select_after_epoch=4))
    with pytest.raises(ValueError) as e:
        validate_config(replace(base, select_by="auc", select_after_epoch=5))
    message = str(e.value)
    assert "select_by must be one of ['val_loss', 'val_auc', 'last'], got 'auc'" in message
    assert "select_after_epoch (--select-after-epoch) 5 must be < epochs (5)" in message
    with pytest.raises(ValueError, match="select_after_epoch must be >= 0 epochs, got -1"):
        validate_config(replace(base, select_after_epoch=-1))

    help_text = _parser().format_help()
    assert "--select-by {val_loss,val_auc,last}" in help_text and "--select-after-epoch" in help_text
    args = _parser().parse_args(["--select-by", "last", "--select-after-epoch", "3"])
    assert (args.select_by, args.select_after_epoch) == ("last", 3)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--select-by", "auc"])


# ============================================================================ splits
def _records(n_normal: int, n_tumour: int) -> list[SlideRecord]:
    return [SlideRecord(f"normal_{i:03d}", Path(f"n{i}.tif"), 0, "train") for i in range(n_normal)] + [
        SlideRecord(f"tumor_{i:03d}", Path(f"t{i}.tif"), 1, "train") for i in range(n_tumour)
    ]


def test_each_class_with_two_or_more_slides_gets_a_validation_slide(tmp_path):
    def val_counts(records):
        return [sum(r.split == "val" and r.label == label for r in records) for label in (0, 1)]

    # round(2 * 0.2) = 0: each class still gets one; round(5 * 0.2) = 1 stays 1; a lone slide stays training
    assert val_counts(make_splits(_records(2, 2), tmp_path / "a.csv", 0.2, seed=0)) == [1, 1]
    assert val_counts(make_splits(_records(1, 5), tmp_path / "b.csv", 0.2, seed=0)) == [0, 1]
    assert val_counts(make_splits(_records(20, 15), tmp_path / "c.csv", 0.2, seed=0)) == [4, 3]
    assert val_counts(make_splits(_records(4, 4), tmp_path / "d.csv", 0.0, seed=0)) == [0, 0]

    # an existing splits.csv (here one the earlier rule wrote: no validation slide) is read back unchanged
    old = tmp_path / "old.csv"
    old.write_text("slide,label,split\nnormal_000,0,train\nnormal_001,0,train\ntumor_000,1,train\ntumor_001,1,train\n")
    before = old.read_bytes()
    assert val_counts(make_splits(_records(2, 2), old, 0.2, seed=0)) == [0, 0]
    assert old.read_bytes() == before


# ============================================================================ training runs
@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """6 training slides (3 normal, 3 tumour), 1024 x 1024 px at 0.25 um/px; no test slides."""
    root = tmp_path_factory.mktemp("select_data")
    make_demo_data(root, n_normal=3, n_tumor=3, n_test_normal=0, n_test_tumor=0, size=(1024, 1024), seed=3)
    return root


#: width-4 ResNet-34, 3 epochs (the first head only), 2 + 2 training and 1 + 1 validation slides
tiny_config = functools.partial(tiny_train_config, width=4, epochs=3, head_only_epochs=1)


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


#: Validation metrics of epochs 1-4 on which the rules disagree (the tiny runs' own validation
#: loss falls every epoch, so every rule would pick the last one): val_loss picks 3; val_auc
#: picks 1 (AUC 1 in epochs 1, 2, 4; lowest loss among them), 4 with epoch 1 excluded.
SCRIPT_LOSS = [0.3, 0.5, 0.2, 0.4]
SCRIPT_AUC = [1.0, 1.0, 0.5, 1.0]
REAL_VALIDATE = train_module.validate


def script_validation(monkeypatch, losses: list[float], aucs: list[float]) -> None:
    """Training's validation runs as usual, but reports ``losses[i]`` and ``aucs[i]`` on its
    i-th call (counted across train() calls in this test: a resume continues the count)."""
    calls = []

    def scripted(*args, **kwargs):
        result = REAL_VALIDATE(*args, **kwargs)
        i = len(calls)
        calls.append(i)
        return {**result, "val_loss": losses[i], "val_auc": aucs[i]}

    monkeypatch.setattr(train_module, "validate", scripted)


def weights_per_epoch(out: Path) -> tuple[dict[int, dict], object]:
    """({epoch: model weights at its end}, on_slide): on_slide reads last.pt (written at the
    end of each epoch) at the first slide of the next epoch, before that slide's step."""
    snapshots: dict[int, dict] = {}

    def on_slide(event):
        if event["position"] == 0 and event["epoch"] > 0:
            state = load_checkpoint(out / "last.pt")
            assert state["epoch"] == event["epoch"] and state["slide_index"] == 0
            snapshots[event["epoch"]] = state["model"]

    return snapshots, on_slide


def equal_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("rule", "after", "expected"), [("val_loss", 0, 3), ("val_auc", 0, 1), ("val_auc", 1, 4), ("last", 2, 4)]
)
def test_best_pt_is_the_epoch_the_rule_picks_from_metrics_csv(
    data_root, tmp_path, caplog, monkeypatch, rule, after, expected
):
    caplog.set_level(logging.INFO)
    script_validation(monkeypatch, SCRIPT_LOSS, SCRIPT_AUC)
    out = tmp_path / "run"
    snapshots, on_slide = weights_per_epoch(out)
    best_pt_after_epoch_1 = []

    def on_slide_and_look(event):
        on_slide(event)
        if event["epoch"] == 1 and event["position"] == 0:
            best_pt_after_epoch_1.append((out / "best.pt").exists())

    config = tiny_config(data_root, out, epochs=4, select_by=rule, select_after_epoch=after)
    result = train(config, on_slide=on_slide_and_look)
    snapshots[4] = load_checkpoint(out / "last.pt")["model"]

    rows = read_metrics(out / "metrics.csv")
    assert [float(r["val_loss"]) for r in rows] == SCRIPT_LOSS
    assert oracle_epoch(rows, rule, after) == expected  # the script does what its comment says
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == best["best_epoch"] == result["best_epoch"] == int(rows[-1]["best_epoch"]) == expected
    assert equal_weights(best["model"], snapshots[expected])  # best.pt holds that epoch's network
    assert [r["select_by"] for r in rows] == [rule] * 4 and result["select_by"] == best["select_by"] == rule
    metric = {"val_loss": "val_loss", "val_auc": "val_auc", "last": "epoch"}[rule]
    assert result["best_value"] == pytest.approx(float(rows[expected - 1][metric]))
    assert result["best_val_loss"] == pytest.approx(SCRIPT_LOSS[expected - 1])
    assert f"best.pt: epoch {expected} of 4, selected by {rule}" in caplog.text
    # epochs <= after are never eligible: no best.pt after epoch 1 when it is excluded
    assert best_pt_after_epoch_1 == [after == 0] and (rows[0]["best_epoch"] == "") == (after > 0)
    # a head-only epoch as best.pt of a run that trained its trunk later is worth a warning
    assert ("a head-only epoch" in caplog.text) == (expected == 1)
    # 1 + 1 validation slides: the AUC is coarse, and the log says so
    assert "validation slides per class {0: 1, 1: 1}" in caplog.text and "at most 3 values" in caplog.text
    assert ("--select-by val_loss ranks by it directly" in caplog.text) == (rule == "val_auc")


def test_resumed_run_leaves_the_best_pt_of_an_uninterrupted_run(data_root, tmp_path, monkeypatch):
    losses, aucs = [0.3, 0.1, 0.2], [1.0, 1.0, 1.0]  # best.pt: epoch 2, before the interruption in epoch 3
    changes = dict(select_by="val_loss", checkpoint_every=2)
    script_validation(monkeypatch, losses, aucs)
    train(tiny_config(data_root, tmp_path / "reference", **changes))

    class Interrupted(Exception):
        pass

    def stop_in_epoch_3(event):
        if event["epoch"] == 2 and event["position"] == 3:
            raise Interrupted

    script_validation(monkeypatch, losses, aucs)
    interrupted = tiny_config(data_root, tmp_path / "interrupted", **changes)
    with pytest.raises(Interrupted):
        train(interrupted, on_slide=stop_in_epoch_3)
    assert load_checkpoint(tmp_path / "interrupted" / "last.pt")["epoch"] == 2
    train(interrupted, resume=True)

    a, b = tmp_path / "reference", tmp_path / "interrupted"
    ra, rb = read_metrics(a / "metrics.csv"), read_metrics(b / "metrics.csv")
    assert [{**r, "seconds": ""} for r in ra] == [{**r, "seconds": ""} for r in rb]
    assert load_checkpoint(b / "best.pt")["epoch"] == load_checkpoint(a / "best.pt")["epoch"] == 2
    assert oracle_epoch(rb, "val_loss", 0) == 2
    assert equal_weights(load_checkpoint(a / "best.pt")["model"], load_checkpoint(b / "best.pt")["model"])


def _make_old_run(run: Path) -> None:
    """Turn a run folder into one an older version wrote: no select_by, select_after_epoch, or
    the state and metrics fields that record the rule."""
    config = json.loads((run / "config.json").read_text())
    for key in ("select_by", "select_after_epoch"):
        del config[key]
    (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run / name)
        for key in ("select_by", "select_after_epoch"):
            del state["train_config"][key]
        for key in ("select_by", "best_value"):
            del state[key]
        for row in state["history"]:
            del row["best_epoch"], row["select_by"]
        torch.save(state, run / name)


def test_an_older_run_resumes_with_its_own_rule(data_root, tmp_path, caplog, restore_logging):
    out = tmp_path / "run"
    train(tiny_config(data_root, out, epochs=2, select_by="val_auc"))  # the only rule of older versions
    _make_old_run(out)
    caplog.set_level(logging.INFO)
    assert main_train(["--resume", "--out", str(out), "--epochs", "3", "-q"]) == 0
    assert load_config(out / "config.json").select_by == "val_auc"
    assert "no longer an exact continuation" not in caplog.text  # epochs may change; nothing else did
    rows = read_metrics(out / "metrics.csv")
    assert [r["select_by"] for r in rows] == ["", "", "val_auc"]  # the older rows have no record
    assert load_checkpoint(out / "best.pt")["epoch"] == oracle_epoch(rows, "val_auc", 0)


def test_resume_refuses_a_selection_change_that_best_pt_does_not_satisfy(data_root, tmp_path, caplog):
    out = tmp_path / "run"
    config = tiny_config(data_root, out, epochs=2, select_by="last")
    train(config)
    before = {name: (out / name).read_bytes() for name in ("last.pt", "best.pt", "config.json", "metrics.csv")}
    with pytest.raises(PipelineError) as e:  # epochs 1-2 excluded: no epoch yet, but best.pt holds epoch 2
        train(replace(config, epochs=4, select_after_epoch=2), resume=True)
    message = str(e.value)
    assert "select_after_epoch 0 -> 2" in message and "the new rule picks no epoch yet" in message
    assert "best.pt holds epoch 2" in message and "--select-by last --select-after-epoch 0" in message
    assert {name: (out / name).read_bytes() for name in before} == before  # nothing written

    # a change that the finished epochs agree with is accepted: "last" -> epochs 1 excluded still picks 2
    caplog.set_level(logging.INFO)
    result = train(replace(config, epochs=3, select_after_epoch=1), resume=True)
    assert "over the 2 finished epochs it picks epoch 2" in caplog.text
    assert result["best_epoch"] == 3 == load_checkpoint(out / "best.pt")["epoch"]


def _ckpt(rows: list[tuple[float, float]], best_epoch: int | None, **train_config) -> dict:
    history = [{"epoch": i + 1, "val_loss": loss, "val_auc": auc} for i, (loss, auc) in enumerate(rows)]
    return {"history": history, "best_epoch": best_epoch, "train_config": train_config}


def test_check_selection_accepts_exactly_the_changes_best_pt_satisfies(tmp_path):
    config = TrainConfig(select_by="val_loss", select_after_epoch=0)
    last = tmp_path / "last.pt"
    rows = [(0.2, 1.0), (0.5, 1.0), (0.1, 0.5)]  # val_loss picks 3; val_auc (ties: loss) picks 1
    check_selection(_ckpt(rows, 3, select_by="last", select_after_epoch=0), config, last, True)  # 3 == 3
    check_selection(_ckpt(rows, 3, select_by="val_loss", select_after_epoch=0), config, last, True)  # no change
    check_selection(_ckpt(rows, 3), replace(config, select_by="last"), last, False)  # no validation: last
    with pytest.raises(PipelineError, match="the new rule picks epoch 3, but best.pt holds epoch 1") as e:
        check_selection(_ckpt(rows, 1), config, last, True)  # an older run's checkpoint: val_auc picked 1
    assert "select_by 'val_auc' -> 'val_loss'" in str(e.value) and "--select-by val_auc" in str(e.value)
    with pytest.raises(PipelineError, match="picks epoch 1, but no best.pt was written yet"):
        check_selection(_ckpt(rows[:1], None, select_by="val_loss", select_after_epoch=1), config, last, True)


def test_a_class_without_validation_slides_is_warned_about_and_the_split_kept(data_root, tmp_path, caplog):
    splits = tmp_path / "splits.csv"
    ids = sorted(r.slide_id for r in discover(data_root, include_test=False))
    splits.write_text(
        "slide,label,split\n"
        + "".join(f"{s},{0 if s.startswith('normal') else 1},{'val' if s == 'tumor_001' else 'train'}\n" for s in ids)
    )
    before = splits.read_bytes()
    caplog.set_level(logging.WARNING)
    result = train(tiny_config(data_root, tmp_path / "run", epochs=1, splits_csv=str(splits)))
    assert "validation slides per class {0: 0, 1: 1}" in caplog.text and "undefined (NaN)" in caplog.text
    assert splits.read_bytes() == before
    assert result["best_epoch"] == 1 and math.isnan(result["val_auc"])
