"""Does end-to-end training at higher resolution find smaller metastases? Test AUC against um/px.

    python benchmarks/resolution_study.py [--out DIR] [--data DIR] [--resolutions 8 4 2 1]
        [--seeds 0 1] [--width 16] [--epochs 10] [--head-only-epochs 5] [--jobs 2]
        [--quick] [--device DEV]            (--help lists the rest: data, recipe, selection)

1. A synthetic CAMELYON16 under ``DIR/data`` (made once, reused after): by default the
   harder set, ``make_demo_data(..., difficulty="camelyon")`` (small lesions whose cue is
   the nuclei's size and texture, with their sizes and category in ``lesions.csv``), its
   preset counts (24 + 16 training, 12 + 8 test slides) on 2 mm slides stored at 0.5 um/px
   (the set is painted at 0.5 um/px: finer level-0 pixels would only upsample it).
2. For every working resolution (um/px) and seed, two runs of the same recipe (the demo's:
   a narrow ResNet-34 with random initialisation and data-calibrated batch norms, a CLAM
   head; :func:`train_config`), trained by the pipeline's own ``train``:
     * ``end_to_end``: head only for ``head_only_epochs``, then the whole network;
     * ``head_only``: the trunk frozen throughout (head_only_epochs = epochs): the baseline
       that is not end to end (a CLAM head on fixed random features).
3. Each run's ``best.pt`` (``select_by`` = ``--select``, default the lowest validation loss,
   among the epochs after the head-only phase: ``select_after_epoch = head_only_epochs``
   for both methods) is evaluated on the test slides by the pipeline's own
   ``evaluate_run`` (whole slides, deterministic), then:
     * test AUC and its stratified bootstrap 95% interval (``bootstrap_auc_ci``);
     * attention AUC: for each annotated tumour test slide, the AUC of attention separating
       lesion cells from other tissue cells (the heatmap's definition:
       ``heatmap.attention_auc`` of ``heatmap.lesion_fraction``), averaged over the slides
       where it is defined;
     * AUC by lesion category (``lesions.csv``): tumour test slides of one category (itc,
       micro, macro) against all normal test slides.
4. ``DIR/results.csv`` (one row per run), ``DIR/summary.md`` (per method and resolution:
   AUC per seed, their mean, the bootstrap 95% interval of the *pooled* predictions of all
   seeds, attention AUC, AUC by category; the machine, torch version, date and wall time)
   and ``DIR/auc_vs_resolution.png``, each written atomically. Run folders are
   ``DIR/runs/<method>_<mpp>um_seed<seed>/{train,eval}``; a finished run is reused, an
   interrupted one resumed (a different recipe needs a new ``--out``).

The pooled interval: the predictions of all seeds of one method and resolution are put
together (each test slide once per seed) and ``bootstrap_auc_ci`` resamples them, tumour
and normal separately. It describes "a model of this recipe on a test slide"; since the
same slides repeat across seeds it is narrower than a slide-level interval would be (by up
to sqrt(seeds) when the seeds agree). Every run's own interval is in results.csv.

Cost (2-core CPU VM shared with other jobs, load 3-6, one torch thread per run, width 16;
20 epochs of 18 slides + 5 validation slides, 2 mm slides): 4 um/px 130 s head only and
260 s end to end, 1 um/px 1080 s and 1110 s; a phase-2 slide step at 1 um/px (crops
~1650 px) took ~3.5 s, a phase-1 step ~1.5 s. The defaults (preset counts, 10 epochs, two
seeds, two runs at a time, finest first) are sized from these to about 45 minutes on an
idle 2-core machine, data (~5 s a slide) included. ``--quick`` (1 mm slides, 4 and
1 um/px, width 8, one seed) took 2 minutes there.

Findings so far (exploratory runs, one seed, 20 test slides; AUC intervals +-0.25):
  * With the demo's trunk learning rate (lr x 0.1) the runs of the harder set collapsed at
    the switch to end-to-end training (training loss 0.55 -> 0.95, then constant
    predictions at chance; at 2 and 1 um/px). With x 0.01 they did not (test AUC 0.68 at
    2 um/px against 0.27): the default here is 0.01, for both methods alike.
  * The random trunk's features do not tell lesion cells from normal tissue cells at 1 or
    2 um/px (a linear probe on held-out slides: cell AUC 0.36-0.63), but start to at
    0.5 um/px (0.66-0.83): on this set the frozen-trunk baseline needs 0.5 um/px, and the
    end-to-end runs must learn the cue from 16 tumour slides in a few epochs, which a CPU
    budget hardly allows. The effect the study looks for is expected at <= 1 um/px with
    more epochs and slides, i.e. on a GPU.

Notebooks call :func:`run_study` (``quick=True`` for a few minutes on a CPU); it returns the
rows of results.csv as a list of dicts. On a GPU the same script scales up by its options
(``--device cuda --width 64 --resolutions 4 2 1 0.5 --epochs 30 --head-only-epochs 10 ...``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from torch_impl.models.streaming_clam import ModelConfig  # noqa: E402
from torch_impl.pipeline.config import TrainConfig  # noqa: E402
from torch_impl.pipeline.evaluate import evaluate_run  # noqa: E402
from torch_impl.pipeline.heatmap import attention_auc, lesion_fraction  # noqa: E402
from torch_impl.pipeline.logs import run_log, setup_logging  # noqa: E402
from torch_impl.pipeline.metrics import bootstrap_auc_ci, roc_auc  # noqa: E402
from torch_impl.pipeline.predict import load_prediction  # noqa: E402
from torch_impl.pipeline.runtime import atomic_write  # noqa: E402
from torch_impl.pipeline.selection import SELECT_RULES  # noqa: E402
from torch_impl.pipeline.train import train  # noqa: E402
from torch_impl.slides import Slide, SlideRecord, discover, make_demo_data, read_lesions  # noqa: E402
from torch_impl.slides.synthetic import DIFFICULTIES  # noqa: E402

logger = logging.getLogger("resolution_study")

#: The two methods: end to end (trunk trained after the head-only epochs), and the baseline
#: whose trunk stays frozen (random features, calibrated batch norms) for every epoch.
METHODS = ("end_to_end", "head_only")
#: Which checkpoint of a run is evaluated: best.pt under TrainConfig.select_by, i.e. the lowest
#: validation loss or the highest validation AUC among the epochs after the head-only phase
#: (select_after_epoch = head_only_epochs, for both methods alike), or the last epoch.
SELECT_CHOICES = SELECT_RULES
#: Lesion categories of lesions.csv that get their own AUC (tumour slides of the category
#: against all normal test slides).
CATEGORIES = ("itc", "micro", "macro")
#: Columns of results.csv, in order.
RESULT_COLUMNS = (
    "method",
    "mpp",
    "seed",
    "test_auc",
    "test_auc_ci_low",
    "test_auc_ci_high",
    "test_accuracy",
    "n_test",
    "n_test_tumor",
    "attention_auc",
    "n_attention_slides",
    *(f"auc_{c}" for c in CATEGORIES),
    *(f"n_{c}" for c in CATEGORIES),
    "checkpoint",
    "selected_epoch",
    "train_seconds",
    "eval_seconds",
    "run_dir",
)


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """What the study trains and evaluates (:func:`run_study`'s arguments; see the CLI's help).

    ``data_counts`` = (training normal, training tumour, test normal, test tumour) slides,
    ``slide_size`` (level-0 pixels, one side) and ``slide_mpp`` (level-0 um/px) are passed to
    ``make_demo_data``; None takes the generator's preset.
    """

    out_dir: Path = Path("resolution_study")
    data_dir: Path | None = None  # None: OUT/data, made if missing
    resolutions: tuple[float, ...] = (8.0, 4.0, 2.0, 1.0)  # working um/px
    seeds: tuple[int, ...] = (0, 1)
    methods: tuple[str, ...] = METHODS
    width: int = 16  # ResNet-34 base width
    epochs: int = 10
    head_only_epochs: int = 5  # end_to_end: head only for these epochs, then the whole network
    lr: float = 1e-3
    trunk_lr_factor: float = 0.01  # the demo's 0.1 made the harder set's runs collapse (module docstring)
    pool: str | None = None  # the head's pooling of the feature map: None (the demo's), "max", "avg"
    instance_loss: bool = False  # CLAM's instance-level clustering loss (off in StreamingCLAM)
    max_size: int = 4096  # largest training crop side, working pixels
    tile_size: int = 2048  # streaming tile side, working pixels
    val_fraction: float = 0.25
    select: str = "val_loss"  # SELECT_CHOICES
    data_counts: tuple[int, int, int, int] | None = None
    difficulty: str = "camelyon"  # make_demo_data's data set: "camelyon" (the harder set) or "demo"
    slide_size: int | None = 4096  # with slide_mpp: 2 mm slides, the harder preset's area
    slide_mpp: float | None = 0.5  # the harder set paints at 0.5 um/px: finer level-0 pixels add nothing
    data_seed: int = 0
    device: str = "cpu"
    threads: int = 1  # torch threads per run (one: the tensors are small; see pipeline/demo.py)
    jobs: int = 2  # runs at a time, each in its own process
    n_bootstrap: int = 2000

    def __post_init__(self) -> None:
        problems = []
        if not self.resolutions or min(self.resolutions) <= 0:
            problems.append(f"--resolutions must be one or more positive um/px, got {list(self.resolutions)}")
        if not self.seeds:
            problems.append("--seeds needs at least one seed")
        if not self.methods or set(self.methods) - set(METHODS):
            problems.append(f"--methods must be among {list(METHODS)}, got {list(self.methods)}")
        if self.epochs < 1 or not 0 <= self.head_only_epochs < self.epochs:
            problems.append(
                f"need epochs >= 1 and 0 <= head-only epochs < epochs (so that end_to_end trains the trunk), "
                f"got --epochs {self.epochs} --head-only-epochs {self.head_only_epochs}"
            )
        if self.select not in SELECT_CHOICES:
            problems.append(f"--select must be one of {list(SELECT_CHOICES)}, got {self.select!r}")
        if self.data_counts is not None and (len(self.data_counts) != 4 or min(self.data_counts) < 0):
            problems.append(f"--data-counts takes four counts >= 0, got {list(self.data_counts)}")
        if self.difficulty not in DIFFICULTIES:
            problems.append(f"--difficulty must be one of {list(DIFFICULTIES)}, got {self.difficulty!r}")
        if self.pool not in (None, "max", "avg"):
            problems.append(f"--pool must be none, max or avg, got {self.pool!r}")
        if self.threads < 1:
            problems.append(f"--threads must be >= 1, got {self.threads}")
        if self.jobs < 1:
            problems.append(f"--jobs must be >= 1, got {self.jobs}")
        if problems:
            raise ValueError("invalid study configuration:\n  " + "\n  ".join(problems))


#: --quick: a few minutes on a CPU (tutorial 06): two resolutions, one seed, a small data set.
QUICK = dict(
    resolutions=(4.0, 1.0),
    seeds=(0,),
    width=8,
    epochs=6,
    head_only_epochs=3,
    data_counts=(6, 6, 4, 4),
    slide_size=2048,  # 1 mm slides at 0.5 um/px
    jobs=1,
)


# ----------------------------------------------------------------------------- data
def _has_data(root: Path) -> bool:
    """Whether ``root`` holds training and test slides (a data set to reuse)."""
    if not root.is_dir() or not any(root.iterdir()):
        return False
    try:
        return {"train", "test"} <= {r.split for r in discover(root)}
    except (FileNotFoundError, ValueError):
        return False


def ensure_data(config: StudyConfig) -> Path:
    """The data folder, written first if it holds no data set (module docstring, step 1)."""
    root = config.data_dir if config.data_dir is not None else config.out_dir / "data"
    if _has_data(root):
        logger.info("using the slides in %s", root)
        return root
    if root.is_dir() and any(root.iterdir()) and config.data_dir is not None:
        raise FileExistsError(f"{root} is not empty but holds no complete data set; pass a new or empty folder")
    kwargs: dict[str, Any] = {"seed": config.data_seed}
    if config.data_counts is not None:
        kwargs.update(zip(("n_normal", "n_tumor", "n_test_normal", "n_test_tumor"), config.data_counts))
    if config.slide_size is not None:
        kwargs["size"] = (config.slide_size, config.slide_size)
    if config.slide_mpp is not None:
        kwargs["mpp"] = config.slide_mpp
    kwargs["difficulty"] = config.difficulty
    logger.info("writing the synthetic data set to %s (%s)", root, kwargs)
    make_demo_data(root, **kwargs)
    return root


def read_lesion_table(data_dir: Path) -> dict[str, dict[str, str]] | None:
    """``lesions.csv`` by slide id (its columns as strings), or None if the data set has none."""
    path = data_dir / "lesions.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        return {row["slide_id"]: row for row in csv.DictReader(f)}


# ----------------------------------------------------------------------------- one run
def run_name(method: str, mpp: float, seed: int) -> str:
    return f"{method}_{mpp:g}um_seed{seed}"


def train_config(config: StudyConfig, data_dir: Path, out_dir: Path, method: str, mpp: float, seed: int) -> TrainConfig:
    """The recipe of one run: the demo's (``pipeline.demo.demo_config``) at ``mpp`` with the
    study's width, epochs and sizes; ``head_only`` never trains the trunk."""
    return TrainConfig(
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        model=ModelConfig(
            width=config.width,
            hidden_dim=64,
            attention_dim=32,
            pool=config.pool,
            instance_loss=config.instance_loss,
            tile_size=config.tile_size,
            freeze_bn_affine=False,
        ),
        mpp=mpp,
        max_size=config.max_size,
        val_fraction=config.val_fraction,
        seed=seed,
        epochs=config.epochs,
        head_only_epochs=config.epochs if method == "head_only" else config.head_only_epochs,
        lr=config.lr,
        trunk_lr_factor=config.trunk_lr_factor,
        device=config.device,
        progress=False,
        select_by=config.select,
        # best.pt only from the epochs where end_to_end's trunk trains; the same for head_only
        # keeps the two comparable
        select_after_epoch=config.head_only_epochs,
    )


def _selected_epoch(checkpoint: Path) -> int | None:
    """The epoch a checkpoint was written after (1-based), from the checkpoint itself."""
    from torch_impl.pipeline.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    epoch = state.get("epoch")
    return int(epoch) if epoch is not None else None


def attention_aucs(eval_dir: Path, records: Sequence[SlideRecord]) -> dict[str, float | None]:
    """Attention AUC (lesion vs other tissue cells) of every annotated tumour test slide, from
    the attention maps that ``evaluate_run`` saved: the heatmap's computation, without drawing."""
    out: dict[str, float | None] = {}
    for record in records:
        if record.label != 1 or record.annotation_path is None:
            continue
        saved = eval_dir / "attention" / f"{record.slide_id}.npy"
        if not saved.is_file():
            continue
        pred = load_prediction(saved)
        slide = Slide(record.path, mpp=pred.mpp)
        try:
            level0_to_working = (slide.mpp_level0[0] / slide.mpp, slide.mpp_level0[1] / slide.mpp)
        finally:
            slide.close()
        lesions, holes = read_lesions(record.annotation_path)
        attention = np.asarray(pred.attention)
        fraction = lesion_fraction(lesions, holes, attention.shape, pred.box, pred.cell_size, level0_to_working)
        heatmap_logger = logging.getLogger("torch_impl.pipeline.heatmap")
        level = heatmap_logger.level
        heatmap_logger.setLevel(logging.ERROR)  # one summary line below instead of a warning per slide
        try:
            out[record.slide_id] = attention_auc(attention, fraction)["attention_auc"]
        finally:
            heatmap_logger.setLevel(level)
    undefined = [s for s, auc in out.items() if auc is None]
    if undefined:
        logger.info(
            "attention AUC undefined on %d of %d annotated slides (no cell at least half lesion, or all): %s",
            len(undefined),
            len(out),
            ", ".join(undefined),
        )
    return out


def category_aucs(
    predictions: dict[str, tuple[int, float]], lesions: dict[str, dict[str, str]] | None
) -> dict[str, Any]:
    """``auc_<c>`` and ``n_<c>`` per lesion category: the tumour test slides of category c
    against all normal test slides (None where a side is empty or there is no lesions.csv)."""
    out: dict[str, Any] = {}
    normal = [p for label, p in predictions.values() if label == 0]
    for category in CATEGORIES:
        tumour = [
            p
            for slide_id, (label, p) in predictions.items()
            if label == 1 and lesions is not None and lesions.get(slide_id, {}).get("category") == category
        ]
        out[f"n_{category}"] = len(tumour) if lesions is not None else None
        out[f"auc_{category}"] = (
            roc_auc([1] * len(tumour) + [0] * len(normal), tumour + normal) if tumour and normal else None
        )
    return out


def read_predictions(path: Path) -> dict[str, tuple[int, float]]:
    """evaluate_run's predictions.csv: {slide_id: (label, prob_tumor)}."""
    with open(path, newline="") as f:
        return {row["slide_id"]: (int(row["label"]), float(row["prob_tumor"])) for row in csv.DictReader(f)}


def run_one(config: StudyConfig, data_dir: Path, method: str, mpp: float, seed: int) -> dict[str, Any]:
    """Train (or reuse) and evaluate one run; returns its row of results.csv."""
    run_dir = config.out_dir / "runs" / run_name(method, mpp, seed)
    train_dir, eval_dir = run_dir / "train", run_dir / "eval"
    timing_path = run_dir / "timing.json"
    tc = train_config(config, data_dir, train_dir, method, mpp, seed)
    timing = json.loads(timing_path.read_text()) if timing_path.is_file() else {}
    finished_before = "train_seconds" in timing and _epochs_done(train_dir) >= config.epochs
    logger.info("run %s: %s", run_dir.name, "reusing the finished run" if finished_before else "training")
    start = time.perf_counter()
    with run_log(train_dir / "train.log"):
        train(tc, resume=(train_dir / "last.pt").is_file())
    trained = time.perf_counter()
    checkpoint = train_dir / "best.pt"
    metrics = evaluate_run(
        checkpoint, data_dir, eval_dir, mpp=mpp, device=config.device, n_bootstrap=config.n_bootstrap
    )
    evaluated = time.perf_counter()
    if not finished_before:  # a reused run keeps the time it was trained in
        timing["train_seconds"] = round(timing.get("train_seconds", 0.0) + trained - start, 1)
    timing["eval_seconds"] = round(evaluated - trained, 1)
    with atomic_write(timing_path) as f:
        f.write(json.dumps(timing) + "\n")

    records = [r for r in discover(data_dir) if r.split == "test"]
    predictions = read_predictions(eval_dir / "predictions.csv")
    att = attention_aucs(eval_dir, records)
    defined = [a for a in att.values() if a is not None]
    ci = metrics.get("auc_ci95") or (None, None)
    row = {
        "method": method,
        "mpp": mpp,
        "seed": seed,
        "test_auc": metrics.get("auc"),
        "test_auc_ci_low": ci[0],
        "test_auc_ci_high": ci[1],
        "test_accuracy": metrics.get("accuracy"),
        "n_test": metrics.get("n_slides"),
        "n_test_tumor": metrics.get("n_tumor"),
        "attention_auc": float(np.mean(defined)) if defined else None,
        "n_attention_slides": len(defined),
        **category_aucs(predictions, read_lesion_table(data_dir)),
        "checkpoint": checkpoint.name,
        "selected_epoch": _selected_epoch(checkpoint),
        "train_seconds": timing["train_seconds"],
        "eval_seconds": timing["eval_seconds"],
        "run_dir": str(run_dir.relative_to(config.out_dir)),
    }
    logger.info(
        "run %s: test AUC %s, attention AUC %s (train %.0f s, eval %.0f s)",
        run_dir.name,
        _fmt(row["test_auc"]),
        _fmt(row["attention_auc"]),
        row["train_seconds"],
        row["eval_seconds"],
    )
    return row


def _epochs_done(train_dir: Path) -> int:
    """Epochs a run folder has finished (rows of its metrics.csv; 0 without one)."""
    path = train_dir / "metrics.csv"
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


def _run_in_worker(config: StudyConfig, data_dir: Path, method: str, mpp: float, seed: int) -> dict[str, Any]:
    """run_one in a worker process of run_all (torch threads as configured there too)."""
    torch.set_num_threads(config.threads)
    return run_one(config, data_dir, method, mpp, seed)


def run_all(config: StudyConfig, data_dir: Path) -> list[dict[str, Any]]:
    """Every run (resolution, seed, method), ``config.jobs`` at a time, the finest resolutions
    first; returns their rows in the order of ``config.resolutions``, seeds, methods. results.csv is rewritten after each run, so progress survives a stop.

    With jobs > 1 each run is a spawned process (its own torch, ``config.threads`` threads):
    independent processes use the cores without the OpenMP stalls of one multi-threaded run
    on a busy machine. A failed run stops the study with its error (the others finish first).
    """
    plan = [(method, mpp, seed) for mpp in config.resolutions for seed in config.seeds for method in config.methods]
    # the finest resolutions (the longest runs) start first, so that parallel runs end together
    order = sorted(range(len(plan)), key=lambda i: plan[i][1])
    done: dict[int, dict[str, Any]] = {}

    def record(i: int, row: dict[str, Any]) -> None:
        done[i] = row
        write_results_csv(config.out_dir / "results.csv", [done[j] for j in sorted(done)])

    if config.jobs == 1:
        for i in order:
            record(i, run_one(config, data_dir, *plan[i]))
        return [done[i] for i in range(len(plan))]

    # the workers import this file by its module name: put its folder on their sys.path
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    level = logging.getLogger().getEffectiveLevel()
    with ProcessPoolExecutor(
        max_workers=config.jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=setup_logging,
        initargs=(-1 if level > logging.INFO else 0,),
    ) as pool:
        futures = {pool.submit(_run_in_worker, config, data_dir, *plan[i]): i for i in order}
        for future in as_completed(futures):
            record(futures[future], future.result())
    return [done[i] for i in range(len(plan))]


# ----------------------------------------------------------------------------- summary
def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(defined)) if defined else None


def summarise(rows: Sequence[dict[str, Any]], out_dir: Path, n_bootstrap: int = 2000) -> list[dict[str, Any]]:
    """One entry per (method, mpp), in the order of the rows: AUC per seed, mean, pooled AUC and
    its bootstrap 95% interval (module docstring), mean attention and category AUCs, mean times.

    The pooled predictions are read back from each run's ``eval/predictions.csv``.
    """
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["mpp"]), []).append(row)
    summary = []
    for (method, mpp), runs in groups.items():
        labels: list[int] = []
        scores: list[float] = []
        for run in runs:
            for label, prob in read_predictions(out_dir / run["run_dir"] / "eval" / "predictions.csv").values():
                labels.append(label)
                scores.append(prob)
        pooled_auc, ci = None, (None, None)
        if 0 < sum(labels) < len(labels):
            pooled_auc = roc_auc(labels, scores)
            if min(sum(labels), len(labels) - sum(labels)) >= 2:
                ci = bootstrap_auc_ci(labels, scores, n_bootstrap)
        entry = {
            "method": method,
            "mpp": mpp,
            "seeds": [run["seed"] for run in runs],
            "aucs": [run["test_auc"] for run in runs],
            "mean_auc": _mean([run["test_auc"] for run in runs]),
            "pooled_auc": pooled_auc,
            "pooled_ci_low": ci[0],
            "pooled_ci_high": ci[1],
            "attention_auc": _mean([run["attention_auc"] for run in runs]),
            **{f"auc_{c}": _mean([run[f"auc_{c}"] for run in runs]) for c in CATEGORIES},
            "train_seconds": _mean([run["train_seconds"] for run in runs]),
            "eval_seconds": _mean([run["eval_seconds"] for run in runs]),
        }
        summary.append(entry)
    return summary


def machine_description() -> dict[str, str]:
    """CPU model (``lscpu``), cores, GPU, torch version: the summary's machine line."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True).stdout
        model = next(
            (line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), model
        )
    except (OSError, subprocess.SubprocessError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": model, "cores": str(os.cpu_count()), "gpu": gpu, "torch": torch.__version__}


def format_summary(config: StudyConfig, summary: Sequence[dict[str, Any]], wall_seconds: float, data_note: str) -> str:
    """summary.md: the settings, the machine, and a Markdown table (pasteable into RESULTS.md)."""
    machine = machine_description()
    lines = [
        "# Resolution study: test AUC against working resolution",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, GPU {machine['gpu']}; torch {machine['torch']}; "
        f"device {config.device}, {config.threads} torch thread(s)",
        f"- date: {datetime.date.today().isoformat()}; wall time {wall_seconds / 60:.1f} min (data, training, "
        "evaluation; reused runs count their evaluation only)",
        f"- data: {data_note}",
        f"- recipe: ResNet-34 width {config.width} (random init, calibrated batch norms), CLAM head; {config.epochs} "
        f"epochs, end_to_end head only for the first {config.head_only_epochs}; head_only: trunk frozen throughout; "
        f"head pool {config.pool or 'none'}, instance loss {'on' if config.instance_loss else 'off'}; "
        f"lr {config.lr:g}, trunk x{config.trunk_lr_factor:g}; crops <= {config.max_size} px; val fraction "
        f"{config.val_fraction:g}; evaluated checkpoint: {config.select}",
        "- AUC per seed and their mean; 95% CI: stratified bootstrap (bootstrap_auc_ci, "
        f"{config.n_bootstrap} resamples) of the predictions of all seeds pooled (each test slide once per seed: "
        "narrower than a slide-level interval); attention AUC: lesion vs other tissue cells, mean over annotated "
        "tumour test slides and seeds; micro / macro: AUC of those tumour slides against all normal slides",
        "",
        "| method | um/px | AUC per seed | mean AUC | pooled AUC (95% CI) | attention AUC | AUC itc | AUC micro "
        "| AUC macro | train s/run | eval s/run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in summary:
        ci = f" ({_fmt(e['pooled_ci_low'])}-{_fmt(e['pooled_ci_high'])})" if e["pooled_ci_low"] is not None else ""
        lines.append(
            f"| {e['method']} | {e['mpp']:g} | {', '.join(_fmt(a) for a in e['aucs'])} | {_fmt(e['mean_auc'])} "
            f"| {_fmt(e['pooled_auc'])}{ci} | {_fmt(e['attention_auc'])} | {_fmt(e['auc_itc'])} "
            f"| {_fmt(e['auc_micro'])} | {_fmt(e['auc_macro'])} | {_fmt(e['train_seconds'], 0)} "
            f"| {_fmt(e['eval_seconds'], 0)} |"
        )
    return "\n".join(lines) + "\n"


def write_results_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """results.csv: :data:`RESULT_COLUMNS`, empty cells for undefined values, floats round-trip."""
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: ("" if row[k] is None else repr(row[k]) if isinstance(row[k], float) else row[k])
                    for k in RESULT_COLUMNS
                }
            )


def plot_auc_vs_resolution(summary: Sequence[dict[str, Any]], path: Path) -> Figure:
    """Test AUC against um/px (log axis, finest resolution on the right): per method the seeds'
    AUCs as points, their mean as a line, the pooled bootstrap 95% interval as a bar."""
    fig = Figure(figsize=(6.0, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    methods = list(dict.fromkeys(e["method"] for e in summary))
    for i, method in enumerate(methods):
        entries = sorted((e for e in summary if e["method"] == method), key=lambda e: e["mpp"])
        shift = 1.0 + 0.04 * (i - (len(methods) - 1) / 2)  # side by side on the log axis
        colour = f"C{i}"
        x = np.array([e["mpp"] for e in entries]) * shift
        for xi, e in zip(x, entries):
            aucs = [a for a in e["aucs"] if a is not None]
            ax.scatter([xi] * len(aucs), aucs, s=14, color=colour, alpha=0.5, linewidths=0)
            if e["pooled_ci_low"] is not None:
                ax.plot([xi, xi], [e["pooled_ci_low"], e["pooled_ci_high"]], color=colour, lw=1.2, alpha=0.7)
        means = [np.nan if e["mean_auc"] is None else e["mean_auc"] for e in entries]
        ax.plot(x, means, "-o", color=colour, label=method.replace("_", " "), ms=5)
    ticks = sorted({e["mpp"] for e in summary})
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.invert_xaxis()  # higher resolution (fewer um/px) to the right
    ax.axhline(0.5, ls="--", lw=1, color="0.6")
    ax.set(xlabel="working resolution (um/px, log scale)", ylabel="test AUC", ylim=(-0.02, 1.02))
    ax.set_title("test AUC vs resolution: seeds (points), mean (line), pooled 95% CI (bars)", fontsize="small")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    with atomic_write(path, "wb", what="figure") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    return fig


# ----------------------------------------------------------------------------- the study
def run_study(quick: bool = False, **options: Any) -> list[dict[str, Any]]:
    """Run the study (module docstring) and write its outputs; returns the rows of results.csv.

    ``options`` are :class:`StudyConfig` fields (``out_dir``, ``resolutions``, ``seeds``, ...);
    ``quick`` starts from :data:`QUICK` instead of the defaults (explicit options win).
    Each row is a dict with the keys :data:`RESULT_COLUMNS` (None where undefined).
    """
    values = {**(QUICK if quick else {}), **options}
    for key in ("out_dir", "data_dir"):
        if values.get(key) is not None:
            values[key] = Path(values[key])
    for key in ("resolutions", "seeds", "methods", "data_counts"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    if "resolutions" in values:
        values["resolutions"] = tuple(float(r) for r in values["resolutions"])
    config = StudyConfig(**values)

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        config.out_dir.mkdir(parents=True, exist_ok=True)
        data_dir = ensure_data(config)
        data_seconds = time.perf_counter() - start
        rows = run_all(config, data_dir)
        summary = summarise(rows, config.out_dir, config.n_bootstrap)
    finally:
        torch.set_num_threads(threads)
    records = discover(data_dir)
    counts = {split: sum(r.split == split for r in records) for split in ("train", "test")}
    tumour = {split: sum(r.split == split and r.label == 1 for r in records) for split in ("train", "test")}
    kind = "with lesions.csv (the harder set)" if read_lesion_table(data_dir) else "without lesions.csv (the demo set)"
    data_note = (
        f"{counts['train']} training slides ({tumour['train']} tumour), {counts['test']} test ({tumour['test']} "
        f"tumour), {kind}; made or found in {data_seconds:.0f} s"
    )
    wall = time.perf_counter() - start
    with atomic_write(config.out_dir / "summary.md") as f:
        f.write(format_summary(config, summary, wall, data_note))
    plot_auc_vs_resolution(summary, config.out_dir / "auc_vs_resolution.png")
    logger.info("wrote %s, summary.md and auc_vs_resolution.png in %.1f min", config.out_dir / "results.csv", wall / 60)
    return rows


def _parser() -> argparse.ArgumentParser:
    d = StudyConfig()
    p = argparse.ArgumentParser(
        description="Test AUC of StreamingCLAM against the working resolution, end to end vs a frozen trunk, "
        "on synthetic slides (results.csv, summary.md, auc_vs_resolution.png).",
    )
    p.add_argument("--out", dest="out_dir", type=Path, default=d.out_dir, help="output folder (default %(default)s)")
    p.add_argument("--data", dest="data_dir", type=Path, help="data set folder; default OUT/data, made if missing")
    p.add_argument("--resolutions", nargs="+", type=float, help=f"working um/px (default {list(d.resolutions)})")
    p.add_argument("--seeds", nargs="+", type=int, help=f"training seeds (default {list(d.seeds)})")
    p.add_argument("--methods", nargs="+", choices=METHODS, help=f"default {list(d.methods)}")
    p.add_argument("--width", type=int, help=f"ResNet-34 base width (default {d.width})")
    p.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    p.add_argument("--head-only-epochs", type=int, help=f"end_to_end's head-only epochs (default {d.head_only_epochs})")
    p.add_argument("--lr", type=float, help=f"head learning rate (default {d.lr:g})")
    p.add_argument("--trunk-lr-factor", type=float, help=f"trunk lr = lr x this (default {d.trunk_lr_factor:g})")
    p.add_argument("--pool", choices=("none", "max", "avg"), help="head's pooling of the feature map (default none)")
    p.add_argument("--instance-loss", action="store_true", default=None, help="CLAM's instance loss (default off)")
    p.add_argument("--max-size", type=int, help=f"largest training crop side, working px (default {d.max_size})")
    p.add_argument("--tile-size", type=int, help=f"streaming tile side, px (default {d.tile_size})")
    p.add_argument("--val-fraction", type=float, help=f"default {d.val_fraction:g}")
    p.add_argument("--select", choices=SELECT_CHOICES, help=f"checkpoint evaluated (default {d.select})")
    p.add_argument(
        "--data-counts",
        nargs=4,
        type=int,
        metavar=("NORMAL", "TUMOR", "TEST_NORMAL", "TEST_TUMOR"),
        help="slides of a new data set (default: the generator's preset)",
    )
    p.add_argument("--difficulty", choices=tuple(DIFFICULTIES), help=f"a new data set's kind (default {d.difficulty})")
    p.add_argument("--slide-size", type=int, help="level-0 side of a new data set's slides, px (default: preset)")
    p.add_argument("--slide-mpp", type=float, help="level-0 um/px of a new data set's slides (default: preset)")
    p.add_argument("--data-seed", type=int, help=f"seed of a new data set (default {d.data_seed})")
    p.add_argument("--device", help=f"cpu, cuda, cuda:N, auto (default {d.device})")
    p.add_argument("--threads", type=int, help=f"torch threads per run (default {d.threads})")
    p.add_argument("--jobs", type=int, help=f"runs at a time, one process each (default {d.jobs})")
    p.add_argument("--bootstrap", dest="n_bootstrap", type=int, help=f"bootstrap resamples (default {d.n_bootstrap})")
    p.add_argument("--quick", action="store_true", help=f"a few minutes on a CPU: {QUICK}")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    quiet, quick = args.pop("quiet"), args.pop("quick")
    setup_logging(-1 if quiet else 0)
    options = {k: v for k, v in args.items() if v is not None}
    if options.get("pool") == "none":
        options["pool"] = None
    try:
        run_study(quick=quick, **options)
    except ValueError as e:
        print(f"resolution_study: {e}", file=sys.stderr)
        return 2
    out = Path(options.get("out_dir", StudyConfig().out_dir))
    print((out / "summary.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
