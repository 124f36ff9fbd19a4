"""One optimizer step of the hard-negative recipe.

A step trains ``positives`` positive pairs (the config's ``train_batch_size``), each as two
hard batches: an image-side one (one image against its caption and the hardest captions
of other images; alignment objectives align the image's self-attention, IAIS's visual
variant) and a text-side one (one caption against its image and the hardest other images;
the text's, the linguistic variant). Gradients are accumulated over all of them, averaged
over processes, unscaled, clipped, and applied unless they are not finite.
"""
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch.nn.utils import clip_grad_norm_

from utils import distributed as dist
from utils.cli import TrainingError
from utils.logger import LOGGER
from utils.precision import autocast


class Side(NamedTuple):
    stream: str  # key of the training streams
    sample_from: str  # 'i': one image, many captions; 't': one caption, many images
    align: str  # whose self-attention the alignment objectives align: 'V' image, 'L' text


# in the order the original trains them
SIDES = (Side("image", "i", "V"), Side("text", "t", "L"))


def hard_batch_loss(model, batch, sample_from, align, weights, positives):
    """Loss of one hard batch: mean rank loss / positives, plus each alignment loss term
    times its weight (``weights``: {term: weight}) when ``align`` ('L' or 'V') is set; and
    its parts as tensors (empty without alignment)."""
    rank_loss, losses = model(batch, sample_from=sample_from, compute_loss=True, align=align)
    rank_loss = rank_loss.mean() / positives
    if align is None:
        return rank_loss, {}
    loss = rank_loss
    for term, value in losses.items():
        loss = loss + value * weights[term]
    return loss, {"rank_loss": rank_loss, **losses}


def term_weights(objectives, done_steps, num_train_steps, device):
    """{term: float32 weight on ``device``} of every objective's terms after ``done_steps``."""
    weights = {}
    for objective in objectives:
        weight = torch.as_tensor(objective.weight(done_steps, num_train_steps), dtype=torch.float32, device=device)
        weights.update({term: weight for term in objective.terms})
    return weights


def read_terms(terms):
    """[{name: 0-dim tensor}] -> [{name: float}], with one read of the device for them all:
    a read waits for the device to finish its queue, so the micro-batches' loss terms stay
    on the device until the step is done."""
    values = [v.float() for batch_terms in terms for v in batch_terms.values()]
    values = iter(torch.stack(values).tolist() if values else [])
    return [{name: next(values) for name in batch_terms} for batch_terms in terms]


@dataclass
class StepReport:
    lr: float
    loss: float  # summed over the hard batches: the loss of the whole step
    micro_losses: list  # per hard batch, {name: float}
    rows: int  # (image, text) pairs trained on by this process
    grad_norm: torch.Tensor  # before clipping
    applied: bool  # False: gradients were not finite and the update was skipped
    skipped_in_a_row: int  # updates skipped in a row, this one included
    stop: TrainingError = None  # set when too many updates in a row were skipped
    weights: dict = field(default_factory=dict)  # {"weight/<objective>": its weight at this step}


class NonFinitePolicy:
    """Skip an update whose gradients are not finite; stop after ``max_skipped`` in a row.

    With loss scaling, the scaler skips the update itself and halves its scale: a few
    overflows early on are how dynamic scaling finds its level, not an error."""

    def __init__(self, max_skipped):
        self.max_skipped = max_skipped
        self.skipped = 0

    def record(self, step, finite, scaler, scale_before):
        """Count and report this step; -> the error that ends the run, or None."""
        self.skipped = 0 if finite else self.skipped + 1
        if finite:
            return None
        if scale_before is not None:
            LOGGER.warning("step %d: gradients overflowed at loss scale %g, update skipped, loss scale "
                           "now %g (%d in a row)", step, scale_before, scaler.get_scale(), self.skipped)
        else:
            LOGGER.warning("step %d: non-finite gradients, update skipped (%d in a row)", step, self.skipped)
        if self.skipped < self.max_skipped:
            return None
        return TrainingError(f"{self.skipped} consecutive steps had non-finite gradients; "
                             f"lower --learning_rate or check the data (last good checkpoint is kept)")


class TrainStep:
    """``train_step(step)`` trains step ``step + 1`` of ``state`` (an
    engine.checkpointing.TrainingState) and returns its StepReport.

    ``lr_at(step)`` is the learning rate of the step with that 1-based number;
    ``objectives`` are the alignment objectives the model was built with (() for none),
    whose weights are taken at the number of steps done before, as the original takes
    IAIS's."""

    def __init__(self, state, *, positives, objectives, num_train_steps, lr_at, grad_norm,
                 max_skipped_steps, device, amp_dtype):
        self.state = state
        self.positives, self.num_train_steps, self.lr_at = positives, num_train_steps, lr_at
        self.objectives = tuple(objectives)
        self.grad_norm = grad_norm
        self.device, self.amp_dtype = device, amp_dtype
        self.params = [p for p in state.model.parameters() if p.requires_grad]
        self.non_finite = NonFinitePolicy(max_skipped_steps)

    def __call__(self, step):
        terms, rows = self.accumulate(step)
        lr = self.lr_at(step + 1)
        grad_norm, finite, stop = self.update(step + 1, lr)
        weights = {f"weight/{o.name}": torch.as_tensor(o.weight(step, self.num_train_steps), dtype=torch.float32,
                                                       device=self.device) for o in self.objectives}
        # the update above has waited for the device already; the weights come in the same read
        *micro_losses, weights = read_terms(terms + [weights])
        return StepReport(lr=lr, loss=sum(m["loss"] for m in micro_losses), micro_losses=micro_losses, rows=rows,
                          grad_norm=grad_norm, applied=finite, skipped_in_a_row=self.non_finite.skipped, stop=stop,
                          weights=weights)

    def accumulate(self, step):
        """Forward and backward of every hard batch; gradients add up in .grad.
        -> (per-batch loss terms {name: 0-dim tensor}, rows)."""
        weights = term_weights(self.objectives, step, self.num_train_steps, self.device)
        terms, rows = [], 0
        for _ in range(self.positives):
            for side in SIDES:
                batch = next(self.state.streams[side.stream])
                rows += batch["attn_masks"].size(0)
                with autocast(self.device, self.amp_dtype):
                    loss, parts = hard_batch_loss(self.state.model, batch, side.sample_from,
                                                  side.align if self.objectives else None, weights, self.positives)
                self.state.scaler.scale(loss).backward()
                terms.append({"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}})
        return terms, rows

    def update(self, step, lr):
        """Average, unscale and clip the gradients, then apply them if finite:
        -> (gradient norm before clipping, whether applied, the error that ends the run or None)."""
        optimizer, scaler = self.state.optimizer, self.state.scaler
        grads = [p.grad for p in self.params if p.grad is not None]
        dist.all_reduce_mean(grads)
        for group in optimizer.param_groups:
            group["lr"] = lr
        scaler.unscale_(optimizer)
        if self.grad_norm != -1:
            grad_norm = clip_grad_norm_(self.params, self.grad_norm)
        else:
            grad_norm = torch.norm(torch.stack([g.norm() for g in grads]))
        finite = bool(torch.isfinite(grad_norm))
        scaling = scaler.is_enabled()
        scale_before = scaler.get_scale() if scaling and not finite else None  # a device sync: only then
        if scaling:
            scaler.step(optimizer)  # skips the update itself when gradients overflowed
            scaler.update()
        elif finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite, self.non_finite.record(step, finite, scaler, scale_before)
