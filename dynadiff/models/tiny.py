"""Tiny random Versatile Diffusion folders for tests, the demo and benchmarks.

``write_tiny_vd`` writes a folder in the Hugging Face layout of
``shi-labs/versatile-diffusion`` (``image_unet/``, ``vae/``, ``scheduler/``, optionally
``text_unet/``) with diffusers' ``save_pretrained``, so the real loader reads it. The
UNet keeps VD's block types (CrossAttnDown x3 + Down, Up + CrossAttnUp x3, cross-attention
mid block) and cross-attention size (768); only widths and depths shrink.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

# VD image UNet (SD-1.x layout): 859.5M parameters.
VD_UNET_BLOCK_OUT_CHANNELS = (320, 640, 1280, 1280)
VD_UNET_LAYERS_PER_BLOCK = 2
VD_CROSS_ATTENTION_DIM = 768
DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# SD-1.x / VD scheduler values.
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    set_alpha_to_one=False,
    skip_prk_steps=True,
)


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed the initialisation without touching the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def unet_kwargs(
    block_out_channels: tuple[int, ...] = (32, 32, 64, 64),
    layers_per_block: int = 1,
    cross_attention_dim: int = VD_CROSS_ATTENTION_DIM,
    attention_heads: int = 8,
    norm_num_groups: int = 8,
) -> dict:
    """Constructor arguments of a VD-style image UNet (``UNet2DConditionModel``).

    ``attention_heads`` is diffusers' ``attention_head_dim`` (a legacy name: in SD-1.x
    configs it is the number of heads; VD uses 8).
    """
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=DOWN_BLOCK_TYPES,
        up_block_types=UP_BLOCK_TYPES,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_heads,
        norm_num_groups=norm_num_groups,
    )


def vd_unet_kwargs(width_divisor: int = 1) -> dict:
    """VD's image-UNet configuration, channel widths divided by ``width_divisor``."""
    channels = tuple(c // width_divisor for c in VD_UNET_BLOCK_OUT_CHANNELS)
    groups = math.gcd(32, *channels)  # VD: 32 groups; the largest divisor of 32 that fits narrower widths
    return unet_kwargs(channels, VD_UNET_LAYERS_PER_BLOCK, VD_CROSS_ATTENTION_DIM, 8, groups)


def build_unet(seed: int = 0, **kwargs):
    """A random ``UNet2DConditionModel`` with ``unet_kwargs(**kwargs)`` (diffusers' own
    initialisation, which leaves no layer at zero: outputs are non-trivial)."""
    from diffusers import UNet2DConditionModel

    with _seeded(seed):
        return UNet2DConditionModel(**unet_kwargs(**kwargs))


def build_text_unet(seed: int = 1, **kwargs):
    """A random VD text UNet (``UNetFlatConditionModel``) whose transformers match
    ``build_unet(**kwargs)``'s: the second stack of the dual-attention UNet."""
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel

    kw = unet_kwargs(**kwargs)
    kw["down_block_types"] = tuple(t.replace("2D", "Flat") for t in kw["down_block_types"])
    kw["up_block_types"] = tuple(t.replace("2D", "Flat") for t in kw["up_block_types"])
    kw["mid_block_type"] = "UNetMidBlockFlatCrossAttn"
    with _seeded(seed):
        return UNetFlatConditionModel(**kw)


def build_vae(seed: int = 0, block_out_channels: tuple[int, ...] = (16, 32, 32, 32), norm_num_groups: int = 8):
    """A random ``AutoencoderKL``; downsampling factor 2 ** (len(block_out_channels) - 1)."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    with _seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=norm_num_groups,
            sample_size=64,
            scaling_factor=0.18215,
        )


def write_tiny_vd(
    folder: str | Path,
    *,
    unet_block_out_channels: tuple[int, ...] = (32, 32, 64, 64),
    layers_per_block: int = 1,
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32, 32),
    text_unet: bool = False,
    seed: int = 0,
) -> Path:
    """Write a tiny random Versatile Diffusion folder; returns its path.

    Layout and file names are those of ``shi-labs/versatile-diffusion``, written with
    ``save_pretrained``: ``image_unet/``, ``vae/``, ``scheduler/`` (SD-1.x values:
    scaled_linear betas 0.00085-0.012, 1000 train steps, steps_offset 1, clip_sample
    false) and, with ``text_unet=True``, ``text_unet/`` (needed by dual_attention only).
    With the default 4-level VAE, latents are image / 8 (a 64x64 image -> 8x8 latents).
    """
    from diffusers import PNDMScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = dict(block_out_channels=tuple(unet_block_out_channels), layers_per_block=layers_per_block)
    build_unet(seed, **shapes).save_pretrained(folder / "image_unet")
    if text_unet:
        build_text_unet(seed + 1, **shapes).save_pretrained(folder / "text_unet")
    build_vae(seed, block_out_channels=tuple(vae_block_out_channels)).save_pretrained(folder / "vae")
    scheduler = PNDMScheduler(**SCHEDULER_CONFIG)
    scheduler.register_to_config(clip_sample=False)
    scheduler.save_pretrained(folder / "scheduler")
    return folder


def write_tiny_mask2former(folder: Path, n_labels: int = 7, seed: int = 0, image_size: int = 64) -> Path:
    """A tiny random Mask2Former (Swin backbone) in the layout of ``facebook/mask2former-swin-large-coco-panoptic``
    (``config.json``, ``model.safetensors``, ``preprocessor_config.json``), as ``prepare_weights.py --only
    segmenter`` leaves it. The class head and mask embedder are drawn wide, so that its maps hold several classes
    rather than one everywhere."""
    import torch
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    swin = SwinConfig(image_size=image_size, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    id2label = {i: f"class{i}" for i in range(n_labels)}
    config = Mask2FormerConfig(backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
                               dim_feedforward=32, num_queries=6, id2label=id2label,
                               label2id={v: k for k, v in id2label.items()})
    with _seeded(seed):
        model = Mask2FormerForUniversalSegmentation(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "class_predictor" in name or "mask_embedder" in name:
                    p.normal_(0.0, 2.0)
    folder = Path(folder)
    model.save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": image_size, "longest_edge": 2 * image_size},
                              size_divisor=32).save_pretrained(folder)
    return folder
