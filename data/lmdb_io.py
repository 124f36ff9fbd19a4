"""LMDB access shared by the text and image DBs: read-only opens that work on read-only
media and refuse truncated files, per-thread read transactions, and batched writes."""
import contextlib
import os
import threading
from os.path import exists, isdir, join

import lmdb

from utils.environment import env_int

from .errors import DataError


def _processes_on_this_node():
    for var in ("LOCAL_WORLD_SIZE", "HOROVOD_LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        count = env_int(var, low=1, advice="launch with torchrun or horovodrun, or unset it")
        if count is not None:
            return count
    return 1


def open_readonly(path):
    """Open an LMDB for reading without creating or locking anything, so that it works
    on read-only media; read-ahead only when one process per node reads it."""
    if not isdir(path) or not exists(join(path, "data.mdb")):
        raise DataError(f"{path} is not an LMDB directory (no data.mdb)")
    try:
        env = lmdb.open(path, readonly=True, create=False, lock=False, subdir=True,
                        readahead=_processes_on_this_node() == 1, max_readers=1024)
        _check_complete(env, path)
    except lmdb.Error as e:
        raise lmdb_error(path, e) from None
    return env


def _check_complete(env, path):
    """LMDB maps data.mdb into memory: a page past the end of a truncated file kills the
    reader with SIGBUS instead of raising, so the file must hold every page the
    environment's newest meta page counts."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(join(path, "data.mdb"))
    if size < needed:
        env.close()
        raise DataError(f"{path}/data.mdb is truncated ({size} bytes, the LMDB needs {needed}); "
                        f"copy or download it again")


def lmdb_error(path, error):
    """A DataError naming the LMDB that a raw lmdb.Error came from."""
    return DataError(f"{path}/data.mdb is not a readable LMDB ({type(error).__name__}: "
                     f"{str(error).strip() or 'no detail'}); copy or download it again")


_ENVS = {}  # real path -> environment: py-lmdb allows one per file and process
_ENVS_LOCK = threading.Lock()


class ReadOnlyLmdb:
    """Read transactions of one LMDB, one per process and thread. DataLoader worker
    processes either fork (the lock-free read-only environment is inherited and stays
    valid; only transactions must not cross the fork) or unpickle the dataset (the
    environment is opened there); loader threads each read through their own transaction,
    as LMDB asks, and the values they get stay valid while the thread's transaction lives."""

    def __init__(self, path):
        self.path = path
        self._txns = {}
        self._txn()

    def _txn(self):
        key = (os.getpid(), threading.get_ident())
        txn = self._txns.get(key)
        if txn is None:
            env_key = os.path.realpath(self.path)
            with _ENVS_LOCK:
                if env_key not in _ENVS:
                    _ENVS[env_key] = open_readonly(self.path)
            txn = self._txns[key] = _ENVS[env_key].begin(buffers=True)
        return txn

    def get(self, key):
        try:
            return self._txn().get(key)
        except lmdb.Error as e:
            raise lmdb_error(self.path, e) from None

    def entries(self):
        """The number of keys (a header read, not a scan)."""
        try:
            return self._txn().stat()["entries"]
        except lmdb.Error as e:
            raise lmdb_error(self.path, e) from None

    def items(self):
        """(key, value) of every entry, as buffers."""
        try:
            yield from self._txn().cursor()
        except lmdb.Error as e:
            raise lmdb_error(self.path, e) from None

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


class WriteTxn:
    """Writes to a new LMDB, committing every ``every`` puts so transactions stay small."""

    def __init__(self, path, every):
        os.makedirs(path, exist_ok=True)
        self.path = path
        with self._named_errors():
            self.env = lmdb.open(path, readonly=False, create=True, map_size=1 << 40)
            self.txn = self.env.begin(write=True)
        self.every, self.pending = every, 0

    @contextlib.contextmanager
    def _named_errors(self):
        try:
            yield
        except lmdb.Error as e:
            raise DataError(f"could not write the LMDB {self.path} ({type(e).__name__}: "
                            f"{str(e).strip() or 'no detail'}); check its disk space and permissions") from None

    def put(self, key, value):
        with self._named_errors():
            self.txn.put(key.encode("utf-8"), value)
            self.pending += 1
            if self.pending >= self.every:
                self.txn.commit()
                self.txn = self.env.begin(write=True)
                self.pending = 0

    def commit(self):
        with self._named_errors():
            self.txn.commit()
            self.env.close()

    def abort(self):
        self.txn.abort()
        self.env.close()
