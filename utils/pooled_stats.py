"""Statistics of a few training runs per arm (numpy and math only).

Per arm: the mean, the sample standard deviation and a 95% Student-t interval over runs.
Between two arms whose runs pair by seed: an exact two-sided sign-flip permutation p-value
over the per-seed differences, and bootstrap intervals that resample the seeds (and, with
per-query data, the queries within each resampled seed).
"""
import math

import numpy as np

EXACT_MAX_SEEDS = 20          # 2^20 sign assignments: 8 MB, well under a second
MONTE_CARLO_FLIPS = 100_000   # random sign assignments beyond that
_TINY = 1e-300


def _beta_fraction(a, b, x):
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    def clamp(v):
        return v if abs(v) > _TINY else _TINY

    c, d = 1.0, 1.0 / clamp(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, 500):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 / clamp(1.0 + aa * d)
            c = clamp(1.0 + aa / c)
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a, b, x):
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t, df):
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p, df):
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on t_cdf)."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-13 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def summarise(values):
    """{n, mean, std, ci95}: the sample standard deviation (n - 1) and the 95% Student-t
    interval of the mean; ``std`` and ``ci95`` are None for a single value."""
    v = np.asarray(values, dtype=np.float64)
    n, mean = len(v), float(v.mean())
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = float(v.std(ddof=1))
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def sign_flip_p(diffs, seed=0, n_flips=MONTE_CARLO_FLIPS):
    """Two-sided p-value of paired differences under the null that each one's sign is a coin
    flip: the share of sign assignments whose |sum| is at least the observed |sum|. Exact
    (all 2^n assignments, the observed one included) for n <= EXACT_MAX_SEEDS; beyond, the
    share among ``n_flips`` seeded random assignments, the observed one counted once."""
    d = np.asarray(diffs, dtype=np.float64)
    observed = abs(d.sum())
    tolerance = 1e-9 * max(1.0, float(np.abs(d).sum()))  # sums in another order round differently
    if len(d) <= EXACT_MAX_SEEDS:
        sums = np.zeros(1)
        for x in d:
            sums = np.concatenate([sums + x, sums - x])
        return float(np.mean(np.abs(sums) >= observed - tolerance))
    rng = np.random.default_rng(seed)
    extreme = 0
    for st in range(0, n_flips, 10_000):
        signs = rng.choice([-1.0, 1.0], size=(min(10_000, n_flips - st), len(d)))
        extreme += int((np.abs(signs @ d) >= observed - tolerance).sum())
    return (1 + extreme) / (1 + n_flips)


def seed_draws(n_seeds, n_boot, rng):
    """Seed indices of ``n_boot`` resamples of ``n_seeds`` seeds with replacement: [n_boot, n_seeds]."""
    return rng.integers(n_seeds, size=(n_boot, n_seeds))


def seeds_bootstrap(per_seed, draws):
    """Mean of the per-seed values over each resample of the seeds: [n_boot]."""
    return np.asarray(per_seed, dtype=np.float64)[draws].mean(1)


def two_level_bootstrap(pool, draws):
    """Mean over each resample of the seeds, each drawn seed on a resample of its queries of
    its own: pool [n_seeds, n_boot * n_seeds] holds each seed's value on independent query
    resamples, and slot i of seed resample b takes column b * n_seeds + i. -> [n_boot]."""
    n_boot, n_seeds = draws.shape
    columns = np.arange(n_boot * n_seeds).reshape(n_boot, n_seeds)
    return np.asarray(pool)[draws, columns].mean(1)


def resampled_means(values, n_resamples, rng, chunk=100):
    """Column means of ``values`` [n_items, n_cols] over resamples of its rows with
    replacement, the same resamples for every column: [n_resamples, n_cols]."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    out = []
    for st in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - st)
        draws = rng.integers(n, size=(rows, n)) + n * np.arange(rows)[:, None]
        counts = np.bincount(draws.ravel(), minlength=rows * n).reshape(rows, n)
        out.append(counts @ values / n)
    return np.concatenate(out) if out else np.zeros((0, values.shape[1]))
