"""The AUC bootstrap: ``scipy.stats.bootstrap`` against the hand-written stratified bootstrap.

Oracle: a stratified percentile bootstrap written out here (resample the positives and the
negatives separately, count winning pairs, take quantiles), which is what
the Python loop that ``evaluate`` used before ``scipy.stats.bootstrap`` replaced it did.

Two claims are tested:
* Same seed, same draws: scipy's two-sample, unpaired bootstrap draws the positives' indices
  and then the negatives' from ``default_rng(seed)`` exactly as the hand-written loop does,
  so the intervals are equal (to round-off in the AUC).
* Independent seeds agree to Monte Carlo error. The q-quantile of B independent bootstrap
  AUCs lies at probability level q + e of the bootstrap distribution F, e ~ N(0, q(1-q)/B);
  two independent runs differ by e1 - e2 ~ N(0, 2 q(1-q)/B). So one run's quantile lies in
  the band ``[F_B^-1(q - z s), F_B^-1(q + z s)]`` of the other run's empirical F_B, with
  s = sqrt(2 q(1-q)/B) and z = 4, except with probability 2 Phi(-4) = 6e-5. With B = 40000
  the band is about +-0.004 in probability, narrow enough to reject a plain (unstratified)
  bootstrap and scipy's BCa interval on an unbalanced set (the power test below).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from torch_impl.pipeline import evaluate, metrics

N_RESAMPLES = 40_000
Z = 4.0


def label_score_sets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Named (labels, scores) sets: balanced, unbalanced with ties, CAMELYON16-sized, tiny."""
    rng = np.random.default_rng(3)
    sets = {}
    for name, n_pos, n_neg, shift, ties in [
        ("overlapping 25/35", 25, 35, 0.8, False),
        ("unbalanced ties 5/40", 5, 40, 1.5, True),
        ("camelyon16-sized 49/80", 49, 80, 1.0, False),
        ("tiny ties 3/4", 3, 4, 0.5, True),
        ("smallest 2/2", 2, 2, 0.0, False),
    ]:
        labels = np.r_[np.ones(n_pos, np.int64), np.zeros(n_neg, np.int64)]
        scores = labels * shift + rng.normal(size=labels.size)
        sets[name] = labels, np.round(scores) if ties else scores
    return sets


SETS = label_score_sets()


def pair_auc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """(B,) AUCs of (B, n_pos) positives against (B, n_neg) negatives by counting pairs."""
    p, n = pos[:, :, None], neg[:, None, :]
    return ((p > n).sum(axis=(1, 2)) + 0.5 * (p == n).sum(axis=(1, 2))) / (pos.shape[1] * neg.shape[1])


def stratified_bootstrap_by_hand(labels, scores, n_resamples, confidence, seed):
    """(low, high) and the (B,) resampled AUCs of the stratified percentile bootstrap."""
    rng = np.random.default_rng(seed)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pos_draws = rng.choice(pos, size=(n_resamples, pos.size))
    neg_draws = rng.choice(neg, size=(n_resamples, neg.size))
    aucs = np.concatenate([pair_auc(p, n) for p, n in zip(np.array_split(pos_draws, 20), np.array_split(neg_draws, 20))])
    tail = (1 - confidence) / 2
    return tuple(np.quantile(aucs, [tail, 1 - tail])), aucs


def plain_bootstrap(labels, scores, n_resamples, confidence, seed):
    """A different method, to check the comparison can tell: resample slides regardless of
    class and drop the resamples that hold one class only."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, labels.size, (n_resamples, labels.size))
    aucs = []
    for chunk in np.array_split(draws, 20):
        y, s = labels[chunk][:, :, None], scores[chunk]  # (b, n, 1), (b, n)
        pairs = (y == 1) & (y.transpose(0, 2, 1) == 0)  # (b, n, n): positive i, negative j
        wins = (pairs & (s[:, :, None] > s[:, None, :])).sum((1, 2)) + 0.5 * (pairs & (s[:, :, None] == s[:, None, :])).sum((1, 2))
        n_pairs = pairs.sum(axis=(1, 2))
        aucs.append(wins[n_pairs > 0] / n_pairs[n_pairs > 0])
    tail = (1 - confidence) / 2
    return tuple(np.quantile(np.concatenate(aucs), [tail, 1 - tail]))


def monte_carlo_band(aucs: np.ndarray, q: float) -> tuple[float, float]:
    """Where another run's q-quantile of as many resamples lies, but with probability 6e-5."""
    s = np.sqrt(2 * q * (1 - q) / aucs.size)
    low, high = np.quantile(aucs, [max(q - Z * s, 0.0), min(q + Z * s, 1.0)])
    return float(low), float(high)


def inside(value: float, band: tuple[float, float]) -> bool:
    return band[0] - 1e-12 <= value <= band[1] + 1e-12


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("seed", [0, 7])
def test_scipy_and_hand_written_bootstraps_draw_the_same_resamples(name, seed):
    labels, scores = SETS[name]
    want, _ = stratified_bootstrap_by_hand(labels, scores, 2000, 0.95, seed)
    got = metrics.bootstrap_auc_ci(labels, scores, n_resamples=2000, confidence=0.95, seed=seed)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert evaluate.bootstrap_auc_ci is metrics.bootstrap_auc_ci  # evaluation uses this one


@pytest.mark.parametrize("name", SETS)
@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_independent_streams_agree_within_monte_carlo_error(name, confidence):
    labels, scores = SETS[name]
    _, aucs = stratified_bootstrap_by_hand(labels, scores, N_RESAMPLES, confidence, seed=1)
    low, high = metrics.bootstrap_auc_ci(labels, scores, n_resamples=N_RESAMPLES, confidence=confidence, seed=2)
    tail = (1 - confidence) / 2
    assert inside(low, monte_carlo_band(aucs, tail)), (low, monte_carlo_band(aucs, tail))
    assert inside(high, monte_carlo_band(aucs, 1 - tail)), (high, monte_carlo_band(aucs, 1 - tail))


def test_the_monte_carlo_tolerance_rejects_other_intervals():
    """The band is narrow enough to notice a different method on an unbalanced set."""
    labels, scores = SETS["unbalanced ties 5/40"]
    _, aucs = stratified_bootstrap_by_hand(labels, scores, N_RESAMPLES, 0.95, seed=1)
    bands = monte_carlo_band(aucs, 0.025), monte_carlo_band(aucs, 0.975)
    plain = plain_bootstrap(labels, scores, N_RESAMPLES, 0.95, seed=2)
    assert not (inside(plain[0], bands[0]) and inside(plain[1], bands[1])), (plain, bands)
    pos, neg = scores[labels == 1], scores[labels == 0]
    bca = stats.bootstrap((pos, neg), metrics._auc_of_samples, paired=False, vectorized=True,
                          n_resamples=N_RESAMPLES, method="BCa", rng=np.random.default_rng(2)).confidence_interval
    assert not (inside(bca.low, bands[0]) and inside(bca.high, bands[1])), (bca, bands)


def test_bootstrap_edge_cases_and_errors():
    assert metrics.bootstrap_auc_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], n_resamples=50) == (1.0, 1.0)
    labels, scores = SETS["overlapping 25/35"]
    lo, hi = metrics.bootstrap_auc_ci(labels, scores, n_resamples=500, seed=0)
    assert lo < metrics.roc_auc(labels, scores) < hi
    assert metrics.bootstrap_auc_ci(labels, scores, n_resamples=500, seed=0) == (lo, hi)
    assert metrics.bootstrap_auc_ci(labels, scores, n_resamples=500, seed=1) != (lo, hi)
    with pytest.raises(ValueError, match="at least two slides of each class, got 1 positive"):
        metrics.bootstrap_auc_ci([0, 0, 1], [0.1, 0.2, 0.8])
    with pytest.raises(ValueError, match="n_resamples must be >= 1"):
        metrics.bootstrap_auc_ci(labels, scores, n_resamples=0)
    with pytest.raises(ValueError, match=r"confidence must lie in \(0, 1\)"):
        metrics.bootstrap_auc_ci(labels, scores, confidence=95)
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.bootstrap_auc_ci([0, 2, 1], [0.1, 0.2, 0.3])
