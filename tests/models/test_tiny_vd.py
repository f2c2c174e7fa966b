"""The tiny Versatile Diffusion folder: real layout, SD-1.x scheduler values, VD's block
types; the benchmark's full configuration has VD's parameter counts."""

import json

import torch
from diffusers import UNet2DConditionModel

from dynadiff.models import vd
from dynadiff.models.tiny import DOWN_BLOCK_TYPES, UP_BLOCK_TYPES, build_unet, vd_unet_kwargs


def test_layout_and_values(tiny_vd):
    for sub, name in (("image_unet", "config.json"), ("vae", "config.json"), ("text_unet", "config.json"),
                      ("scheduler", "scheduler_config.json")):
        assert (tiny_vd / sub / name).is_file()
    for sub in ("image_unet", "vae", "text_unet"):
        assert (tiny_vd / sub / "diffusion_pytorch_model.safetensors").is_file()
    sched = json.loads((tiny_vd / "scheduler" / "scheduler_config.json").read_text())
    assert {k: sched[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset", "clip_sample")} == {
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "steps_offset": 1, "clip_sample": False}
    unet = vd.load_image_unet(tiny_vd)
    assert tuple(unet.config.down_block_types) == DOWN_BLOCK_TYPES == (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert tuple(unet.config.up_block_types) == UP_BLOCK_TYPES
    assert unet.config.mid_block_type == "UNetMidBlock2DCrossAttn" and unet.config.cross_attention_dim == 768
    assert vd.vae_scale_factor(vd.load_vae(tiny_vd)) == 8
    # the saved weights are what the builder made (seeded)
    assert torch.equal(unet.conv_in.weight, build_unet(seed=0).conv_in.weight)


def test_full_vd_configuration_has_vd_parameter_counts():
    with torch.device("meta"):
        image = UNet2DConditionModel(**vd_unet_kwargs(1))
        dual = vd.make_dual_unet(UNet2DConditionModel(**vd_unet_kwargs(1)), UNet2DConditionModel(**vd_unet_kwargs(1)))
    n_image = sum(p.numel() for p in image.parameters())
    assert round(n_image / 1e6, 1) == 859.5
    assert round((n_image + vd.text_stack_parameter_count(dual)) / 1e6, 1) == 1126.8
    assert image.config.block_out_channels == (320, 640, 1280, 1280) and image.config.layers_per_block == 2
