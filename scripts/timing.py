"""Calls per second of a function, shared by the benchmark scripts."""
import time


def rate(fn, min_time=3.0, min_iters=3):
    fn()  # warm-up
    n, st = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - st < min_time:
        fn()
        n += 1
    return n / (time.perf_counter() - st)
