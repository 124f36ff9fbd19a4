"""Moves batches to the device ahead of use (a side CUDA stream on GPU; as-is on CPU)."""
import random

import torch


def move_to(batch, device, non_blocking=True):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device, non_blocking) for v in batch)
    return batch


def _record_stream(batch, stream):
    if isinstance(batch, torch.Tensor):
        batch.record_stream(stream)
    elif isinstance(batch, dict):
        for v in batch.values():
            _record_stream(v, stream)
    elif isinstance(batch, (list, tuple)):
        for v in batch:
            _record_stream(v, stream)


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
        current = None
        for batch in self.loader:
            with torch.cuda.stream(stream):
                nxt = move_to(batch, self.device)
            if current is not None:
                yield current
            torch.cuda.current_stream(self.device).wait_stream(stream)
            _record_stream(nxt, torch.cuda.current_stream(self.device))
            current = nxt
        if current is not None:
            yield current

    def __getattr__(self, name):
        return getattr(self.loader, name)


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
    """Seeds ``random`` from (seed, epoch, position) before each item, so the negatives an
    item draws do not depend on worker count or on where a run was resumed."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, pos, index = key
        random.seed(f"{self.seed}:{epoch}:{pos}")
        return self.dataset[index]


class ResumableStream:
    """Endless shuffled stream of a dataset's batches whose position can be saved and
    restored (``state_dict``/``load_state_dict``): epoch e's order depends only on
    (seed, e), so a resumed run sees exactly the batches the uninterrupted one would."""

    def __init__(self, dataset, collate_fn, seed, n_workers=0, pin_memory=False, device=None):
        self.dataset, self.collate_fn, self.seed = dataset, collate_fn, seed
        self.n_workers, self.pin_memory, self.device = n_workers, pin_memory, device
        self.epoch, self.pos, self._it = 0, 0, None

    def _start(self):
        loader = torch.utils.data.DataLoader(
            _SeededItems(self.dataset, self.seed), batch_size=None,
            sampler=_EpochSampler(len(self.dataset), self.seed, self.epoch, self.pos),
            num_workers=self.n_workers, pin_memory=self.pin_memory,
            # a private generator keeps worker seeding off the global torch RNG (dropout)
            generator=torch.Generator().manual_seed(self.seed))
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
        return self.collate_fn([batch])

    def __iter__(self):
        return self

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos, self._it = state["epoch"], state["pos"], None
