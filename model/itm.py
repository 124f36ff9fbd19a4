"""UNITER for image-text retrieval: ranking head, hinge loss and hard-negative mining."""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from utils.row_lengths import RowLengths

from .alignment import SIDES
from .iais import IaisVariant, iais_objective
from .model import UniterModel, UniterPreTrainedModel


@dataclass(frozen=True)
class FastPaths:
    """Computations that give the original's numbers faster, fixed when a model is built.

    fused_attention: fused attention kernels, and the IAIS attention blocks from two
    softmax passes instead of four; length_buckets: no-grad scoring of at least twice this
    many rows runs in groups of similar length, each cut to its longest row (0: one padded
    pass); first_token_only: the last layer computes only the [CLS] position the head
    reads. :meth:`original` turns them all off.
    """
    fused_attention: bool = True
    length_buckets: int = 32
    first_token_only: bool = True

    def __post_init__(self):
        if self.length_buckets < 0:
            raise ValueError(f"length_buckets must be >= 0, got {self.length_buckets}")

    @classmethod
    def original(cls):
        """The original code's computation: eager attention, four IAIS passes, one padded
        scoring pass, every position through the last layer."""
        return cls(fused_attention=False, length_buckets=0, first_token_only=False)


@dataclass(frozen=True)
class Alignment:
    """What one forward aligns: ``side`` ('L', 'V' or None: nothing) with ``objectives``
    (None: the model's own)."""
    side: str = None
    objectives: tuple = None

    @classmethod
    def of(cls, IAIS, align):
        """From a forward's arguments: the original's ``IAIS`` variant (its IAIS objective
        alone, on its modality) or ``align`` (the model's objectives on that side)."""
        variant = IaisVariant.parse(IAIS)
        if variant is not None:
            if align is not None and align != variant.modality:
                raise ValueError(f"IAIS={IAIS!r} aligns {variant.modality!r}, but align={align!r} was given too")
            return cls(variant.modality, (iais_objective(variant.alignment),))
        if align is not None and align not in SIDES:
            raise ValueError(f"align must be one of {SIDES} or None, got {align!r}")
        return cls(align)


@contextmanager
def scoring_mode(module):
    """``module`` in eval mode without gradients for the block; its previous mode comes
    back on exit, also when the block raises."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


class UniterForImageTextRetrieval(UniterPreTrainedModel):
    """Scores image-text pairs with one logit; groups of ``pairs_num`` rows are
    (positive, negatives...) for the ranking loss. ``fast_paths``: see :class:`FastPaths`;
    ``objectives``: the alignment objectives (model/alignment.py) its encoder computes."""

    def __init__(self, config, img_dim, pairs_num, margin=0.2, *, fast_paths=FastPaths(), objectives=()):
        super().__init__(config)
        self.uniter = UniterModel(config, img_dim, fused_attention=fast_paths.fused_attention, objectives=objectives)
        self.itm_output = nn.Linear(config.hidden_size, 2)
        self.rank_output = nn.Linear(config.hidden_size, 1)
        self.margin = margin
        self.pairs_num = pairs_num
        self.fast_paths = fast_paths
        self.apply(self.init_weights)

    def init_output(self):
        """Start the ranking head from the 'match' row of the pre-trained ITM head
        (call after from_pretrained on a pre-training checkpoint)."""
        with torch.no_grad():
            self.rank_output.weight.copy_(self.itm_output.weight[1:])
            self.rank_output.bias.copy_(self.itm_output.bias[1:])

    def forward(self, batch, compute_loss=True, IAIS=False, align=None):
        """Returns (output, losses).

        batch: the dict the datasets produce (compact layout with ``gather_index``, or the
        padded layout of IAIS batches with ``txt_attn_masks``/``img_attn_masks``).
        compute_loss: output is the ranking loss [groups, sample_size - 1] of each negative
        (groups of ``batch['sample_size']`` rows, the positive first),
        ``clamp(margin + sigmoid(s_neg) - sigmoid(s_pos), min=0)``; otherwise the raw
        scores [n, 1]. align: 'L' or 'V' (whose self-attention the model's alignment
        objectives align on this batch; None: none); IAIS (the original's call, instead of
        align): False/None, one of 'L-singular', 'V-singular', 'L-distributed',
        'V-distributed', or an IaisVariant, aligning with that IAIS variant alone. With
        compute_loss, losses holds the objectives' loss terms (IAIS: {'self_attn_loss': ...}),
        otherwise it is {}. (The original returned the bare tensor without IAIS.)
        """
        return self._output(batch, compute_loss, Alignment.of(IAIS, align))

    def _output(self, batch, compute_loss, alignment):
        if not compute_loss:
            return self._score(batch), {}
        rank_scores, losses = self._logits(batch, alignment)
        scores = torch.sigmoid(rank_scores).view(-1, batch["sample_size"])
        rank_loss = torch.clamp(self.margin + scores[:, 1:] - scores[:, :1], min=0)
        return rank_loss, losses

    def _logits(self, batch, alignment=None):
        """(raw ranking logits [n, 1], the encoder's losses) of a batch in either layout;
        aligned batches run on the padded concatenation, as IAIS batches in the original."""
        aligned = alignment is not None and alignment.side is not None
        gather_index = None if aligned else batch.get("gather_index")
        mask_counts = None
        if aligned:
            lengths = row_lengths(batch)
            mask_counts = (lengths.words, lengths.boxes)
        sequence_output, losses = self.uniter(
            batch["input_ids"], batch["position_ids"], batch["img_feat"], batch["img_pos_feat"],
            batch["attn_masks"], gather_index, batch.get("txt_attn_masks"), batch.get("img_attn_masks"),
            output_all_encoded_layers=False, pairs_num=self.pairs_num,
            first_token_only=self.fast_paths.first_token_only, align=alignment.side if aligned else None,
            objectives=alignment.objectives if aligned else None, mask_counts=mask_counts)
        return self.rank_output(self.uniter.pooler(sequence_output)), losses

    def _score(self, batch):
        """Raw ranking logits [n, 1]; without gradients, in length buckets when they apply."""
        buckets = None
        if not torch.is_grad_enabled() and self.fast_paths.length_buckets:
            buckets = _length_buckets(batch, self.fast_paths.length_buckets)
        if buckets is None:
            return self._logits(batch)[0]
        scores = torch.empty(batch["attn_masks"].size(0), 1, device=batch["attn_masks"].device)
        for rows, sub_batch in buckets:
            scores[rows] = self._logits(sub_batch)[0].to(scores.dtype)
        return scores


def row_lengths(batch):
    """The batch's RowLengths: as its dataset built them, or read off its masks."""
    lengths = batch.get("lengths")
    if lengths is None:
        lengths = RowLengths.of_masks(batch["attn_masks"], batch["input_ids"].size(1),
                                      batch.get("txt_attn_masks"), batch.get("img_attn_masks"))
    return lengths


def _length_buckets(batch, size):
    """Split a one-caption-many-images batch into groups of ``size`` rows of similar
    length, each cut to its own longest row: the padding a random set of images brings
    (10 to 100 boxes) is mostly skipped, and masked positions change no score.
    None when the batch is small or its captions differ in length."""
    attn = batch["attn_masks"]
    n, tl = attn.size(0), batch["input_ids"].size(1)
    if n < 2 * size or batch["img_feat"].size(0) != n:
        return None
    lengths = row_lengths(batch)
    if not lengths.text_unmasked:
        return None
    # on the host: the bucket boundaries are shapes, which a device tensor would have to be read for
    order = torch.tensor(lengths.attended).argsort()
    ascending = sorted(lengths.attended)
    out = []
    for st in range(0, n, size):
        rows = order[st:st + size]
        m = ascending[min(st + size, n) - 1]
        sub = {"input_ids": batch["input_ids"].expand(n, -1)[rows], "position_ids": batch["position_ids"],
               "img_feat": batch["img_feat"][rows, :m - tl], "img_pos_feat": batch["img_pos_feat"][rows, :m - tl],
               "attn_masks": attn[rows, :m]}
        if batch.get("gather_index") is not None:
            sub["gather_index"] = batch["gather_index"][rows, :m].clamp(max=m - 1)
        out.append((rows, sub))
    return out


class UniterForImageTextRetrievalHardNeg(UniterForImageTextRetrieval):
    """Training on the ``hard_size`` highest-scoring negatives of each micro-batch."""

    def __init__(self, config, img_dim, margin=0.2, hard_size=16, *, fast_paths=FastPaths(), objectives=()):
        super().__init__(config, img_dim, hard_size + 1, margin, fast_paths=fast_paths, objectives=objectives)
        self.hard_size = hard_size

    def forward(self, batch, sample_from="t", compute_loss=True, IAIS=False, align=None):
        """Returns (output, losses), as :meth:`UniterForImageTextRetrieval.forward`.

        batch: one micro-batch, the positive first, then negatives sharing its text
        (sample_from='t') or its image ('i'); the shared side may come as one row.
        In training with compute_loss: every pair is scored in eval mode without
        gradients (unless every negative is kept anyway), and output is the ranking loss
        [1, hard_size] of the positive against the top ``hard_size`` negatives (with
        ``align`` or IAIS, losses holds the alignment loss terms on them).
        Otherwise output is as in the parent class on the whole batch, without IAIS (as
        in the original): losses is {}.
        """
        alignment = Alignment.of(IAIS, align)
        batch = _expand_shared_side(batch, sample_from)
        if not (self.training and compute_loss):
            return self._output(batch, compute_loss, None)
        scores = None  # every negative is kept: there is nothing to select, so no scoring pass
        if batch["attn_masks"].size(0) - 1 != self.hard_size:
            with scoring_mode(self):
                scores = self._score(batch)
        hard_batch = self.select_hard_batch(batch, scores, sample_from, alignment.side is not None)
        return self._output(hard_batch, True, alignment)

    def select_hard_batch(self, batch, scores, sample_from="t", iais_masks=False):
        """The positive (row 0) and the top-``hard_size`` negatives by ``scores`` [n, 1],
        cut to the longest row (all rows in their order when ``scores`` is None).
        iais_masks: the batch is in the padded layout with IAIS position masks, which
        are kept (otherwise the compact layout's gather_index is).

        Mirrors the original exactly, including that image-side batches without IAIS
        drop ``gather_index`` (their hard forward runs on the padded concatenation).
        """
        k = self.hard_size + 1
        lengths = row_lengths(batch)
        if scores is None:
            indices = torch.arange(k, device=batch["attn_masks"].device)
            lengths = lengths.rows(k)
        else:
            hard = scores.squeeze(-1)[1:].topk(self.hard_size, sorted=False)[1] + 1
            indices = torch.cat([hard.new_zeros(1), hard])
            lengths = RowLengths((), lengths.text_unmasked, lengths.words, lengths.boxes)
        attn_masks = batch["attn_masks"].index_select(0, indices)
        position_ids = batch["position_ids"]
        if position_ids.size(0) != 1:
            position_ids = position_ids[:k]
        out = {"sample_size": k, "position_ids": position_ids, "lengths": lengths}
        if sample_from == "t":
            # which negatives were chosen decides the batch's length: the one read of the step
            # that depends on the device's results (none when every negative is kept)
            max_len = max(lengths.attended) if scores is None else int(attn_masks.sum(dim=1).max())
            max_i = max_len - batch["input_ids"].size(1)
            attn_masks = attn_masks[:, :max_len]
            out["img_feat"] = batch["img_feat"].index_select(0, indices)[:, :max_i]
            out["img_pos_feat"] = batch["img_pos_feat"].index_select(0, indices)[:, :max_i]
            out["input_ids"] = batch["input_ids"][:k]
        else:
            out["input_ids"] = batch["input_ids"].index_select(0, indices)
            out["img_feat"] = batch["img_feat"][:k]
            out["img_pos_feat"] = batch["img_pos_feat"][:k]
        out["attn_masks"] = attn_masks
        if iais_masks:
            cut = slice(None, max_len) if sample_from == "t" else slice(None)
            out["txt_attn_masks"] = batch["txt_attn_masks"][:, cut]
            out["img_attn_masks"] = batch["img_attn_masks"][:, cut]
        elif sample_from == "t":
            out["gather_index"] = batch["gather_index"].index_select(0, indices)[:, :max_len]
        return out


def _expand_shared_side(batch, sample_from):
    """A copy of ``batch`` whose shared side (the text for 't', the image for 'i'), when
    given as one row, is expanded (a view) to every row."""
    batch = dict(batch)
    n = batch["attn_masks"].size(0)
    if sample_from == "t":
        if batch["input_ids"].size(0) == 1:
            batch["input_ids"] = batch["input_ids"].expand(n, -1)
    elif sample_from == "i":
        if batch["img_feat"].size(0) == 1:
            batch["img_feat"] = batch["img_feat"].expand(n, -1, -1)
        if batch["img_pos_feat"].size(0) == 1:
            batch["img_pos_feat"] = batch["img_pos_feat"].expand(n, -1, -1)
    else:
        raise ValueError(f"sample_from must be 't' or 'i', got {sample_from!r}")
    return batch
