"""Reading DeepSpeed ZeRO-1/2 checkpoint folders without DeepSpeed and without unpickling code.

Layout (one tag folder, ``checkpoint`` for the Lightning-written Dynadiff checkpoints):
``mp_rank_00_model_states.pt`` holds ``module`` (the module's state dict in the training
dtype), ``buffer_names``, ``param_shapes`` (one ordered name -> shape dict per optimizer
parameter group), ``frozen_param_shapes`` / ``frozen_param_fragments`` (parameters without
gradient) and ``shared_params``; each ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` holds
``optimizer_state_dict.single_partition_of_fp32_groups``: rank R's slice of each group's
flat float32 master weights. A group's full vector is the concatenation of the slices over
the ranks; its parameters lie in it one after the other in ``param_shapes`` order (plus
``param_alignment_paddings`` when the file has them), the end padded to a multiple of
2 * world size. The result equals DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``
(tested on checkpoints DeepSpeed wrote with 1 and 2 ranks).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path

import torch

from dynadiff.checkpoint.safe_load import OpaqueObject, safe_torch_load

logger = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"
OPTIM_STATES_GLOB = "*_optim_states.pt"
DEFAULT_TAG = "checkpoint"


@dataclasses.dataclass
class ZeroCheckpoint:
    """A ZeRO checkpoint read back: float32 state dict and what DeepSpeed recorded."""

    state_dict: dict[str, torch.Tensor]
    trainable: list[str]  # names of the parameters the optimizer held (param_shapes)
    frozen: list[str]  # names of the frozen parameters (frozen_param_shapes)
    buffers: list[str]
    zero_stage: int
    world_size: int
    ds_version: str | None
    folder: Path


def is_zero_checkpoint(path: str | Path, tag: str = DEFAULT_TAG) -> bool:
    try:
        resolve_zero_folder(path, tag)
    except FileNotFoundError:
        return False
    return True


def resolve_zero_folder(path: str | Path, tag: str = DEFAULT_TAG) -> Path:
    """The tag folder holding ``mp_rank_00_model_states.pt``: ``path`` itself, ``path/tag``,
    or ``path/<content of path/latest>``."""
    path = Path(path)
    candidates = [path, path / tag]
    latest = path / "latest"
    if latest.is_file():
        candidates.append(path / latest.read_text().strip())
    for folder in candidates:
        if (folder / MODEL_STATES).is_file():
            return folder
    raise FileNotFoundError(
        f"no DeepSpeed ZeRO checkpoint at {path}: expected {MODEL_STATES} in {path}, in {path / tag} "
        f"(tag {tag!r}) or in the folder named by {latest}"
    )


def _as_int(value, what: str) -> int:
    if isinstance(value, OpaqueObject) and len(value.args) == 1:  # e.g. DeepSpeed's ZeroStageEnum(2)
        value = value.args[0]
    if isinstance(value, (list, tuple)):  # per-group partition counts: the data-parallel size is the largest
        return max(_as_int(v, what) for v in value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"unreadable {what} in the DeepSpeed checkpoint: {value!r}")
    return value


def _natural_key(path: Path) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def read_zero_checkpoint(path: str | Path, tag: str = DEFAULT_TAG, include_frozen: bool = True) -> ZeroCheckpoint:
    """Float32 state dict of a ZeRO-1/2 checkpoint (names as DeepSpeed recorded them).

    Trainable parameters come from the float32 master copies of the optimizer
    partitions; frozen ones (``include_frozen``) and buffers from the model states file.
    Without optimizer files, the module's own (possibly half-precision) weights are used,
    with a warning.
    """
    folder = resolve_zero_folder(path, tag)
    states = safe_torch_load(folder / MODEL_STATES)
    for key in ("module", "buffer_names", "param_shapes"):
        if key not in states:
            raise ValueError(f"{folder / MODEL_STATES} is not a DeepSpeed model-states file (no {key!r})")
    module = states["module"]
    buffers = {k: (v.float() if v.is_floating_point() else v).clone() for k, v in module.items() if k in states["buffer_names"]}
    param_shapes = states["param_shapes"]
    if isinstance(param_shapes, dict):
        param_shapes = [param_shapes]
    trainable = [name for group in param_shapes for name in group]
    frozen_shapes = states.get("frozen_param_shapes") or {}
    fragments = states.get("frozen_param_fragments") or {}

    out: dict[str, torch.Tensor] = dict(buffers)
    if include_frozen:
        for name in frozen_shapes:
            if name in fragments:
                out[name] = fragments[name].clone()
            elif name in module:
                out[name] = module[name].clone()
            else:
                raise ValueError(f"frozen parameter {name} is listed but not stored in {folder / MODEL_STATES}")

    optim_files = sorted(folder.glob(OPTIM_STATES_GLOB), key=_natural_key)
    if not optim_files:
        logger.warning("%s has no optimizer partitions: using the module's stored weights (training dtype)", folder)
        for name in trainable:
            out[name] = module[name].float().clone()
        stage, world = 0, 1
    else:
        stage, world, flat_groups, paddings = _read_partitions(optim_files, folder)
        out.update(_merge_zero2(param_shapes, flat_groups, world, paddings))
    for alias, target in (states.get("shared_params") or {}).items():
        if target in out:
            out[alias] = out[target]
    return ZeroCheckpoint(
        state_dict=out,
        trainable=trainable,
        frozen=list(frozen_shapes),
        buffers=list(buffers),
        zero_stage=stage,
        world_size=world,
        ds_version=states.get("ds_version"),
        folder=folder,
    )


def check_partitions(folder: Path) -> int:
    """The world size of the tag folder ``folder``'s optimizer shards, checked as the reader checks them (one
    per rank of the world size they record, a ZeRO stage read here) without reading their tensors (the files
    are memory-mapped); 0 without any shard (the reader then uses the module's weights). ValueError otherwise."""
    files = sorted(folder.glob(OPTIM_STATES_GLOB), key=_natural_key)
    return _read_partitions(files, folder)[1] if files else 0


def _read_partitions(files: list[Path], folder: Path):
    optim = []
    for f in files:
        sd = safe_torch_load(f)
        if "optimizer_state_dict" not in sd:
            raise ValueError(f"{f} is not a DeepSpeed optimizer-states file (no 'optimizer_state_dict')")
        optim.append(sd["optimizer_state_dict"])
    first = optim[0]
    if "zero_stage" not in first:
        raise ValueError(f"{files[0]} is not a ZeRO optimizer-states file (no 'zero_stage')")
    stage = _as_int(first["zero_stage"], "zero_stage")
    if stage > 2:
        raise ValueError(
            f"{folder} is a ZeRO-{stage} checkpoint; only ZeRO-1/2 (the published Dynadiff format) is read here. "
            "Convert it with DeepSpeed's own zero_to_fp32.py (on files you trust) and load the result."
        )
    world = _as_int(first["partition_count"], "partition_count")
    if world != len(files):
        ranks = {int(m.group(1)) for f in files if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))}
        missing = sorted(set(range(world)) - ranks)
        raise ValueError(f"{folder} should hold {world} optimizer partitions (one per rank) but holds {len(files)}"
                         + (f"; missing: rank {', '.join(map(str, missing))}" if missing else "")
                         + " (an incomplete copy, or the shards of another save left in the folder?)")
    flat_groups = [sd["single_partition_of_fp32_groups"] for sd in optim]
    return stage, world, flat_groups, first.get("param_alignment_paddings")


def _merge_zero2(param_shapes: list[dict], flat_groups: list[list[torch.Tensor]], world: int, paddings) -> dict:
    out = {}
    n_groups = len(flat_groups[0])
    if len(param_shapes) != n_groups:
        raise ValueError(f"{len(param_shapes)} parameter groups recorded but {n_groups} optimizer groups stored")
    align = 2 * world
    for g, shapes in enumerate(param_shapes):
        flat = torch.cat([rank_groups[g] for rank_groups in flat_groups]).detach()
        offset = 0
        group_pad = paddings[g] if paddings is not None else None
        for i, (name, shape) in enumerate(shapes.items()):
            n = math.prod(shape)
            if offset + n > flat.numel():
                raise ValueError(f"parameter {name} {tuple(shape)} runs past group {g}'s {flat.numel()} stored values")
            out[name] = flat.narrow(0, offset, n).view(tuple(shape)).clone()
            offset += n + (group_pad[i] if group_pad is not None else 0)
        if align * math.ceil(offset / align) != align * math.ceil(flat.numel() / align):
            raise ValueError(f"group {g}: parameters use {offset} values but {flat.numel()} are stored")
    return out
