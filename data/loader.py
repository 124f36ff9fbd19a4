"""Loaders: worker threads (default) or processes build batches ahead of use, and batches
move to the device ahead of use (a side CUDA stream on GPU; as-is on CPU)."""
import collections
import itertools
import signal
from concurrent.futures import ThreadPoolExecutor

import torch

from .batch import is_shared_across_batches
from .negatives import seeded_draws

WORKER_TYPES = ("thread", "process")


def map_tensors(batch, fn):
    """``batch`` with ``fn`` applied to every tensor in it (nested dicts, lists, tuples)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


class _Uploader:
    """Moves batches to ``device``; a tensor shared across batches is moved once and its
    device copy handed out again (kept with the host tensor, so its id stays its own)."""

    def __init__(self, device):
        self.device, self._copies = device, {}

    def _to_device(self, t):
        if not is_shared_across_batches(t):
            return t.to(self.device, non_blocking=True)
        if id(t) not in self._copies:
            self._copies[id(t)] = (t, t.to(self.device, non_blocking=True))
        return self._copies[id(t)][1]

    def __call__(self, batch):
        return map_tensors(batch, self._to_device)


class ThreadLoader:
    """``dataset[key]`` for each key of ``keys``, in order, built ahead by ``n_threads``
    threads of this process (``n_threads + 1`` batches in flight).

    Batches of 100+ MB cost more to hand from a worker process to this one (a copy into
    fresh shared memory) than to build; threads hand them over for free and reuse their
    memory (``RecycledBuffers``). The heavy work, LMDB reads and array copies, runs
    without the GIL."""

    def __init__(self, dataset, keys, collate_fn=None, n_threads=1, pin_memory=False):
        self.dataset, self.keys, self.collate_fn, self.n_threads = dataset, keys, collate_fn, n_threads
        self.pin_memory = pin_memory and torch.cuda.is_available()
        # the current CUDA device is per thread: pinning from a thread still on device 0
        # would open a context there for every rank of the node
        self.cuda_device = torch.cuda.current_device() if self.pin_memory else None

    def _start_thread(self):
        if self.cuda_device is not None:
            torch.cuda.set_device(self.cuda_device)

    def __len__(self):
        return len(self.keys)

    def _build(self, key):
        batch = self.dataset[key]
        if self.collate_fn is not None:
            batch = self.collate_fn([batch])
        if not self.pin_memory:
            return batch
        return map_tensors(batch, lambda t: t if is_shared_across_batches(t) else t.pin_memory())

    def __iter__(self):
        keys = iter(self.keys)
        with ThreadPoolExecutor(self.n_threads, thread_name_prefix="loader", initializer=self._start_thread) as pool:
            pending = collections.deque(pool.submit(self._build, k) for k in itertools.islice(keys, self.n_threads + 1))
            try:
                while pending:
                    batch = pending.popleft().result()
                    pending.extend(pool.submit(self._build, k) for k in itertools.islice(keys, 1))
                    yield batch
            finally:
                for future in pending:
                    future.cancel()


def make_loader(dataset, collate_fn, n_workers, pin_memory=False, worker_type="thread", keys=None):
    """``collate_fn([dataset[key]])`` for each key of ``keys`` (default: every index in
    turn), built by ``n_workers`` workers of ``worker_type`` (``0``: in the calling thread)."""
    keys = range(len(dataset)) if keys is None else keys
    if n_workers > 0 and worker_type == "thread":
        return ThreadLoader(dataset, keys, collate_fn, n_workers, pin_memory)
    # a private generator: a pass must not draw from the global torch RNG (dropout), so
    # that the kind and number of workers changes no number
    return torch.utils.data.DataLoader(dataset, batch_size=1, sampler=keys, num_workers=n_workers,
                                       pin_memory=pin_memory, collate_fn=collate_fn, generator=torch.Generator(),
                                       worker_init_fn=_ignore_sigint if n_workers > 0 else None)


def _ignore_sigint(worker_id):
    """A Ctrl-C in a terminal reaches the loader's worker processes too: they leave it to
    the training process, which stops after its step (engine/interrupts.py) and ends them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PrefetchLoader:
    """Wraps a DataLoader; on CUDA the copy of batch k+1 overlaps the compute of batch k."""

    def __init__(self, loader, device=None):
        self.loader = loader
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
            else torch.device("cpu"))
        self.dataset = loader.dataset

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.device.type != "cuda":
            yield from self.loader
            return
        stream = torch.cuda.Stream(self.device)
        upload = _Uploader(self.device)
        current = None
        for batch in self.loader:
            with torch.cuda.stream(stream):
                nxt = upload(batch)
            if current is not None:
                yield current
            torch.cuda.current_stream(self.device).wait_stream(stream)
            map_tensors(nxt, lambda t: t.record_stream(torch.cuda.current_stream(self.device)))
            current = nxt
        if current is not None:
            yield current

    def __getattr__(self, name):
        return getattr(self.loader, name)


def prefetch_loader(dataset, collate_fn, n_workers, pin_memory, worker_type, device, keys=None):
    """One pass over ``dataset`` (its items ``keys``, default all) as :func:`make_loader`
    builds it, each batch on ``device``."""
    return PrefetchLoader(make_loader(dataset, collate_fn, n_workers, pin_memory, worker_type, keys), device)


class _EpochSampler(torch.utils.data.Sampler):
    """(epoch, position, index) keys of one shuffled epoch, from ``start`` on."""

    def __init__(self, n, seed, epoch, start):
        self.n, self.seed, self.epoch, self.start = n, seed, epoch, start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        return iter((self.epoch, pos, order[pos]) for pos in range(self.start, self.n))

    def __len__(self):
        return self.n - self.start


class _SeededItems(torch.utils.data.Dataset):
    """Draws each item's negatives from a generator seeded by (seed, epoch, position), so
    that they do not depend on the number or kind of workers or on where a run resumed."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, pos, index = key
        with seeded_draws(f"{self.seed}:{epoch}:{pos}"):
            return self.dataset[index]


class ResumableStream:
    """Endless shuffled stream of a dataset's batches whose position can be saved and
    restored (``state_dict``/``load_state_dict``): epoch e's order depends only on
    (seed, e), so a resumed run sees exactly the batches the uninterrupted one would."""

    def __init__(self, dataset, collate_fn, seed, n_workers=0, pin_memory=False, device=None,
                 worker_type="thread"):
        self.dataset, self.collate_fn, self.seed = dataset, collate_fn, seed
        self.n_workers, self.pin_memory, self.device = n_workers, pin_memory, device
        self.worker_type = worker_type
        self.epoch, self.pos, self._it = 0, 0, None

    def _start(self):
        loader = make_loader(_SeededItems(self.dataset, self.seed), self.collate_fn, self.n_workers,
                             self.pin_memory, self.worker_type,
                             keys=_EpochSampler(len(self.dataset), self.seed, self.epoch, self.pos))
        self._it = iter(PrefetchLoader(loader, self.device))

    def __next__(self):
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.pos = self.epoch + 1, 0
            self._start()
            batch = next(self._it)
        self.pos += 1
        return batch

    def __iter__(self):
        return self

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos, self._it = state["epoch"], state["pos"], None
