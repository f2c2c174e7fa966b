"""Devices: one syntax check (cheap, no torch) and one resolution (``auto`` -> what this machine has)."""

from __future__ import annotations

import re

from dynadiff.cli import ConfigError

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


class DeviceError(ConfigError):
    """The device asked for is not on this machine (the message says what to use instead)."""


def check_device_name(name: str) -> str:
    """``name`` if it is a device this tool can run on (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``), else
    a ValueError saying what is allowed. Syntax only: whether CUDA is present is checked before the run."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N (N: a GPU index) or mps")
    return name


def check_device_available(name: str) -> None:
    """:class:`DeviceError` when ``name`` asks for an accelerator this machine does not have (imports torch)."""
    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but CUDA is not available here: use --device cpu (or auto)")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("device 'mps' asked for, but Apple's MPS backend is not available here: use --device cpu")


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` where CUDA is available, else ``cpu``; any other name checked (:class:`DeviceError` for
    a device this machine lacks) and returned as it is. ``torch.device(resolve_device(name))`` for a torch device."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device_available(name)
    return name
