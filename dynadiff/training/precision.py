"""Autocast mixed precision: which dtype (if any) ``mixed_precision`` means on a device."""

from __future__ import annotations

import torch

from dynadiff.training.errors import TrainingError


def resolve_mixed_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full precision) for ``mixed_precision`` on ``device``."""
    cuda = device.type == "cuda"
    if name == "auto":
        if not cuda:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "no":
        return None
    if name == "fp16" and not cuda:
        raise TrainingError("mixed_precision=fp16 needs a CUDA device (loss scaling); use bf16 or no on the CPU")
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise TrainingError("this GPU does not support bf16: use mixed_precision=fp16 (or no)")
    return torch.bfloat16 if name == "bf16" else torch.float16
