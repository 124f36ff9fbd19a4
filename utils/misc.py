import fcntl
import os
import random
import socket

import numpy as np
import torch

from .config import ConfigError
from .logger import LOGGER

LOCK_NAME = ".lock"
_held_locks = []  # open lock files: a lock lasts as long as its file stays open


def set_random_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def set_dropout(model, drop_p):
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p != drop_p:
            module.p = drop_p
            LOGGER.debug("%s dropout set to %s", name, drop_p)


def rng_state():
    """Python, numpy and torch RNG states in a form torch.load(weights_only=True) reads."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def lock_dir(directory):
    """Hold an exclusive lock on ``directory/.lock`` until this process ends (the system
    releases it however the process ends, so a lock file left by a crash is stale and
    simply taken over). A second process asking for it is refused with the holder's id."""
    f = open(os.path.join(directory, LOCK_NAME), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ConfigError(f"output_dir {directory} is in use by another run ({holder}); wait for it to end "
                          f"or choose another output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held_locks.append(f)
