"""Configs of the decoder (cheap import: pydantic only, no torch, no diffusers).

``FmriMLPConfig`` describes the brain module (docs/behaviour.md §3), ``VersatileDiffusionConfig``
the diffusion decoder (docs/behaviour.md §4). Defaults are the published Dynadiff settings.
Each config builds its object with ``.build(...)``; a bad option combination is a
validation error here, at config time, not deep inside a forward pass.
"""

from __future__ import annotations

import typing as tp
from pathlib import Path

import pydantic

# Published LoRA targets (docs/behaviour.md §4): the cross-attention projections of every transformer block.
LORA_TARGET_MODULES = ("attn2.to_k", "attn2.to_q", "attn2.to_v", "attn2.to_out.0")


class _StrictModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)


class FmriMLPConfig(_StrictModel):
    """Brain module: (B, V, T) fMRI window -> (B, n_tokens, token_dim) conditioning tokens.

    Published configuration (docs/behaviour.md §3): per-subject linear layer V -> 1552, a different
    Linear(1552 -> 1552) per TR, LayerNorm -> GELU -> Dropout(0.5), no residual block,
    a Linear(T -> 1) over time, Linear(1552 -> 257 * 768).

    time_agg: where the T time points are merged into one:
        ``out_linear`` / ``out_mean``: after the per-TR layer and the blocks, by a learnt
        Linear(T -> 1) / by the mean (published: ``out_linear``);
        ``in_linear`` / ``in_mean``: on the raw input, before the subject layer (the
        rest of the network then sees a single time point).
    subject_layers: ``plain``: one (V, hidden) matrix per subject; ``deep``: that matrix,
        GELU, then a second per-subject (hidden, hidden) matrix; ``none``: one Linear
        (V -> hidden) shared by all subjects.
    per_tr_layer: a different Linear(hidden -> hidden) for each time point (published) or,
        when false, one Linear shared by all time points.
    tr_embedding: add a learnt (T, hidden) embedding after the subject layer, so that the
        shared layers know which TR they process.
    norm / act_first: ``layer`` (LayerNorm over the hidden axis) or ``batch`` (BatchNorm1d
        over the hidden channels); act_first puts GELU before the normalisation.
    """

    hidden: int = pydantic.Field(1552, ge=1)
    n_blocks: int = pydantic.Field(0, ge=0)
    subject_layers: tp.Literal["plain", "deep", "none"] = "plain"
    subject_layers_bias: bool = False
    per_tr_layer: bool = True
    tr_embedding: bool = False
    time_agg: tp.Literal["out_linear", "out_mean", "in_linear", "in_mean"] = "out_linear"
    norm: tp.Literal["layer", "batch"] = "layer"
    act_first: bool = False
    dropout: float = pydantic.Field(0.5, ge=0.0, lt=1.0)
    block_dropout: float = pydantic.Field(0.15, ge=0.0, lt=1.0)
    n_tokens: int = pydantic.Field(257, ge=1)
    token_dim: int = pydantic.Field(768, ge=1)

    @pydantic.model_validator(mode="after")
    def _coherent_time_axis(self) -> "FmriMLPConfig":
        if self.time_agg.startswith("in_"):
            if self.per_tr_layer:
                raise ValueError(
                    f"per_tr_layer=true needs the time axis, but time_agg={self.time_agg!r} merges the "
                    "time points at the input: use time_agg 'out_linear'/'out_mean' or per_tr_layer=false"
                )
            if self.tr_embedding:
                raise ValueError(
                    f"tr_embedding=true needs the time axis, but time_agg={self.time_agg!r} merges the "
                    "time points at the input: use time_agg 'out_linear'/'out_mean' or tr_embedding=false"
                )
        return self

    @property
    def out_dim(self) -> int:
        return self.n_tokens * self.token_dim

    def build(self, n_voxels: int, n_subjects: int = 1, n_timepoints: int = 6):
        """The ``FmriMLP`` (a ``torch.nn.Module``) for this many voxels, subjects and TRs."""
        from dynadiff.models.brain import FmriMLP

        return FmriMLP(self, n_voxels=n_voxels, n_subjects=n_subjects, n_timepoints=n_timepoints)


class VersatileDiffusionConfig(_StrictModel):
    """Diffusion decoder: Versatile Diffusion's image UNet with LoRA, its VAE, a sampler.

    vd_cache_dir: local folder in the Hugging Face layout of ``shi-labs/versatile-diffusion``
        (``image_unet/``, ``vae/``, ``scheduler/``; ``text_unet/`` only for dual_attention).
    dual_attention: false (default): the plain image UNet fed the 257 brain tokens; the
        text transformer stack is not even loaded. With the published mix ratio 0 it
        contributes exactly nothing, so this gives the original's outputs faster (proved in
        tests/models). true: the original's dual-attention UNet (loads ``text_unet/`` too),
        for checking that claim on real weights.
    scheduler: sampler; ``ddpm`` is the original's (docs/behaviour.md §4 quirk: DDPM, not DDIM).
    precision: dtype of the frozen UNet and VAE weights and of the UNet's compute; the
        trainable weights (brain module, LoRA) stay float32.
    image_size: side of the reconstructed images in pixels (latents are image_size / the
        VAE's downsampling factor).
    cond_drop_prob, noise_offset, timestep_sampling: training step (docs/behaviour.md §4).
    """

    vd_cache_dir: Path = Path("./versatile_diffusion")
    dual_attention: bool = False
    num_inference_steps: int = pydantic.Field(20, ge=1)
    guidance_scale: float = pydantic.Field(3.5, ge=0.0)
    scheduler: tp.Literal["ddpm", "ddim", "dpmsolver++"] = "ddpm"
    precision: tp.Literal["fp32", "fp16", "bf16"] = "fp32"
    image_size: int = pydantic.Field(512, ge=8)
    seed: int = 0
    lora_rank: int = pydantic.Field(4, ge=1)
    lora_alpha: float = pydantic.Field(4.0, gt=0.0)
    lora_dropout: float = pydantic.Field(0.0, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = pydantic.Field(default_factory=lambda: list(LORA_TARGET_MODULES))
    cond_drop_prob: float = pydantic.Field(0.1, ge=0.0, le=1.0)
    noise_offset: float = pydantic.Field(0.1, ge=0.0)
    timestep_sampling: tp.Literal["cubic", "uniform"] = "cubic"

    @pydantic.field_validator("lora_target_modules")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("lora_target_modules must name at least one module, e.g. 'attn2.to_q'")
        bad = [name for name in v if not name or name.startswith(".") or name.endswith(".")]
        if bad:
            raise ValueError(f"lora_target_modules must be dotted module names such as 'attn2.to_q', got {bad}")
        return v

    def build(self, brain_config: FmriMLPConfig, n_voxels: int, n_subjects: int = 1, n_timepoints: int = 6, device="cpu"):
        """The ``DynadiffModel`` for this config and brain module, from ``vd_cache_dir``."""
        from dynadiff.models.decoder import build_model

        return build_model(self, brain_config, n_voxels=n_voxels, n_subjects=n_subjects, n_timepoints=n_timepoints, device=device)
