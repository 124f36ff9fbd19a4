"""Padding and layout helpers shared by the ITM datasets: the compact and the padded IAIS
layout of a batch, its masks and gather index, and the memory its tensors are built in."""
import sys
import threading

import numpy as np
import torch

from utils.row_lengths import RowLengths


def pad_tensors(tensors, lens=None, pad=0):
    """B x [T_i, D] -> [B, max T, D], zero (or ``pad``) filled, in the tensors' dtype."""
    if lens is None:
        lens = [t.size(0) for t in tensors]
    out = torch.full((len(tensors), max(lens), tensors[0].size(-1)), pad, dtype=tensors[0].dtype)
    for i, (t, n) in enumerate(zip(tensors, lens)):
        out[i, :n] = t[:n]
    return out


def shared_across_batches(tensor):
    """Marks a tensor that many batches hold (the image side of an evaluation mini-batch):
    loaders move it to the device once per pass and never pin a copy of it."""
    tensor.shared_across_batches = True
    return tensor


def is_shared_across_batches(tensor):
    return getattr(tensor, "shared_across_batches", False)


class RecycledBuffers:
    """Memory for large padded batches, used again once nothing refers to a batch any more.

    A text-side hard-negative batch is 100+ MB; writing it into pages the process already
    has is about twice as fast as into fresh ones, which every new allocation of that size
    gets. Whether a buffer is still in use is read off its reference count, so a batch that
    someone keeps (or a view of it, or a tensor made from it) is never written over.
    Loader threads share one instance: a buffer is handed out under a lock, with the
    reference that marks it busy already taken.
    """

    def __init__(self, keep=8):
        self.keep = keep
        self._buffers = []
        self._lock = threading.Lock()
        self._idle_refs = self._probe_idle_refs()

    def _refs(self, i):
        return sys.getrefcount(self._buffers[i])

    def _probe_idle_refs(self):
        self._buffers.append(np.empty(0, np.uint8))
        refs = self._refs(0)
        self._buffers.pop()
        return refs

    def empty(self, shape, dtype):
        """An uninitialised array of this shape and dtype, in recycled memory when some is free."""
        with self._lock:
            return self._empty(shape, np.dtype(dtype))

    def _empty(self, shape, dtype):
        nbytes = int(np.prod(shape)) * dtype.itemsize
        idle = [i for i in range(len(self._buffers)) if self._refs(i) == self._idle_refs]
        fits = [i for i in idle if self._buffers[i].nbytes >= nbytes]
        if fits:
            slot = fits[0]
        else:
            size = max([nbytes] + [b.nbytes for b in self._buffers])
            if idle:
                slot = idle[0]
                self._buffers[slot] = np.empty(size, np.uint8)
            elif len(self._buffers) < self.keep:
                slot = len(self._buffers)
                self._buffers.append(np.empty(size, np.uint8))
            else:
                return np.empty(shape, dtype)
        return self._buffers[slot][:nbytes].view(dtype).reshape(shape)

    def __getstate__(self):  # a copy sent to a worker process starts empty
        return {"keep": self.keep}

    def __setstate__(self, state):
        self.__init__(state["keep"])


def _lengths(values):
    return torch.as_tensor(values, dtype=torch.long).unsqueeze(1)


def get_gather_index(txt_lens, num_bbs, batch_size, max_len, out_size):
    """Index that packs row i of [text padded to max_len | boxes] as [text | boxes | rest].

    ``max_len`` is where the boxes start in the concatenation; the original image-side
    dataset passes the last caption's length here, and we keep that to give its numbers.
    """
    assert len(txt_lens) == len(num_bbs) == batch_size
    tl, nbb = _lengths(txt_lens), _lengths(num_bbs)
    pos = torch.arange(out_size, dtype=torch.long).unsqueeze(0)
    is_box = (pos >= tl) & (pos < tl + nbb)
    return torch.where(is_box, pos - tl + max_len, pos.expand(batch_size, -1))


def compact_attn_masks(txt_lens, num_bbs):
    """0/1 masks of the compact layout: row i has txt_lens[i] + num_bbs[i] ones."""
    pos = torch.arange(max(txt_lens) + max(num_bbs), dtype=torch.long).unsqueeze(0)
    return (pos < _lengths(txt_lens) + _lengths(num_bbs)).long()


def padded_layout_masks(txt_lens, num_bbs):
    """Masks of the padded IAIS layout [text padded to max_tl | boxes padded to max_nbb]:
    (attn_masks [B, max_tl + max_nbb], words [B, max_tl + max_nbb], boxes [...]).

    ``words`` marks the caption tokens without [CLS]/[SEP]; ``boxes`` the valid regions.
    """
    max_tl, max_nbb = max(txt_lens), max(num_bbs)
    tl, nbb = _lengths(txt_lens), _lengths(num_bbs)
    pos = torch.arange(max_tl + max_nbb, dtype=torch.long).unsqueeze(0)
    words = ((pos >= 1) & (pos < tl - 1)).long()
    boxes = ((pos >= max_tl) & (pos < max_tl + nbb)).long()
    attn = (pos < tl).long() | boxes
    return attn, words, boxes


def box_position_features(norm_bb):
    """[..., 6] (x1, y1, x2, y2, w, h) -> [..., 7] with the area w*h appended."""
    return torch.cat([norm_bb, norm_bb[..., 4:5] * norm_bb[..., 5:]], dim=-1)


def iais_batch(input_ids, position_ids, img_feat, img_pos_feat, txt_lens, num_bbs, all_rows):
    """Padded layout with the word/box position masks IAIS needs (of row 0 unless all_rows)."""
    attn_masks, words, boxes = padded_layout_masks(txt_lens, num_bbs)
    rows = slice(None) if all_rows else slice(0, 1)
    return {"input_ids": input_ids, "position_ids": position_ids, "img_feat": img_feat,
            "img_pos_feat": img_pos_feat, "attn_masks": attn_masks,
            "txt_attn_masks": words[rows], "img_attn_masks": boxes[rows],
            "lengths": RowLengths.of_layout(txt_lens, num_bbs, padded=True, mask_rows=rows)}


def compact_batch(input_ids, position_ids, img_feat, img_pos_feat, txt_lens, num_bbs, box_start):
    """Compact layout (each row's text then its boxes) with the gather index that packs it;
    ``box_start``: see ``get_gather_index``."""
    attn_masks = compact_attn_masks(txt_lens, num_bbs)
    gather_index = get_gather_index(txt_lens, num_bbs, len(txt_lens), box_start, attn_masks.size(1))
    return {"input_ids": input_ids, "position_ids": position_ids, "img_feat": img_feat,
            "img_pos_feat": img_pos_feat, "attn_masks": attn_masks, "gather_index": gather_index,
            "lengths": RowLengths.of_layout(txt_lens, num_bbs, padded=False)}
