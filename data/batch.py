"""Padding and layout helpers shared by the ITM datasets."""
import torch


def pad_tensors(tensors, lens=None, pad=0):
    """B x [T_i, D] -> [B, max T, D], zero (or ``pad``) filled, in the tensors' dtype."""
    if lens is None:
        lens = [t.size(0) for t in tensors]
    out = torch.full((len(tensors), max(lens), tensors[0].size(-1)), pad, dtype=tensors[0].dtype)
    for i, (t, n) in enumerate(zip(tensors, lens)):
        out[i, :n] = t[:n]
    return out


def get_gather_index(txt_lens, num_bbs, batch_size, max_len, out_size):
    """Index that packs row i of [text padded to max_len | boxes] as [text | boxes | rest].

    ``max_len`` is where the boxes start in the concatenation; the original image-side
    dataset passes the last caption's length here, and we keep that to give its numbers.
    """
    assert len(txt_lens) == len(num_bbs) == batch_size
    index = torch.arange(out_size, dtype=torch.long).unsqueeze(0).repeat(batch_size, 1)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
        index[i, tl:tl + nbb] = torch.arange(max_len, max_len + nbb, dtype=torch.long)
    return index


def compact_attn_masks(txt_lens, num_bbs):
    """0/1 masks of the compact layout: row i has txt_lens[i] + num_bbs[i] ones."""
    out = torch.zeros(len(txt_lens), max(txt_lens) + max(num_bbs), dtype=torch.long)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
        out[i, :tl + nbb] = 1
    return out


def padded_layout_masks(txt_lens, num_bbs):
    """Masks of the padded IAIS layout [text padded to max_tl | boxes padded to max_nbb]:
    (attn_masks [B, max_tl + max_nbb], words [B, max_tl + max_nbb], boxes [...]).

    ``words`` marks the caption tokens without [CLS]/[SEP]; ``boxes`` the valid regions.
    """
    max_tl, max_nbb = max(txt_lens), max(num_bbs)
    attn = torch.zeros(len(txt_lens), max_tl + max_nbb, dtype=torch.long)
    words = torch.zeros_like(attn)
    boxes = torch.zeros_like(attn)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
        attn[i, :tl] = 1
        attn[i, max_tl:max_tl + nbb] = 1
        words[i, 1:tl - 1] = 1
        boxes[i, max_tl:max_tl + nbb] = 1
    return attn, words, boxes
