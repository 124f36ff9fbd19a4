"""The training loop: steps, their logs, at every ``valid_steps`` a validation, the best
checkpoint and a checkpoint, and a checkpoint when a signal stops the run."""
from os.path import join
from time import time

from tqdm import tqdm

from utils import distributed as dist
from utils.logger import RunningMeter

from .checkpointing import save_checkpoint
from .interrupts import Interrupted, StopRequests


def log_step(tb, step, report, meters, ex_per_s):
    if not report.applied:
        tb.add_scalar("skipped_steps", report.skipped_in_a_row, step)
    tb.add_scalar("lr", report.lr, step)
    tb.add_scalar("loss_step", report.loss, step)
    tb.add_scalar("grad_norm", report.grad_norm, step)
    tb.add_scalar("perf/ex_per_s", ex_per_s, step)
    tb.log_scalar_dict(report.weights, step)
    for name, meter in meters.items():
        if meter.seen:
            tb.add_scalar(name, meter.val, step)


def train(train_step, ckpt_dir, *, start_step, num_train_steps, valid_steps, validate, tb, best=None,
          save_steps=None):
    """Steps ``start_step + 1 .. num_train_steps`` of ``train_step`` (an
    engine.train_step.TrainStep); ``validate(step)`` gives the scalars logged before each
    checkpoint of the training state (also written every ``save_steps``, without a
    validation), and ``best`` (an engine.best.BestCheckpoint) keeps the
    best weights by them. -> the last step. A SIGINT or SIGTERM stops the run after the step
    it came in, with a checkpoint at that step: engine.interrupts.Interrupted is raised."""
    state = train_step.state
    meters = {}  # one for each loss term the steps report: the total, the ranking loss, the objectives' terms
    pbar = tqdm(total=num_train_steps, initial=start_step, disable=not dist.is_main_process(), desc="train")
    rows, start = 0, time()
    state.model.train()
    state.optimizer.zero_grad(set_to_none=True)
    step = start_step
    with StopRequests(train_step.device) as stops:
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
            saved = step % valid_steps == 0 or step == num_train_steps
            if saved:
                validate_and_save(state, ckpt_dir, step, validate, tb, best)
            elif save_steps and step % save_steps == 0:
                save_checkpoint(state, ckpt_dir, step)
                saved = True
            signum = stops.agreed()
            if signum is not None:
                pbar.close()
                raise Interrupted(signum, step, stop_checkpoint(state, ckpt_dir, step, saved))
    pbar.close()
    return step


def validate_and_save(state, ckpt_dir, step, validate, tb, best):
    scalars = validate(step)
    tb.log_scalar_dict(scalars, step)
    if best is not None:
        best.update(step, scalars, state.model)
    save_checkpoint(state, ckpt_dir, step)


def stop_checkpoint(state, ckpt_dir, step, saved):
    """The checkpoint of a run stopped after ``step`` (written now unless ``saved`` already)."""
    if not saved:
        save_checkpoint(state, ckpt_dir, step)
    return join(ckpt_dir, f"model_step_{step}.pt")
