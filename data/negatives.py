"""Negative sampling of the hard-negative datasets: the original's draws from the global
``random``, or, inside ``seeded_draws``, from a generator of the item's own."""
import contextlib
import random
import threading


def _has_overlap(la, lb):
    if len(la) < len(lb):
        la, lb = lb, la
    s = set(la)
    return any(b in s for b in lb)


_draws = threading.local()


@contextlib.contextmanager
def seeded_draws(seed):
    """The negatives of items built inside are drawn from a generator of their own, seeded
    with ``seed`` (the same draws as after ``random.seed(seed)``): loader threads must not
    share the global one. Outside, draws come from the global ``random``, as in the original."""
    _draws.rng = random.Random(seed)
    try:
        yield
    finally:
        del _draws.rng


MAX_REDRAWS = 1000


def sample_negative(sample_pool, ground_truths, num_sample):
    """``num_sample`` draws from the pool without any ground truth (redrawn until so).

    When the pool holds few more items than ``num_sample``, a draw that misses every ground
    truth is rare (1 in 512 for 512 images and 511 negatives; never when no more items
    than ``num_sample`` are left): after ``MAX_REDRAWS`` draws the sample is taken from the
    pool without the ground truths instead. Larger pools draw exactly as the original."""
    rng = getattr(_draws, "rng", random)
    outputs = ground_truths[:1]
    for _ in range(MAX_REDRAWS):
        if not _has_overlap(outputs, ground_truths):
            return outputs
        outputs = rng.sample(sample_pool, num_sample)
    if not _has_overlap(outputs, ground_truths):
        return outputs
    truths = set(ground_truths)
    return rng.sample([x for x in sample_pool if x not in truths], num_sample)


def negatives_with(forced, sample_pool, ground_truths, num_sample):
    """``num_sample`` negatives: ``forced`` first (a seeded sample of them when there are more),
    then draws from the pool without any ground truth or forced one; with nothing forced,
    exactly the draws of ``sample_negative`` (the original's)."""
    if len(forced) >= num_sample:
        return getattr(_draws, "rng", random).sample(forced, num_sample)
    return forced + sample_negative(sample_pool, ground_truths + forced, num_sample - len(forced))
