"""Deterministic slide-level evaluation: predictions, AUC with a bootstrap CI, ROC curve.

    checkpoint --load_model--> StreamingCLAM (eval mode)
    slide --open_slide_input(mpp, rng=None)--> the whole tissue crop (no random window)
        --predict_slide--> P(tumour), attention on the (pooled) feature grid
    all slides of a split --> predictions.csv, metrics.json, roc.png, attention/<id>.npy

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
    generator is ``np.random.default_rng(seed)``: the interval is deterministic.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import pickle
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, load_model
from ..slides import SlideError, SlideRecord, discover, read_splits
from ..slides.inputs import SlideInput, open_slide_input
from .metrics import binary_labels_and_scores, roc_auc
from ..models.streaming_clam import StreamingCLAM
from .plots import plot_roc

__all__ = [
    "BadSlideError",
    "SlidePrediction",
    "attention_cell_size",
    "bootstrap_auc_ci",
    "evaluate_run",
    "main_evaluate",
    "predict_slide",
    "read_train_config",
    "resolve_device",
    "roc_curve",
    "select_records",
]

logger = logging.getLogger(__name__)

#: Probability threshold of the hard prediction (tumour when prob_tumor >= THRESHOLD).
THRESHOLD = 0.5
#: Splits the evaluation supports; "val" needs the run's splits CSV.
SPLITS = ("test", "val")


class BadSlideError(RuntimeError):
    """A slide could not be evaluated (missing, corrupt, truncated, no tissue, too coarse)."""


@dataclass(frozen=True)
class SlidePrediction:
    """The model's output for one slide.

    Attributes:
        slide_id: e.g. "test_001".
        prob_tumor: P(tumour), the softmax probability of class 1.
        attention: (h', w') float32 attention of the tumour branch (the only branch of a
            single-branch head, branch 1 of a multi-branch head) on the head's grid: the
            trunk's feature grid, pooled if the head pools. Sums to 1 over tissue cells;
            exactly 0 on background cells.
        feature_hw: (H', W') of the trunk's feature map (before the head's pooling).
        box: (y, x, h, w) of the analysed crop in working pixels.
        cell_size: working pixels per attention cell side: the trunk's stride S (32),
            times the head's pool size if it pools. Cell (i, j) covers working rows
            [box_y + i cell_size, box_y + (i+1) cell_size) and the matching columns,
            clipped to the crop.
        mpp: the working resolution in um/px.
    """

    slide_id: str
    prob_tumor: float
    attention: np.ndarray
    feature_hw: tuple[int, int]
    box: tuple[int, int, int, int]
    cell_size: int
    mpp: float


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: as given, or the first GPU if there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def attention_cell_size(model: StreamingCLAM) -> int:
    """Working pixels per attention cell side: trunk stride S, times the head's pool size."""
    rows, cols = model.trunk.geometry
    if rows.stride != cols.stride:
        raise ValueError(f"the trunk's row and column strides differ ({rows.stride} vs "
                         f"{cols.stride}); square attention cells are assumed")
    pool = model.head.pool_size if model.head.pool is not None else 1
    return int(rows.stride) * int(pool)


def predict_slide(
    model: StreamingCLAM,
    slide_input: SlideInput,
    device: str | torch.device | None = None,
    amp: bool = False,
    slide_id: str | None = None,
) -> SlidePrediction:
    """Whole-crop inference on one slide: eval mode, no gradients, deterministic.

    Args:
        model: the network, already on ``device`` (it is not moved: moving is the caller's
            choice). It runs in eval mode and is put back in its previous mode afterwards.
        slide_input: from ``open_slide_input(path, mpp, rng=None)`` (the whole tissue).
        device: where the model lives; default: where its parameters are. Only checked and
            used to choose the autocast device.
        amp: bfloat16 autocast for the trunk (the head runs in float32 regardless); only on
            CUDA, ignored with a warning elsewhere.
        slide_id: default: the slide file's lower-case stem.

    The tissue mask is computed on the trunk's feature grid (H', W') = output_size(h, w)
    of the crop, as in training, and the head attends only to tissue positions.
    """
    model_device = _model_device(model)
    dev = torch.device(device) if device is not None else model_device
    if dev.type != model_device.type or (dev.index is not None and dev != model_device):
        raise ValueError(f"the model is on {model_device}, not {dev}; call model.to({str(dev)!r}) first")
    use_amp = bool(amp) and dev.type == "cuda"
    if amp and not use_amp:
        logger.warning("amp (bfloat16 autocast) is only used on CUDA; running %s in float32", dev)

    rows, cols = model.trunk.geometry
    _, h, w = slide_input.source.shape
    feature_hw = (int(rows.output_size(h)), int(cols.output_size(w)))  # (H', W')
    mask = slide_input.feature_mask(feature_hw, rows.stride)  # (1, H', W') bool

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            out = model(slide_input.source, mask.to(dev))
    finally:
        model.train(was_training)

    if out.probs.shape[1] < 2:
        raise ValueError(f"the model has {out.probs.shape[1]} class(es); P(tumour) needs class 1")
    branch = 1 if out.attention.shape[1] > 1 else 0  # multi-branch: the tumour class's branch
    attention = out.attention[0, branch].float().cpu().numpy()  # (h', w')
    return SlidePrediction(
        slide_id=slide_id if slide_id is not None else Path(slide_input.slide.path).stem.lower(),
        prob_tumor=float(out.probs[0, 1]),
        attention=attention,
        feature_hw=feature_hw,
        box=tuple(int(v) for v in slide_input.box),
        cell_size=attention_cell_size(model),
        mpp=float(slide_input.slide.mpp),
    )


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


def bootstrap_auc_ci(
    labels: Sequence[int],
    scores: Sequence[float],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Stratified percentile-bootstrap confidence interval of the AUC (module docstring).

    Each resample draws n_pos positives from the positives and n_neg negatives from the
    negatives, with replacement; the interval is the ((1-c)/2, (1+c)/2) quantiles of the
    ``n_resamples`` AUCs. Deterministic for a given ``seed``.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    y, s = _check_binary(labels, scores)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    pos_draws = rng.choice(pos, size=(n_resamples, pos.size))  # (B, n_pos) indices
    neg_draws = rng.choice(neg, size=(n_resamples, neg.size))  # (B, n_neg)
    yb = np.r_[np.ones(pos.size, dtype=np.int64), np.zeros(neg.size, dtype=np.int64)]
    aucs = np.array([roc_auc(yb, s[np.r_[p, n]]) for p, n in zip(pos_draws, neg_draws)])
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(aucs, [tail, 1.0 - tail])
    return float(lo), float(hi)


def classification_metrics(
    labels: Sequence[int],
    scores: Sequence[float],
    threshold: float = THRESHOLD,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """AUC, its bootstrap CI, and accuracy/sensitivity/specificity at ``threshold``.

    AUC and CI are None when only one class is present (logged as a warning).
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
        "bootstrap": {"method": "stratified percentile", "n_resamples": n_bootstrap,
                      "seed": seed, "confidence": 0.95},
        "threshold": threshold,
        "accuracy": float((pred == y).mean()) if y.size else None,
        "sensitivity": float(pred[y == 1].mean()) if n_pos else None,
        "specificity": float(1 - pred[y == 0].mean()) if n_neg else None,
    }
    if n_pos and n_neg:
        out["auc"] = float(roc_auc(y, s))
        out["auc_ci95"] = list(bootstrap_auc_ci(y, s, n_bootstrap, 0.95, seed))
    else:
        logger.warning("only one class among the %d slides: AUC and ROC are undefined", y.size)
    return out


# ---------------------------------------------------------------------- the run
def read_train_config(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The ``train_config`` dict stored in a checkpoint (memory-mapped, tensors not read)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint (corrupt or truncated file?): {e}") from e
    config = state.get("train_config") if isinstance(state, dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has no 'train_config' dict; is it a StreamingCLAM checkpoint?")
    return config


def _mpp_of(checkpoint: str | os.PathLike, mpp: float | None) -> float:
    if mpp is not None:
        return float(mpp)
    config = read_train_config(checkpoint)
    if "mpp" not in config:
        raise ValueError(f"{checkpoint}: train_config has no 'mpp'; pass mpp (--mpp) explicitly")
    return float(config["mpp"])


def select_records(
    data_dir: str | os.PathLike, split: str = "test", splits_csv: str | os.PathLike | None = None
) -> list[SlideRecord]:
    """The slides of ``split`` under a CAMELYON16 root, in ``discover``'s order.

    ``"test"``: the test slides ``discover`` finds (test_049 excluded). ``"val"``: the
    training slides that the run's splits CSV (``slide,label,split``, written by
    ``make_splits``) assigns to "val"; ``splits_csv`` must be given.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    records = discover(data_dir)
    if split == "test":
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
            raise FileNotFoundError(f"{splits_csv} lists {len(missing)} val slide(s) not found under "
                                    f"{data_dir} (e.g. {missing[:3]})")
        for s in val_ids:
            if splits[s][0] != by_id[s].label:
                raise ValueError(f"{splits_csv}: {s} has label {splits[s][0]}, the data set says "
                                 f"{by_id[s].label}")
        chosen = [dataclasses.replace(r, split="val") for r in records if r.slide_id in set(val_ids)]
    if not chosen:
        raise FileNotFoundError(f"no {split} slides under {data_dir}")
    return chosen


def _predict_record(
    model: StreamingCLAM, record: SlideRecord, mpp: float, device: torch.device, amp: bool
) -> SlidePrediction:
    """predict_slide on a record; file problems become a BadSlideError naming the file."""
    hint = "; pass skip_bad_slides=True (--skip-bad-slides) to skip it"
    try:
        # rng=None: the whole tissue box, whatever its size (max_size only bounds training crops)
        slide_input = open_slide_input(record.path, mpp=mpp, rng=None)
    except (OSError, ValueError) as e:  # missing, SlideError, NoTissueError, mpp too fine
        raise BadSlideError(f"{record.slide_id} ({record.path}): {e}{hint}") from e
    try:
        return predict_slide(model, slide_input, device, amp, slide_id=record.slide_id)
    except (OSError, SlideError) as e:  # a tile that cannot be decoded
        raise BadSlideError(f"{record.slide_id} ({record.path}): {e}{hint}") from e
    finally:
        slide_input.close()


def save_attention(prediction: SlidePrediction, folder: str | os.PathLike, **extra: Any) -> Path:
    """Write ``<slide_id>.npy`` (the (h', w') attention) and ``<slide_id>.json`` (its placement).

    The JSON holds everything ``torch_impl.pipeline.heatmap.write_heatmap`` needs to draw the map
    without the model: slide_id, prob_tumor, box, feature_hw, cell_size, mpp, plus ``extra``.
    Returns the .npy path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    npy = folder / f"{prediction.slide_id}.npy"
    np.save(npy, prediction.attention.astype(np.float32))
    meta = {k: v for k, v in dataclasses.asdict(prediction).items() if k != "attention"}
    meta.update(extra)
    (folder / f"{prediction.slide_id}.json").write_text(json.dumps(meta, indent=2, default=str))
    return npy


def _write_predictions(path: Path, rows: Sequence[tuple[str, int, float]]) -> None:
    with open(path, "w", newline="") as f:
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
    device: str | torch.device | None = None,
    skip_bad_slides: bool = False,
    splits_csv: str | os.PathLike | None = None,
    amp: bool | None = None,
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a checkpoint on every slide of a split; write the results to ``out_dir``.

    Args:
        checkpoint: a training checkpoint (``torch_impl.pipeline.checkpoint.load_model`` reads it).
        data_dir: CAMELYON16 root (``torch_impl.slides.discover``'s layout).
        out_dir: created if needed. Receives ``predictions.csv`` (slide_id, label,
            prob_tumor, prediction), ``metrics.json``, ``roc.png`` (when both classes are
            present) and ``attention/<slide_id>.npy`` + ``.json`` (see :func:`save_attention`).
        mpp: working resolution; default the checkpoint's ``train_config["mpp"]``.
        split: "test" (default) or "val" (needs the run's splits CSV, see ``splits_csv``).
        device: default the first GPU, else the CPU.
        skip_bad_slides: skip unreadable slides with a warning (listed in metrics.json under
            "skipped") instead of raising :class:`BadSlideError`.
        splits_csv: for split "val": default the run's (``train_config["splits_csv"]``, or
            ``splits.csv`` beside the checkpoint, i.e. in the run folder).
        amp: bfloat16 autocast of the trunk; default on CUDA only.
        n_bootstrap, seed: the AUC bootstrap (module docstring).

    Returns:
        the metrics dict also written to metrics.json.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    dev = resolve_device(device)
    mpp = _mpp_of(checkpoint, mpp)
    use_amp = dev.type == "cuda" if amp is None else bool(amp)
    if split == "val" and splits_csv is None:
        splits_csv = read_train_config(checkpoint).get("splits_csv") or checkpoint.parent / "splits.csv"
    records = select_records(data_dir, split, splits_csv)

    model, _ = load_model(checkpoint, device=dev)
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("evaluating %s on %d %s slides at %g um/px on %s%s", checkpoint, len(records), split,
                mpp, dev, " (bf16 autocast)" if use_amp and dev.type == "cuda" else "")

    rows: list[tuple[str, int, float]] = []
    skipped: list[dict[str, str]] = []
    for k, record in enumerate(records, 1):
        start = time.perf_counter()
        try:
            pred = _predict_record(model, record, mpp, dev, use_amp)
        except BadSlideError as e:
            if not skip_bad_slides:
                raise
            logger.warning("skipping %s", e)
            skipped.append({"slide_id": record.slide_id, "path": str(record.path), "error": str(e)})
            continue
        save_attention(pred, out_dir / "attention", label=record.label, slide_path=str(record.path))
        rows.append((record.slide_id, record.label, pred.prob_tumor))
        logger.info("[%d/%d] %s: P(tumour) = %.4f, label %d, crop %dx%d px, %.1f s", k, len(records),
                    record.slide_id, pred.prob_tumor, record.label, pred.box[2], pred.box[3],
                    time.perf_counter() - start)
    if not rows:
        raise BadSlideError(f"no slide of {len(records)} could be evaluated (all skipped)")

    _write_predictions(out_dir / "predictions.csv", rows)
    labels = np.array([r[1] for r in rows], dtype=np.int64)
    scores = np.array([r[2] for r in rows], dtype=np.float64)
    metrics = classification_metrics(labels, scores, THRESHOLD, n_bootstrap, seed)
    metrics.update(split=split, mpp=mpp, checkpoint=str(checkpoint), skipped=skipped)
    if metrics["auc"] is not None:
        fpr, tpr, _ = roc_curve(labels, scores)
        plot_roc(fpr, tpr, metrics["auc"], out_dir / "roc.png", ci=tuple(metrics["auc_ci95"]),
                 title=f"{split}: {len(rows)} slides")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))

    auc = "undefined" if metrics["auc"] is None else (
        f"{metrics['auc']:.4f} (95% CI {metrics['auc_ci95'][0]:.4f}-{metrics['auc_ci95'][1]:.4f})")
    logger.info("%s: AUC %s, accuracy %.4f at %.2f, %d slides (%d tumour), %d skipped; wrote %s",
                split, auc, metrics["accuracy"], THRESHOLD, metrics["n_slides"], metrics["n_tumor"],
                len(skipped), out_dir)
    return metrics


def main_evaluate(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m torch_impl evaluate --data DIR --checkpoint FILE --out DIR``. Returns 0."""
    parser = argparse.ArgumentParser(
        prog="python -m torch_impl evaluate",
        description="Deterministic whole-slide evaluation of a StreamingCLAM checkpoint: "
                    "predictions.csv, metrics.json (AUC, 95% bootstrap CI, accuracy), roc.png "
                    "and attention maps.",
    )
    parser.add_argument("--data", type=Path, required=True, help="CAMELYON16 root")
    parser.add_argument("--checkpoint", type=Path, required=True, help="training checkpoint (.pt)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--mpp", type=float, default=None,
                        help="working resolution in um/px (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--split", choices=SPLITS, default="test",
                        help="test slides, or the run's validation slides (needs --splits)")
    parser.add_argument("--splits", type=Path, default=None,
                        help="splits CSV for --split val (default: the run's, i.e. the checkpoint's "
                             "train_config splits_csv or splits.csv beside the checkpoint)")
    parser.add_argument("--skip-bad-slides", action="store_true",
                        help="skip unreadable slides with a warning instead of stopping")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 autocast (default: on for CUDA)")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the AUC CI")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    evaluate_run(args.checkpoint, args.data, args.out, mpp=args.mpp, split=args.split,
                 device=args.device, skip_bad_slides=args.skip_bad_slides, splits_csv=args.splits,
                 amp=args.amp, n_bootstrap=args.bootstrap, seed=args.seed)
    return 0
