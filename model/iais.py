"""IAIS: Inter-modal Alignment on Intra-modal Self-attentions (the paper's regulariser),
registered as the alignment objectives 'iais-singular' and 'iais-distributed'.

All functions work on one positive pair at a time, on head-averaged attention
matrices. Log-probabilities are taken in float32 so that fp16/bf16 training stays finite.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .alignment import OBJECTIVES, AlignmentObjective, register_objective
from .layer import MASK_VALUE

MODALITIES = ("L", "V")  # whose self-attention is regularised: L text, V image
ALIGNMENTS = ("singular", "distributed")
VARIANTS = ("L-singular", "V-singular", "L-distributed", "V-distributed")

# log(0) guard of the distributed variant (the singular variant has none in the original)
DISTRIBUTED_EPS = 1e-6


@dataclass(frozen=True)
class IaisVariant:
    """One IAIS variant: the modality whose self-attention is aligned ('L' text, 'V' image)
    and the alignment ('singular' or 'distributed'); ``str()`` gives e.g. 'L-singular'."""
    modality: str
    alignment: str

    def __post_init__(self):
        if self.modality not in MODALITIES or self.alignment not in ALIGNMENTS:
            raise ValueError(f"IAIS must be one of {VARIANTS}, got modality {self.modality!r} "
                             f"and alignment {self.alignment!r}")

    def __str__(self):
        return f"{self.modality}-{self.alignment}"

    @classmethod
    def of(cls, modality, alignment):
        """The variant of ``modality`` ('L' or 'V') for a configured ``alignment``
        ('singular', 'distributed', or False/None: IAIS off, giving None)."""
        return cls(modality, alignment) if alignment else None

    @classmethod
    def parse(cls, value):
        """None for False/None, the variant for one of VARIANTS or an IaisVariant;
        ValueError naming the four choices for anything else."""
        if value is None or value is False:
            return None
        if isinstance(value, cls):
            return value
        if isinstance(value, str) and value in VARIANTS:
            return cls(*value.split("-"))
        raise ValueError(f"IAIS must be False or one of {VARIANTS}, got {value!r}")


def kl_batchmean(log_input, target):
    """KLDivLoss(reduction='batchmean'): sum(target * (log target - log_input)) / rows."""
    return F.kl_div(log_input, target, reduction="batchmean")


def singular_pseudo(other_attn, cross_attn):
    """The other modality's self-attention other_attn [n, n] re-indexed by each unit's most
    attended counterpart (argmax over cross_attn [L, m], m >= n, padded columns 0): [L, L].
    The re-indexed probabilities go through a second softmax, as in the original code."""
    idx = cross_attn.argmax(-1).detach()
    return torch.softmax(other_attn[idx][:, idx], dim=-1)


def distributed_pseudo(to_other, from_other):
    """Attention routed through the other modality: to_other [L, n] @ from_other [n, L]."""
    return to_other @ from_other


def singular_alignment(self_attn, other_attn, cross_attn):
    """Align a modality's self-attention self_attn [L, L] with :func:`singular_pseudo`."""
    pseudo = singular_pseudo(other_attn, cross_attn)
    return kl_batchmean(self_attn.log(), pseudo) + kl_batchmean(pseudo.log(), self_attn)


def distributed_alignment(self_attn, to_other, from_other):
    """Align a modality's self-attention self_attn [L, L] with :func:`distributed_pseudo`."""
    pseudo = distributed_pseudo(to_other, from_other)
    return (kl_batchmean(torch.log(self_attn + DISTRIBUTED_EPS), pseudo)
            + kl_batchmean(torch.log(pseudo + DISTRIBUTED_EPS), self_attn))


def pair_loss(variant, txt, img, t2i, i2t, n_words, n_boxes):
    """IAIS loss (an :class:`IaisVariant`) of one positive pair from its four padded
    attention blocks: txt [>=L, >=L], img [>=n, >=n], t2i [>=L, >=n], i2t [>=n, >=L]."""
    L, n = n_words, n_boxes
    txt, img = txt[:L, :L], img[:n, :n]
    if variant.modality == "L":
        own, other, to_other, from_other = txt, img, t2i[:L], i2t[:n, :L]
    else:
        own, other, to_other, from_other = img, txt, i2t[:n], t2i[:L, :n]
    if variant.alignment == "singular":
        # the argmax runs over every (padded) column, as in the original
        return singular_alignment(own, other, to_other)
    # the routed attention goes through valid units only
    return distributed_alignment(own, to_other[:, :other.size(0)], from_other)


def _masked_probs(scores, row_mask, col_mask):
    """softmax(scores + (1 - row x col) * -10000) * (row x col), over keys, in >= float32."""
    dtype = torch.promote_types(scores.dtype, torch.float32)
    block = (row_mask[:, None, :, None] * col_mask[:, None, None, :]).to(dtype)
    probs = torch.softmax(scores.to(dtype) + (1.0 - block) * MASK_VALUE, dim=-1)
    return probs * block


def attention_blocks(scores, txt_mask, img_mask, max_tl, fused=True):
    """Head-averaged blocks (txt, img, t2i, i2t) of the last layer's attention.

    scores: raw QK^T/sqrt(d) [P, heads, N, N] of the positives; txt_mask/img_mask: 0/1
    position masks [P, N] (text without [CLS]/[SEP], valid boxes). Text rows/columns are
    1..max_tl-2, image rows/columns max_tl..N-1.

    The original runs one masked softmax per block (four in all). For rows inside the
    block mask, masking rows changes nothing, so ``fused`` computes the same values with
    one softmax per key mask (two in all).
    """
    t = slice(1, max_tl - 1)
    v = slice(max_tl, scores.size(-1))
    if fused:
        to_txt = _masked_probs(scores, torch.ones_like(txt_mask), txt_mask)
        to_img = _masked_probs(scores, torch.ones_like(img_mask), img_mask)
        rows_t = txt_mask[:, None, :, None].to(to_txt.dtype)
        rows_v = img_mask[:, None, :, None].to(to_txt.dtype)
        blocks = ((to_txt * rows_t)[..., t, t], (to_img * rows_v)[..., v, v],
                  (to_img * rows_t)[..., t, v], (to_txt * rows_v)[..., v, t])
    else:
        blocks = (_masked_probs(scores, txt_mask, txt_mask)[..., t, t],
                  _masked_probs(scores, img_mask, img_mask)[..., v, v],
                  _masked_probs(scores, txt_mask, img_mask)[..., t, v],
                  _masked_probs(scores, img_mask, txt_mask)[..., v, t])
    return tuple(b.mean(dim=1) for b in blocks)


def iais_loss(variant, scores, txt_mask, img_mask, max_tl, fused=True, mask_counts=None):
    """Mean IAIS loss (an :class:`IaisVariant`) over the positives (scores as in
    :func:`attention_blocks`). mask_counts: (words, boxes), the ones of each row of
    txt_mask/img_mask as ints; read off the masks (a wait for the device) when None."""
    txt, img, t2i, i2t = attention_blocks(scores, txt_mask, img_mask, max_tl, fused)
    if mask_counts is None:
        mask_counts = (txt_mask.sum(1).tolist(), img_mask.sum(1).tolist())
    n_words, n_boxes = mask_counts
    losses = [pair_loss(variant, txt[j], img[j], t2i[j], i2t[j], int(n_words[j]), int(n_boxes[j]))
              for j in range(scores.size(0))]
    return torch.stack(losses).mean()


def tsa_weight(done_steps, num_train_steps):
    """Weight of the IAIS loss: exp(5 * (progress - 1)) ("exp_schedule" training signal
    annealing), in float32 as the original computes it."""
    progress = torch.tensor(done_steps, dtype=torch.float) / torch.tensor(num_train_steps, dtype=torch.float)
    return torch.exp((progress - 1) * 5)


@register_objective
class IaisSingular(AlignmentObjective):
    """IAIS with singular alignment on the last layer: 'self_attn_loss', weighted by
    :func:`tsa_weight`."""
    name = "iais-singular"
    alignment = "singular"
    terms = ("self_attn_loss",)

    def __call__(self, view):
        variant = IaisVariant(view.side, self.alignment)
        return {"self_attn_loss": iais_loss(variant, view.scores, view.txt_mask, view.img_mask, view.max_tl,
                                            view.fused, (view.n_words, view.n_boxes))}

    def weight(self, done_steps, num_train_steps):
        return tsa_weight(done_steps, num_train_steps)


@register_objective
class IaisDistributed(IaisSingular):
    """IAIS with distributed alignment on the last layer (as :class:`IaisSingular`)."""
    name = "iais-distributed"
    alignment = "distributed"


def iais_objective(alignment):
    """The IAIS objective of ``alignment`` ('singular' or 'distributed')."""
    return OBJECTIVES[f"iais-{alignment}"]()
