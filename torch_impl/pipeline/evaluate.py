"""Deterministic slide-level evaluation: predictions, AUC with a bootstrap CI, ROC curve.

    checkpoint --load_model--> StreamingCLAM (eval mode)
    every slide of a split --predict_slides (torch_impl.pipeline.predict)--> P(tumour), attention
    --> predictions.csv, metrics.json, roc.png, attention/<id>.npy + .json

Whole-slide inference is :mod:`torch_impl.pipeline.predict`'s (the same path as validation
during training, heatmaps and the ``predict`` command); this module adds the labels, the
metrics and their files.

Unlike the reference implementation, which crops large test slides at random, every slide
is read whole (its tissue bounding box), so two runs give identical numbers.

Conventions:
  * ``prob_tumor`` is the softmax probability of class 1 (tumour); the hard prediction is
    1 when ``prob_tumor >= 0.5``.
  * The ROC curve is that of the classifier "score >= t" over every distinct score t,
    from t = +inf (point (0, 0)) down to the smallest score (point (1, 1)).
  * The AUC's 95% confidence interval is a *stratified percentile bootstrap*: each of
    ``n_bootstrap`` resamples draws the tumour slides and the normal slides with
    replacement *separately*, keeping both class counts; the interval is the 2.5% and
    97.5% quantiles of the resampled AUCs. Stratifying keeps every resample two-class, so
    no resample must be dropped (a plain bootstrap of a small test set draws one-class
    samples, whose AUC is undefined, and dropping them biases the interval). The
    generator is ``np.random.default_rng(seed)``: the interval is deterministic. It is
    computed by ``scipy.stats.bootstrap`` (:func:`~torch_impl.pipeline.metrics.bootstrap_auc_ci`:
    the two classes as two unpaired samples, percentile method), which draws exactly the
    resamples of the hand-written loop it replaced, 10-40x faster (``tests/test_metrics.py``
    checks both against a bootstrap written out by hand).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..slides import SlideRecord, discover, read_splits
from ..slides.camelyon import missing_test_slides
from .checkpoint import load_model, read_train_config, run_file, trained_mpp
from .logs import verbosity_options
from .metrics import binary_labels_and_scores, bootstrap_auc_ci, roc_auc
from .options import OptionParser, option
from .plots import plot_roc
from .predict import BatchInferenceOptions, SlidePrediction, predict_slides, save_prediction
from .runtime import BadSlideError, atomic_write, autocast_dtype, resolve_device

__all__ = [
    "EvaluateOptions",
    "bootstrap_auc_ci",
    "classification_metrics",
    "evaluate_run",
    "main_evaluate",
    "roc_curve",
    "select_records",
]

logger = logging.getLogger(__name__)

#: Probability threshold of the hard prediction (tumour when prob_tumor >= THRESHOLD).
THRESHOLD = 0.5
#: Splits the evaluation supports; "val" needs the run's splits CSV.
SPLITS = ("test", "val")


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions(BatchInferenceOptions):
    """The ``evaluate`` command (--checkpoint, --out, --mpp, --device, --amp, --slide-cache,
    --skip-bad-slides from :class:`~torch_impl.pipeline.predict.BatchInferenceOptions`); its fields are
    :func:`evaluate_run`'s arguments. Raises ValueError for fewer than 1 bootstrap resample."""

    data_dir: Path = option(flag="--data", metavar="DIR")  # CAMELYON16 root (layout in torch_impl.slides.camelyon)
    split: str = option("test", choices=SPLITS)  # "test": the test slides; "val": the run's validation slides
    splits_csv: Path | None = option(
        None,
        flag="--splits",
        metavar="CSV",
    )  # split val: the run's splits CSV; none = the checkpoint's train_config splits_csv, else splits.csv beside it
    n_bootstrap: int = option(2000, flag="--bootstrap")  # resamples of the AUC's stratified bootstrap 95% interval
    seed: int = 0  # the bootstrap's seed

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_bootstrap < 1:
            raise ValueError(f"--bootstrap must be >= 1 resample, got {self.n_bootstrap}")


# ---------------------------------------------------------------------- metrics
def _check_binary(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Checked (n,) labels and scores (see metrics), with both classes present."""
    y, s = binary_labels_and_scores(labels, scores)
    if y.min(initial=1) == y.max(initial=0):
        raise ValueError("the ROC needs both classes; labels hold only one")
    return y, s


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points of the classifier "score >= t" for t = +inf and every distinct score.

    With the scores sorted in decreasing order, the true and false positives at the last
    slide of each group of tied scores are cumulative sums of the labels:
        TPR(t) = #{positives with score >= t} / P,   FPR(t) = #{negatives with score >= t} / N.

    Args:
        labels: (n,) 0/1, both present.
        scores: (n,) finite; higher = more likely positive.

    Returns:
        fpr, tpr, thresholds: (m + 1,) each, m = number of distinct scores; the first point
        is (0, 0) at threshold +inf, the last (1, 1) at the smallest score.
    """
    y, s = _check_binary(labels, scores)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]  # (n,) decreasing scores
    tp = np.cumsum(y)  # (n,) positives among the first k+1
    fp = np.cumsum(1 - y)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]  # (m,) end of each tie group
    tpr = np.r_[0.0, tp[last] / tp[-1]]
    fpr = np.r_[0.0, fp[last] / fp[-1]]
    thresholds = np.r_[np.inf, s[last]]
    return fpr, tpr, thresholds


def classification_metrics(
    labels: Sequence[int],
    scores: Sequence[float],
    threshold: float = THRESHOLD,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """AUC, its bootstrap CI, and accuracy/sensitivity/specificity at ``threshold``.

    AUC and CI are None when only one class is present, the CI also when a class has a single
    slide (both logged as warnings).
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    pred = (s >= threshold).astype(np.int64)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    out: dict[str, Any] = {
        "n_slides": int(y.size),
        "n_tumor": n_pos,
        "n_normal": n_neg,
        "auc": None,
        "auc_ci95": None,
        "bootstrap": {"method": "stratified percentile", "n_resamples": n_bootstrap, "seed": seed, "confidence": 0.95},
        "threshold": threshold,
        "accuracy": float((pred == y).mean()) if y.size else None,
        "sensitivity": float(pred[y == 1].mean()) if n_pos else None,
        "specificity": float(1 - pred[y == 0].mean()) if n_neg else None,
    }
    if n_pos and n_neg:
        out["auc"] = float(roc_auc(y, s))
        if min(n_pos, n_neg) >= 2:
            out["auc_ci95"] = list(bootstrap_auc_ci(y, s, n_bootstrap, 0.95, seed))
        else:  # one slide of a class cannot be resampled into any variability
            logger.warning(
                "fewer than two slides of a class (%d tumour, %d normal): no bootstrap interval", n_pos, n_neg
            )
    else:
        logger.warning("only one class among the %d slides: AUC and ROC are undefined", y.size)
    return out


# ---------------------------------------------------------------------- the run
def select_records(
    data_dir: str | os.PathLike,
    split: str = "test",
    splits_csv: str | os.PathLike | None = None,
    skip_bad_slides: bool = False,
) -> list[SlideRecord]:
    """The slides of ``split`` under a CAMELYON16 root, in ``discover``'s order.

    ``"test"``: the test slides ``discover`` finds (test_049 excluded). A slide that the
    reference CSV lists but the test folder lacks is an error (:class:`BadSlideError` naming
    each), or with ``skip_bad_slides`` a warning naming each (they are left out; see
    :func:`~torch_impl.slides.camelyon.missing_test_slides`). ``"val"``: the training slides
    that the run's splits CSV (``slide,label,split``, written by ``make_splits``) assigns to
    "val"; ``splits_csv`` must be given. The test labels (reference CSV) are not needed for it.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    records = discover(data_dir, include_test=split == "test", warn_missing=False)
    if split == "test":
        missing = missing_test_slides(data_dir)
        if missing and not skip_bad_slides:
            raise BadSlideError(
                f"{len(missing)} test slide(s) listed in the reference CSV are not under "
                f"{Path(data_dir) / 'testing' / 'images'}: {', '.join(missing)}; restore them, or pass "
                f"skip_bad_slides=True (--skip-bad-slides) to evaluate without them"
            )
        for slide_id in missing:
            logger.warning(
                "skipping %s: listed in the reference CSV but not under %s",
                slide_id,
                Path(data_dir) / "testing" / "images",
            )
        chosen = [r for r in records if r.split == "test"]
    else:
        if splits_csv is None or not Path(splits_csv).is_file():
            raise FileNotFoundError(
                f"split 'val' needs the run's splits CSV (slide,label,split); not found: {splits_csv}"
            )
        splits = read_splits(splits_csv)
        by_id = {r.slide_id: r for r in records}
        val_ids = [s for s, (_, sp) in splits.items() if sp == "val"]
        missing = [s for s in val_ids if s not in by_id]
        if missing:
            raise FileNotFoundError(
                f"{splits_csv} lists {len(missing)} val slide(s) not found under {data_dir} (e.g. {missing[:3]})"
            )
        for s in val_ids:
            if splits[s][0] != by_id[s].label:
                raise ValueError(f"{splits_csv}: {s} has label {splits[s][0]}, the data set says {by_id[s].label}")
        chosen = [dataclasses.replace(r, split="val") for r in records if r.slide_id in set(val_ids)]
    if not chosen:
        raise FileNotFoundError(f"no {split} slides under {data_dir}")
    return chosen


def _write_predictions(path: Path, rows: Sequence[tuple[str, int, float]]) -> None:
    with atomic_write(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "label", "prob_tumor", "prediction"])
        for slide_id, label, prob in rows:
            writer.writerow([slide_id, label, repr(prob), int(prob >= THRESHOLD)])


def evaluate_run(
    checkpoint: str | os.PathLike,
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    mpp: float | None = None,
    split: str = "test",
    device: str | torch.device | None = "auto",
    skip_bad_slides: bool = False,
    splits_csv: str | os.PathLike | None = None,
    amp: str = "auto",
    n_bootstrap: int = 2000,
    seed: int = 0,
    slide_cache: str = "auto",
) -> dict[str, Any]:
    """Evaluate a checkpoint on every slide of a split; write the results to ``out_dir``.

    The arguments are the fields of :class:`EvaluateOptions` (the ``evaluate`` command's
    options, whose help says what each means; ``data_dir`` is ``--data``, ``splits_csv``
    ``--splits``, ``n_bootstrap`` ``--bootstrap``). Besides: ``device`` may be None (as
    "auto") or a ``torch.device``; with ``skip_bad_slides`` unreadable slides, and test
    slides that the reference CSV lists but the test folder lacks, are skipped with a warning
    naming each (listed in metrics.json under "skipped", counted under "n_skipped" and
    "n_missing"); without it the first one raises
    :class:`~torch_impl.pipeline.runtime.BadSlideError`. A ``splits_csv`` stored in the
    checkpoint is used only inside the checkpoint's folder
    (:func:`~torch_impl.pipeline.checkpoint.run_file`).

    ``out_dir`` receives ``predictions.csv`` (slide_id, label, prob_tumor, prediction),
    ``metrics.json``, ``roc.png`` (when both classes are present) and
    ``attention/<slide_id>.npy`` + ``.json`` (the saved predictions,
    :func:`torch_impl.pipeline.predict.save_prediction`, with the label).

    Returns:
        the metrics dict also written to metrics.json.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    mpp = trained_mpp(checkpoint, mpp)  # a bad --mpp stops here, before any slide is blamed
    dev = resolve_device(device)
    amp_dtype = autocast_dtype(amp, dev)
    if split == "val" and splits_csv is None:
        splits_csv = run_file(
            checkpoint, read_train_config(checkpoint).get("splits_csv"), "splits.csv", "splits_csv", "--splits"
        )
    records = select_records(data_dir, split, splits_csv, skip_bad_slides)
    missing = missing_test_slides(data_dir) if split == "test" else []
    labels_by_id = {r.slide_id: r.label for r in records}

    model, _ = load_model(checkpoint, device=dev)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info(
        "evaluating %s on %d %s slides at %g um/px on %s%s",
        checkpoint,
        len(records),
        split,
        mpp,
        dev,
        " (bf16 autocast)" if amp_dtype is not None else "",
    )

    def save(pred: SlidePrediction) -> None:
        save_prediction(pred, out_dir / "attention", label=labels_by_id[pred.slide_id])

    predictions, skipped = predict_slides(
        model,
        [(r.slide_id, r.path) for r in records],
        mpp,
        dev,
        amp,
        skip_bad_slides,
        on_prediction=save,
        slide_cache=slide_cache,
    )
    skipped = [
        {
            "slide_id": s,
            "path": str(Path(data_dir) / "testing" / "images"),
            "error": "listed in the reference CSV but no slide file",
        }
        for s in missing
    ] + skipped
    if not predictions:
        raise BadSlideError(f"no slide of {len(records)} could be evaluated (all skipped)")
    rows = [(p.slide_id, labels_by_id[p.slide_id], p.prob_tumor) for p in predictions]

    _write_predictions(out_dir / "predictions.csv", rows)
    labels = np.array([r[1] for r in rows], dtype=np.int64)
    scores = np.array([r[2] for r in rows], dtype=np.float64)
    metrics = classification_metrics(labels, scores, THRESHOLD, n_bootstrap, seed)
    metrics.update(
        split=split,
        mpp=mpp,
        checkpoint=str(checkpoint),
        skipped=skipped,
        n_skipped=len(skipped),
        n_missing=len(missing),
    )
    if metrics["auc"] is not None:
        fpr, tpr, _ = roc_curve(labels, scores)
        ci = tuple(metrics["auc_ci95"]) if metrics["auc_ci95"] is not None else None
        plot_roc(fpr, tpr, metrics["auc"], out_dir / "roc.png", ci=ci, title=f"{split}: {len(rows)} slides")
    with atomic_write(out_dir / "metrics.json") as f:
        f.write(json.dumps(metrics, indent=2))

    auc = "undefined" if metrics["auc"] is None else f"{metrics['auc']:.4f}"
    if metrics["auc_ci95"] is not None:
        auc += f" (95% CI {metrics['auc_ci95'][0]:.4f}-{metrics['auc_ci95'][1]:.4f})"
    logger.info(
        "%s: AUC %s, accuracy %.4f at %.2f, %d slides (%d tumour), %d skipped; wrote %s",
        split,
        auc,
        metrics["accuracy"],
        THRESHOLD,
        metrics["n_slides"],
        metrics["n_tumor"],
        len(skipped),
        out_dir,
    )
    return metrics


def main_evaluate(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """CLI: ``python -m torch_impl evaluate --data DIR --checkpoint FILE --out DIR`` (:class:`EvaluateOptions`).

    Returns 0. The pipeline's errors propagate: :func:`torch_impl.pipeline.cli.main` reports
    the expected ones in one line (exit status 2).
    """
    parser = OptionParser(
        EvaluateOptions,
        prog=prog or "python -m torch_impl evaluate",
        description="Deterministic whole-slide evaluation of a StreamingCLAM checkpoint: "
        "predictions.csv, metrics.json (AUC, 95% bootstrap CI, accuracy), roc.png "
        "and attention maps.",
        parents=[verbosity_options()],
    )
    evaluate_run(**dataclasses.asdict(parser.parse(argv)))
    return 0
