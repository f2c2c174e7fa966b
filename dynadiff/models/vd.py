"""Versatile Diffusion parts from a local folder, the dual-attention UNet, the schedulers.

Only the parts Dynadiff needs are loaded, each with its own diffusers class
(``image_unet/`` -> ``UNet2DConditionModel``, ``vae/`` -> ``AutoencoderKL``,
``scheduler/`` -> a config dict, ``text_unet/`` -> ``UNetFlatConditionModel`` for the
dual-attention path only): no pipeline, no patching of diffusers, no network.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.models import DualTransformer2DModel, Transformer2DModel
from torch import nn

logger = logging.getLogger(__name__)

HF_REPO = "shi-labs/versatile-diffusion"
# Dual-attention conditioning (docs/behaviour.md §4): [77 text tokens, 257 image tokens].
TEXT_TOKENS = 77
IMAGE_TOKENS = 257
# transformers[1] (text stack) reads condition 0 (the 77 text tokens),
# transformers[0] (image stack) reads condition 1 (the 257 image tokens).
TRANSFORMER_INDEX_FOR_CONDITION = (1, 0)
MIX_RATIO = 0.0  # weight of the text stack's output: 0 -> only the image stack matters


def check_vd_folder(vd_dir: str | Path, subfolders: tuple[str, ...] = ("image_unet", "vae", "scheduler")) -> Path:
    """``vd_dir`` as a Path, or a FileNotFoundError saying what is missing and how to get it."""
    vd_dir = Path(vd_dir)
    dual = " --dual-attention" if "text_unet" in subfolders else ""
    how = (
        f"download it once with `python prepare_weights.py --only vd --vd_cache_dir {vd_dir}{dual}` (or `hf download "
        f"{HF_REPO} --local-dir {vd_dir} --include " + " ".join(f"'{s}/*'" for s in subfolders) + "`), or point "
        "versatilediffusion_config.vd_cache_dir (CLI --vd_cache_dir) at an existing copy"
    )
    if not vd_dir.is_dir():
        raise FileNotFoundError(f"Versatile Diffusion folder {vd_dir} does not exist: {how}")
    missing = [s for s in subfolders if not (vd_dir / s / ("scheduler_config.json" if s == "scheduler" else "config.json")).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Versatile Diffusion folder {vd_dir} lacks {', '.join(s + '/' for s in missing)} "
            f"(the Hugging Face layout of {HF_REPO}): {how}"
        )
    return vd_dir


def load_image_unet(vd_dir: str | Path, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    vd_dir = check_vd_folder(vd_dir, ("image_unet",))
    return UNet2DConditionModel.from_pretrained(vd_dir, subfolder="image_unet", local_files_only=True, torch_dtype=dtype)


def load_text_unet(vd_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    vd_dir = check_vd_folder(vd_dir, ("text_unet",))
    return UNetFlatConditionModel.from_pretrained(vd_dir, subfolder="text_unet", local_files_only=True, torch_dtype=dtype)


def load_vae(vd_dir: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    vd_dir = check_vd_folder(vd_dir, ("vae",))
    return AutoencoderKL.from_pretrained(vd_dir, subfolder="vae", local_files_only=True, torch_dtype=dtype)


def load_scheduler_config(vd_dir: str | Path) -> dict:
    vd_dir = check_vd_folder(vd_dir, ("scheduler",))
    return dict(DDPMScheduler.load_config(vd_dir, subfolder="scheduler", local_files_only=True))


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent pixel: each encoder level but the last halves the resolution."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def build_scheduler(name: str, scheduler_config: dict):
    """A fresh scheduler built from VD's scheduler config.

    ``ddpm`` is what the original sampled with (docs/behaviour.md §4 quirk); ``ddim`` (eta 0) and
    ``dpmsolver++`` (second order, multistep) are faster alternatives.
    """
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    if name == "ddpm":
        cls, extra = DDPMScheduler, {}
    elif name == "ddim":
        cls, extra = DDIMScheduler, {}
    elif name == "dpmsolver++":
        cls, extra = DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}
    else:
        raise ValueError(f"unknown scheduler {name!r}: choose 'ddpm', 'ddim' or 'dpmsolver++'")
    # keep only the keys the class knows (VD's config is a PNDM one): no warning noise; a key the file lacks takes
    # the class's default, as the original's DDPMScheduler.from_pretrained(vd, subfolder="scheduler") did
    known = set(inspect.signature(cls.__init__).parameters)
    scheduler = cls(**{k: v for k, v in config.items() if k in known}, **extra)
    _log_effective_settings(scheduler, config)
    return scheduler


_LOGGED_SETTINGS: set[str] = set()  # one log line per distinct effective configuration, per process


def effective_settings(scheduler, file_config: dict) -> dict[str, tuple[object, bool]]:
    """``{key: (value, from the file?)}`` of a scheduler built from ``file_config``: what it really uses."""
    return {k: (v, k in file_config) for k, v in scheduler.config.items() if not k.startswith("_")}


def _log_effective_settings(scheduler, file_config: dict) -> None:
    settings = effective_settings(scheduler, file_config)
    text = ", ".join(f"{k}={v!r}" + ("" if from_file else " (default: not in the file)")
                     for k, (v, from_file) in sorted(settings.items()))
    line = f"{type(scheduler).__name__} from VD's scheduler_config.json: {text}"
    if line not in _LOGGED_SETTINGS:
        _LOGGED_SETTINGS.add(line)
        logger.info("%s", line)


class DualTransformer(DualTransformer2DModel):
    """diffusers' ``DualTransformer2DModel`` around two existing transformers.

    Its ``forward`` (diffusers' own) does not take ``encoder_attention_mask``, which
    ``UNet2DConditionModel``'s blocks pass: this subclass accepts and ignores it (the
    original passed no mask). Configured as in Dynadiff (docs/behaviour.md §4): mix ratio 0,
    condition lengths [77, 257], transformer index for condition [1, 0].
    """

    def __init__(self, image_transformer: Transformer2DModel, text_transformer: Transformer2DModel):
        nn.Module.__init__(self)  # the parent's __init__ would build two fresh transformers
        self.transformers = nn.ModuleList([image_transformer, text_transformer])
        self.mix_ratio = MIX_RATIO
        self.condition_lengths = [TEXT_TOKENS, IMAGE_TOKENS]
        self.transformer_index_for_condition = list(TRANSFORMER_INDEX_FOR_CONDITION)

    def forward(self, hidden_states, encoder_hidden_states, timestep=None, attention_mask=None,
                cross_attention_kwargs=None, return_dict: bool = True, encoder_attention_mask=None, **kwargs):
        if encoder_attention_mask is not None:
            raise ValueError("the dual-attention UNet takes no encoder_attention_mask")
        return super().forward(
            hidden_states,
            encoder_hidden_states,
            timestep=timestep,
            attention_mask=attention_mask,
            cross_attention_kwargs=cross_attention_kwargs,
            return_dict=return_dict,
        )


def make_dual_unet(unet: UNet2DConditionModel, text_unet: nn.Module) -> UNet2DConditionModel:
    """Turn ``unet`` (in place) into VD's dual-attention image UNet, as VD's pipelines do.

    Each ``Transformer2DModel`` of ``unet`` becomes ``transformers[0]`` (image stack) of a
    ``DualTransformer`` whose ``transformers[1]`` (text stack) is the transformer at the same
    path in ``text_unet``. The UNet then expects 334 = 77 + 257 conditioning tokens.
    """
    if is_dual(unet):
        raise ValueError("this UNet is dual already")
    paths = [name for name, module in unet.named_modules() if isinstance(module, Transformer2DModel)]
    if not paths:
        raise ValueError("this UNet has no Transformer2DModel to make dual")
    for path in paths:
        parent_path, index = path.rsplit(".", 1)
        image_transformer = unet.get_submodule(path)
        try:
            text_transformer = text_unet.get_submodule(path)
        except AttributeError as e:
            raise ValueError(f"the text UNet has no transformer at {path}: it does not match the image UNet") from e
        unet.get_submodule(parent_path)[int(index)] = DualTransformer(image_transformer, text_transformer)
    return unet


def is_dual(unet: nn.Module) -> bool:
    return any(isinstance(m, DualTransformer2DModel) for m in unet.modules())


def set_sdpa_attention(unet: nn.Module) -> None:
    """Every attention layer on PyTorch's scaled-dot-product attention (no xformers)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    for module in unet.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor2_0())


def text_stack_parameter_count(unet: nn.Module) -> int:
    return sum(p.numel() for m in unet.modules() if isinstance(m, DualTransformer2DModel) for p in m.transformers[1].parameters())


__all__ = [
    "DualTransformer",
    "build_scheduler",
    "check_vd_folder",
    "is_dual",
    "load_image_unet",
    "load_scheduler_config",
    "load_text_unet",
    "load_vae",
    "make_dual_unet",
    "set_sdpa_attention",
    "vae_scale_factor",
]
