"""Configs of the decoder: published defaults, cheap import, validation at config time."""

import subprocess
import sys

import pydantic
import pytest

from dynadiff.models.config import FmriMLPConfig, VersatileDiffusionConfig


def test_config_import_is_cheap():
    code = (
        "import sys, dynadiff.models.config, dynadiff.models; "
        "heavy = [m for m in ('torch', 'diffusers', 'peft', 'transformers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"importing the configs pulled {proc.stdout.strip()} {proc.stderr[-500:]}"


def test_published_defaults():
    b = FmriMLPConfig()
    assert (b.hidden, b.n_blocks, b.subject_layers, b.per_tr_layer, b.time_agg, b.norm, b.act_first) == (
        1552, 0, "plain", True, "out_linear", "layer", False)
    assert (b.dropout, b.n_tokens, b.token_dim, b.out_dim) == (0.5, 257, 768, 257 * 768)
    v = VersatileDiffusionConfig()
    assert str(v.vd_cache_dir) == "versatile_diffusion"
    assert (v.num_inference_steps, v.guidance_scale, v.scheduler, v.precision, v.seed) == (20, 3.5, "ddpm", "fp32", 0)
    assert (v.lora_rank, v.lora_alpha, v.lora_dropout) == (4, 4.0, 0.0)
    assert sorted(v.lora_target_modules) == sorted(["attn2.to_k", "attn2.to_q", "attn2.to_v", "attn2.to_out.0"])
    assert (v.cond_drop_prob, v.noise_offset, v.timestep_sampling, v.dual_attention) == (0.1, 0.1, "cubic", False)


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (FmriMLPConfig, dict(hiden=3), "hiden"),
        (FmriMLPConfig, dict(time_agg="in_mean"), "per_tr_layer=true needs the time axis"),
        (FmriMLPConfig, dict(time_agg="in_linear", per_tr_layer=False, tr_embedding=True), "tr_embedding=true needs the time axis"),
        (FmriMLPConfig, dict(time_agg="last"), "time_agg"),
        (FmriMLPConfig, dict(norm="group"), "norm"),
        (FmriMLPConfig, dict(dropout=1.0), "dropout"),
        (FmriMLPConfig, dict(n_blocks=-1), "n_blocks"),
        (VersatileDiffusionConfig, dict(scheduler="pndm"), "scheduler"),
        (VersatileDiffusionConfig, dict(precision="fp64"), "precision"),
        (VersatileDiffusionConfig, dict(lora_target_modules=[]), "at least one module"),
        (VersatileDiffusionConfig, dict(num_inference_steps=0), "num_inference_steps"),
        (VersatileDiffusionConfig, dict(guidance=3.0), "guidance"),
    ],
)
def test_bad_options_fail_at_config_time(cls, kwargs, match):
    with pytest.raises(pydantic.ValidationError, match=match):
        cls(**kwargs)


def test_valid_option_combinations():
    FmriMLPConfig(time_agg="in_mean", per_tr_layer=False)
    FmriMLPConfig(time_agg="out_mean", tr_embedding=True, subject_layers="deep", norm="batch", act_first=True, n_blocks=2)
    cfg = VersatileDiffusionConfig(scheduler="dpmsolver++", precision="bf16")
    with pytest.raises(pydantic.ValidationError, match="scheduler"):
        cfg.scheduler = "euler"  # validated on assignment too
