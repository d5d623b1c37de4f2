"""benchmarks/resolution_study.py on a tiny configuration: its numbers recomputed from the files it wrote.

The oracles are independent of the study's own aggregation: AUCs by counting (tumour, normal)
pairs of the written predictions, the attention AUC by the heatmap path that the demo uses
(``write_heatmap`` on the saved attention), results.csv read back as text.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from torch_impl.pipeline.heatmap import write_heatmap
from torch_impl.pipeline.predict import load_prediction
from torch_impl.slides import Slide, discover, make_demo_data

pytestmark = pytest.mark.usefixtures("single_torch_thread")

ROOT = Path(__file__).resolve().parent.parent


def _load_study():
    spec = importlib.util.spec_from_file_location("resolution_study", ROOT / "benchmarks" / "resolution_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


study = _load_study()

#: The tiny study: two resolutions, one seed, both methods, width 4, two epochs.
TINY = dict(
    resolutions=(2.0, 1.0),
    seeds=(0,),
    width=4,
    epochs=3,
    head_only_epochs=1,
    max_size=512,
    tile_size=1024,
    val_fraction=0.34,
    n_bootstrap=200,
    jobs=1,
)
#: Made-up lesion categories of the test tumour slides (the study reads them from lesions.csv).
CATEGORY_OF_TUMOUR = ("micro", "macro", "micro")


def pair_auc(labels, scores) -> float:
    """AUC by counting: P(tumour score > normal score) + P(tie) / 2."""
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    data = out / "slides"
    records = make_demo_data(data, n_normal=3, n_tumor=3, n_test_normal=3, n_test_tumor=3, size=(1024, 1024))
    tumours = [r.slide_id for r in records if r.split == "test" and r.label == 1]
    with open(data / "lesions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "split", "label", "category"])
        for r in records:
            category = CATEGORY_OF_TUMOUR[tumours.index(r.slide_id)] if r.slide_id in tumours else "none"
            writer.writerow([r.slide_id, r.split, r.label, category])
    rows = study.run_study(out_dir=out, data_dir=data, **TINY)
    return out, data, rows


def test_one_row_per_run_and_results_csv_reads_back(study_run):
    out, _, rows = study_run
    assert [(r["method"], r["mpp"], r["seed"]) for r in rows] == [
        (m, mpp, 0) for mpp in TINY["resolutions"] for m in study.METHODS
    ]
    written = read_csv(out / "results.csv")
    assert list(written[0]) == list(study.RESULT_COLUMNS)
    for row, text in zip(rows, written):
        for key in study.RESULT_COLUMNS:
            value = row[key]
            if value is None:
                assert text[key] == "", key
            elif isinstance(value, float):
                assert float(text[key]) == value, key
            else:
                assert text[key] == str(value), key


def test_aucs_equal_pair_counting_of_the_written_predictions(study_run):
    out, _, rows = study_run
    for row in rows:
        preds = read_csv(out / row["run_dir"] / "eval" / "predictions.csv")
        labels = [int(p["label"]) for p in preds]
        scores = [float(p["prob_tumor"]) for p in preds]
        assert row["n_test"] == 6 and row["n_test_tumor"] == 3
        assert row["test_auc"] == pytest.approx(pair_auc(labels, scores), abs=1e-12)
        assert row["test_auc_ci_low"] <= row["test_auc"] <= row["test_auc_ci_high"]
        by_id = {p["slide_id"]: (int(p["label"]), float(p["prob_tumor"])) for p in preds}
        tumours = sorted(s for s, (y, _) in by_id.items() if y == 1)
        normals = [p for y, p in by_id.values() if y == 0]
        for category in ("micro", "macro"):
            chosen = [by_id[s][1] for s, c in zip(tumours, CATEGORY_OF_TUMOUR) if c == category]
            expected = pair_auc([1] * len(chosen) + [0] * len(normals), chosen + normals)
            assert row[f"n_{category}"] == len(chosen)
            assert row[f"auc_{category}"] == pytest.approx(expected, abs=1e-12)
        assert row["auc_itc"] is None and row["n_itc"] == 0


def test_trunk_frozen_only_in_the_baseline(study_run):
    """head_only's evaluated weights keep the trunk of its initialisation; end_to_end's moved."""
    from torch_impl.pipeline.checkpoint import load_checkpoint

    out, _, rows = study_run
    for mpp in TINY["resolutions"]:
        trunks = {}
        for method in study.METHODS:
            run = next(r for r in rows if r["method"] == method and r["mpp"] == mpp)
            state = load_checkpoint(out / run["run_dir"] / "train" / run["checkpoint"])["model"]
            trunks[method] = {k: v for k, v in state.items() if k.startswith("trunk.") and v.is_floating_point()}
            history = read_csv(out / run["run_dir"] / "train" / "metrics.csv")
            eligible = [h for h in history if int(h["epoch"]) > TINY["head_only_epochs"]]
            best = min(eligible, key=lambda h: float(h["val_loss"]))  # --select val_loss (default)
            assert run["checkpoint"] == "best.pt" and run["selected_epoch"] == int(best["epoch"])
        changed = [
            k for k in trunks["head_only"] if not np.array_equal(trunks["head_only"][k], trunks["end_to_end"][k])
        ]
        assert changed, "end_to_end's trunk equals the frozen baseline's: the trunk never trained"


def test_attention_auc_is_the_heatmaps(study_run, tmp_path):
    out, data, rows = study_run
    annotated = [r for r in discover(data) if r.split == "test" and r.annotation_path is not None]
    assert any(r["n_attention_slides"] for r in rows if r["mpp"] == min(TINY["resolutions"])), (
        "no attention AUC defined: the test tests nothing"
    )
    for row in [r for r in rows if r["mpp"] == min(TINY["resolutions"])]:  # the most cells per slide
        values = []
        for record in annotated:
            pred = load_prediction(out / row["run_dir"] / "eval" / "attention" / f"{record.slide_id}.npy")
            drawn = write_heatmap(
                pred, tmp_path / row["run_dir"], annotation=record.annotation_path, thumbnail_size=128
            )
            if drawn["attention_auc"] is not None:
                values.append(drawn["attention_auc"])
        assert row["n_attention_slides"] == len(values)
        if values:
            assert row["attention_auc"] == pytest.approx(np.mean(values), abs=1e-12)
        else:
            assert row["attention_auc"] is None


def test_summary_table_and_figure(study_run):
    out, _, rows = study_run
    text = (out / "summary.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| end_to_end") or line.startswith("| head_only")]
    assert len(table) == len(rows)
    for row, line in zip(rows, table):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == row["method"] and float(cells[1]) == row["mpp"]
        # one seed: the pooled predictions are the run's, so pooled AUC and interval are the run's
        assert cells[3] == cells[2] == f"{row['test_auc']:.3f}"
        assert cells[4] == f"{row['test_auc']:.3f} ({row['test_auc_ci_low']:.3f}-{row['test_auc_ci_high']:.3f})"
    assert "machine:" in text and "torch" in text and "wall time" in text
    with Image.open(out / "auc_vs_resolution.png") as png:
        assert png.format == "PNG" and min(png.size) > 100
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_pooled_interval_of_two_seeds(study_run):
    """summarise pools the seeds' predictions: with the same run given twice, the pooled AUC
    is the run's (pairs across copies tie exactly as within one)."""
    out, _, rows = study_run
    twice = [rows[0], {**rows[0], "seed": 1}]
    (entry,) = study.summarise(twice, out, n_bootstrap=200)
    assert entry["aucs"] == [rows[0]["test_auc"]] * 2 and entry["mean_auc"] == rows[0]["test_auc"]
    assert entry["pooled_auc"] == pytest.approx(rows[0]["test_auc"], abs=1e-12)
    assert entry["pooled_ci_low"] <= entry["pooled_auc"] <= entry["pooled_ci_high"]


def _copy(out: Path, tmp_path: Path) -> Path:
    """A copy of the study folder, so that a test that writes into it leaves the others' alone."""
    copy = tmp_path / "study"
    shutil.copytree(out, copy)
    return copy


def test_a_second_call_reuses_the_runs(study_run, tmp_path):
    out, data, rows = study_run
    out = _copy(out, tmp_path)
    again = study.run_study(out_dir=out, data_dir=data, **{**TINY, "resolutions": (1.0,)})
    before = [r for r in rows if r["mpp"] == 1.0]
    assert [r["train_seconds"] for r in again] == [r["train_seconds"] for r in before]  # not trained again
    for a, b in zip(again, before):
        assert {k: v for k, v in a.items() if k != "eval_seconds"} == {
            k: v for k, v in b.items() if k != "eval_seconds"
        }


def test_command_line_prints_the_summary(study_run, tmp_path, capsys, restore_logging):
    out, data, rows = study_run
    out = _copy(out, tmp_path)
    argv = ["--out", str(out), "--data", str(data), "--resolutions", "2", "--seeds", "0", "--width", "4"]
    argv += ["--epochs", "3", "--head-only-epochs", "1", "--max-size", "512", "--tile-size", "1024"]
    argv += ["--val-fraction", "0.34", "--bootstrap", "200", "--jobs", "1", "-q"]
    assert study.main(argv) == 0  # the runs exist: evaluation only
    printed = capsys.readouterr().out
    assert printed == (out / "summary.md").read_text()
    assert len(read_csv(out / "results.csv")) == 2 and "| end_to_end | 2 |" in printed


def test_data_is_made_once_and_never_into_a_foreign_folder(tmp_path):
    config = study.StudyConfig(out_dir=tmp_path / "out", data_counts=(1, 1, 1, 1), slide_size=512, slide_mpp=0.5)
    root = study.ensure_data(config)
    assert root == tmp_path / "out" / "data"
    records = discover(root)
    assert sorted((r.split, r.label) for r in records) == [("test", 0), ("test", 1), ("train", 0), ("train", 1)]
    assert set(study.read_lesion_table(root)) == {r.slide_id for r in records}  # the harder set's lesions.csv
    with Slide(records[0].path) as slide:
        assert slide.mpp_level0 == pytest.approx((0.5, 0.5)) and slide.shape[1:] == (512, 512)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.tif")}
    assert study.ensure_data(config) == root  # reused, not rewritten
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.tif")} == stamps
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not slides")
    with pytest.raises(FileExistsError, match="new or empty folder"):
        study.ensure_data(dataclasses.replace(config, data_dir=foreign))


def test_command_line_refuses_bad_settings(tmp_path, capsys, restore_logging):
    assert study.main(["--out", str(tmp_path / "x"), "--epochs", "2", "--head-only-epochs", "2"]) == 2
    assert "head-only epochs < epochs" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_parallel_runs_give_the_same_rows(study_run, tmp_path):
    """--jobs 2: the runs in spawned processes give the rows of the serial study (training is
    seeded and deterministic on the CPU), in the same order."""
    out, data, rows = study_run
    parallel = study.run_study(
        out_dir=tmp_path / "parallel", data_dir=data, **{**TINY, "resolutions": (2.0,), "jobs": 2}
    )
    serial = [r for r in rows if r["mpp"] == 2.0]
    times = ("train_seconds", "eval_seconds")
    assert [{k: v for k, v in r.items() if k not in times} for r in parallel] == [
        {k: v for k, v in r.items() if k not in times} for r in serial
    ]
    assert len(read_csv(tmp_path / "parallel" / "results.csv")) == len(serial)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"head_only_epochs": 3, "epochs": 3}, "head-only epochs < epochs"),
        ({"resolutions": (0.0,)}, "--resolutions"),
        ({"methods": ("frozen",)}, "--methods"),
        ({"select": "best"}, "--select"),
        ({"jobs": 0}, "--jobs"),
        ({"difficulty": "hard"}, "--difficulty"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        study.run_study(out_dir=tmp_path / "never", **{**TINY, **changes})
    assert not (tmp_path / "never").exists()
