"""Checkpoint files: atomic writes, pickle-free loads, model weights and where the newest
training state of a run is."""
import os
import pickle
import re
import zipfile
from os.path import basename, exists, join

import torch

from .logger import LOGGER
from .outputs import atomic_write, first_line

DDP_PREFIX = "module."  # what DistributedDataParallel (and DataParallel) put before every name


class CheckpointError(ValueError):
    pass


def atomic_save(obj, path):
    """torch.save through utils.outputs.atomic_write: the file at ``path`` is either the
    previous complete one or the new complete one, never a partial write."""
    atomic_write(path, lambda f: torch.save(obj, f), error=CheckpointError)


def _looks_like_torch_save(path):
    """torch.save writes a zip archive (or, in its legacy format, a pickle: first byte 0x80);
    a truncated archive still starts with the zip signature."""
    if os.path.isdir(path):
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def load_checkpoint(path, what="checkpoint"):
    """torch.load(weights_only=True): a file that needs pickled code is refused, unrun."""
    if not exists(path):
        raise CheckpointError(f"{what} {path} not found")
    if not _looks_like_torch_save(path):
        raise CheckpointError(f"{what} {path} is unreadable or truncated: not a file written by torch.save "
                              f"(neither its zip format nor a pickle)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{what} {path} needs pickled code to load and was refused "
                              f"({first_line(e)}); only plain tensor files are accepted") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{what} {path} is unreadable or truncated ({first_line(e)})") from None


def _describe(obj):
    return f"a {type(obj).__name__}" + (f" of {len(obj)} entries" if isinstance(obj, (dict, list, tuple)) else "")


def load_model_state(path, what="checkpoint"):
    """A model state dict from ``path``: a non-empty mapping of names to finite tensors.
    Anything else (a training state, a list, a dict of other things, NaN weights) is
    refused with the reason."""
    state = load_checkpoint(path, what)
    if isinstance(state, dict) and {"optimizer", "global_step"} <= set(state):
        raise CheckpointError(f"{what} {path} is a training state (for --resume), not model weights; "
                              f"pass the model_step_N.pt next to it")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{what} {path} holds {_describe(state)}, not a model state dict "
                              f"(parameter names mapped to tensors)")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{what} {path}: entry {key!r} holds {_describe(value)}, not a tensor; "
                                  f"this is not a model state dict")
    state = strip_wrapper_prefix(state, path, what)
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if v.is_floating_point()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:
        first = next(iter(bad))
        raise CheckpointError(f"{what} {path}: {len(bad)} tensor(s) hold non-finite values (first: {first}, "
                              f"{bad[first]} values); these weights are unusable")
    return state


def strip_wrapper_prefix(state, path, what="checkpoint"):
    """The weights of a model saved while wrapped in DistributedDataParallel (every name
    starts with ``module.``, once per wrapping) under the model's own names; a prefix on
    some names only is left for the checks of what the model takes to name."""
    depth = 0
    while state and all(k.startswith(DDP_PREFIX * (depth + 1)) for k in state):
        depth += 1
    if not depth:
        return state
    prefix = DDP_PREFIX * depth
    LOGGER.info("%s %s was saved from a wrapped model: the prefix '%s' is removed from its %d names",
                what, path, prefix, len(state))
    return {k[len(prefix):]: v for k, v in state.items()}


def state_dict_on_cpu(model):
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def check_finite(state_dict, path):
    for key, value in state_dict.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"refusing to write {path}: {key} holds non-finite values")


def save_weights(state_dict, path):
    """A plain state dict (finite, checked) to ``path``, atomically: the format of model_step_N.pt."""
    check_finite(state_dict, path)
    atomic_save(state_dict, path)
    return path


def save_model(model, ckpt_dir, tag):
    """ckpt/model_step_{tag}.pt: a plain state dict with the original's keys."""
    return save_weights(state_dict_on_cpu(model), join(ckpt_dir, f"model_step_{tag}.pt"))


def save_training_state(ckpt_dir, step, state):
    """ckpt/train_state_{step}.pt, written after model_step_{step}.pt."""
    atomic_save(state, join(ckpt_dir, f"train_state_{step}.pt"))


def step_of(path, kind="model_step"):
    """N of ``{kind}_N.pt`` (model_step_N.pt, train_state_N.pt), None for another name."""
    m = re.fullmatch(rf"{kind}_(\d+)\.pt", basename(path))
    return int(m.group(1)) if m else None


def latest_training_state(ckpt_dir):
    """(step, model path, state path) of the newest complete pair, or None."""
    if not os.path.isdir(ckpt_dir):
        return None
    steps = sorted((step for f in os.listdir(ckpt_dir) if (step := step_of(f, "train_state")) is not None),
                   reverse=True)
    for step in steps:
        model_path = join(ckpt_dir, f"model_step_{step}.pt")
        if exists(model_path):
            return step, model_path, join(ckpt_dir, f"train_state_{step}.pt")
    return None
