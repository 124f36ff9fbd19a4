"""Runs an entry point as a launcher's worker and signals when this rank is training.

    torchrun ... tests/rank_probe.py train_itm_hard_negatives.py --config ...

Once the rank has computed its first gradient norm (it is inside the training loop), its
process id is written to ``$RANK_READY_DIR/rank{N}.pid`` (atomically: a test that sees
the file can read the whole id)."""
import os
import runpy
import sys

import torch.nn.utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
_clip_grad_norm = torch.nn.utils.clip_grad_norm_


def _ready_file():
    rank = os.environ.get("RANK", os.environ.get("HOROVOD_RANK", "0"))
    return os.path.join(os.environ["RANK_READY_DIR"], f"rank{rank}.pid")


def _clip_and_signal(*args, **kwargs):
    norm = _clip_grad_norm(*args, **kwargs)
    path = _ready_file()
    if not os.path.exists(path):
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)
    return norm


torch.nn.utils.clip_grad_norm_ = _clip_and_signal  # the entry point imports it by name
sys.argv = sys.argv[1:]
runpy.run_path(os.path.join(ROOT, sys.argv[0]), run_name="__main__")
