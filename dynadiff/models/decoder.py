"""The Dynadiff decoder (docs/behaviour.md §4): brain module -> tokens -> VD image UNet with LoRA -> VAE.

``build_model`` loads the Versatile Diffusion parts from a local folder and returns a
``DynadiffModel`` with ``training_loss`` (one training step's loss) and
``reconstruct`` (the sampler: images in [0, 1] from fMRI windows).
"""

from __future__ import annotations

import logging
import typing as tp

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from dynadiff.models import vd
from dynadiff.models.config import FmriMLPConfig, VersatileDiffusionConfig

logger = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BRAIN_KEY = "clip_image"  # the published checkpoints' name of the (only) brain module
LORA_ADAPTER = "default"


def resolve_dtype(dtype: str | torch.dtype | None, default: str = "fp32") -> torch.dtype:
    if dtype is None:
        dtype = default
    if isinstance(dtype, torch.dtype):
        if dtype not in PRECISIONS.values():
            raise ValueError(f"unsupported dtype {dtype}: use float32, float16 or bfloat16")
        return dtype
    if dtype not in PRECISIONS:
        raise ValueError(f"unknown precision {dtype!r}: choose one of {sorted(PRECISIONS)}")
    return PRECISIONS[dtype]


def _generator_device(generator: torch.Generator | list[torch.Generator] | None, default: torch.device) -> torch.device:
    if generator is None:
        return default
    return (generator[0] if isinstance(generator, list) else generator).device


class DynadiffModel(nn.Module):
    """Brain module + VD image UNet (LoRA) + VAE + schedulers.

    Submodules (their names are the state-dict prefixes): ``brain_modules`` (a ModuleDict
    with the single key ``clip_image``), ``unet``, ``vae``. Trainable: the brain module and
    the LoRA weights (float32); the UNet base and the VAE are frozen, in ``dtype``.
    ``dual_attention`` tells whether the UNet is the original's dual-attention one (334
    conditioning tokens) or the plain image UNet (257).
    """

    def __init__(self, brain_module: nn.Module, unet: nn.Module, vae: nn.Module, scheduler_config: dict,
                 config: VersatileDiffusionConfig):
        super().__init__()
        self.config = config
        self.brain_modules = nn.ModuleDict({BRAIN_KEY: brain_module})
        self.unet = unet
        self.vae = vae
        self.scheduler_config = dict(scheduler_config)
        self.noise_scheduler = vd.build_scheduler("ddpm", self.scheduler_config)  # training: add_noise
        self.dual_attention = vd.is_dual(unet)
        self.vae_scale_factor = vd.vae_scale_factor(vae)
        self.latent_channels = unet.config.in_channels
        token_dim = brain_module.config.token_dim
        if token_dim != unet.config.cross_attention_dim:
            raise ValueError(
                f"the brain module makes {token_dim}-dim tokens but the UNet's cross-attention takes "
                f"{unet.config.cross_attention_dim}: set brain_modules_config.token_dim={unet.config.cross_attention_dim}"
            )
        if self.dual_attention and brain_module.config.n_tokens != vd.IMAGE_TOKENS:
            raise ValueError(
                f"the dual-attention UNet reads exactly {vd.IMAGE_TOKENS} image tokens, "
                f"the brain module makes {brain_module.config.n_tokens}"
            )
        if config.image_size % self.vae_scale_factor:
            raise ValueError(
                f"image_size must be a multiple of the VAE's factor {self.vae_scale_factor}, got {config.image_size}"
            )

    @property
    def brain_module(self) -> nn.Module:
        return self.brain_modules[BRAIN_KEY]

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the UNet and VAE (the precision of the frozen weights)."""
        return self.unet.conv_in.weight.dtype

    def trainable_parameters(self) -> tp.Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    # -- conditioning ------------------------------------------------------------------

    def encode_brain(self, brain: torch.Tensor, subject_idx: torch.Tensor) -> torch.Tensor:
        """(B, V, T) fMRI, (B,) subject indices -> (B, 257, 768) tokens in the UNet's dtype."""
        tokens = self.brain_module(brain.to(self.device), subject_idx.to(self.device))
        return tokens.to(self.dtype)

    def unet_context(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens -> the UNet's encoder_hidden_states: the tokens themselves (plain image UNet)
        or [zeros(B, 77, D), tokens] (dual-attention UNet, text tokens zero as in the original)."""
        if not self.dual_attention:
            return tokens
        text = tokens.new_zeros(tokens.shape[0], vd.TEXT_TOKENS, tokens.shape[2])
        return torch.cat([text, tokens], dim=1)  # (B, 334, D)

    def predict_noise(self, latents: torch.Tensor, timestep: torch.Tensor | int, tokens: torch.Tensor,
                      guidance_scale: float = 1.0) -> torch.Tensor:
        """Epsilon prediction, float32, with classifier-free guidance ``u + s * (c - u)``.

        The unconditional input is all-zero conditioning (every token zero). With
        ``guidance_scale == 1`` only the conditional branch runs.
        """
        context = self.unet_context(tokens.to(self.dtype))
        x = latents.to(self.dtype)
        if guidance_scale == 1.0:
            return self.unet(x, timestep, encoder_hidden_states=context).sample.float()
        both = self.unet(torch.cat([x, x]), timestep, encoder_hidden_states=torch.cat([torch.zeros_like(context), context])).sample
        uncond, cond = both.float().chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    # -- training ----------------------------------------------------------------------

    def _check_images(self, img: torch.Tensor) -> None:
        if img.ndim != 4 or img.shape[1] != 3:
            raise ValueError(f"images must have shape (batch, 3, height, width), got {tuple(img.shape)}")
        f = self.vae_scale_factor
        if img.shape[2] % f or img.shape[3] % f:
            raise ValueError(f"height and width have to be divisible by {f} but are {img.shape[2]} and {img.shape[3]}")
        lo, hi = float(img.min()), float(img.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"images must be floats in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training timesteps: ``cubic`` t = long((1 - u^3) * T), clamped to [0, T - 1],
        u ~ U(0, 1) -- biased towards high noise levels; ``uniform`` t = long(u * T)."""
        n = self.noise_scheduler.config.num_train_timesteps
        u = torch.rand(batch_size, generator=generator, device=_generator_device(generator, self.device))
        frac = 1.0 - u**3 if self.config.timestep_sampling == "cubic" else u
        return (frac * n).long().clamp(0, n - 1).to(self.device)

    def training_loss(self, brain: torch.Tensor, img: torch.Tensor, subject_idx: torch.Tensor,
                      generator: torch.Generator | None = None, share: tuple[int, int] | None = None) -> torch.Tensor:
        """The loss of one training step (docs/behaviour.md §4), a float32 scalar.

        img: (B, 3, H, W) in [0, 1]. Latents = VAE sample of ``2 img - 1`` times the
        scaling factor; cubic timesteps; noise ``randn + noise_offset * randn(B, C, 1, 1)``;
        conditioning zeroed for a random ``cond_drop_prob`` of the samples; MSE between the
        epsilon prediction and the noise. Random draws come from ``generator`` if given.

        ``share = (start, total)``: this batch is rows ``start .. start + B - 1`` of a global batch of
        ``total`` samples (data-parallel training): every random tensor is drawn for the ``total`` rows and
        these rows are kept, so the draws of a row do not depend on how the global batch is split. ``None``
        (or ``(0, B)``): the batch is the whole of it.
        """
        self._check_images(img)
        b = img.shape[0]
        if brain.shape[0] != b:
            raise ValueError(f"brain has {brain.shape[0]} samples but img has {b}")
        start, total = (0, b) if share is None else share
        if not (0 <= start and start + b <= total):
            raise ValueError(f"share {share}: rows {start}..{start + b - 1} are not within a batch of {total}")
        rows = slice(start, start + b)
        gdev = _generator_device(generator, self.device)
        with torch.no_grad():
            posterior = self.vae.encode((2 * img - 1).to(self.device, self.dtype)).latent_dist
            # posterior.sample(generator), drawn for the global batch (diffusers' DiagonalGaussianDistribution)
            eps = randn_tensor((total, *posterior.mean.shape[1:]), generator=generator,
                               device=posterior.parameters.device, dtype=posterior.parameters.dtype)[rows]
            latents = (posterior.mean + posterior.std * eps).float() * self.vae.config.scaling_factor
        timesteps = self.sample_timesteps(total, generator)[rows]
        noise = torch.randn((total, *latents.shape[1:]), generator=generator, device=gdev)[rows].to(self.device)
        offset = torch.randn(total, latents.shape[1], 1, 1, generator=generator, device=gdev)[rows].to(self.device)
        noise = noise + self.config.noise_offset * offset
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        keep = torch.rand(total, generator=generator, device=gdev)[rows].to(self.device) >= self.config.cond_drop_prob
        tokens = self.encode_brain(brain, subject_idx) * keep[:, None, None].to(self.dtype)
        pred = self.unet(noisy.to(self.dtype), timesteps, encoder_hidden_states=self.unet_context(tokens)).sample
        return F.mse_loss(pred.float(), noise)

    # -- sampling ----------------------------------------------------------------------

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) latents -> (B, 3, h*f, w*f) float32 images in [0, 1]."""
        x = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.dtype)).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, brain: torch.Tensor, subject_idx: torch.Tensor, seed: int | tp.Sequence[int] | None = None,
                    num_inference_steps: int | None = None, guidance_scale: float | None = None,
                    scheduler: str | None = None) -> torch.Tensor:
        """Images (B, 3, S, S), float32 in [0, 1], S = config.image_size, from fMRI windows.

        Each image has its own random stream, a CPU generator seeded with its seed (one
        int for all images: the original's per-call seed, 0 by default): its initial latents
        and every noise the sampler draws come from it alone, so a batch gives the same
        images as one image at a time, on any device. Defaults (steps, guidance, scheduler,
        seed) come from the config. Runs the brain module in eval mode (no dropout).
        """
        cfg = self.config
        steps = cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
        scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
        seed = cfg.seed if seed is None else seed
        b = brain.shape[0]
        seeds = [int(seed)] * b if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != b:
            raise ValueError(f"got {len(seeds)} seeds for {b} fMRI windows")
        if steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {steps}")
        sched = vd.build_scheduler(scheduler or cfg.scheduler, self.scheduler_config)
        sched.set_timesteps(steps, device=self.device)

        was_training = self.training
        self.eval()
        try:
            tokens = self.encode_brain(brain, subject_idx)
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            side = cfg.image_size // self.vae_scale_factor
            shape = (b, self.latent_channels, side, side)
            latents = randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)
            latents = latents * sched.init_noise_sigma
            for t in sched.timesteps:
                eps = self.predict_noise(sched.scale_model_input(latents, t), t, tokens, scale)
                latents = sched.step(eps, t, latents, generator=generators).prev_sample
            return self.decode_latents(latents)
        finally:
            self.train(was_training)


def add_lora(unet: nn.Module, config: VersatileDiffusionConfig) -> None:
    """PEFT LoRA (adapter ``default``) on ``config.lora_target_modules``; only LoRA trains."""
    from peft import LoraConfig

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        init_lora_weights=True,  # B = 0: the adapted UNet starts equal to the base one
    )
    unet.add_adapter(lora, adapter_name=LORA_ADAPTER)
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)


def assemble_model(brain_module: nn.Module, unet: nn.Module, vae: nn.Module, scheduler_config: dict,
                   config: VersatileDiffusionConfig, device: str | torch.device = "cpu",
                   dtype: str | torch.dtype | None = None) -> DynadiffModel:
    """A ``DynadiffModel`` from already built parts (``unet`` plain or dual, without LoRA)."""
    dtype = resolve_dtype(dtype, config.precision)
    vd.set_sdpa_attention(unet)
    add_lora(unet, config)
    for name, p in unet.named_parameters():  # frozen base in `dtype`, LoRA float32
        p.data = p.data.to(torch.float32 if "lora_" in name else dtype)
    vae.requires_grad_(False)
    for p in vae.parameters():  # not vae.to(dtype): diffusers warns on any ModelMixin cast
        p.data = p.data.to(dtype)
    model = DynadiffModel(brain_module, unet, vae, scheduler_config, config)
    return model.to(device).eval()


def build_model(vd_config: VersatileDiffusionConfig, brain_config: FmriMLPConfig, n_voxels: int, n_subjects: int = 1,
                n_timepoints: int = 6, device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None) -> DynadiffModel:
    """The decoder, from the VD folder ``vd_config.vd_cache_dir`` (no network), in eval mode.

    ``dtype`` (default: ``vd_config.precision``) is the precision of the frozen UNet and VAE;
    brain module and LoRA stay float32. Random brain module and LoRA: load trained weights
    with ``dynadiff.checkpoint.load_checkpoint``.
    """
    subfolders = ("image_unet", "vae", "scheduler") + (("text_unet",) if vd_config.dual_attention else ())
    vd_dir = vd.check_vd_folder(vd_config.vd_cache_dir, subfolders)
    dtype = resolve_dtype(dtype, vd_config.precision)
    unet = vd.load_image_unet(vd_dir, dtype)
    if vd_config.dual_attention:
        vd.make_dual_unet(unet, vd.load_text_unet(vd_dir, dtype))
    brain_module = brain_config.build(n_voxels=n_voxels, n_subjects=n_subjects, n_timepoints=n_timepoints)
    return assemble_model(brain_module, unet, vd.load_vae(vd_dir, dtype), vd.load_scheduler_config(vd_dir), vd_config,
                          device=device, dtype=dtype)
