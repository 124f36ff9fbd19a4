"""What a batch's masks count, as Python ints: the model reads lengths from here instead
of from its mask tensors, since reading a device tensor waits for the device.

The datasets know every caption's and image's length when they build a batch, and put a
:class:`RowLengths` under the batch's ``"lengths"`` key; the model computes it from the
masks (one read) only for a batch that comes without one.
"""
from dataclasses import dataclass
from operator import add


@dataclass(frozen=True)
class RowLengths:
    """attended: the ones of each row of ``attn_masks``; text_unmasked: every row attends
    to every position of the (padded) text, ``attn_masks[:, :T].all()``; words/boxes: the
    ones of each row of ``txt_attn_masks``/``img_attn_masks`` (IAIS batches, () otherwise).
    ``attended`` is () for a hard batch whose negatives were chosen on the device: which
    rows it holds is not known on the host."""
    attended: tuple
    text_unmasked: bool
    words: tuple = ()
    boxes: tuple = ()

    @classmethod
    def of_layout(cls, txt_lens, num_bbs, padded, mask_rows=None):
        """The lengths of a batch built from ``txt_lens`` ([CLS] and [SEP] included) and
        ``num_bbs`` per row, in the padded layout (text padded to its longest, then boxes)
        or the compact one (each row's text then its boxes); IAIS masks of ``mask_rows``
        (a slice of the rows) when given."""
        # C-level passes only: the datasets build this for every batch, some of 400+ rows
        attended = tuple(map(add, txt_lens, num_bbs))
        max_tl = max(txt_lens)
        text_unmasked = min(txt_lens) == max_tl if padded else min(attended) >= max_tl
        words = boxes = ()
        if mask_rows is not None:
            words = tuple(max(t - 2, 0) for t in txt_lens[mask_rows])
            boxes = tuple(num_bbs[mask_rows])
        return cls(attended, text_unmasked, words, boxes)

    @classmethod
    def of_masks(cls, attn_masks, text_len, txt_attn_masks=None, img_attn_masks=None):
        """The same read off the mask tensors (each read waits for the device)."""
        words = boxes = ()
        if txt_attn_masks is not None and img_attn_masks is not None:
            words = tuple(txt_attn_masks.sum(1).tolist())
            boxes = tuple(img_attn_masks.sum(1).tolist())
        return cls(tuple(attn_masks.sum(1).tolist()), bool(attn_masks[:, :text_len].all()), words, boxes)

    def rows(self, n):
        """The lengths of the first ``n`` rows (their masks, if any, unchanged)."""
        return RowLengths(self.attended[:n], self.text_unmasked, self.words, self.boxes)
