"""Checkpoint files <-> ``DynadiffModel``, with an explicit report of what was loaded.

Names on disk are the published ones (docs/behaviour.md §4): the model's state dict with the Lightning
prefix ``model.`` removed, e.g. ``brain_modules.clip_image.lin0.weight`` and, for LoRA,
the dual-attention UNet's names
``unet.down_blocks.0.attentions.0.transformers.0.transformer_blocks.0.attn2.to_q.lora_A.default.weight``
(``transformers.0``: image stack; ``transformers.1``: text stack). The plain image UNet's
``...attentions.0.transformer_blocks...`` maps to ``transformers.0``; text-stack LoRA
weights (no effect at mix ratio 0) are ignored by it, and said so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import typing as tp
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dynadiff.checkpoint.safe_load import safe_torch_load
from dynadiff.checkpoint.zero import (
    DEFAULT_TAG,
    MODEL_STATES,
    check_partitions,
    read_zero_checkpoint,
    resolve_zero_folder,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
WRAPPER_PREFIXES = ("module.", "_forward_module.", "model.")  # DeepSpeed engine, Lightning wrapper, LightningModule.model
_ATTENTION = re.compile(r"(attentions\.\d+)\.(?!transformers\.)")
_UNET_PATH = re.compile(r"(?:^|\.)((?:down_blocks|up_blocks|mid_block)\..*)$")
_TEXT_STACK = re.compile(r"attentions\.\d+\.transformers\.1\.")
_LIST_LIMIT = 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read (missing, truncated, another format) or does not fit the model (missing
    trainable weights, wrong shapes)."""


MODEL_FILE = "model.safetensors"  # what train.py writes in checkpoints/{best,last}/
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_KINDS = (f"a DeepSpeed checkpoint folder (the published subjXX folders: {DEFAULT_TAG}/{MODEL_STATES} and "
          f"the optimizer shards), a {MODEL_FILE} file or a folder holding one (train.py's checkpoints/best or "
          f"checkpoints/last), or a .safetensors file written by `python -m dynadiff.checkpoint convert`")


def resolve_checkpoint(path: str | Path, tag: str = DEFAULT_TAG) -> Path:
    """The checkpoint that ``path`` names, checked enough that reading it cannot fail on its form.

    - a DeepSpeed ZeRO folder (``path``, ``path/tag`` or the tag named by ``path/latest``
      holds ``mp_rank_00_model_states.pt``): ``path``, every ``.pt`` of its tag folder
      checked to be a complete torch zip file, its optimizer shards to be one per rank;
    - a folder holding ``model.safetensors`` (or a single ``.safetensors`` file): that file;
    - a ``.safetensors`` file: itself, its header read and its size checked against it;
    - a torch file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``): itself, its zip directory checked.

    Anything else is a :class:`CheckpointError` that says what ``path`` is and what was expected.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _resolve_folder(path, tag)
    if path.suffix == ".safetensors":
        check_safetensors(path)
        return path
    if path.suffix in TORCH_SUFFIXES:
        _check_torch_zip(path)
        return path
    raise CheckpointError(f"checkpoint {path} is a file of an unknown kind (suffix {path.suffix!r}): give {_KINDS}")


def _resolve_folder(path: Path, tag: str) -> Path:
    try:
        zero = resolve_zero_folder(path, tag)
    except FileNotFoundError:
        zero = None
    if zero is not None:
        for f in sorted(zero.glob("*.pt")):
            _check_torch_zip(f)
        try:  # a missing shard, or stale shards of a save with another world size: here, not when loading
            check_partitions(zero)
        except ValueError as e:
            raise CheckpointError(f"DeepSpeed checkpoint {_first_line(e)}") from None
        return path
    if (path / MODEL_FILE).is_file():
        check_safetensors(path / MODEL_FILE)
        logger.info("checkpoint %s: reading %s", path, path / MODEL_FILE)
        return path / MODEL_FILE
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        check_safetensors(found[0])
        logger.info("checkpoint %s: reading %s", path, found[0])
        return found[0]
    if found:
        raise CheckpointError(f"checkpoint folder {path} holds several .safetensors files "
                              f"({', '.join(f.name for f in found)}): pass the one to use")
    runs = [path / "checkpoints" / kind / MODEL_FILE for kind in ("best", "last")]
    if any(r.is_file() for r in runs):
        raise CheckpointError(
            f"{path} is a train.py run folder, not a checkpoint: pass {runs[0]} (lowest validation loss) or "
            f"{runs[1]} (last step)")
    entries = sorted(p.name for p in path.iterdir())
    what = "is empty" if not entries else (
        f"holds no checkpoint ({len(entries)} entries: {', '.join(entries[:5])}{', ...' if len(entries) > 5 else ''})")
    raise CheckpointError(f"checkpoint folder {path} {what}: give {_KINDS}")


def check_safetensors(path: str | Path) -> dict[str, str]:
    """The metadata of a ``.safetensors`` file whose header is readable and whose size matches it (safetensors
    checks that the tensors cover the file exactly); :class:`CheckpointError` for a truncated or foreign file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is not a readable .safetensors file (truncated, or another "
                              f"format?): {_first_line(e)}") from None


def _check_torch_zip(path: Path) -> None:
    """A torch file saved by ``torch.save`` is a zip: a truncated one has no central directory."""
    try:
        with zipfile.ZipFile(path) as z:
            z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint file {path} is not a complete torch file (truncated, or another "
                              f"format?): {_first_line(e)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@dataclasses.dataclass
class LoadReport:
    """What ``load_checkpoint`` did, key by key (published names)."""

    source: str
    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)  # trainable weights the file lacks
    unexpected: list[str] = dataclasses.field(default_factory=list)  # file keys the model has no place for
    ignored_text_stack: list[str] = dataclasses.field(default_factory=list)  # text-stack LoRA, plain UNet
    ignored_frozen: list[str] = dataclasses.field(default_factory=list)  # UNet/VAE base weights (from the VD folder)
    missing_text_stack: list[str] = dataclasses.field(default_factory=list)  # dual UNet: text-stack LoRA kept at init
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # file key -> published name, other prefixes

    @property
    def ok(self) -> bool:
        return not self.missing

    def summary(self) -> str:
        n_brain = sum(k.startswith("brain_modules.") for k in self.loaded)
        lines = [
            f"loaded {len(self.loaded)} tensors from {self.source} "
            f"(brain module: {n_brain}, LoRA: {len(self.loaded) - n_brain})"
        ]
        for title, keys in (
            ("MISSING (left at their initial values)", self.missing),
            ("unexpected (not loaded)", self.unexpected),
        ):
            lines.append(f"{title}: {_listing(keys) if keys else 'none'}")
        if self.ignored_text_stack:
            lines.append(f"ignored {len(self.ignored_text_stack)} text-stack LoRA tensors (no effect at mix ratio 0)")
        if self.missing_text_stack:
            lines.append(f"{len(self.missing_text_stack)} text-stack LoRA tensors absent, kept at init (no effect at mix ratio 0)")
        if self.ignored_frozen:
            lines.append(f"ignored {len(self.ignored_frozen)} frozen UNet/VAE base tensors (the VD folder's are used)")
        if self.renamed:
            lines.append(f"{len(self.renamed)} LoRA keys matched after mapping their prefix, e.g. {next(iter(self.renamed.items()))}")
        return "\n".join(lines)


def _listing(keys: tp.Sequence[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return f"{len(keys)}: {shown}" + (f", ... and {len(keys) - _LIST_LIMIT} more" if len(keys) > _LIST_LIMIT else "")


def published_name(model_key: str, dual_attention: bool) -> str:
    """The published (dual-attention) name of a ``DynadiffModel`` state-dict key."""
    if dual_attention or not model_key.startswith("unet."):
        return model_key
    return _ATTENTION.sub(r"\1.transformers.0.", model_key, count=1)


def strip_wrapper_prefixes(state_dict: tp.Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` (DeepSpeed engine), ``_forward_module.`` (Lightning wrapper) and ``model.``
    (the LightningModule's attribute) prefixes, in that order."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name in out:
            raise CheckpointError(f"two checkpoint keys map to {name!r} once the wrapper prefixes are removed")
        out[name] = value
    return out


def _trainable_keys(model: torch.nn.Module) -> list[str]:
    return [k for k in model.state_dict(keep_vars=True) if k.startswith("brain_modules.") or (k.startswith("unet.") and ".lora_" in k)]


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Brain module (parameters and buffers) and LoRA weights, under their published names."""
    state = model.state_dict(keep_vars=True)
    return {published_name(k, model.dual_attention): state[k].detach() for k in _trainable_keys(model)}


def read_state_dict(path: str | Path, tag: str = DEFAULT_TAG) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: a DeepSpeed ZeRO folder (float32 master weights), a
    ``.safetensors`` file, or a torch file (read with the weights-only unpickler)."""
    path = Path(path)
    if path.is_dir():
        return read_zero_checkpoint(path, tag).state_dict
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found: give a DeepSpeed checkpoint folder (e.g. checkpoints/subj01, the "
            "published facebook/dynadiff weights) or a .safetensors file written by "
            "`python -m dynadiff.checkpoint convert` or dynadiff.checkpoint.save_checkpoint"
        )
    if path.suffix == ".safetensors":
        check_safetensors(path)
        return load_file(path)
    _check_torch_zip(path)
    obj = safe_torch_load(path)
    for key in ("state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} holds no state dict of tensors")
    return obj


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` checkpoint (:class:`CheckpointError` if it is unreadable)."""
    return check_safetensors(path)


def load_checkpoint(model: torch.nn.Module, source: str | Path | tp.Mapping[str, torch.Tensor], *,
                    allow_missing: bool = False, tag: str = DEFAULT_TAG) -> LoadReport:
    """Load the brain-module and LoRA weights of ``source`` into ``model``; return the report.

    Every trainable weight the checkpoint lacks is listed in ``report.missing`` and, unless
    ``allow_missing``, is an error (``CheckpointError``) raised before anything is copied.
    A shape mismatch is always an error. Keys the model has no place for are listed in
    ``report.unexpected`` and logged; text-stack LoRA (plain UNet) and frozen base weights
    are listed apart, as they are expected in the published files.
    """
    frozen_unread: list[str] = []
    if isinstance(source, tp.Mapping):
        state, origin = dict(source), "<state dict>"
    elif Path(source).is_dir():  # a ZeRO folder: its frozen UNet/VAE copies are not read (the VD folder's are
        ckpt = read_zero_checkpoint(source, tag, include_frozen=False)  # used), half the memory of reading them
        state, origin = ckpt.state_dict, str(source)
        frozen_unread = list(strip_wrapper_prefixes(dict.fromkeys(ckpt.frozen)))
    else:
        state, origin = read_state_dict(source, tag), str(source)
    state = strip_wrapper_prefixes(state)
    dual = bool(model.dual_attention)
    params = model.state_dict(keep_vars=True)
    targets = {published_name(k, dual): k for k in _trainable_keys(model)}
    report = LoadReport(source=origin)

    matched: dict[str, str] = {}  # published name -> file key
    for key in state:
        target = key if key in targets else None
        if target is None and ".lora_" in key:
            m = _UNET_PATH.search(key)
            candidate = "unet." + m.group(1) if m else None
            if candidate in targets:
                target = candidate
                report.renamed[key] = candidate
            elif candidate is not None and not dual and _TEXT_STACK.search(candidate):
                report.ignored_text_stack.append(key)
                continue
        if target is not None:
            if target in matched:
                raise CheckpointError(f"{matched[target]!r} and {key!r} both map to {target!r}")
            matched[target] = key
        elif key.split(".", 1)[0] in ("unet", "vae") and ".lora_" not in key:
            report.ignored_frozen.append(key)
        else:
            report.unexpected.append(key)

    report.ignored_frozen += frozen_unread
    mismatched = [
        f"{name}: file {tuple(state[key].shape)} vs model {tuple(params[targets[name]].shape)}"
        for name, key in matched.items()
        if tuple(state[key].shape) != tuple(params[targets[name]].shape)
    ]
    if mismatched:
        raise CheckpointError(f"{origin}: shapes do not match the model (wrong n_voxels, n_subjects or config?): {_listing(mismatched)}")
    for name in targets:
        if name not in matched:
            (report.missing_text_stack if dual and _TEXT_STACK.search(name) else report.missing).append(name)
    if report.missing and not allow_missing:
        raise CheckpointError(
            f"{origin} lacks trainable weights of this model: {_listing(report.missing)}. Nothing was loaded; "
            "pass allow_missing=True to load the rest and keep those at their random initial values"
        )
    with torch.no_grad():
        for name, key in matched.items():
            params[targets[name]].copy_(state[key].to(params[targets[name]].dtype))
            report.loaded.append(name)
    if report.missing:
        logger.warning("checkpoint %s: %d trainable tensors MISSING, left at init: %s", origin, len(report.missing), _listing(report.missing))
    if report.unexpected:
        logger.warning("checkpoint %s: %d unexpected tensors not loaded: %s", origin, len(report.unexpected), _listing(report.unexpected))
    logger.info("%s", report.summary())
    return report


def _metadata_value(value: tp.Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def save_checkpoint(model: torch.nn.Module, path: str | Path, extra_metadata: tp.Mapping[str, tp.Any] | None = None) -> Path:
    """Write the brain module and LoRA weights (published names) to a ``.safetensors`` file.

    Metadata: the brain module's config and sizes, the UNet kind, plus ``extra_metadata``
    (values that are not strings are stored as JSON).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint files are .safetensors, got {path.name}")
    brain = model.brain_modules["clip_image"]
    metadata = {
        "format": "pt",
        "dynadiff_checkpoint": FORMAT_VERSION,
        "dual_attention": _metadata_value(bool(model.dual_attention)),
        "brain_modules_config": brain.config.model_dump_json(),
        "n_voxels": str(brain.n_voxels),
        "n_subjects": str(brain.n_subjects),
        "n_timepoints": str(brain.n_timepoints),
    }
    metadata.update({str(k): _metadata_value(v) for k, v in (extra_metadata or {}).items()})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable_state_dict(model).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def convert(src: str | Path, dst: str | Path, tag: str = DEFAULT_TAG, include_frozen: bool = False) -> dict[str, int]:
    """DeepSpeed ZeRO folder -> ``.safetensors`` (float32 master weights, wrapper prefixes removed).

    By default only what was trained (the optimizer's parameters) and the buffers are
    written: the frozen UNet/VAE copies are in the VD folder already. Returns counts.
    """
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"the destination must be a .safetensors file, got {dst}")
    ckpt = read_zero_checkpoint(src, tag, include_frozen=include_frozen)
    keep = ckpt.trainable + ckpt.buffers + (ckpt.frozen if include_frozen else [])
    tensors = strip_wrapper_prefixes({k: ckpt.state_dict[k].contiguous() for k in keep})
    metadata = {
        "format": "pt",
        "dynadiff_checkpoint": FORMAT_VERSION,
        "converted_from": str(Path(src).resolve()),
        "deepspeed_version": str(ckpt.ds_version),
        "zero_stage": str(ckpt.zero_stage),
        "world_size": str(ckpt.world_size),
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=metadata)
    return {
        "written": len(tensors),
        "trainable": len(ckpt.trainable),
        "buffers": len(ckpt.buffers),
        "frozen_written": len(ckpt.frozen) if include_frozen else 0,
        "frozen_skipped": 0 if include_frozen else len(ckpt.frozen),
    }
