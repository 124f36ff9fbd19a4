"""Time-to-event statistics of a few runs per arm (standard library only): Kaplan-Meier
curves and the log-rank test of "steps to learn" (censored where a run never learns),
Fisher's exact test of how many runs learned, and the power of both designs.

An event time is a step; ``learned`` False means the run was censored at that step (it
had not learned by then). A run censored at step t is at risk at t: an event at the last
evaluation counts against the runs still waiting there.
"""
import math
from statistics import NormalDist


def kaplan_meier(times, learned):
    """[(step, share of runs not yet learned just after it)], starting at (0, 1.0), one
    point per step at which some run learned."""
    curve, surviving = [(0, 1.0)], 1.0
    for t in sorted({t for t, e in zip(times, learned) if e}):
        at_risk = sum(1 for u in times if u >= t)
        events = sum(1 for u, e in zip(times, learned) if e and u == t)
        surviving *= 1.0 - events / at_risk
        curve.append((t, surviving))
    return curve


def logrank(times_a, learned_a, times_b, learned_b):
    """Two-sided log-rank test of arm a against arm b: {chi2, p, observed_a, expected_a,
    observed_b, expected_b} (observed and expected events; expected under equal hazards).
    p is None when no run learned (nothing to compare)."""
    event_times = sorted({t for t, e in zip(times_a, learned_a) if e} | {t for t, e in zip(times_b, learned_b) if e})
    observed_a = expected_a = variance = 0.0
    for t in event_times:
        n_a = sum(1 for u in times_a if u >= t)
        n_b = sum(1 for u in times_b if u >= t)
        d_a = sum(1 for u, e in zip(times_a, learned_a) if e and u == t)
        d = d_a + sum(1 for u, e in zip(times_b, learned_b) if e and u == t)
        n = n_a + n_b
        observed_a += d_a
        expected_a += d * n_a / n
        if n > 1:
            variance += d * (n_a / n) * (n_b / n) * (n - d) / (n - 1)
    events = sum(map(bool, learned_a)) + sum(map(bool, learned_b))
    chi2 = (observed_a - expected_a) ** 2 / variance if variance > 0 else 0.0
    return {"chi2": chi2, "p": math.erfc(math.sqrt(chi2 / 2)) if events else None,
            "observed_a": observed_a, "expected_a": expected_a,
            "observed_b": events - observed_a, "expected_b": events - expected_a}


def _hypergeometric(k, row_a, row_b, learned):
    """P(k of the ``learned`` runs are in arm a) with arms of ``row_a`` and ``row_b`` runs."""
    return math.comb(row_a, k) * math.comb(row_b, learned - k) / math.comb(row_a + row_b, learned)


def fisher_exact(learned_a, n_a, learned_b, n_b):
    """Two-sided p of Fisher's exact test of the 2x2 table (learned, not) x (arm a, arm b):
    the probability, margins fixed, of a table no more likely than the one observed."""
    learned = learned_a + learned_b
    lo, hi = max(0, learned - n_b), min(n_a, learned)
    observed = _hypergeometric(learned_a, n_a, n_b, learned)
    # a relative tolerance: tables as likely as the observed one must count despite rounding
    return min(1.0, sum(p for k in range(lo, hi + 1)
                        if (p := _hypergeometric(k, n_a, n_b, learned)) <= observed * (1 + 1e-7)))


def _binomial(n, p):
    return [math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)]


def fisher_power(n_a, p_a, n_b, p_b, alpha=0.05):
    """Probability that Fisher's exact test gives p < alpha when the runs of arm a learn
    with probability p_a and those of arm b with p_b (exact: every outcome enumerated)."""
    pa, pb = _binomial(n_a, p_a), _binomial(n_b, p_b)
    return sum(pa[x] * pb[y] for x in range(n_a + 1) for y in range(n_b + 1)
               if fisher_exact(x, n_a, y, n_b) < alpha)


def smallest_detectable_share(n_a, n_b, p_b, alpha=0.05, power=0.8, grid=100):
    """The smallest share p_a > p_b (on a grid of 1/grid) that arm a of n_a runs must learn
    with, against arm b's p_b, for Fisher's exact test to find it with ``power``; None
    when even p_a = 1 is not enough."""
    for i in range(math.floor(p_b * grid) + 1, grid + 1):
        if fisher_power(n_a, i / grid, n_b, p_b, alpha) >= power:
            return i / grid
    return None


def logrank_detectable_hazard_ratio(events, alpha=0.05, power=0.8):
    """The hazard ratio a log-rank test of two equal arms detects with ``power`` given
    ``events`` learned runs in all (Schoenfeld's approximation); None without events."""
    if events <= 0:
        return None
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return math.exp(2 * z / math.sqrt(events))
