"""Checkpoints: atomic writes, pickle-free loads, and the training state for --resume."""
import os
import pickle
import re
import zipfile
from os.path import dirname, exists, join

import torch


class CheckpointError(ValueError):
    pass


def atomic_save(obj, path):
    """torch.save through a temporary file, fsync and rename: the file at ``path`` is
    either the previous complete one or the new complete one, never a partial write."""
    directory = dirname(path) or "."
    tmp = join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            raise CheckpointError(f"could not write {path} ({e}); the previous file there is intact") from None
        raise
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(error):
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:160]


def load_checkpoint(path, what="checkpoint"):
    """torch.load(weights_only=True): a file that needs pickled code is refused, unrun."""
    if not exists(path):
        raise CheckpointError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{what} {path} needs pickled code to load and was refused "
                              f"({_first_line(e)}); only plain tensor files are accepted") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{what} {path} is unreadable or truncated ({_first_line(e)})") from None


def state_dict_on_cpu(model):
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def check_finite(state_dict, path):
    for key, value in state_dict.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"refusing to write {path}: {key} holds non-finite values")


def save_model(model, ckpt_dir, tag):
    """ckpt/model_step_{tag}.pt: a plain state dict with the original's keys."""
    path = join(ckpt_dir, f"model_step_{tag}.pt")
    state = state_dict_on_cpu(model)
    check_finite(state, path)
    atomic_save(state, path)
    return path


def save_training_state(ckpt_dir, step, state):
    """ckpt/train_state_{step}.pt, written after model_step_{step}.pt."""
    atomic_save(state, join(ckpt_dir, f"train_state_{step}.pt"))


def latest_training_state(ckpt_dir):
    """(step, model path, state path) of the newest complete pair, or None."""
    if not os.path.isdir(ckpt_dir):
        return None
    steps = sorted((int(m.group(1)) for f in os.listdir(ckpt_dir)
                    if (m := re.fullmatch(r"train_state_(\d+)\.pt", f))), reverse=True)
    for step in steps:
        model_path = join(ckpt_dir, f"model_step_{step}.pt")
        if exists(model_path):
            return step, model_path, join(ckpt_dir, f"train_state_{step}.pt")
    return None
