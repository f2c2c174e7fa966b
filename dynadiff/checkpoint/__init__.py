"""Checkpoints: read the published DeepSpeed ZeRO folders and safetensors files, load
them into a ``DynadiffModel`` with an explicit report, save and convert.

    python -m dynadiff.checkpoint convert checkpoints/subj01 subj01.safetensors
    python -m dynadiff.checkpoint inspect subj01.safetensors

DeepSpeed is never needed: its folders are read by ``dynadiff.checkpoint.zero``, and no
pickle is ever executed (``dynadiff.checkpoint.safe_load``).
"""

from dynadiff.checkpoint.io import (
    CheckpointError,
    LoadReport,
    check_safetensors,
    convert,
    load_checkpoint,
    published_name,
    read_metadata,
    read_state_dict,
    resolve_checkpoint,
    save_checkpoint,
    strip_wrapper_prefixes,
    trainable_state_dict,
)
from dynadiff.checkpoint.safe_load import OpaqueObject, safe_torch_load
from dynadiff.checkpoint.zero import DEFAULT_TAG, ZeroCheckpoint, read_zero_checkpoint, resolve_zero_folder

__all__ = [
    "DEFAULT_TAG",
    "CheckpointError",
    "LoadReport",
    "check_safetensors",
    "OpaqueObject",
    "ZeroCheckpoint",
    "convert",
    "load_checkpoint",
    "published_name",
    "read_metadata",
    "read_state_dict",
    "read_zero_checkpoint",
    "resolve_checkpoint",
    "resolve_zero_folder",
    "safe_torch_load",
    "save_checkpoint",
    "strip_wrapper_prefixes",
    "trainable_state_dict",
]
