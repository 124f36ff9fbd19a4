"""Programs a script runs as child processes, stopped together with it.

Each child runs in its own session, so that a signal reaches it only once, from the
parent: a Ctrl-C in a terminal or a SIGTERM to the whole job would otherwise reach a
training run twice (its own and the one passed on), and training stops at once, without a
checkpoint, on a second signal. The first SIGINT or SIGTERM the parent receives raises
:class:`Stopped` in its main thread and is passed to every running child (training
finishes its step and writes a checkpoint it resumes from); no child starts after it; a
second signal is passed on too (the children stop at once).
"""
import signal
import subprocess
import threading

from engine.interrupts import exit_status


class Stopped(Exception):
    """The parent received ``signum``."""

    def __init__(self, signum):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self):
        return exit_status(self.signum)


class ChildRuns:
    def __init__(self):
        self._lock = threading.RLock()  # a second signal may arrive while the first is passed on
        self._running = set()
        self.stopped_by = None

    def run(self, command, **popen_kwargs):
        """``command`` to its end: (exit status, stdout, stderr). Raises Stopped instead of
        starting it once the parent has been stopped."""
        with self._lock:
            if self.stopped_by is not None:
                raise Stopped(self.stopped_by)
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, **popen_kwargs)
            self._running.add(child)
        try:
            out, err = child.communicate()
        finally:
            with self._lock:
                self._running.discard(child)
        return child.returncode, out, err

    def pass_on(self, signum):
        """Mark the parent stopped and send ``signum`` to every running child."""
        with self._lock:
            self.stopped_by = self.stopped_by or signum
            for child in self._running:
                if child.poll() is None:
                    child.send_signal(signum)

    def __enter__(self):
        """In the main thread: SIGTERM, and SIGINT unless it is ignored (a job started in
        the background of a shell), stop the parent; the previous handlers come back on
        leaving."""
        self._previous, self.stopped_by = {}, None
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def _handle(self, signum, frame):
        first = self.stopped_by is None
        self.pass_on(signum)
        if first:
            raise Stopped(signum)
