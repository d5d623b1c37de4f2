"""What ``--resume`` may change: a run continues with the network it was trained with.

The checkpoint's stored settings are compared with the new ones before anything is written:
a change of :data:`ARCHITECTURE_FIELDS` is refused (the weights would not fit, or would mean
something else), any other change is accepted with a warning that the run is no longer an
exact continuation, and the previous ``config.json`` is kept beside the new one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from .config import CONFIG_FILE, LEGACY_DEFAULTS, TrainConfig, load_config
from .runtime import PipelineError, atomic_write
from .selection import effective_rule, select_epoch

__all__ = ["ARCHITECTURE_FIELDS", "check_resume", "check_selection", "config_changes", "keep_previous_config"]

logger = logging.getLogger(__name__)

#: Settings that may change on --resume without breaking the exact continuation.
_RESUMABLE_CHANGES = {
    "epochs",
    "device",
    "progress",
    "checkpoint_every",
    "skip_bad_slides",
    "out_dir",
    "data_dir",
    "slide_cache",
    "select_by",  # training goes on exactly; check_selection decides whether best.pt stays valid
    "select_after_epoch",
}

#: ModelConfig fields that --resume refuses to change: they change the network's parameters
#: (their names or shapes: width, head, n_classes, hidden_dim, attention_dim, instance_loss,
#: whose instance classifiers are parameters) or what its forward pass computes (pool,
#: pool_size, dropout), so the weights in last.pt would not fit or would mean something
#: else. Every other change (lr, epochs, tile sizes, k_sample, bag_weight, ...) only
#: changes how the run goes on: accepted, with a warning that it is no longer an exact
#: continuation.
ARCHITECTURE_FIELDS = (
    "width",
    "head",
    "n_classes",
    "hidden_dim",
    "attention_dim",
    "instance_loss",
    "pool",
    "pool_size",
    "dropout",
)


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """{"model": {"width": 4}, "lr": 1} -> {"model.width": 4, "lr": 1}."""
    flat = {k: v for k, v in config.items() if k != "model"}
    model = config.get("model")
    if isinstance(model, dict):
        flat.update({f"model.{k}": v for k, v in model.items()})
    return flat


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that differ ("key: old -> new"), model settings as "model.NAME"; a field
    that ``stored`` lacks (an older version's) counts with its :data:`LEGACY_DEFAULTS` value."""
    stored, current = _flatten({**LEGACY_DEFAULTS, **stored}), _flatten(current)
    changes = []
    for key in sorted(set(stored) | set(current)):
        if key in _RESUMABLE_CHANGES or stored.get(key) == current.get(key):
            continue
        changes.append(f"{key}: {stored.get(key)!r} -> {current.get(key)!r}")
    return changes


def _architecture_changes(stored_model: dict[str, Any], model: dict[str, Any]) -> list[str]:
    """The :data:`ARCHITECTURE_FIELDS` that differ: "model.NAME (--option) old -> new"."""
    return [
        f"model.{name} (--{name.replace('_', '-')}) {stored_model.get(name)!r} -> {model.get(name)!r}"
        for name in ARCHITECTURE_FIELDS
        if stored_model.get(name) != model.get(name)
    ]


def check_resume(ckpt: dict[str, Any], config: TrainConfig, last_path: Path) -> None:
    """Refuse a resume that changes the network (:data:`ARCHITECTURE_FIELDS`), naming each
    change; warn about other changes. Runs before anything is written."""
    stored_model = ckpt.get("model_config")
    if not isinstance(stored_model, dict):
        raise PipelineError(f"{last_path} has no model_config; is it a StreamingCLAM checkpoint?")
    refused = _architecture_changes(stored_model, dataclasses.asdict(config.model))
    if refused:
        raise PipelineError(
            f"--resume cannot change how the network is built: the weights in {last_path} are of the run's "
            f"network. Refused: {'; '.join(refused)}. Resume without these options (the run's config.json keeps "
            f"its settings), or start a new run with another --out. Nothing was written"
        )
    changes = config_changes(ckpt.get("train_config", {}), config.to_dict())
    if changes:
        logger.warning(
            "resuming %s with changed settings (no longer an exact continuation): %s", last_path, "; ".join(changes)
        )


def keep_previous_config(out: Path, config: TrainConfig) -> Path | None:
    """Before config.json is rewritten with other settings, keep the old one beside it as
    ``config.previous-<UTC time>.json``; returns that path (None when nothing changed)."""
    path = out / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        if load_config(path) == config:
            return None
    except ValueError:
        pass  # unreadable: keep its bytes all the same
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = out / f"config.previous-{stamp}.json"
    n = 1
    while kept.exists():
        n += 1
        kept = out / f"config.previous-{stamp}-{n}.json"
    data = path.read_bytes()
    with atomic_write(kept, "wb") as f:
        f.write(data)
    logger.info("kept the previous settings of %s as %s", path, kept.name)
    return kept


def check_selection(ckpt: dict[str, Any], config: TrainConfig, last_path: Path, has_validation: bool) -> None:
    """Refuse a resume whose model-selection settings would not have chosen the run's best.pt.

    ``select_by`` and ``select_after_epoch`` may change on ``--resume`` only when the new
    rule, applied to the epochs finished so far (the checkpoint's ``history``, the rows of
    metrics.csv), selects the epoch that best.pt holds: then best.pt stays the new rule's
    pick (:mod:`~torch_impl.pipeline.selection`) and the run goes on under it. Otherwise the
    weights the new rule asks for are gone, and the resume is refused, naming both epochs.
    A checkpoint without these settings (an older version's) was selected by
    :data:`~torch_impl.pipeline.config.LEGACY_DEFAULTS`.
    """
    stored = {**LEGACY_DEFAULTS, **ckpt.get("train_config", {})}
    before = (stored["select_by"], stored["select_after_epoch"])
    after = (config.select_by, config.select_after_epoch)
    if before == after:
        return
    history = ckpt.get("history") or []
    best_epoch = ckpt.get("best_epoch")
    chosen = select_epoch(history, effective_rule(config.select_by, has_validation), config.select_after_epoch)
    chosen_epoch = None if chosen is None else int(chosen["epoch"])
    change = f"select_by {before[0]!r} -> {after[0]!r}, select_after_epoch {before[1]} -> {after[1]}"
    if chosen_epoch != best_epoch:
        picks = f"epoch {chosen_epoch}" if chosen_epoch is not None else "no epoch yet"
        held = f"best.pt holds epoch {best_epoch}" if best_epoch is not None else "no best.pt was written yet"
        raise PipelineError(
            f"--resume cannot change model selection ({change}): over the {len(history)} epochs in {last_path} "
            f"the new rule picks {picks}, but {held}, chosen by the old rule, and the "
            f"weights of the other epochs are gone. Resume with --select-by {before[0]} --select-after-epoch "
            f"{before[1]} (the run's own settings), or start a new run with another --out. Nothing was written"
        )
    logger.info(
        "model selection changed on resume (%s): over the %d finished epochs it picks epoch %s, the one best.pt "
        "holds; the new rule applies from here on",
        change,
        len(history),
        best_epoch,
    )
