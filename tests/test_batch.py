"""Batch layouts by hand, and the recycled memory batches are built in."""
import sys
import threading

import numpy as np
import torch

from data.batch import RecycledBuffers, compact_attn_masks, get_gather_index, padded_layout_masks


def test_recycled_buffers_never_overwrite_a_batch_in_use():
    pool = RecycledBuffers(keep=2)
    first = torch.from_numpy(pool.empty((4, 8), np.float16))
    first.fill_(1)
    view_of_second = pool.empty((4, 8), np.float16)[1:]  # only a view survives
    view_of_second.fill(2)
    third = pool.empty((4, 8), np.float16)  # both slots taken: fresh memory
    third.fill(3)
    assert (first == 1).all() and (view_of_second == 2).all()
    address = first.data_ptr()
    del first
    reused = pool.empty((2, 8), np.float16)
    assert reused.ctypes.data == address  # released memory is used again


def test_recycled_buffers_shared_by_threads_hand_out_each_buffer_once():
    pool = RecycledBuffers(keep=4)
    errors, start, all_holding = [], threading.Barrier(6), threading.Barrier(6)

    def work(tag):
        start.wait()
        first = pool.empty((64, 256), np.int32)
        first.fill(tag)
        all_holding.wait()  # six buffers in use at once: the pool keeps 4, two are fresh arrays
        if not (first == tag).all():
            errors.append(tag)
        del first
        for _ in range(200):
            held = pool.empty((64, 256), np.int32)
            held.fill(tag)
            if not (held == tag).all():
                errors.append(tag)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, or a race would rarely show
    try:
        threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and len(pool._buffers) == 4


def test_layout_masks_and_gather_index_by_hand():
    """Masks and gather index against a position-by-position construction."""
    txt_lens, num_bbs = [5, 3, 7, 4], [2, 6, 1, 3]
    max_tl, max_nbb, box_start = 7, 6, 4
    width = max(txt_lens) + max(num_bbs)
    compact = [[int(j < tl + nbb) for j in range(width)] for tl, nbb in zip(txt_lens, num_bbs)]
    gather = [[box_start + j - tl if tl <= j < tl + nbb else j for j in range(width)]
              for tl, nbb in zip(txt_lens, num_bbs)]
    attn = [[int(j < tl or max_tl <= j < max_tl + nbb) for j in range(max_tl + max_nbb)]
            for tl, nbb in zip(txt_lens, num_bbs)]
    words = [[int(1 <= j < tl - 1) for j in range(max_tl + max_nbb)] for tl in txt_lens]
    boxes = [[int(max_tl <= j < max_tl + nbb) for j in range(max_tl + max_nbb)] for nbb in num_bbs]
    assert compact_attn_masks(txt_lens, num_bbs).tolist() == compact
    assert get_gather_index(txt_lens, num_bbs, 4, box_start, width).tolist() == gather
    assert [m.tolist() for m in padded_layout_masks(txt_lens, num_bbs)] == [attn, words, boxes]
