"""Runs inf_itm.py and halts each process once it has written ``$STOP_AFTER_SHARDS``
shard files (default 1), so that a test can kill it there, as a preemption would. Each
process first leaves an empty file named by its id in ``$STOP_PID_DIR`` (a launcher starts
its workers in sessions of their own: the test kills each one by its id).

    python tests/stop_after_shards.py inf_itm.py --output_dir ...
    torchrun ... tests/stop_after_shards.py inf_itm.py ...
"""
import os
import runpy
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import utils.threads  # noqa: E402,F401  (first, as in inf_itm.py)

from engine import eval_shards  # noqa: E402

_write = eval_shards.ShardedRows.write
_written = [0]


def _write_then_halt(self, block, rows):
    _write(self, block, rows)
    _written[0] += 1
    if _written[0] >= int(os.environ.get("STOP_AFTER_SHARDS", "1")):
        time.sleep(600)  # the test kills the process here


eval_shards.ShardedRows.write = _write_then_halt
open(os.path.join(os.environ["STOP_PID_DIR"], str(os.getpid())), "w").close()
sys.argv = sys.argv[1:]
runpy.run_path(os.path.join(ROOT, sys.argv[0]), run_name="__main__")
