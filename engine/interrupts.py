"""SIGINT and SIGTERM during training.

The first one asks the run to stop: the optimizer step in progress is finished (and a
validation in progress too, with the checkpoint of its step), then the training loop
writes a checkpoint and the training state at that step and raises :class:`Interrupted`.
In a distributed run every rank stops at the same step: at each step boundary the ranks
average one small flag tensor, so a signal that reached one rank stops them all. A second
signal stops the process at once, without a checkpoint (the previous one is kept).
"""
import os
import signal
import sys
import threading

import torch

from utils import distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum):
    """130 for SIGINT, 143 for SIGTERM: 128 + the signal's number, as a shell reports it."""
    return 128 + int(signum)


class Interrupted(Exception):
    """Training stopped by ``signum`` after ``step``, whose checkpoint is ``checkpoint``."""

    def __init__(self, signum, step, checkpoint):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint

    @property
    def exit_status(self):
        return exit_status(self.signum)


def _say(text):
    """One line on stderr from a signal handler: a plain write, no lock that the interrupted
    code may hold."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    os.write(2, f"{prog}: {text}\n".encode())


class StopRequests:
    """Within ``with StopRequests(device) as stops:`` SIGINT and SIGTERM are caught (in the
    main thread; elsewhere nothing is installed); :meth:`agreed` says at a step boundary
    whether to stop. The previous handlers come back on leaving."""

    def __init__(self, device):
        self.device = device
        self.received = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            _say(f"second signal ({name}): stopping at once, without a checkpoint")
            os._exit(exit_status(signum))
        self.received = signum
        _say(f"{name}: stopping after this step with a checkpoint (a second signal stops at once)")

    def agreed(self):
        """The signal that stops every rank after this step, or None: this rank's, else the
        one another rank received (SIGTERM before SIGINT). One all-reduce of two numbers."""
        received = self.received  # read once: the handler may set it meanwhile
        if dist.get_world_size() == 1:
            return received
        flags = torch.tensor([received == signal.SIGINT, received == signal.SIGTERM], dtype=torch.float32,
                             device=self.device)
        dist.all_reduce_mean([flags], name="stop_requests")
        if received is not None:
            return received
        sigint, sigterm = flags.tolist()
        return signal.SIGTERM if sigterm > 0 else signal.SIGINT if sigint > 0 else None
