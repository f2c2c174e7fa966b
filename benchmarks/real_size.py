"""Versatile Diffusion and published Dynadiff checkpoints at their real sizes, random weights, nothing downloaded.

For smoke runs and benchmarks at the published sizes on machines that have neither the weights nor a
network (the project's CPU machine, a lent GPU machine):

- ``VD_IMAGE_UNET_CONFIG``, ``VD_VAE_CONFIG``, ``VD_SCHEDULER_CONFIG``: the configuration files of
  ``shi-labs/versatile-diffusion``'s ``image_unet/``, ``vae/`` and ``scheduler/`` folders, as diffusers'
  VD conversion script wrote them (SD-1.x sizes: UNet 320/640/1280/1280, 2 layers per block, 8 heads,
  cross-attention 768, 859.5 M parameters; VAE 128/256/512/512, 4 latent channels, 83.7 M parameters,
  scaling factor 0.18215 by default; a PNDM scheduler config without ``clip_sample``);
- :func:`write_real_vd`: those files, verbatim, next to random weights in VD's folder layout, so that the
  real loader (``dynadiff.models.vd``) reads them as it reads the downloaded folder;
- :func:`published_trainable_shapes`: the 265 trainable tensors of a published checkpoint (9 brain module,
  256 LoRA of which 128 on the text stack ``transformers.1``), names and shapes, for any voxel count;
- :func:`write_published_zero_checkpoint`: a DeepSpeed ZeRO-2 checkpoint folder in the published layout
  (Lightning's ``model.`` prefix, tag ``checkpoint``, world size 8, fp32 master partitions and Adam moments
  per rank, the whole module, frozen weights included, in the training precision), written directly with
  ``torch.save`` -- DeepSpeed itself is not needed (its own reader, ``zero_to_fp32``, reads the result).

``dynadiff/models/tiny.py`` is the small counterpart used by the tests and the demo. Benchmark tooling, not part
of the ``dynadiff`` package: the benchmarks import it as ``real_size`` (run as scripts, their folder is on
``sys.path``), and so do the tests (``benchmarks/`` is on their ``sys.path``: ``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import re
from pathlib import Path

import torch

# shi-labs/versatile-diffusion image_unet/config.json (written by diffusers 0.8's VD conversion).
# Keys absent here take diffusers' defaults, which are SD-1.x's (e.g. no linear projection, no
# upcast attention, sinusoidal time embedding).
VD_IMAGE_UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.8.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# shi-labs/versatile-diffusion vae/config.json: SD's VAE (sample_size: the conversion's 256; used for tiling only).
# No scaling_factor key (it predates it): diffusers' default, 0.18215, applies.
VD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.8.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# shi-labs/versatile-diffusion scheduler/scheduler_config.json: the PNDM scheduler of the conversion script.
# No clip_sample key: a DDPMScheduler built from it takes DDPM's default (docs/behaviour.md §4).
VD_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.8.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# What these configs build (diffusers 0.42), checked by the tests.
IMAGE_UNET_PARAMETERS = 859_520_964
VAE_PARAMETERS = 83_653_863
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
N_BRAIN_TENSORS = 9
N_LORA_TENSORS = 256  # 16 transformers x 4 projections x (A, B) x 2 stacks
N_TRAINABLE_TENSORS = N_BRAIN_TENSORS + N_LORA_TENSORS
LIGHTNING_PREFIX = "model."
ZERO_TAG = "checkpoint"
DS_VERSION = "0.15.1"  # the DeepSpeed version that wrote the published checkpoints (docs/behaviour.md §4)

_ATTENTION = re.compile(r"^((?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+)\.(.*)$")


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed the initialisation without touching the caller's global random state (CUDA seeded too)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _init_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_image_unet(seed: int = 0, device: str | torch.device = "cpu", config: dict | None = None):
    """VD's image UNet (``UNet2DConditionModel``) from its real config, random weights (diffusers' own
    initialisation), built directly on ``device`` (``"meta"``: shapes only, no memory)."""
    from diffusers import UNet2DConditionModel

    with _seeded(seed), torch.device(device):
        return UNet2DConditionModel(**_init_kwargs(config or VD_IMAGE_UNET_CONFIG))


def build_vae(seed: int = 0, device: str | torch.device = "cpu", config: dict | None = None):
    """VD's VAE (``AutoencoderKL``) from its real config, random weights, built directly on ``device``."""
    from diffusers import AutoencoderKL

    with _seeded(seed), torch.device(device):
        return AutoencoderKL(**_init_kwargs(config or VD_VAE_CONFIG))


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def write_real_vd(folder: str | Path, seed: int = 0, unet_config: dict | None = None,
                  vae_config: dict | None = None) -> Path:
    """Write a random-weight Versatile Diffusion folder at the real sizes; returns its path.

    ``image_unet/`` and ``vae/`` hold the real config files verbatim (``config.json``) and random fp32
    weights (``diffusion_pytorch_model.safetensors``, 3.4 GB and 0.33 GB), ``scheduler/`` the real
    ``scheduler_config.json``. The models are built and saved one at a time (peak memory: the UNet,
    about 3.5 GB). ``unet_config`` / ``vae_config`` replace the real configs (tests: smaller ones).
    """
    folder = Path(folder)
    unet_config = unet_config or VD_IMAGE_UNET_CONFIG
    vae_config = vae_config or VD_VAE_CONFIG
    for name, build, config in (("image_unet", build_image_unet, unet_config), ("vae", build_vae, vae_config)):
        model = build(seed, "cpu", config)
        model.save_pretrained(folder / name, safe_serialization=True)
        del model
        _write_json(folder / name / "config.json", config)  # the real file, not diffusers 0.42's rewrite
    _write_json(folder / "scheduler" / "scheduler_config.json", VD_SCHEDULER_CONFIG)
    return folder


# -- the published checkpoints' trainable tensors -------------------------------------------------------


def _dual_name(unet_key: str, stack: int) -> str:
    """``down_blocks.0.attentions.0.X`` -> ``down_blocks.0.attentions.0.transformers.{stack}.X``."""
    m = _ATTENTION.match(unet_key)
    if m is None:
        raise ValueError(f"{unet_key} is not inside an attention block")
    return f"{m.group(1)}.transformers.{stack}.{m.group(2)}"


def lora_shapes(unet, rank: int = 4, stacks: tuple[int, ...] = (0, 1)) -> dict[str, tuple[int, ...]]:
    """Published names (``unet.`` prefix, dual-attention paths) and shapes of the LoRA tensors of ``unet``
    (a plain image UNet, e.g. built on the meta device): A (rank, in), B (out, rank) on every ``attn2``
    projection, for each stack of ``stacks``, in module order (for each transformer: its image stack, then
    its text stack)."""
    from diffusers.models import Transformer2DModel

    out: dict[str, tuple[int, ...]] = {}
    for path, transformer in unet.named_modules():
        if not isinstance(transformer, Transformer2DModel):
            continue
        for stack in stacks:
            for rest, attn in transformer.named_modules():
                if not rest.endswith("attn2"):
                    continue
                for target in LORA_TARGETS:
                    lin = attn.get_submodule(target)
                    name = "unet." + _dual_name(f"{path}.{rest}.{target}", stack)
                    out[f"{name}.lora_A.default.weight"] = (rank, lin.in_features)
                    out[f"{name}.lora_B.default.weight"] = (lin.out_features, rank)
    return out


def brain_shapes(n_voxels: int, brain_config=None, n_subjects: int = 1, n_timepoints: int = 6) -> dict[str, tuple[int, ...]]:
    """Names (``brain_modules.clip_image.`` prefix) and shapes of the brain module's tensors (published
    configuration by default)."""
    from dynadiff.models.config import FmriMLPConfig

    config = brain_config or FmriMLPConfig()
    with torch.device("meta"):
        module = config.build(n_voxels=n_voxels, n_subjects=n_subjects, n_timepoints=n_timepoints)
    return {f"brain_modules.clip_image.{k}": tuple(v.shape) for k, v in module.state_dict().items()}


def published_trainable_shapes(n_voxels: int, unet_config: dict | None = None, brain_config=None,
                               lora_rank: int = 4) -> dict[str, tuple[int, ...]]:
    """The trainable tensors of a published checkpoint (without Lightning's ``model.`` prefix), in the order
    the original's optimizer held them: the UNet's LoRA (both stacks), then the brain module.

    With the real configs: 265 tensors, 256 LoRA (128 per stack) and 9 brain module; for subject 1
    (15,724 voxels) 346,188,871 elements.
    """
    unet = build_image_unet(0, "meta", unet_config)
    return {**lora_shapes(unet, lora_rank), **brain_shapes(n_voxels, brain_config)}


def random_trainable_tensors(n_voxels: int, seed: int = 0, unet_config: dict | None = None, brain_config=None,
                             lora_rank: int = 4) -> dict[str, torch.Tensor]:
    """Float32 values for :func:`published_trainable_shapes`: the brain module's own initialisation and
    LoRA weights as after training (image stack: A and B non-zero; text stack: B zero, as mix ratio 0 gives
    it no gradient), so that the loaded model's output differs from the base UNet's."""
    from dynadiff.models.config import FmriMLPConfig

    shapes = published_trainable_shapes(n_voxels, unet_config, brain_config, lora_rank)
    out: dict[str, torch.Tensor] = {}
    with _seeded(seed):
        brain = (brain_config or FmriMLPConfig()).build(n_voxels=n_voxels)
        for k, v in brain.state_dict().items():
            out[f"brain_modules.clip_image.{k}"] = v
        del brain
        g = torch.Generator().manual_seed(seed)
        for name, shape in shapes.items():
            if name in out:
                continue
            if ".lora_B." in name and ".transformers.1." in name:
                out[name] = torch.zeros(shape)
            else:
                out[name] = torch.randn(shape, generator=g) * (0.01 if ".lora_B." in name else 1.0 / math.sqrt(shape[-1]))
    return {name: out[name] for name in shapes}  # the published order


def frozen_shapes(unet_config: dict | None = None, vae_config: dict | None = None,
                  lora_modules: bool = True) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the frozen weights a published checkpoint's module state holds: the
    dual-attention image UNet (every transformer twice: ``transformers.0`` image stack, ``transformers.1``
    text stack, whose shapes are the same) and the VAE. With ``lora_modules``, the LoRA-wrapped projections'
    weights have PEFT's ``base_layer`` names."""
    unet = build_image_unet(0, "meta", unet_config)
    vae = build_vae(0, "meta", vae_config)
    lora_paths = tuple(f"attn2.{t}." for t in LORA_TARGETS)
    out: dict[str, tuple[int, ...]] = {}
    for key, value in unet.state_dict().items():
        if lora_modules and any(p in key for p in lora_paths):
            head, leaf = key.rsplit(".", 1)
            key = f"{head}.base_layer.{leaf}"
        if _ATTENTION.match(key):
            for stack in (0, 1):
                out["unet." + _dual_name(key, stack)] = tuple(value.shape)
        else:
            out["unet." + key] = tuple(value.shape)
    for key, value in vae.state_dict().items():
        out["vae." + key] = tuple(value.shape)
    return out


# -- DeepSpeed ZeRO-2 layout ----------------------------------------------------------------------------


def _save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _slice_mappings(trainable: dict[str, torch.Tensor], start: int, size: int, prefix: str) -> dict:
    """DeepSpeed's ``param_slice_mappings`` of one rank (name -> where its part of the flat vector starts in
    the rank's partition, and how long it is), as plain dicts instead of DeepSpeed's ``fragment_address``."""
    out: dict[str, dict[str, int]] = collections.OrderedDict()
    offset = 0
    for name, t in trainable.items():
        lo, hi = max(offset, start), min(offset + t.numel(), start + size)
        if lo < hi:
            out[prefix + name] = {"numel": hi - lo, "start": lo - start}
        offset += t.numel()
    return out


def write_published_zero_checkpoint(folder: str | Path, trainable: dict[str, torch.Tensor], *, world_size: int = 8,
                                    frozen: dict[str, tuple[int, ...]] | None = None,
                                    module_dtype: torch.dtype = torch.float16, adam_state: bool = True,
                                    prefix: str = LIGHTNING_PREFIX, tag: str = ZERO_TAG) -> Path:
    """Write ``trainable`` (float32, published names without ``prefix``) as a DeepSpeed ZeRO-2 checkpoint
    folder in the layout DeepSpeed 0.15's ``save_checkpoint`` gives (through Lightning); returns ``folder``.

    ``folder/latest`` names the tag; ``folder/tag/mp_rank_00_model_states.pt`` holds ``module`` (every
    tensor, trainable and ``frozen`` -- zeros of the given shapes, the VD folder's weights are used anyway --
    in ``module_dtype``, the training precision), ``buffer_names``, ``param_shapes`` (one parameter group, in
    ``trainable``'s order), ``frozen_param_shapes`` / ``frozen_param_fragments``, ``shared_params``,
    ``ds_version``...; ``folder/tag/zero_pp_rank_R_mp_rank_00_optim_states.pt`` holds rank R's slice of the
    group's flat float32 master weights (the flat vector padded to a multiple of 2 x world size, split
    equally), with AdamW's two moments of that slice when ``adam_state``. Only tensors, containers, numbers
    and strings are pickled (no DeepSpeed classes): the files load with ``weights_only=True``.
    """
    folder = Path(folder)
    tag_dir = folder / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    names = list(trainable)
    numel = sum(t.numel() for t in trainable.values())
    align = 2 * world_size
    padded = align * math.ceil(numel / align)
    part = padded // world_size

    module: dict[str, torch.Tensor] = collections.OrderedDict()
    frozen_tensors: dict[str, torch.Tensor] = collections.OrderedDict()
    for name, shape in (frozen or {}).items():
        frozen_tensors[prefix + name] = torch.zeros(shape, dtype=module_dtype)
    for name in names:
        module[prefix + name] = trainable[name].detach().to(module_dtype)
    module.update(frozen_tensors)
    states = {
        "module": module,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [collections.OrderedDict((prefix + n, torch.Size(trainable[n].shape)) for n in names)],
        "frozen_param_shapes": collections.OrderedDict((k, torch.Size(v.shape)) for k, v in frozen_tensors.items()),
        "shared_params": {},
        "frozen_param_fragments": frozen_tensors,  # the same tensors: stored once by torch.save
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": 1,
        "global_samples": 8,
        "dp_world_size": world_size,
        "mp_world_size": 1,
        "ds_config": {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1},
        "ds_version": DS_VERSION,
        "epoch": 0,
        "global_step": 1,
        "pytorch-lightning_version": "2.4.0",
    }
    _save(states, tag_dir / "mp_rank_00_model_states.pt")
    del states, module, frozen_tensors

    flat = torch.empty(padded, dtype=torch.float32)
    offset = 0
    for name in names:
        n = trainable[name].numel()
        flat[offset:offset + n] = trainable[name].detach().reshape(-1).float()
        offset += n
    flat[offset:] = 0.0
    for rank in range(world_size):
        master = flat[rank * part:(rank + 1) * part].clone()
        state = {"step": torch.tensor(1.0)}
        if adam_state:
            state.update(exp_avg=torch.zeros(part), exp_avg_sq=torch.zeros(part))
        optimizer_state = {
            "loss_scaler": None,
            "dynamic_loss_scale": False,
            "overflow": False,
            "clip_grad": 1.0,
            "base_optimizer_state": {
                "state": {0: state},
                "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
                                  "amsgrad": False, "params": [0]}],
            },
            "single_partition_of_fp32_groups": [master],
            "zero_stage": 2,
            "group_paddings": [padded - numel if rank == world_size - 1 else 0],
            "partition_count": [world_size],
            "param_slice_mappings": [_slice_mappings(trainable, rank * part, part, prefix)],
            "ds_version": DS_VERSION,
        }
        _save({"optimizer_state_dict": optimizer_state, "ds_config": {"zero_optimization": {"stage": 2}},
               "ds_version": DS_VERSION}, tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        del master, state, optimizer_state
    (folder / "latest").write_text(tag)
    return folder


__all__ = [
    "VD_IMAGE_UNET_CONFIG",
    "VD_SCHEDULER_CONFIG",
    "VD_VAE_CONFIG",
    "brain_shapes",
    "build_image_unet",
    "build_vae",
    "frozen_shapes",
    "lora_shapes",
    "published_trainable_shapes",
    "random_trainable_tensors",
    "write_published_zero_checkpoint",
    "write_real_vd",
]
