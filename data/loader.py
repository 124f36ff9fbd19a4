"""Moves batches to the device ahead of use (a side CUDA stream on GPU; as-is on CPU)."""
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
