"""Intra-modal Self-attention Distance (ISD), the paper's diagnostic of relation consistency.

For a matched pair and a layer, ISD is the symmetric KL distance between a modality's
self-attention (head-averaged) and its counterpart mapped through the cross-modal
attention, i.e. the IAIS loss evaluated without gradients at every layer. ISDa replaces
the attention-based mapping by annotated phrase-to-box alignments.
"""
import torch

from .iais import VARIANTS, IaisVariant, attention_blocks, kl_batchmean, pair_loss
from .layer import additive_mask


@torch.no_grad()
def layer_attention_blocks(model, batch):
    """Per layer, the head-averaged (txt, img, t2i, i2t) attention blocks of every row of
    a padded-layout batch (``txt_attn_masks``/``img_attn_masks`` for all rows)."""
    uniter = model.uniter
    hidden = uniter.embed(batch["input_ids"], batch["position_ids"], batch["img_feat"], batch["img_pos_feat"])
    bias = additive_mask(batch["attn_masks"][:, None, None, :], hidden.dtype)
    max_tl = batch["input_ids"].size(1)
    out = []
    for layer in uniter.encoder.layer:
        scores = layer.attention.self.attention_scores(hidden)
        out.append(attention_blocks(scores, batch["txt_attn_masks"], batch["img_attn_masks"], max_tl))
        hidden = layer(hidden, bias)
    return out


def pair_isd(blocks, j, n_words, n_boxes):
    """{variant: distance} of row j of one layer's blocks."""
    txt, img, t2i, i2t = (b[j] for b in blocks)
    return {v: float(pair_loss(IaisVariant.parse(v), txt, img, t2i, i2t, n_words, n_boxes)) for v in VARIANTS}


def annotated_isd(txt, img, alignments):
    """ISDa of one pair: text attention among annotated words against the visual attention
    among their annotated boxes, mapped back to words through the annotation.

    txt [L, L], img [n, n] (one layer, head-averaged); alignments: list of
    (word indices, box indices), word indices counting caption words from 0 (no [CLS])."""
    words = sorted({w for ws, _ in alignments for w in ws})
    if len(words) < 2:
        return None
    to_boxes = torch.zeros(len(words), img.size(0), dtype=img.dtype)
    for ws, bs in alignments:
        for w in ws:
            to_boxes[words.index(w), bs] += 1.0 / len(bs)
    to_boxes = to_boxes / to_boxes.sum(1, keepdim=True)
    pseudo = to_boxes @ img @ to_boxes.t()
    pseudo = pseudo / pseudo.sum(1, keepdim=True)
    sub = txt[words][:, words]
    sub = sub / sub.sum(1, keepdim=True).clamp_min(1e-12)
    eps = 1e-6
    return float(kl_batchmean(torch.log(sub + eps), pseudo) + kl_batchmean(torch.log(pseudo + eps), sub))
