"""UNITER for image-text retrieval: ranking head, hinge loss and hard-negative mining."""
import torch
from torch import nn

from .model import UniterModel, UniterPreTrainedModel


class UniterForImageTextRetrieval(UniterPreTrainedModel):
    """Scores image-text pairs with one logit; groups of ``pairs_num`` rows are
    (positive, negatives...) for the ranking loss."""

    def __init__(self, config, img_dim, pairs_num, margin=0.2):
        super().__init__(config)
        self.uniter = UniterModel(config, img_dim)
        self.itm_output = nn.Linear(config.hidden_size, 2)
        self.rank_output = nn.Linear(config.hidden_size, 1)
        self.margin = margin
        self.pairs_num = pairs_num
        # no-grad scoring of >= 2x this many rows runs in groups of similar length (0: off)
        self.length_buckets = 32
        # the last layer computes only the [CLS] position the head reads (False: all of them)
        self.first_token_only = True
        self.apply(self.init_weights)

    def _scores(self, batch):
        """Raw ranking logits [n, 1] of a batch in either layout."""
        sequence_output = self.uniter(
            batch["input_ids"], batch["position_ids"], batch["img_feat"], batch["img_pos_feat"],
            batch["attn_masks"], batch.get("gather_index"), output_all_encoded_layers=False,
            first_token_only=self.first_token_only)
        return self.rank_output(self.uniter.pooler(sequence_output))

    def init_output(self):
        """Start the ranking head from the 'match' row of the pre-trained ITM head
        (call after from_pretrained on a pre-training checkpoint)."""
        with torch.no_grad():
            self.rank_output.weight.copy_(self.itm_output.weight[1:])
            self.rank_output.bias.copy_(self.itm_output.bias[1:])

    def forward(self, batch, compute_loss=True, IAIS=False):
        if not compute_loss and not torch.is_grad_enabled() and self.length_buckets:
            buckets = _length_buckets(batch, self.length_buckets)
            if buckets is not None:
                scores = torch.empty(batch["attn_masks"].size(0), 1, device=batch["attn_masks"].device)
                for rows, sub_batch in buckets:
                    scores[rows] = self._scores(sub_batch).to(scores.dtype)
                return scores
        if not compute_loss:
            return self._scores(batch)
        if IAIS:
            sequence_output, losses = self.uniter(
                batch["input_ids"], batch["position_ids"], batch["img_feat"], batch["img_pos_feat"],
                batch["attn_masks"], None, batch.get("txt_attn_masks"), batch.get("img_attn_masks"),
                output_all_encoded_layers=False, IAIS=IAIS, pairs_num=self.pairs_num,
                first_token_only=self.first_token_only)
            rank_scores = self.rank_output(self.uniter.pooler(sequence_output))
        else:
            rank_scores = self._scores(batch)
        scores = torch.sigmoid(rank_scores).view(-1, batch["sample_size"])
        rank_loss = torch.clamp(self.margin + scores[:, 1:] - scores[:, :1], min=0)
        return (rank_loss, losses) if IAIS else rank_loss


def _length_buckets(batch, size):
    """Split a one-caption-many-images batch into groups of ``size`` rows of similar
    length, each cut to its own longest row: the padding a random set of images brings
    (10 to 100 boxes) is mostly skipped, and masked positions change no score.
    None when the batch is small or its captions differ in length."""
    attn = batch["attn_masks"]
    n, tl = attn.size(0), batch["input_ids"].size(1)
    if n < 2 * size or batch["img_feat"].size(0) != n or not bool(attn[:, :tl].all()):
        return None
    lengths = attn.sum(1)
    order = lengths.argsort()
    out = []
    for st in range(0, n, size):
        rows = order[st:st + size]
        m = int(lengths[rows].max())
        sub = {"input_ids": batch["input_ids"].expand(n, -1)[rows], "position_ids": batch["position_ids"],
               "img_feat": batch["img_feat"][rows, :m - tl], "img_pos_feat": batch["img_pos_feat"][rows, :m - tl],
               "attn_masks": attn[rows, :m]}
        if batch.get("gather_index") is not None:
            sub["gather_index"] = batch["gather_index"][rows, :m].clamp(max=m - 1)
        out.append((rows, sub))
    return out


class UniterForImageTextRetrievalHardNeg(UniterForImageTextRetrieval):
    """Training on the ``hard_size`` highest-scoring negatives of each micro-batch."""

    def __init__(self, config, img_dim, margin=0.2, hard_size=16):
        super().__init__(config, img_dim, hard_size + 1, margin)
        self.hard_size = hard_size

    def forward(self, batch, sample_from="t", compute_loss=True, IAIS=False):
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

        if not (self.training and compute_loss):
            return super().forward(batch, compute_loss)
        scores = None  # every negative is kept: there is nothing to select, so no scoring pass
        if n - 1 != self.hard_size:
            with torch.no_grad():
                self.eval()
                scores = super().forward(batch, compute_loss=False)
                self.train()
        hard_batch = self._get_hard_batch(batch, scores, sample_from, IAIS)
        return super().forward(hard_batch, compute_loss=True, IAIS=IAIS)

    def _get_hard_batch(self, batch, scores, sample_from="t", IAIS=False):
        """The positive (row 0) and the top-``hard_size`` negatives, cut to the longest row
        (all rows in their order when ``scores`` is None).

        Mirrors the original exactly, including that image-side batches without IAIS
        drop ``gather_index`` (their hard forward runs on the padded concatenation).
        """
        k = self.hard_size + 1
        if scores is None:
            indices = torch.arange(k, device=batch["attn_masks"].device)
        else:
            hard = scores.squeeze(-1)[1:].topk(self.hard_size, sorted=False)[1] + 1
            indices = torch.cat([hard.new_zeros(1), hard])
        attn_masks = batch["attn_masks"].index_select(0, indices)
        position_ids = batch["position_ids"]
        if position_ids.size(0) != 1:
            position_ids = position_ids[:k]
        out = {"sample_size": k, "position_ids": position_ids}
        if sample_from == "t":
            max_len = int(attn_masks.sum(dim=1).max())
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
        if IAIS:
            cut = slice(None, max_len) if sample_from == "t" else slice(None)
            out["txt_attn_masks"] = batch["txt_attn_masks"][:, cut]
            out["img_attn_masks"] = batch["img_attn_masks"][:, cut]
        elif sample_from == "t":
            out["gather_index"] = batch["gather_index"].index_select(0, indices)[:, :max_len]
        return out
