"""Train StreamingCLAM end to end on whole slides: the paper's two-phase recipe, exact resume, DDP.

Per epoch (``TrainConfig`` in :mod:`torch_impl.pipeline.config`):

    phase 1 (epoch < head_only_epochs): trunk frozen, only the CLAM head learns
    phase 2: the whole network; trunk learning rate lr * trunk_lr_factor, optional smaller
             recompute + backward tile (phase2_tile_size)

    order = balanced (or shuffled) slide order of the epoch           f(seed, epoch)
    for each slide of this process's share of the order:               rank r: r, r + N, ...
        crop  = random max_size window inside the tissue               f(seed, epoch, position)
        view  = AugmentedView(crop, flips, rot90, HSV jitter)          f(seed, epoch, position)
        loss  = CE(model(view, tissue mask), label)                    (bf16 autocast on CUDA)
        grads += d loss / d params                                     (streamed backward)
        every `accumulate` slides: average over slides and processes, Adam step
    validation: every val slide whole (no crop, no augmentation): loss, AUC, accuracy
    last.pt (every epoch, and every `checkpoint_every` slides), best.pt (the epoch that
    `select_by` picks, epochs <= `select_after_epoch` excluded: pipeline/selection.py),
    metrics.csv, config.json

Exact resume. Everything random is a pure function of (seed, epoch, position in the
epoch's order): the order, the crop, the augmentation and the torch generator used for the
slide (dropout); the learning rate is a function of the epoch. Checkpoints are written only
right after an optimizer step (no half-accumulated gradients), with the model, Adam's state
and how far the epoch got. ``--resume`` therefore continues bitwise identically to a run
that was never interrupted (``tests/test_train.py``).

Gradients come from ``torch.autograd.grad`` per slide and are added to ``.grad`` only once
the slide succeeded: a slide that fails halfway (unreadable tile, non-finite loss or
gradient) leaves the accumulated gradients untouched, so ``--skip-bad-slides`` can skip it
cleanly. A non-finite loss stops the run, naming the slide, without writing a checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..models.streaming_clam import StreamingCLAM, build_model
from ..slides import SlideError, SlideRecord, discover, make_splits
from ..slides.augment import AugmentedView, draw_augmentation
from ..slides.device_view import augmented_crop
from ..slides.inputs import SlideInput
from .calibration import calibrate_batchnorm, calibration_batch
from .checkpoint import load_checkpoint, quiet_random_init, rng_state, save_checkpoint, set_rng_state
from .config import CHOICES, CONFIG_FILE, TrainConfig, load_config, load_run_config, save_config, validate_config
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_parameters,
    gather_objects,
    init_distributed,
    reduce_gradients,
    shard,
)
from .logs import QUIET, run_log, verbosity, verbosity_options
from .metrics import accuracy, roc_auc
from .options import OptionParser, add_dataclass_options, apply_options, field_paths, given_options
from .predict import feature_mask, open_slide, predict_slides
from .resume import check_resume, check_selection, keep_previous_config
from .run_lock import RunLock, RunLockedError
from .runtime import BadSlideError, PipelineError, atomic_write, autocast_dtype, remove_stale_temp_files
from .runtime import autocast as _autocast
from .selection import effective_rule, rule_metric, select_epoch

__all__ = [
    "TrainingError",
    "BadSlideError",
    "NonFiniteLossError",
    "RunLockedError",
    "epoch_order",
    "train",
    "main_train",
]

logger = logging.getLogger(__name__)

LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.csv"
#: metrics.csv: one row per epoch; lr is the head's; seconds = training time (without validation);
#: best_epoch = the epoch best.pt holds after this one, chosen by the rule select_by.
METRIC_COLUMNS = (
    "epoch",
    "phase",
    "lr",
    "train_loss",
    "train_slides",
    "skipped",
    "val_loss",
    "val_auc",
    "val_accuracy",
    "val_slides",
    "seconds",
    "best_epoch",
    "select_by",
)

# Streams of the per-run seed sequence: np.random.default_rng([seed, stream, ...]).
_ORDER_STREAM, _SLIDE_STREAM = 1, 2


#: Training cannot go on (the message says why and what to do): the pipeline's base error
#: under its training name. :class:`~torch_impl.pipeline.runtime.BadSlideError`, the one
#: error of an unusable slide everywhere (skippable with ``skip_bad_slides``), is one, so
#: ``except TrainingError`` also catches it.
TrainingError = PipelineError


class NonFiniteLossError(TrainingError):
    """A slide gave a NaN or infinite loss or gradient; the run stops, the last checkpoint stays."""


# ----------------------------------------------------------------------------- run state
@dataclass
class RunState:
    """How far the run got: everything besides the model and optimizer that a resume needs."""

    epoch: int = 0  # completed epochs
    slide_index: int = 0  # positions of `order` consumed so far (all processes together)
    order: list[str] = field(default_factory=list)  # slide ids of the current epoch, in order
    loss_sum: float = 0.0  # current epoch: sum of training losses so far (all processes)
    slides: int = 0  # current epoch: slides trained on so far (all processes)
    skipped: int = 0  # current epoch: slides skipped so far (all processes)
    seconds: float = 0.0  # current epoch: wall time before the last checkpoint
    best_val_auc: float | None = None  # validation AUC of best.pt's epoch (None: undefined)
    best_val_loss: float | None = None  # validation loss of best.pt's epoch (None: undefined)
    best_epoch: int | None = None  # 1-based epoch of best.pt (None: none eligible yet)
    select_by: str | None = None  # the rule that chose best_epoch (selection.effective_rule; None: older run)
    best_value: float | None = None  # best_epoch's value of the rule's metric (selection.rule_metric)
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per finished epoch


# ----------------------------------------------------------------------------- orders
def epoch_order(
    records: Sequence[SlideRecord], epoch: int, seed: int, sampler: str = "balanced", max_slides: int | None = None
) -> list[SlideRecord]:
    """The epoch's slide order, a pure function of (records, epoch, seed).

    ``"shuffle"``: a permutation of the records. ``"balanced"``: every class is drawn as often
    as the largest class has slides: the largest class's slides once each, smaller classes
    cycled through fresh permutations, the union shuffled (class-balanced like a weighted
    sampler, but every slide of the largest class is seen each epoch). ``max_slides`` cuts the
    order.
    """
    rng = np.random.default_rng([seed, _ORDER_STREAM, epoch])
    records = sorted(records, key=lambda r: r.slide_id)
    if not records:
        return []
    if sampler == "shuffle":
        chosen = [records[i] for i in rng.permutation(len(records))]
    elif sampler == "balanced":
        by_label: dict[int, list[SlideRecord]] = {}
        for r in records:
            by_label.setdefault(r.label, []).append(r)
        n = max(len(v) for v in by_label.values())
        chosen = []
        for label in sorted(by_label):
            members = by_label[label]
            draws: list[SlideRecord] = []
            while len(draws) < n:
                draws += [members[i] for i in rng.permutation(len(members))]
            chosen += draws[:n]
        chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    else:
        raise ValueError(f"sampler must be 'balanced' or 'shuffle', got {sampler!r}")
    return chosen[:max_slides] if max_slides is not None else chosen


def slide_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    """The generator of one training slide: its crop, its augmentation, its torch seed."""
    return np.random.default_rng([seed, _SLIDE_STREAM, epoch, position])


def learning_rate_factor(config: TrainConfig, epoch: int) -> float:
    """Multiplier of the base learning rates in (0-based) ``epoch``: 1, or cosine to 0."""
    if config.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return 1.0


# ----------------------------------------------------------------------------- one slide
def _open(record: SlideRecord, config: TrainConfig, rng: np.random.Generator | None) -> SlideInput:
    """The slide's crop (random with ``rng``, else the whole tissue); BadSlideError if unusable."""
    with record_function("slides.open"):  # the file, its tissue mask and the crop
        return open_slide(record.path, config.mpp, record.slide_id, max_size=config.max_size, rng=rng)


def _feature_mask(model: StreamingCLAM, view: AugmentedView, slide: SlideInput, record: SlideRecord) -> torch.Tensor:
    """(1, h', w') tissue mask on the trunk's output grid for the (augmented) view
    (:func:`torch_impl.pipeline.predict.feature_mask`, the grid inference uses)."""
    mask = feature_mask(model, slide, view)
    if not mask.any():
        raise BadSlideError(f"slide {record.slide_id} ({record.path}): no tissue on the feature grid of its crop")
    return mask


def _train_slide(
    model: StreamingCLAM,
    params: list[torch.nn.Parameter],
    record: SlideRecord,
    config: TrainConfig,
    rng: np.random.Generator,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    where: str,
) -> float:
    """Forward and streamed backward of one slide; adds its gradients to ``.grad``; returns the loss.

    Nothing is added unless the whole slide succeeded (see the module docstring).
    """
    slide = _open(record, config, rng)
    try:
        aug = draw_augmentation(
            rng, config.flip, config.rot90, config.hue_shift, config.saturation_scale, config.value_scale
        )
        view = AugmentedView(slide.source, aug)  # its geometry places the tissue mask; it reads no pixels
        mask = _feature_mask(model, view, slide, record).to(device)
        label = torch.tensor([record.label], device=device)
        torch_seed = int(rng.integers(2**62))
        devices = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        )
        try:
            # the crop is decoded once for the forward and the backward pass (config.slide_cache)
            # and flipped, turned and colour-jittered once per pixel as it is filled, on the
            # cache's device (with mode none, tile by tile); equal to the NumPy `view` bit for bit
            # on the CPU (tests/test_device_view.py)
            with (
                augmented_crop(slide.source, aug, device, config.slide_cache) as augmented,
                torch.random.fork_rng(devices=devices),
            ):
                torch.manual_seed(torch_seed)
                with _autocast(device, amp_dtype):
                    output = model(augmented, mask, label)
                loss = model.loss(output, label)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"non-finite training loss ({loss.item()}) on slide {record.slide_id} ({record.path}) "
                        f"{where}; stopping without saving, the last checkpoint is intact"
                    )
                grads = torch.autograd.grad(loss, params, allow_unused=True)  # the backward reads the cache too
        except (SlideError, OSError) as e:
            raise BadSlideError(f"slide {record.slide_id} ({record.path}): reading failed during training: {e}") from e
    finally:
        slide.close()
    bad = [i for i, g in enumerate(grads) if g is not None and not torch.isfinite(g).all()]
    if bad:
        raise NonFiniteLossError(
            f"non-finite gradient ({len(bad)} parameter tensors) from slide {record.slide_id} ({record.path}) "
            f"{where}; stopping without saving, the last checkpoint is intact"
        )
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(g)
    return float(loss.detach())


def _optimizer_step(
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    group: torch.Tensor,
    info: DistInfo,
    grad_clip: float | None,
) -> torch.Tensor:
    """Average the accumulated gradients over slides and processes, step, zero them.

    ``group`` = (slides, loss sum, skipped) of this process since the last step, float64;
    returns it summed over processes.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # every process reduces the same tensors
    group = all_reduce_sum(group, info)
    reduce_gradients(params, info)
    n = int(group[0].item())
    if n > 0:
        with torch.no_grad():
            for p in params:
                p.grad.div_(n)  # mean over the slides of all processes
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return group


# ----------------------------------------------------------------------------- validation
def validate(
    model: StreamingCLAM,
    records: Sequence[SlideRecord],
    config: TrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    info: DistInfo | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss (bag cross-entropy), AUC and accuracy on whole slides (no crop, no augmentation).

    Each slide goes through :func:`torch_impl.pipeline.predict.predict_slides`, the inference
    of evaluation and prediction (``amp_dtype``: bfloat16 autocast, or None for float32);
    the loss is the cross-entropy of the prediction's logits. Processes share the slides
    (rank r: r, r + N, ...) and gather the results. Unusable slides raise BadSlideError, or
    are skipped with ``config.skip_bad_slides``. Returns {"val_loss", "val_auc",
    "val_accuracy", "val_slides", "val_skipped"} (NaN when undefined).
    """
    if amp_dtype not in (None, torch.bfloat16):
        raise ValueError(f"amp_dtype must be None or torch.bfloat16, got {amp_dtype}")
    info = info if info is not None else DistInfo()
    local = list(records)[info.rank :: info.world_size]
    labels_by_id = {r.slide_id: r.label for r in local}
    predictions, skipped_slides = predict_slides(
        model,
        [(r.slide_id, r.path) for r in local],
        config.mpp,
        device,
        "off" if amp_dtype is None else "bf16",
        config.skip_bad_slides,
        progress=progress,
        slide_cache=config.slide_cache,  # each slide decoded once, as in training
    )
    rows: list[tuple[str, int, float, float]] = []
    for pred in predictions:
        label = labels_by_id[pred.slide_id]
        logits = torch.from_numpy(pred.logits)[None]  # (1, n_classes)
        loss = float(torch.nn.functional.cross_entropy(logits, torch.tensor([label])))
        rows.append((pred.slide_id, label, pred.prob_tumor, loss))
    parts = gather_objects((rows, len(skipped_slides)), info)  # [(rows, skipped)] per process
    gathered = [row for part in parts for row in part[0]]
    skipped = sum(part[1] for part in parts)
    labels = [r[1] for r in gathered]
    probs = [r[2] for r in gathered]
    finite = all(math.isfinite(p) for p in probs)
    return {
        "val_loss": float(np.mean([r[3] for r in gathered])) if gathered else float("nan"),
        "val_auc": roc_auc(labels, probs) if gathered and finite else float("nan"),
        "val_accuracy": accuracy(labels, probs) if gathered and finite else float("nan"),
        "val_slides": len(gathered),
        "val_skipped": skipped,
    }


def _finite(value: float) -> float | None:
    """``value`` as a float, None when NaN or infinite (the state's "undefined")."""
    return float(value) if math.isfinite(value) else None


def _select(state: RunState, config: TrainConfig, has_validation: bool) -> bool:
    """Apply the selection rule to the finished epochs (``state.history``); True when it picks
    the newest epoch, which then goes to best.pt (:mod:`~torch_impl.pipeline.selection`)."""
    rule = effective_rule(config.select_by, has_validation)
    best = select_epoch(state.history, rule, config.select_after_epoch)
    newest = state.history[-1]
    improved = best is newest
    if improved:
        state.best_val_auc, state.best_val_loss = _finite(newest["val_auc"]), _finite(newest["val_loss"])
        state.best_epoch, state.best_value = newest["epoch"], _finite(newest[rule_metric(rule)])
        state.select_by = rule
    newest["best_epoch"], newest["select_by"] = state.best_epoch, rule
    return improved


# ----------------------------------------------------------------------------- bookkeeping
def _checkpoint(path: Path, run: _Run, config: TrainConfig) -> None:
    save_checkpoint(
        path,
        model=run.model.state_dict(),
        model_config=dataclasses.asdict(config.model),
        train_config=config.to_dict(),
        optimizer=run.optimizer.state_dict(),
        scheduler=None,  # the learning rate is learning_rate_factor(config, epoch)
        world_size=run.info.world_size,
        rng=rng_state(),
        **dataclasses.asdict(run.state),
    )


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """metrics.csv from the history (rewritten whole and atomically: always matches last.pt)."""
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)


class _TensorBoard:
    """Per-epoch scalars to TensorBoard when the ``tensorboard`` package is installed."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed: metrics go to %s only", folder / METRICS)
            return
        self.writer = SummaryWriter(str(folder / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key in ("lr", "train_loss", "val_loss", "val_auc", "val_accuracy"):
            value = row.get(key)
            if isinstance(value, float) and math.isfinite(value):
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    return autocast_dtype(config.amp, device)


def _set_phase(model: StreamingCLAM, config: TrainConfig, epoch: int) -> int:
    """Freeze or unfreeze the trunk for ``epoch``; returns the phase (1 or 2)."""
    phase = 1 if epoch < config.head_only_epochs else 2
    model.set_trunk_trainable(phase == 2)
    backward_tile = config.model.backward_tile_size or config.model.tile_size
    if phase == 2 and config.phase2_tile_size is not None:
        backward_tile = config.phase2_tile_size
    model.trunk.backward_tile_size = backward_tile
    return phase


def _make_optimizer(model: StreamingCLAM, config: TrainConfig) -> torch.optim.Adam:
    """Adam over two groups: the head (lr) and the trunk (lr * trunk_lr_factor).

    The trunk's group exists from the start: in phase 1 its parameters get no gradient, and
    Adam skips parameters without one, so the optimizer (and its checkpointed state) never
    needs rebuilding at the phase switch.
    """
    return torch.optim.Adam(
        [
            {"params": list(model.head.parameters()), "name": "head"},
            {"params": list(model.trunk.parameters()), "name": "trunk", "lr": config.lr * config.trunk_lr_factor},
        ],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )


def _load_records(config: TrainConfig, info: DistInfo) -> tuple[list[SlideRecord], list[SlideRecord]]:
    """(training, validation) records; rank 0 writes the splits CSV, the others then read it."""
    records = discover(config.data_dir, exclude=config.exclude, include_test=False)  # no reference CSV needed
    if not records:
        raise TrainingError(f"no training slides under {config.data_dir} (expected training/normal, training/tumor)")
    splits_csv = config.resolved_splits_csv()
    if info.is_main:
        records = make_splits(records, splits_csv, config.val_fraction, config.seed)
    barrier(info)
    if not info.is_main:
        records = make_splits(records, splits_csv, config.val_fraction, config.seed)
    train_records = [r for r in records if r.split == "train"]
    val_records = [r for r in records if r.split == "val"]
    if not train_records:
        raise TrainingError(f"{splits_csv} leaves no training slides (all {len(records)} are 'val')")
    if info.is_main:
        _check_validation_set(train_records, val_records, config, splits_csv)
    return train_records, val_records


def _check_validation_set(
    train_records: Sequence[SlideRecord], val_records: Sequence[SlideRecord], config: TrainConfig, splits_csv: Path
) -> None:
    """Warn when the validation set cannot rank epochs well: no validation slides (best.pt is
    then the last epoch), or fewer than 2 of a class (the AUC is undefined, or takes so few
    values that epochs tie)."""
    if not val_records:
        deliberate = config.val_fraction == 0 and not config.splits_csv
        logger.log(
            logging.INFO if deliberate else logging.WARNING,
            "no validation slides in %s (val_fraction %g): best.pt is the last epoch, whatever select_by says",
            splits_csv,
            config.val_fraction,
        )
        return
    labels = sorted({r.label for r in [*train_records, *val_records]})
    counts = {label: sum(r.label == label for r in val_records) for label in labels}
    if min(counts.values()) >= 2:
        return
    if min(counts.values()) == 0:
        what = "undefined (NaN): a class has no validation slide"
    else:  # the AUC counts the slide pairs of different classes ranked right (ties: half)
        pairs = math.prod(counts.values())
        what = f"coarse: at most {2 * pairs + 1} values from {pairs} slide pair(s), so epochs tie"
    advice = (
        "; select_by 'val_auc' then falls back on the validation loss among tied epochs (--select-by val_loss ranks by "
        "it directly)"
        if config.select_by == "val_auc"
        else ""
    )
    logger.warning(
        "validation slides per class %s in %s: the validation AUC is %s; a larger val_fraction or splits CSV gives "
        "each class at least 2%s",
        counts,
        splits_csv,
        what,
        advice,
    )


# ----------------------------------------------------------------------------- the run
@dataclass
class _Run:
    """What one call of :func:`train` works with (built by :func:`_start_run`)."""

    config: TrainConfig
    info: DistInfo
    device: torch.device
    model: StreamingCLAM
    optimizer: torch.optim.Optimizer
    state: RunState
    train_by_id: dict[str, SlideRecord]
    val_records: list[SlideRecord]
    amp_dtype: torch.dtype | None
    progress: bool
    lock: RunLock | None = None  # rank 0's lock of the run folder

    @property
    def out(self) -> Path:
        return Path(self.config.out_dir)


def _start_run(config: TrainConfig, resume: bool) -> _Run:
    """Join the process group, lock the run folder (rank 0), check a resume, read the
    splits, build (or restore) model, optimizer and state.

    Nothing is written to the run folder before the lock is held and a resume is checked
    (:func:`~torch_impl.pipeline.resume.check_resume`); config.json is rewritten only after last.pt loaded into the
    model and optimizer, its previous version kept (:func:`~torch_impl.pipeline.resume.keep_previous_config`). On an
    error the lock is released.
    """
    info, device = init_distributed(config.device)
    out = Path(config.out_dir)
    lock = RunLock(out, "train").acquire() if info.is_main else None
    try:
        return _open_run(config, resume, info, device, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _open_run(config: TrainConfig, resume: bool, info: DistInfo, device: torch.device, lock: RunLock | None) -> _Run:
    out = Path(config.out_dir)
    last_path = out / LAST
    if not Path(config.data_dir).is_dir():  # before the network is built (and warns about its weights)
        raise TrainingError(f"CAMELYON16 root not found: {config.data_dir} (--data)")
    if resume and not last_path.is_file():
        raise TrainingError(f"--resume: no {LAST} in {out} to resume from")
    if not resume and last_path.exists():
        raise TrainingError(f"{out} already holds {LAST}: pass --resume to continue that run, or choose another --out")
    ckpt = None
    if resume:
        ckpt = load_checkpoint(last_path, map_location=device)
        check_resume(ckpt, config, last_path)
    if info.is_main:
        remove_stale_temp_files(out)  # leftovers of a run killed mid-write (see runtime)

    # the network first: a bad weight file stops the run before splits.csv is written
    torch.manual_seed(config.seed)  # the model's initialisation, the same on every process
    if resume:  # every weight comes from last.pt: no weight file needed, no random-init warning
        with quiet_random_init():
            model = build_model(dataclasses.replace(config.model, weights=None)).to(device)
    else:
        model = build_model(config.model).to(device)
    optimizer = _make_optimizer(model, config)
    state = RunState()
    train_records, val_records = _load_records(config, info)
    by_id = {r.slide_id: r for r in train_records}
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise TrainingError(
                f"{last_path} does not fit the configured network ({e}); resume with the run's "
                f"own settings (its config.json). Nothing was written"
            ) from e
        check_selection(ckpt, config, last_path, bool(val_records))
        fields = {f.name for f in dataclasses.fields(RunState)}
        state = RunState(**{k: v for k, v in ckpt.items() if k in fields})
        if state.slide_index and ckpt.get("world_size", 1) != info.world_size:
            raise TrainingError(
                f"{last_path} stopped mid-epoch with {ckpt.get('world_size')} processes; resume it with the same "
                f"number (now {info.world_size}), or from an epoch boundary"
            )
        missing = [s for s in state.order if s not in by_id]
        if missing:
            raise TrainingError(
                f"{last_path}: slides of the interrupted epoch are no training slides now: {missing[:5]}"
            )
        set_rng_state(ckpt["rng"])
        if state.epoch >= config.epochs:
            logger.info("%s: all %d epochs are done already", last_path, config.epochs)
        else:
            logger.info(
                "resuming %s: %d epochs done, %d slides into epoch %d",
                last_path,
                state.epoch,
                state.slide_index,
                state.epoch + 1,
            )
    elif config.calibrate_bn and config.model.weights is None:
        n = calibrate_batchnorm(model.trunk.module, calibration_batch(model, train_records, config, device))
        logger.info("random trunk: set the statistics of %d frozen batch norms from training crops", n)
    if info.is_main:
        if resume:
            keep_previous_config(out, config)
        save_config(config, out)
    broadcast_parameters(model, info)

    amp_dtype = _amp_dtype(config, device)
    logger.info(
        "training on %d slides, validating on %d, %d epoch(s) (%d head only) at %g um/px on %s%s%s",
        len(train_records),
        len(val_records),
        config.epochs,
        config.head_only_epochs,
        config.mpp,
        device,
        " with bf16 autocast" if amp_dtype is not None else "",
        f", {info.world_size} processes" if info.enabled else "",
    )
    progress = config.progress and info.is_main and sys.stderr.isatty()
    return _Run(config, info, device, model, optimizer, state, by_id, val_records, amp_dtype, progress, lock)


def _train_epoch(run: _Run, epoch: int, phase: int, on_slide: Callable[[dict[str, Any]], None] | None) -> None:
    """Train on this process's share of the epoch's order, from where ``run.state`` stands.

    Steps every ``accumulate`` slides and writes last.pt every ``checkpoint_every`` slides
    (right after a step).
    """
    config, info, state, model = run.config, run.info, run.state, run.model
    params = [p for p in model.parameters() if p.requires_grad]
    if state.slide_index == 0:
        state.order = [
            r.slide_id
            for r in epoch_order(
                list(run.train_by_id.values()), epoch, config.seed, config.sampler, config.max_slides_per_epoch
            )
        ]
    positions = shard(list(enumerate(state.order)), info.rank, info.world_size)  # [(position, slide id)]
    start_local = state.slide_index // info.world_size
    started = time.perf_counter() - state.seconds
    last_saved = state.slide_index
    group = torch.zeros(3, dtype=torch.float64, device=run.device)  # this process: slides, loss sum, skipped
    model.train()
    bar = tqdm(
        total=len(positions),
        initial=start_local,
        desc=f"epoch {epoch + 1} (phase {phase})",
        leave=False,
        disable=not run.progress,
    )
    for i in range(start_local, len(positions)):
        position, slide_id = positions[i]
        record = run.train_by_id[slide_id]
        where = f"(epoch {epoch + 1}, position {position})"
        t0 = time.perf_counter()
        try:
            loss = _train_slide(
                model, params, record, config, slide_rng(config.seed, epoch, position), run.device, run.amp_dtype, where
            )
            group += torch.tensor([1.0, loss, 0.0], dtype=torch.float64, device=run.device)
            logger.debug("%s %s: loss %.4f, %.2f s", record.slide_id, where, loss, time.perf_counter() - t0)
        except BadSlideError as e:
            if not config.skip_bad_slides:
                raise
            logger.warning("skipping %s: %s", where, e)
            group[2] += 1
            loss = None
        bar.update(1)
        if on_slide is not None:
            on_slide({"epoch": epoch, "position": position, "slide_id": slide_id, "loss": loss})
        if (i + 1) % config.accumulate == 0 or i + 1 == len(positions):
            slides, loss_sum, skipped = _optimizer_step(run.optimizer, params, group, info, config.grad_clip).tolist()
            group.zero_()
            state.slides += int(slides)
            state.loss_sum += loss_sum
            state.skipped += int(skipped)
            state.slide_index = (i + 1) * info.world_size
            state.seconds = time.perf_counter() - started
            if state.slides:
                bar.set_postfix(loss=f"{state.loss_sum / state.slides:.4f}")
            due = config.checkpoint_every and state.slide_index - last_saved >= config.checkpoint_every
            if due and i + 1 < len(positions):
                if info.is_main:
                    _checkpoint(run.out / LAST, run, config)
                    logger.debug("wrote %s after %d slides of epoch %d", run.out / LAST, state.slide_index, epoch + 1)
                last_saved = state.slide_index
    bar.close()
    if state.slides == 0:
        raise TrainingError(f"epoch {epoch + 1}: every slide was skipped; nothing was trained")


def _finish_epoch(run: _Run, epoch: int, phase: int, factor: float, board: _TensorBoard) -> None:
    """Validate, record the epoch's metrics, write last.pt, best.pt (when the rule picks this epoch), metrics.csv."""
    config, state = run.config, run.state
    if run.val_records:
        val = validate(run.model, run.val_records, config, run.device, run.amp_dtype, run.info, run.progress)
    else:  # without validation slides best.pt follows the last epoch (selection.effective_rule)
        val = {"val_loss": math.nan, "val_auc": math.nan, "val_accuracy": math.nan, "val_slides": 0, "val_skipped": 0}
    row = {
        "epoch": epoch + 1,
        "phase": phase,
        "lr": config.lr * factor,
        "train_loss": state.loss_sum / state.slides,
        "train_slides": state.slides,
        "skipped": state.skipped,
        **val,
        "seconds": round(state.seconds, 3),
    }
    state.history.append(row)
    improved = _select(state, config, bool(run.val_records))
    state.epoch, state.slide_index, state.order = epoch + 1, 0, []
    state.loss_sum, state.slides, state.skipped, state.seconds = 0.0, 0, 0, 0.0
    if run.info.is_main:
        _checkpoint(run.out / LAST, run, config)
        if improved:
            _checkpoint(run.out / BEST, run, config)
        _write_metrics(run.out / METRICS, state.history)
        board.log(row)
    logger.info(
        "epoch %d/%d (phase %d): train loss %.4f on %d slides%s; val loss %.4f, AUC %.4f, accuracy %.4f on %d "
        "slides; %.0f s%s",
        epoch + 1,
        config.epochs,
        phase,
        row["train_loss"],
        row["train_slides"],
        f" ({row['skipped']} skipped)" if row["skipped"] else "",
        row["val_loss"],
        row["val_auc"],
        row["val_accuracy"],
        row["val_slides"],
        row["seconds"],
        f"; best.pt by {state.select_by}" if improved else "",
    )


def train(
    config: TrainConfig, resume: bool = False, *, on_slide: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Train (or with ``resume`` continue) a run; returns the final metrics.

    Args:
        config: the run (validated here). ``config.out_dir`` receives config.json,
            splits.csv, metrics.csv, last.pt and best.pt.
        resume: continue from ``<out_dir>/last.pt`` exactly where it stopped. Without it, a
            run folder that already holds last.pt is refused.
        on_slide: called after every training slide, before its optimizer step, with
            {"epoch" (0-based), "position", "slide_id", "loss"} (loss None for a skipped
            slide); an exception it raises stops the run there (the last checkpoint stays, so
            ``resume`` continues from it: this is how the tests interrupt a run).

    Under ``torchrun`` (WORLD_SIZE > 1) every process calls this; rank 0 writes the files.

    Returns:
        {"epochs", "train_loss", "val_loss", "val_auc", "val_accuracy" (the last epoch's),
        "best_epoch" (best.pt's; None when no epoch was eligible), "select_by" (the rule that
        chose it: ``config.select_by``, or "last" without validation slides), "best_value"
        (its metric at best_epoch: val_loss, val_auc, or the epoch for "last"),
        "best_val_auc", "best_val_loss", "last_checkpoint", "best_checkpoint", "metrics_csv"}.

    Raises:
        BadSlideError: a slide is unusable and ``skip_bad_slides`` is off.
        NonFiniteLossError: a loss or gradient is NaN/inf (no checkpoint is written).
        TrainingError: nothing to train on, nothing to resume, a run folder in the way, or a
            resume that would change the network (:data:`~torch_impl.pipeline.resume.ARCHITECTURE_FIELDS`).
        RunLockedError: another run uses ``config.out_dir`` (its PID and host named).
        DiskFullError: the disk filled up while writing a checkpoint (the previous one is intact).
    """
    validate_config(config)
    run = _start_run(config, resume)
    state = run.state
    try:
        board = _TensorBoard(run.out, run.info.is_main)
    except BaseException:
        if run.lock is not None:
            run.lock.release()
        raise
    try:
        with logging_redirect_tqdm() if run.progress else nullcontext():
            for epoch in tqdm(
                range(state.epoch, config.epochs),
                desc="epochs",
                initial=state.epoch,
                total=config.epochs,
                disable=not run.progress,
            ):
                phase = _set_phase(run.model, config, epoch)
                factor = learning_rate_factor(config, epoch)
                for group in run.optimizer.param_groups:  # from the config, also after a resume
                    scale = config.trunk_lr_factor if group["name"] == "trunk" else 1.0
                    group["lr"] = config.lr * scale * factor
                    group["weight_decay"] = config.weight_decay
                _train_epoch(run, epoch, phase, on_slide)
                _finish_epoch(run, epoch, phase, factor, board)
    finally:
        board.close()
        if run.lock is not None:
            run.lock.release()
    barrier(run.info)
    if run.info.is_main:
        _log_selection(state, config)
    final = state.history[-1] if state.history else {}
    return {
        "epochs": state.epoch,
        "train_loss": final.get("train_loss"),
        "val_loss": final.get("val_loss"),
        "val_auc": final.get("val_auc"),
        "val_accuracy": final.get("val_accuracy"),
        "best_epoch": state.best_epoch,
        "select_by": state.select_by,
        "best_value": state.best_value,
        "best_val_auc": state.best_val_auc,
        "best_val_loss": state.best_val_loss,
        "last_checkpoint": str(run.out / LAST),
        "best_checkpoint": str(run.out / BEST),
        "metrics_csv": str(run.out / METRICS),
    }


def _log_selection(state: RunState, config: TrainConfig) -> None:
    """Say which epoch best.pt holds and why; warn when it is a head-only epoch of a run that
    trained its trunk later (its trunk is the initial one)."""
    if state.best_epoch is None:
        return
    if state.select_by is None:  # chosen before the rule was recorded
        why = "selected by an older version (validation AUC, ties: loss)"
    else:
        value = "undefined" if state.best_value is None else f"{state.best_value:.6g}"
        why = f"selected by {state.select_by} ({rule_metric(state.select_by)} {value})"
    excluded = f", epochs 1-{config.select_after_epoch} excluded" if config.select_after_epoch else ""
    logger.info("best.pt: epoch %d of %d, %s%s", state.best_epoch, state.epoch, why, excluded)
    if state.best_epoch <= config.head_only_epochs < state.epoch:
        logger.warning(
            "best.pt is epoch %d, a head-only epoch: its trunk was never trained. --select-after-epoch %d "
            "selects among the epochs that trained the trunk",
            state.best_epoch,
            config.head_only_epochs,
        )


# ----------------------------------------------------------------------------- CLI
#: Options named unlike their fields (the names the README and earlier versions use).
_RENAMES = {"data_dir": "--data", "out_dir": "--out"}
_METAVARS = {
    "data_dir": "DIR",
    "out_dir": "RUN",
    "splits_csv": "CSV",
    "exclude": "SLIDE",
    "device": "DEV",
    "model.weights": "FILE",
}


def _parser(prog: str = "python -m torch_impl train") -> argparse.ArgumentParser:
    """The train command: --config, --resume, -v/-q and one option per TrainConfig/ModelConfig field
    (usage errors in one line, :class:`~torch_impl.pipeline.options.OptionParser`)."""
    p = OptionParser(
        prog=prog,
        description="Train StreamingCLAM (ResNet-34 + CLAM, streamed) on a CAMELYON16-style data set. "
        "Settings: the defaults shown < --config FILE (or the run's config.json with --resume) "
        "< the options given. Several GPUs: torchrun --nproc_per_node N -m torch_impl train ...",
        parents=[verbosity_options()],
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help='JSON file of TrainConfig fields, model settings under "model" (default: none)',
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out exactly where its last.pt left off, with the settings "
        "of its config.json (default: a new run)",
    )
    add_dataclass_options(p, TrainConfig, title="run", renames=_RENAMES, metavars=_METAVARS, choices=CHOICES)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < --config FILE (or RUN/config.json on --resume) < the options given; -q: no progress bars."""
    out_dir = getattr(args, "out_dir", None)
    if args.config is not None:
        config = load_config(args.config)
    elif args.resume and out_dir and (Path(out_dir) / CONFIG_FILE).is_file():
        config = load_run_config(Path(out_dir) / CONFIG_FILE)  # an older run's keeps its selection rule
    else:
        config = TrainConfig()
    config = apply_options(config, given_options(args, field_paths(TrainConfig)))
    if args.quiet:
        config = dataclasses.replace(config, progress=False)
    return config


def main_train(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """CLI: ``python -m torch_impl train --data DIR --out RUN [options]``. Returns 0 when done.

    Invalid settings (ValueError of :func:`validate_config`, a missing --config file) and a
    failed run (:class:`TrainingError`, ...) propagate: :func:`torch_impl.pipeline.cli.main`
    reports the expected ones in one line (exit status 2). Logging is set up by the caller
    (the top-level CLI); rank 0 also logs to ``RUN/train.log``, which records why a run
    stopped. ``-q`` here or before the command: no progress bars.
    """
    args = _parser(prog or "python -m torch_impl train").parse_args(argv)
    args.quiet = args.quiet or verbosity() == QUIET
    config = validate_config(config_from_args(args))
    rank = int(os.environ.get("RANK", "0") or 0)
    # rank 0 locks the run folder before train.log is opened: a refused second run must not
    # write into the first run's log (train() takes the same lock again, re-entrantly)
    with (
        RunLock(config.out_dir, "train") if rank == 0 else nullcontext(),
        run_log(Path(config.out_dir) / "train.log") if rank == 0 else nullcontext(),
    ):
        try:
            result = train(config, resume=args.resume)
        except Exception as e:
            logger.error("training stopped: %s", e)  # into train.log; the caller reports or raises it
            raise
        logger.info("done: %s", json.dumps(result))
    return 0
