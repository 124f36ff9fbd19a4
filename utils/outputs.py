"""What every tool does with the files it writes, so that nothing a user wrote is lost:

- ``refuse_overwriting_inputs``: no output is one of the tool's inputs (the same path
  spelled otherwise, a symlink or a hard link to it);
- ``refuse_unwritable``: an output that cannot be written is refused before any work;
- ``atomic_write`` (and ``write_json``/``write_text``/``write_bytes``): a file is either
  the previous complete one or the new complete one, never a partial write;
- ``lock_dir``/``lock_output_file``: a lock held for a run's life keeps a second run off
  the same output; the lock file names the holder, and one left by a process that is gone
  is taken over.

Only the standard library is imported here, so that every layer (data/ included) can
write through it without an import cycle.
"""
import atexit
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
from os.path import abspath, basename, dirname, exists, isdir, join, realpath

LOGGER = logging.getLogger("iais")
LOCK_NAME = ".lock"
_LOW_SPACE = 64 << 20


class OutputError(ValueError):
    """An output that cannot or must not be written; the message names the flag and the file."""


# ----------------------------------------------------------------------------- before any work

def _same_file(a, b):
    """Whether paths ``a`` and ``b`` name one file: the same inode where both exist (a
    hard link or a symlink to it), else the same resolved path (relative or absolute)."""
    if exists(a) and exists(b):
        return os.path.samefile(a, b)
    return realpath(a) == realpath(b)


def refuse_overwriting_inputs(outputs, inputs):
    """``outputs``: (flag, path the tool writes, file or folder that the flag names);
    ``inputs``: (flag, path) of what it reads (None where not given). An output that is
    an input is refused before anything is read or written."""
    for out_flag, out_path, given in outputs:
        for in_flag, in_path in inputs:
            if in_path and _same_file(out_path, in_path):
                what = f"{out_flag} {given} is" if out_path == given else \
                    f"{out_flag} {given} would write {out_path}, which is"
                raise OutputError(f"{what} the same file as {in_flag} {in_path}; writing it would replace that "
                                  f"input: choose another {out_flag}")


def _nearest_existing(path):
    while not os.path.lexists(path):
        path = dirname(path)
    return path


def refuse_unwritable(flag, path, folder):
    """Refuse, before any work, an output ``path`` (a ``folder`` the tool fills, else a
    file) that cannot be made: a file where a folder is meant or the reverse, a path under
    a file, a folder this user may not write in. The messages name ``path`` as given."""
    full = abspath(path)
    if folder and exists(full) and not isdir(full):
        raise OutputError(f"{flag} {path} exists and is not a folder; choose another {flag}")
    if not folder and isdir(full):
        raise OutputError(f"{flag} {path} is a folder; give the file to write")
    ancestor = _nearest_existing(full if folder else dirname(full))
    if not isdir(ancestor):
        raise OutputError(f"{flag} {path} lies under {ancestor}, which is a file, not a folder; "
                          f"choose another {flag}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: this user may not write in {ancestor} (read-only); "
                          f"choose another {flag} or make the folder writable")


# ----------------------------------------------------------------------------- atomic writes

def _write_failure(error, directory):
    """Why a write failed, in the user's terms: torch.save's serializer reports a full disk
    as 'file write failed' without the system's reason, so the free space is looked at."""
    if getattr(error, "errno", None) == errno.ENOSPC or (
            isinstance(error, RuntimeError) and "write failed" in str(error)
            and shutil.disk_usage(directory).free < _LOW_SPACE):
        return f"no space left on the device holding {directory}; free some space and run again"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} ({directory})"
    return first_line(error)


def first_line(error):
    """The first line of an error's message (at most 160 characters), or its type's name."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:160]


def _fsync_dir(directory):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write, binary=True, error=OutputError):
    """``write(f)`` into a temporary file beside ``path``, then fsync and rename: the file
    at ``path`` is either the previous complete one or the new complete one. A failure
    (full disk, a serialiser that raises) removes the temporary file; an OSError or
    RuntimeError becomes ``error`` with one line saying what is left at ``path``."""
    directory = dirname(path) or "."
    tmp = join(directory, f".{basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            kept = "; the previous file there is intact" if exists(path) else "; nothing was written there"
            raise error(f"could not write {path}: {_write_failure(e, directory)}{kept}") from None
        raise
    _fsync_dir(directory)


def write_json(path, obj, **dump_options):
    """json.dump(obj, f, **dump_options) to ``path``, atomically."""
    atomic_write(path, lambda f: json.dump(obj, f, **dump_options), binary=False)


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text), binary=False)


def write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


# ----------------------------------------------------------------------------- locks

_held_locks = []  # (path, open file): a lock lasts as long as its file stays open


def _holder(f):
    f.seek(0)
    return f.read().strip()


def _open_locked(lock_path, what, choose):
    """The lock file, opened and locked (flock: the system releases it however its holder
    ends). A holder removes the file when it ends; a lock taken on a file removed meanwhile
    is let go and taken again on the file now at ``lock_path``."""
    while True:
        f = open(lock_path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f) or "another process"
            f.close()
            raise OutputError(f"{what} is in use by another run ({holder}) holding {lock_path}; wait for it "
                              f"to end or choose another {choose}") from None
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(lock_path)):
                return f
        except FileNotFoundError:
            pass
        f.close()


def hold_lock(lock_path, what, choose):
    """Hold an exclusive lock on ``lock_path`` until this process ends; a second process
    asking for it is refused with the holder's pid and host. A lock file left by a process
    that is gone (it ended without removing it: a crash, kill -9) is taken over, said at
    INFO."""
    lock_path = abspath(lock_path)  # removed at exit, whatever the working folder is by then
    f = _open_locked(lock_path, what, choose)
    left = _holder(f)
    if left:
        LOGGER.info("%s: taking over the lock %s left by %s, which is no longer running", what, lock_path, left)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    _held_locks.append((lock_path, f))


def lock_dir(directory, flag="output_dir"):
    """Lock ``directory`` (its file .lock) for this process's life."""
    hold_lock(join(directory, LOCK_NAME), f"{flag} {directory}", flag)


def lock_output_file(path, flag):
    """Lock an output file for this process's life (its lock, .NAME.lock, lies beside it)."""
    hold_lock(join(dirname(path) or ".", f".{basename(path)}.lock"), f"{flag} {path}", flag)


def release_locks():
    """Remove this process's lock files and let go of their locks (at the end of the
    process; removed while still held, so that no other process locks a file that is gone)."""
    while _held_locks:
        lock_path, f = _held_locks.pop()
        try:
            if os.path.samestat(os.fstat(f.fileno()), os.stat(lock_path)):
                os.remove(lock_path)
        except OSError:
            pass
        f.close()


atexit.register(release_locks)
