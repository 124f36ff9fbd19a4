"""How many threads PyTorch computes with on the CPU, set before the OpenMP runtime starts.

PyTorch's CPU wheels use GNU OpenMP, with one thread per core whose idle members spin
before they sleep. On a machine with other work (a laptop, CI, a shared server) every
parallel region then waits for the member that lost its core, and the spinning takes the
cores from everything else: on 2 cores, the demo's training beside one busy process took
3 to 5 times its quiet time, beside two it did not finish. A passive wait (no spinning)
holds under load but costs a quiet machine three quarters more on the demo's small
model; a shorter spin collapsed too. Leaving one core to the rest of the machine holds in
every condition measured and costs a quiet 2-core machine about a sixth (README,
"Busy machines", has the table; ``scripts/bench_threads.py`` measures it).

OpenMP reads its environment once, when the first ``import torch`` loads it: the entry
points, the scripts and the test suite import this module before anything else. A user
who sets ``OMP_NUM_THREADS`` keeps it; a value OpenMP cannot use (``abc``, ``0``, ``2.5``)
would make it warn and take every core, so it is replaced by the default with a warning
on stderr (a wrong thread count costs time, not results: no reason to stop). The thread count changes the order of some
floating-point sums, so runs on machines with different core counts may differ in their
last digits (a resumed run uses the same count as long as the machine is the same).
"""
import os
import re
import sys

THREADS_VARIABLE = "OMP_NUM_THREADS"
# what GNU OpenMP accepts: a positive count, or a comma-separated list of them (nested levels)
_VALID = re.compile(r"\s*0*[1-9][0-9]*\s*(,\s*0*[1-9][0-9]*\s*)*", re.ASCII)


def available_cores():
    """The cores this process may run on (its affinity mask, which a container or a job
    scheduler may narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(cores):
    """All cores but one, at least one."""
    return max(1, cores - 1)


def _warn(message):
    sys.stderr.write(f"{os.path.basename(sys.argv[0] or 'python')}: warning: {message}\n")


def apply_default_policy(environ=os.environ, cores=None, warn=_warn):
    """Set ``OMP_NUM_THREADS`` in ``environ`` to :func:`default_threads` unless the user set
    it to a value OpenMP accepts (an empty one counts as unset; another is replaced, said
    through ``warn``). -> the variables set ({} when the user's own setting stands)."""
    own = environ.get(THREADS_VARIABLE, "")
    if _VALID.fullmatch(own):
        return {}
    policy = {THREADS_VARIABLE: str(default_threads(available_cores() if cores is None else cores))}
    if own.strip():
        warn(f"{THREADS_VARIABLE}={own!r} is not a positive number of threads; computing with "
             f"{policy[THREADS_VARIABLE]} (all cores but one) instead; set it to a count such as 1, or unset it")
    environ.update(policy)
    return policy


apply_default_policy()
