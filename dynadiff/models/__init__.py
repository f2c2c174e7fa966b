"""The Dynadiff decoder: brain module, Versatile Diffusion UNet with LoRA, sampler.

Importing this package is cheap: the torch/diffusers modules load on first use of a
name below (``from dynadiff.models import build_model``). Configs live in
``dynadiff.models.config`` (pydantic only).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FmriMLPConfig": "dynadiff.models.config",
    "VersatileDiffusionConfig": "dynadiff.models.config",
    "FmriMLP": "dynadiff.models.brain",
    "DynadiffModel": "dynadiff.models.decoder",
    "build_model": "dynadiff.models.decoder",
    "assemble_model": "dynadiff.models.decoder",
    "write_tiny_vd": "dynadiff.models.tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
