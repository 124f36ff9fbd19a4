"""Mixed precision with torch.amp (what apex O2 gave the original on GPUs)."""
import contextlib

import torch

from .logger import LOGGER


def resolve_amp(fp16, amp_dtype, device):
    """-> (autocast dtype or None, use GradScaler).

    --fp16 on CUDA: float16 autocast with a GradScaler and fp32 master weights.
    --amp_dtype bf16: bfloat16 autocast, no scaler needed.
    --fp16 alone on a CPU falls back to bfloat16 autocast (CPUs have no fast float16 matmul
    and bfloat16 needs no loss scaling); --amp_dtype fp16 on a CPU keeps float16 and the
    scaler, slowly, so that the GPU recipe can be checked on a laptop."""
    if not fp16 and amp_dtype is None:
        return None, False
    if device.type != "cuda" and amp_dtype is None:
        LOGGER.warning("--fp16 on a CPU: using bfloat16 autocast instead of float16 (no loss scaling); "
                       "--amp_dtype fp16 forces float16")
        return torch.bfloat16, False
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, None: torch.float16}[amp_dtype]
    if device.type != "cuda" and dtype == torch.float16:
        LOGGER.warning("--amp_dtype fp16 on a CPU: float16 autocast, several times slower than bfloat16")
    return dtype, dtype == torch.float16


def autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_scaler(device, enabled):
    return torch.amp.GradScaler(device.type, enabled=enabled)
