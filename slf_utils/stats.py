"""Statistics of per-clip values: percentile-bootstrap intervals that resample identities (all clips of a drawn
identity together: the clips of one person are not independent) or clips, the two-level bootstrap over identities
and training seeds, paired differences of two systems on the same clips (what the two share cancels), and the exact
(Clopper-Pearson) binomial interval of a hit count. Every function is seeded: the same seed draws the same resamples,
so columns bootstrapped apart stay paired.
"""

from __future__ import annotations

import numpy as np

from slf_utils.basics import exists


def bootstrap_means(values, clusters=None, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, ...) means of `values` (n, ...) over bootstrap resamples: of whole clusters (one label per value,
    e.g. the identity; a drawn cluster brings all its values, the mean is over all values drawn) or, with
    clusters=None, of single values. The same seed draws the same resamples, so stacked columns stay paired."""
    v = np.asarray(values, dtype=np.float64)
    inv = np.unique(np.asarray(clusters), return_inverse=True)[1].ravel() if exists(clusters) else np.arange(len(v))
    g = int(inv.max()) + 1
    sums = np.zeros((g, *v.shape[1:]))
    np.add.at(sums, inv, v)
    counts = np.bincount(inv, minlength=g).astype(np.float64).reshape(-1, *(1,) * (v.ndim - 1))
    rng = np.random.default_rng(seed)
    # resample in blocks so memory stays small for long test sets
    blocks = []
    for i in range(0, n_boot, 256):
        idx = rng.integers(0, g, (min(256, n_boot - i), g))
        blocks.append(sums[idx].sum(1) / counts[idx].sum(1))
    return np.concatenate(blocks)


def bootstrap_ci(
    values, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05, stat: str = "mean", clusters=None
) -> tuple:
    """Point estimate and percentile-bootstrap (1 - alpha) interval of the per-clip `values` (NaN = not available,
    dropped with its cluster label). stat `mean` or `rmse` (values are errors; the interval is of
    sqrt(mean(e^2))). `clusters`: a label per value (the identity) to resample whole clusters; None resamples
    clips. Returns (value, ci_low, ci_high, n)."""
    v = np.asarray(values, dtype=np.float64)
    known = ~np.isnan(v)
    v = v[known]
    clusters = np.asarray(clusters)[known] if exists(clusters) else None
    n = len(v)
    if n == 0:
        return np.nan, np.nan, np.nan, 0
    if stat == "rmse":
        v = v**2
    elif stat != "mean":
        raise ValueError(f"stat must be 'mean' or 'rmse', got {stat!r}")
    finish = np.sqrt if stat == "rmse" else (lambda x: x)
    value = float(finish(v.mean()))
    if n_boot <= 0 or not np.isfinite(value):
        return value, np.nan, np.nan, n
    lo, hi = np.quantile(finish(bootstrap_means(v, clusters, n_boot, seed)), [alpha / 2, 1 - alpha / 2])
    # the percentile interval of a skewed statistic can miss the point estimate by rounding only; keep it inside
    return value, float(min(lo, value)), float(max(hi, value)), n


def two_level_ci(values, clusters=None, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple:
    """Mean and percentile interval of per-clip values of several training runs, values (n clips, S seeds), that
    resamples both sources of noise: the test identities (whole clusters, the same draw for every seed) and the
    seeds (S drawn with replacement per resample). With S = 1 it is bootstrap_ci's identity interval. A clip with a
    NaN in any seed is dropped. Returns (value, ci_low, ci_high, n clips)."""
    v = np.asarray(values, np.float64)
    v = v.reshape(len(v), -1)
    known = ~np.isnan(v).any(1)
    v, clusters = v[known], (np.asarray(clusters)[known] if exists(clusters) else None)
    if not len(v):
        return np.nan, np.nan, np.nan, 0
    value = float(v.mean())
    if n_boot <= 0:
        return value, np.nan, np.nan, len(v)
    lo, hi = np.quantile(two_level_means(v, clusters, n_boot, seed), [alpha / 2, 1 - alpha / 2])
    return value, float(min(lo, value)), float(max(hi, value)), len(v)


def two_level_means(values, clusters=None, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_boot, ...) seed means of per-clip values of several runs, values (n clips, S seeds, ...) without NaN, over
    resamples of the test identities (bootstrap_means: the same draw for every seed, and for every array of the same
    clusters and seed, so two systems resampled apart stay paired on identities) and of the S seeds (with
    replacement). two_level_ci's resamples; significance.bootstrap_significance's for each system's recall."""
    v = np.asarray(values, np.float64)
    per_seed = bootstrap_means(v, clusters, n_boot, seed)  # (n_boot, S, ...): identities resampled once for all seeds
    draw = np.random.default_rng([seed, 1]).integers(0, v.shape[1], per_seed.shape[:2])  # seeds, with replacement
    draw = draw.reshape(*draw.shape, *(1,) * (per_seed.ndim - 2))
    return np.take_along_axis(per_seed, draw, 1).mean(1)


def paired_difference(a, b, clusters=None, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple:
    """mean(a) - mean(b) of two systems on the same clips (a[i], b[i] of one clip; a pair with a NaN is dropped)
    with a paired percentile-bootstrap interval: each resample draws clips (or whole clusters) once for both, so
    what the two share cancels. Returns (difference, ci_low, ci_high, n)."""
    return bootstrap_ci(np.asarray(a, np.float64) - np.asarray(b, np.float64), n_boot, seed, alpha, clusters=clusters)


def binomial_interval(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Clopper-Pearson interval of k successes in n trials."""
    from scipy.stats import beta  # 2 s to import: only the learning checks need it

    lo = beta.ppf(alpha / 2, k, n - k + 1) if k > 0 else 0.0
    hi = beta.ppf(1 - alpha / 2, k + 1, n - k) if k < n else 1.0
    return float(lo), float(hi)
