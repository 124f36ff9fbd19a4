"""OpenMP's wait policy for PyTorch's CPU threads, set before the OpenMP runtime starts.

PyTorch's CPU wheels use GNU OpenMP, whose idle threads spin for 300,000 iterations before
they sleep. On a machine with other work (a laptop, CI, a shared server) the spinning
threads take the cores from the thread that holds the work and from everything else, and
a 2-core training run becomes several times slower than twice as slow; a passive wait (no
spinning) holds under load but costs a quiet machine about a quarter. A short spin keeps
most of both (README, "Busy machines", has the measurements).

libgomp reads its environment once, when it is loaded by the first ``import torch``: the
entry points and scripts import this module before anything else. A user who sets any of
:data:`POLICY_VARIABLES` keeps their own policy, and nothing here is changed.
"""
import os

POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
DEFAULT_POLICY = {"GOMP_SPINCOUNT": "10000"}


def apply_default_policy(environ=os.environ):
    """Set :data:`DEFAULT_POLICY` in ``environ`` unless it names a wait policy already.
    -> the variables set ({} when the user's own policy stands)."""
    if any(name in environ for name in POLICY_VARIABLES):
        return {}
    environ.update(DEFAULT_POLICY)
    return dict(DEFAULT_POLICY)


apply_default_policy()
