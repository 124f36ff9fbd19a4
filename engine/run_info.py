"""What ran: log/run.json of a training run, one entry per launch.

Each entry records the command line (sys.argv), the start time, the git commit of the
repository the code runs from and whether its tracked files differ from that commit
(``dirty``; both null where git is missing or the code is not a checkout), the torch,
CUDA and NCCL versions, the world size, and each rank's host and device. A new run
writes a list of one entry; each --resume appends its own, keeping the earlier ones.
"""
import json
import os
import socket
import subprocess
import sys
from datetime import datetime, timezone
from os.path import dirname, abspath, join

import torch

from utils import distributed as dist
from utils.logger import LOGGER
from utils.outputs import write_json

RUN_NAME = "run.json"
CODE_ROOT = dirname(dirname(abspath(__file__)))
GIT_TIMEOUT_S = 5


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _git(args, root):
    """git's stdout in ``root``, or None (no git, not a checkout, too slow)."""
    try:
        res = subprocess.run(["git", "-C", root] + args, capture_output=True, text=True, timeout=GIT_TIMEOUT_S,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_state(root=CODE_ROOT):
    """{"commit", "dirty"} of the checkout at ``root``; null values where it is none."""
    commit = _git(["rev-parse", "HEAD"], root)
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git(["status", "--porcelain", "--untracked-files=no"], root)
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def _nccl_version():
    try:
        version = torch.cuda.nccl.version() if torch.cuda.is_available() else None
    except (AttributeError, RuntimeError):
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else version


def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def this_process(device):
    return {"rank": dist.get_rank(), "host": socket.gethostname(), "device": str(device),
            "device_name": device_name(device)}


def launch_record(device, started):
    """This launch's run.json entry (every rank calls it: each rank's host and device are
    gathered)."""
    ranks = dist.all_gather_object(this_process(device))
    return {"argv": list(sys.argv), "started": started, "git": git_state(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "nccl": _nccl_version(),
            "world_size": dist.get_world_size(), "backend": dist.backend_name(),
            "hosts": sorted({r["host"] for r in ranks}), "devices": [r["device_name"] for r in ranks],
            "ranks": ranks}


def _earlier_launches(path):
    """The launches run.json holds; an unreadable one is kept aside as run.json.unreadable."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            launches = json.load(f)
        if isinstance(launches, list):
            return launches
    except (OSError, ValueError):
        pass
    os.replace(path, path + ".unreadable")
    LOGGER.warning("%s was unreadable; kept as %s.unreadable, a new record started", path, path)
    return []


def record_launch(log_dir, launch, resumed):
    """Write log/run.json (rank 0): this launch after the earlier ones when ``resumed``."""
    path = join(log_dir, RUN_NAME)
    launches = _earlier_launches(path) if resumed else []
    write_json(path, launches + [launch], indent=2)
    return path
