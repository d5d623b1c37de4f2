"""Slide-level classification metrics without scikit-learn: ROC AUC and accuracy.

ROC AUC is the probability that a randomly drawn positive scores higher than a randomly
drawn negative, ties counting one half (Hanley & McNeil 1982). It equals the Mann-Whitney
U statistic of the positives' scores divided by n_pos n_neg, computed from ranks:

    R_pos = sum of the (1-based, tie-averaged) ranks of the positives among all scores
    U     = R_pos - n_pos (n_pos + 1) / 2
    AUC   = U / (n_pos n_neg)

`roc_auc_pairs` is the slow, obvious O(n_pos n_neg) version that the tests compare with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import bootstrap, mannwhitneyu, rankdata

__all__ = ["roc_auc", "roc_auc_pairs", "accuracy", "binary_labels_and_scores", "bootstrap_auc_ci"]


def binary_labels_and_scores(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n,) int labels in {0, 1} and (n,) float64 finite scores, checked."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length, got shapes {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(y.tolist()))}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (no NaN or inf)")
    return y.astype(np.int64), s


def roc_auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve of binary ``labels`` (1 = positive) ranked by ``scores``.

    Rank formula (module docstring), ties averaged. Returns NaN when only one class is
    present (the AUC is undefined then); raises ValueError for bad input.
    """
    y, s = binary_labels_and_scores(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s, method="average")  # (n,), 1-based, ties share their mean rank
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc_pairs(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """The same AUC by counting all (positive, negative) pairs: slow and obvious (tests)."""
    y, s = binary_labels_and_scores(labels, scores)
    pos, neg = s[y == 1], s[y == 0]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def accuracy(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of slides whose prediction ``score >= threshold`` equals the label (NaN if none)."""
    y, s = binary_labels_and_scores(labels, scores)
    if y.size == 0:
        return float("nan")
    return float(((s >= threshold).astype(np.int64) == y).mean())


def _auc_of_samples(pos: np.ndarray, neg: np.ndarray, axis: int = -1) -> np.ndarray:
    """AUC of positives' against negatives' scores along ``axis`` (vectorised over the rest):
    the Mann-Whitney U of the positives, ties counting one half, over n_pos n_neg."""
    u = mannwhitneyu(pos, neg, axis=axis, method="asymptotic").statistic  # p-value unused
    return u / (pos.shape[axis] * neg.shape[axis])


def bootstrap_auc_ci(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Stratified percentile-bootstrap confidence interval of the AUC, by ``scipy.stats.bootstrap``.

    The positives' and the negatives' scores go to scipy as two samples with
    ``paired=False``, so each resample draws n_pos positives from the positives and n_neg
    negatives from the negatives, with replacement: a *stratified* bootstrap, whose every
    resample holds both classes (none is dropped). The interval is the ((1-c)/2, (1+c)/2)
    quantiles (linear interpolation) of the ``n_resamples`` AUCs (``method='percentile'``).

    The generator is ``np.random.default_rng(seed)``, and scipy draws the positives'
    indices (n_resamples, n_pos) and then the negatives' (n_resamples, n_neg) from it: the
    draws of the hand-written loop ``rng.choice(pos, (B, n_pos))``, ``rng.choice(neg, (B,
    n_neg))``, so the two give the same interval for the same seed (tests/test_metrics.py),
    and independent seeds agree to Monte Carlo error. Memory O(n_resamples (n_pos + n_neg)).

    Raises:
        ValueError: bad labels or scores, ``n_resamples < 1``, ``confidence`` outside (0, 1),
            or a class with fewer than two slides (one slide cannot be resampled into any
            variability: the interval would understate the uncertainty).
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    y, s = binary_labels_and_scores(labels, scores)
    pos, neg = s[y == 1], s[y == 0]
    if min(pos.size, neg.size) < 2:
        raise ValueError(
            f"the AUC bootstrap needs at least two slides of each class, got {pos.size} positive "
            f"and {neg.size} negative"
        )
    result = bootstrap(
        (pos, neg), _auc_of_samples, paired=False, vectorized=True, n_resamples=n_resamples,
        confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return float(low), float(high)
