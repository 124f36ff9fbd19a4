"""One optimizer step of the hard-negative recipe.

A step is ``micro_steps`` (the config's ``train_batch_size``) pairs of micro-steps: an
image-side hard batch (one image against its caption and the hardest captions of other
images, visual IAIS variant) and a text-side hard batch (one caption against its image and
the hardest other images, linguistic variant). Gradients are accumulated over all of them,
averaged over processes, unscaled, clipped, and applied unless they are not finite.
"""
from dataclasses import dataclass, field

import torch
from torch.nn.utils import clip_grad_norm_

from model import IaisVariant
from utils import distributed as dist
from utils.cli import TrainingError
from utils.logger import LOGGER
from utils.optim import tsa_weight
from utils.precision import autocast

# (stream, sample_from, IAIS modality), in the order the original trains them
SIDES = (("image", "i", "V"), ("text", "t", "L"))


def iais_variants(alignment):
    """{stream: IaisVariant or None} for ``alignment`` ('singular', 'distributed'; False: off)."""
    return {side: IaisVariant.of(modality, alignment) for side, _, modality in SIDES}


def hard_batch_loss(model, batch, sample_from, variant, tsa, micro_steps):
    """Loss of one hard batch: mean rank loss / micro_steps, plus the IAIS loss weighted by
    ``tsa`` when ``variant`` is set; and its parts as tensors (empty without IAIS)."""
    rank_loss, losses = model(batch, sample_from=sample_from, compute_loss=True, IAIS=variant)
    rank_loss = rank_loss.mean() / micro_steps
    if variant is None:
        return rank_loss, {}
    return rank_loss + losses["self_attn_loss"] * tsa, {"rank_loss": rank_loss, **losses}


@dataclass
class StepReport:
    lr: float
    loss: float  # summed over the micro-steps: the loss of the whole step
    grad_norm: torch.Tensor  # before clipping
    applied: bool  # False: gradients were not finite and the update was skipped
    skipped: int  # updates skipped in a row, this one included
    rows: int  # (image, text) pairs scored, this process
    micro_losses: list = field(default_factory=list)  # per micro-step {name: float}


class NonFinitePolicy:
    """Skip an update whose gradients are not finite; stop after ``max_skipped`` in a row.

    With loss scaling, the scaler skips the update itself and halves its scale: a few
    overflows early on are how dynamic scaling finds its level, not an error."""

    def __init__(self, max_skipped):
        self.max_skipped = max_skipped
        self.skipped = 0

    def record(self, step, finite, scaler, scale_before):
        self.skipped = 0 if finite else self.skipped + 1
        if finite:
            return
        if scale_before is not None:
            LOGGER.warning("step %d: gradients overflowed at loss scale %g, update skipped, loss scale "
                           "now %g (%d in a row)", step, scale_before, scaler.get_scale(), self.skipped)
        else:
            LOGGER.warning("step %d: non-finite gradients, update skipped (%d in a row)", step, self.skipped)
        if self.skipped >= self.max_skipped:
            raise TrainingError(f"{self.skipped} consecutive steps had non-finite gradients; "
                                f"lower --learning_rate or check the data (last good checkpoint is kept)")


class TrainStep:
    """Callable ``(streams, step) -> StepReport`` that trains step ``step + 1``.

    ``lr_at(step)`` is the learning rate of the step with that 1-based number; the IAIS
    weight is taken at the number of steps done before, as in the original."""

    def __init__(self, model, optimizer, scaler, *, micro_steps, iais_alignment, num_train_steps, lr_at,
                 grad_norm, max_skipped_steps, device, amp_dtype):
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.micro_steps, self.num_train_steps, self.lr_at = micro_steps, num_train_steps, lr_at
        self.variants = iais_variants(iais_alignment)
        self.grad_norm = grad_norm
        self.device, self.amp_dtype = device, amp_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.non_finite = NonFinitePolicy(max_skipped_steps)

    def __call__(self, streams, step):
        report = self.accumulate(streams, step)
        report.lr = self.lr_at(step + 1)
        report.grad_norm, report.applied = self.update(step + 1, report.lr)
        report.skipped = self.non_finite.skipped
        return report

    def accumulate(self, streams, step):
        """Forward and backward of every micro-step; gradients add up in .grad."""
        tsa = tsa_weight(step, self.num_train_steps).to(self.device)
        report = StepReport(lr=0.0, loss=0.0, grad_norm=None, applied=False, skipped=0, rows=0)
        for _ in range(self.micro_steps):
            for side, sample_from, _ in SIDES:
                batch = next(streams[side])
                report.rows += batch["attn_masks"].size(0)
                with autocast(self.device, self.amp_dtype):
                    loss, parts = hard_batch_loss(self.model, batch, sample_from, self.variants[side], tsa,
                                                  self.micro_steps)
                self.scaler.scale(loss).backward()
                report.loss += loss.item()
                report.micro_losses.append({"loss": loss.item(), **{
                    k: parts[k].item() for k in ("rank_loss", "self_attn_loss") if k in parts}})
        return report

    def update(self, step, lr):
        """Average, unscale and clip the gradients, then apply them if finite:
        -> (gradient norm before clipping, whether the update was applied)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        dist.all_reduce_mean(grads)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        if self.grad_norm != -1:
            grad_norm = clip_grad_norm_(self.params, self.grad_norm)
        else:
            grad_norm = torch.norm(torch.stack([g.norm() for g in grads]))
        finite = bool(torch.isfinite(grad_norm))
        scaling = self.scaler.is_enabled()
        scale_before = self.scaler.get_scale() if scaling and not finite else None  # a device sync: only then
        if scaling:
            self.scaler.step(self.optimizer)  # skips the update itself when gradients overflowed
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.non_finite.record(step, finite, self.scaler, scale_before)
        return grad_norm, finite
