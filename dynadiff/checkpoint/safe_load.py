"""Loading torch pickles without running anything they name.

DeepSpeed (and Lightning) checkpoints pickle objects of their own classes (loss
scalers, enums, hyper-parameter containers). ``torch.load(weights_only=True)`` refuses
them; ``weights_only=False`` would import and run whatever the file names. Here every
global that torch's weights-only unpickler does not allow is replaced by an inert
stand-in (``OpaqueObject``) that only records its name, arguments and state: tensors,
containers and numbers load as usual, nothing from the file is imported or executed.
"""

from __future__ import annotations

import pickle
import typing as tp
from pathlib import Path

import torch


class OpaqueObject:
    """Stand-in for an object of a class named in a checkpoint but never imported."""

    qualname: str = "?"
    args: tuple = ()
    kwargs: dict = {}
    state: tp.Any = None

    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualname} args={self.args!r} state={self.state!r}>"


def _stand_in(qualname: str) -> type:
    return type(qualname.rsplit(".", 1)[-1], (OpaqueObject,), {"qualname": qualname})


def safe_torch_load(path: str | Path, mmap: bool = True) -> tp.Any:
    """``torch.load`` of ``path`` on the CPU with the weights-only unpickler; classes it does
    not allow come back as ``OpaqueObject`` instances (``.qualname``, ``.args``, ``.state``)."""
    path = Path(path)
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # legacy (pre-zip) format or not a torch file
        raise ValueError(f"{path} is not a torch zip checkpoint that can be read safely: {e}") from e
    try:
        with torch.serialization.safe_globals([(_stand_in(name), name) for name in unknown]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # e.g. a global of a module torch never allows (os, sys)
        lines = [line for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else repr(e))
        raise ValueError(f"{path} cannot be read safely, refusing it: {reason}") from e
