"""What a training run saves at each validation, and how a resumed run picks up again.

ckpt/model_step_{N}.pt holds the weights in the original's format (utils/checkpoint.py);
ckpt/train_state_{N}.pt, written after it, holds everything else a resumed run needs to
continue bit-identically: optimizer, loss scaler, data streams and every rank's RNGs.
"""
from dataclasses import dataclass

from utils import distributed as dist
from utils.checkpoint import (CheckpointError, first_line, latest_training_state, load_checkpoint, load_model_state,
                              save_model, save_training_state)
from utils.cli import TrainingError
from utils.logger import LOGGER
from utils.misc import rng_state, set_rng_state


def _settings(param_groups):
    return sorted(k for group in param_groups for k in group if k != "params")


@dataclass
class TrainingState:
    """The objects whose state a checkpoint holds; the weights go to model_step_{N}.pt,
    the rest (:meth:`state_dict`) to train_state_{N}.pt."""
    model: object
    optimizer: object
    scaler: object
    streams: dict  # {name: data.ResumableStream}

    def state_dict(self, step, rngs):
        """What train_state_{step}.pt holds: the step, optimizer, loss scaler, every data
        stream's position and ``rngs`` (every rank's RNG states)."""
        return {"global_step": step, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": rngs, "streams": {side: s.state_dict() for side, s in self.streams.items()}}

    def load_state_dict(self, state, rank):
        """Restore :meth:`state_dict`'s ``state`` (rank ``rank``'s RNGs) -> its step. A state
        written by another optimiser, model or format raises (KeyError, TypeError,
        ValueError, IndexError or RuntimeError) before the first step would fail."""
        saved = state["optimizer"]["param_groups"]
        if _settings(saved) != _settings(self.optimizer.param_groups):
            raise ValueError(f"written by another optimiser (settings {', '.join(sorted(set(_settings(saved))))})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        for side, stream in self.streams.items():
            stream.load_state_dict(state["streams"][side])
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        return int(state["global_step"])


def check_replicas_agree(model, step):
    """Every rank must hold the same weights; a divergence is a bug worth stopping for."""
    digest = float(sum(p.detach().double().sum() for p in model.parameters()))
    digests = dist.all_gather_object(digest)
    if len(set(digests)) != 1:
        raise TrainingError(f"step {step}: parameters differ across ranks ({digests})")
    LOGGER.info("step %d: parameters identical on %d rank(s)", step, len(digests))


def save_checkpoint(state, ckpt_dir, step):
    """model_step_{step}.pt, then train_state_{step}.pt (rank 0 writes; every rank calls)."""
    check_replicas_agree(state.model, step)
    is_main = dist.is_main_process()
    if is_main:
        save_model(state.model, ckpt_dir, step)
    rngs = dist.all_gather_object(rng_state())
    if is_main:
        save_training_state(ckpt_dir, step, state.state_dict(step, rngs))
    dist.barrier()


def _load_weights(model, model_path, model_config):
    """The run's own weights; a checkpoint of another model size (a folder whose
    log/model.json was edited by hand, say) is one line, not load_state_dict's report."""
    try:
        model.load_state_dict(load_model_state(model_path))
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
        raise CheckpointError(f"--resume: {model_path} does not fit the model of {model_config} ({first[:200]}); "
                              f"resume with the model config the run was trained with") from None


def resume(state, ckpt_dir, model_config):
    """Load the newest complete checkpoint of ``ckpt_dir`` into ``state`` (whose model was
    built from ``model_config``); -> its step."""
    _, model_path, state_path = latest_training_state(ckpt_dir)
    _load_weights(state.model, model_path, model_config)
    saved = load_checkpoint(state_path, "training state")
    try:
        step = state.load_state_dict(saved, dist.get_rank())
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"training state {state_path} does not fit this run ({type(e).__name__}: "
                              f"{first_line(e)}); resume with the options it was written with (log/hps.json)") from None
    LOGGER.info("resumed from %s at step %d", state_path, step)
    return step
