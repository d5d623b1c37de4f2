"""Which epoch ``best.pt`` holds: one selection rule over the rows of ``metrics.csv``.

A training run writes ``best.pt`` at the end of the epoch that :func:`select_epoch` picks
from the epochs finished so far (the rows of ``metrics.csv``, in the run's state as
``history``). The rule (``TrainConfig.select_by``):

    "val_loss"   lowest validation loss; NaN ranks worst; ties: the earlier epoch
    "val_auc"    highest validation AUC; NaN ranks worst; ties: lower validation loss,
                 then the earlier epoch (the only rule before ``select_by`` existed)
    "last"       the last epoch

Epochs 1 .. ``select_after_epoch`` are never selected (``select_after_epoch =
head_only_epochs`` makes best.pt a model whose trunk was trained). A run without validation
slides has no validation metric: its best.pt is the last epoch whatever the rule
(:func:`effective_rule`).

Because the pick over a growing list of epochs either stays or moves to the newest epoch
(ties go to the earlier epoch), writing best.pt whenever the newest epoch is picked leaves
best.pt holding exactly the epoch that :func:`select_epoch` picks over the whole of
``metrics.csv``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "LEGACY_SELECT_BY",
    "SELECT_RULES",
    "effective_rule",
    "rule_metric",
    "select_epoch",
]

#: The values of ``TrainConfig.select_by``.
SELECT_RULES = ("val_loss", "val_auc", "last")

#: The rule of runs written before ``select_by`` existed (their config.json and checkpoints lack it).
LEGACY_SELECT_BY = "val_auc"

#: The metrics.csv column whose value each rule ranks (recorded as best.pt's ``best_value``).
_METRIC = {"val_loss": "val_loss", "val_auc": "val_auc", "last": "epoch"}


def effective_rule(select_by: str, has_validation: bool) -> str:
    """The rule that actually chooses best.pt: ``select_by``, or "last" without validation slides."""
    if select_by not in SELECT_RULES:
        raise ValueError(f"select_by must be one of {list(SELECT_RULES)}, got {select_by!r}")
    return select_by if has_validation else "last"


def rule_metric(rule: str) -> str:
    """The metrics.csv column that ``rule`` ranks: "val_loss", "val_auc" or "epoch" ("last")."""
    if rule not in _METRIC:
        raise ValueError(f"select_by must be one of {list(SELECT_RULES)}, got {rule!r}")
    return _METRIC[rule]


def _worst_if_nan(value: Any) -> float:
    """A value to minimise: NaN (and None, an empty CSV cell) rank after every number."""
    value = float(value) if value not in (None, "") else math.nan
    return value if not math.isnan(value) else math.inf


def _sort_key(row: Mapping[str, Any], rule: str) -> tuple[float, ...]:
    """Smaller is better; the epoch last, so that ties go to the earlier epoch."""
    epoch = int(row["epoch"])
    if rule == "val_loss":
        return (_worst_if_nan(row["val_loss"]), epoch)
    if rule == "val_auc":
        auc = _worst_if_nan(row["val_auc"])
        return (-auc if math.isfinite(auc) else math.inf, _worst_if_nan(row["val_loss"]), epoch)
    return (-epoch,)  # "last"


def select_epoch(rows: Sequence[Mapping[str, Any]], rule: str, select_after_epoch: int = 0) -> Mapping[str, Any] | None:
    """The row (of ``rows``, one per finished epoch) whose epoch ``rule`` selects for best.pt.

    Args:
        rows: metrics rows with at least "epoch" (1-based), "val_loss" and "val_auc" (floats,
            NaN when undefined; strings as read back from metrics.csv work too).
        rule: one of :data:`SELECT_RULES`.
        select_after_epoch: rows with epoch <= this are never selected.

    Returns:
        The selected row, or None when no row is eligible.
    """
    if rule not in SELECT_RULES:
        raise ValueError(f"select_by must be one of {list(SELECT_RULES)}, got {rule!r}")
    if select_after_epoch < 0:
        raise ValueError(f"select_after_epoch must be >= 0, got {select_after_epoch}")
    eligible = [row for row in rows if int(row["epoch"]) > select_after_epoch]
    if not eligible:
        return None
    return min(eligible, key=lambda row: _sort_key(row, rule))
