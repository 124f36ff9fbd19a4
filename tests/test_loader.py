"""Loaders: threads, processes and inline give the same batches; the resumable stream;
device copies."""
import random
import threading

import pytest
import torch
from torch.utils.data import DataLoader

from data import (DataError, ItmEvalDataset, ItmRankDatasetHardNegFromText, PrefetchLoader, ResumableStream,
                  ThreadLoader, itm_eval_collate, itm_rank_hn_collate, make_loader)
from data.batch import shared_across_batches
from data.loader import _Uploader
from helpers import clone_batch, same_batch


def test_prefetch_loader_passes_batches_through_on_cpu(txt_db, img_db):
    ds = ItmEvalDataset(txt_db, img_db, 8)
    loader = PrefetchLoader(DataLoader(ds, batch_size=1, collate_fn=itm_eval_collate), "cpu")
    assert len(loader) == len(ds) and loader.dataset is ds
    first = next(iter(loader))
    assert torch.equal(first[0]["img_feat"], ds[0][0]["img_feat"])


def test_resumable_stream_continues_where_it_stopped(txt_db, img_db):
    """The position saved mid-epoch gives the same following batches, negatives included."""
    ds = ItmRankDatasetHardNegFromText(txt_db, img_db, 3)
    a = ResumableStream(ds, itm_rank_hn_collate, seed=5)
    for _ in range(70):  # crosses the epoch boundary (60 captions)
        next(a)
    state = a.state_dict()
    expected = [next(a)["img_feat"] for _ in range(5)]
    b = ResumableStream(ds, itm_rank_hn_collate, seed=5)
    b.load_state_dict(state)
    assert state == {"epoch": 1, "pos": 10}
    for e in expected:
        assert torch.equal(next(b)["img_feat"], e)


def _stream_batches(ds, n, **kwargs):
    stream = ResumableStream(ds, itm_rank_hn_collate, seed=5, **kwargs)
    return [clone_batch(next(stream)) for _ in range(n)], stream.state_dict()


@pytest.mark.parametrize("iais", [False, True], ids=["compact", "iais"])
def test_stream_batches_do_not_depend_on_the_workers(txt_db, img_db, iais):
    """In the training loop, in 3 threads or in 2 processes: the same batches, negatives
    included, in the same order, across an epoch boundary (60 captions)."""
    ds = ItmRankDatasetHardNegFromText(txt_db, img_db, 7, IAIS=iais)
    random.seed(123)
    before = random.getstate()
    inline, state = _stream_batches(ds, 65)
    assert random.getstate() == before  # the global generator is left alone
    for kwargs in ({"n_workers": 3, "worker_type": "thread"}, {"n_workers": 2, "worker_type": "process"}):
        batches, other_state = _stream_batches(ds, 65, **kwargs)
        assert other_state == state == {"epoch": 1, "pos": 5}
        for a, b in zip(inline, batches):
            assert same_batch(a, b), kwargs


def test_thread_loader_order_errors_and_eval_batches(txt_db, img_db):

    class Slow:
        def __len__(self):
            return 12

        def __getitem__(self, i):
            import time
            time.sleep(0.02 * ((7 * i) % 5))  # later items often finish first
            if i == 9:
                raise DataError("item 9 is broken")
            return torch.tensor([i])

    got = []
    with pytest.raises(DataError, match="item 9 is broken"):
        for batch in ThreadLoader(Slow(), range(12), None, n_threads=4):
            got.append(int(batch))
    assert got == list(range(9))
    ds = ItmEvalDataset(txt_db, img_db, 8)
    inline = list(make_loader(ds, itm_eval_collate, 0))
    assert len(inline) == len(ds)
    for kind in ("thread", "process"):
        other = list(make_loader(ds, itm_eval_collate, 2, worker_type=kind))
        assert len(other) == len(inline)
        for a, b in zip(other, inline):
            for x, y in zip(a, b):
                assert same_batch(x, y), kind


def test_shared_tensors_move_to_the_device_once():
    upload = _Uploader(torch.device("meta"))  # a device whose copies are new objects, on any machine
    shared, own = shared_across_batches(torch.ones(4)), torch.ones(4)
    a, b = upload({"x": shared, "y": own}), upload([shared, own])
    assert a["x"] is b[0] and a["x"].device.type == "meta"
    assert a["y"] is not b[1] and b[1].device.type == "meta"


def test_pinning_threads_use_the_ranks_device(monkeypatch):
    """Loader threads pin on the device of the rank that started them (CUDA's current
    device is per thread), checked with CUDA calls recorded instead of made."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set", d, threading.get_ident())))
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda t: calls.append(("pin", None, threading.get_ident())) or t.clone())
    shared = shared_across_batches(torch.tensor([-1]))
    batches = list(ThreadLoader([(torch.tensor([i]), shared) for i in range(6)], range(6), None, 2,
                                pin_memory=True))
    assert [int(b[0]) for b in batches] == list(range(6))
    assert all(b[1] is shared for b in batches)  # moved to the device once, never pinned
    set_in = {tid for op, d, tid in calls if op == "set" and d == 3}
    pinned_in = {tid for op, _, tid in calls if op == "pin"}
    assert pinned_in and pinned_in <= set_in and threading.get_ident() not in set_in
    assert all(calls[[c[2] for c in calls].index(tid)][0] == "set" for tid in pinned_in)  # set before pinning
