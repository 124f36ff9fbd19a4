"""The training loop: steps, their logs, and at every ``valid_steps`` a validation and a
checkpoint."""
from time import time

from tqdm import tqdm

from utils import distributed as dist
from utils.logger import RunningMeter

from .checkpointing import save_checkpoint


def log_step(tb, step, report, meters, ex_per_s):
    if not report.applied:
        tb.add_scalar("skipped_steps", report.skipped_in_a_row, step)
    tb.add_scalar("lr", report.lr, step)
    tb.add_scalar("loss_step", report.loss, step)
    tb.add_scalar("grad_norm", report.grad_norm, step)
    tb.add_scalar("perf/ex_per_s", ex_per_s, step)
    for name, meter in meters.items():
        if meter.seen:
            tb.add_scalar(name, meter.val, step)


def train(train_step, ckpt_dir, *, start_step, num_train_steps, valid_steps, validate, tb):
    """Steps ``start_step + 1 .. num_train_steps`` of ``train_step`` (an
    engine.train_step.TrainStep); ``validate(step)`` gives the scalars logged before each
    checkpoint of the training state. -> the last step."""
    state = train_step.state
    meters = {}  # one for each loss term the steps report: the total, the ranking loss, the objectives' terms
    pbar = tqdm(total=num_train_steps, initial=start_step, disable=not dist.is_main_process(), desc="train")
    rows, start = 0, time()
    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    step = start_step
    while step < num_train_steps:
        report = train_step(step)
        step += 1
        rows += report.rows
        for losses in report.micro_losses:
            for name, value in losses.items():
                meters.setdefault(name, RunningMeter(name))(value)
        ex_per_s = rows * dist.get_world_size() / max(time() - start, 1e-9)
        log_step(tb, step, report, meters, ex_per_s)
        if report.stop is not None:
            raise report.stop
        pbar.update(1)
        pbar.set_postfix(loss=f"{meters['loss'].val:.4f}", ex_s=f"{ex_per_s:.0f}")
        if step % valid_steps == 0 or step == num_train_steps:
            tb.log_scalar_dict(validate(step), step)
            save_checkpoint(state, ckpt_dir, step)
    pbar.close()
    return step
