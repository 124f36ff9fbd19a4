"""Optimisers and schedules of the fine-tuning recipe."""
import math

import torch
from torch.optim import Adam, Adamax, Optimizer

NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


class AdamW(Optimizer):
    """Adam with decoupled weight decay as BERT/UNITER use it: eps is added to sqrt(v)
    before bias correction, and decay is applied after the Adam update."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True):
        if lr < 0 or eps < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"]
                if group["correct_bias"]:
                    step_size *= math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def build_optimizer(model, name, learning_rate, betas, weight_decay):
    """``name`` in adam|adamax|adamw; no weight decay on biases and LayerNorm."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not any(nd in n for nd in NO_DECAY)],
         "weight_decay": weight_decay},
        {"params": [p for n, p in named if any(nd in n for nd in NO_DECAY)], "weight_decay": 0.0},
    ]
    classes = {"adam": Adam, "adamax": Adamax, "adamw": AdamW}
    if name not in classes:
        raise ValueError(f"optim must be one of {sorted(classes)}, got {name!r}")
    return classes[name](groups, lr=learning_rate, betas=tuple(betas))


def warmup_linear(step, warmup_step, tot_step):
    """BERT schedule: linear warm-up, then linear decay to 0 at tot_step."""
    if step < warmup_step:
        return step / warmup_step
    if step >= tot_step:
        return 0
    return max(0, (tot_step - step) / (tot_step - warmup_step))


def get_lr_sched(global_step, learning_rate, warmup_steps, num_train_steps):
    """Learning rate of step ``global_step`` (1-based); never exactly 0, as in the original."""
    lr = learning_rate * warmup_linear(global_step, warmup_steps, num_train_steps)
    return lr if lr > 0 else 1e-8

