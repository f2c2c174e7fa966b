"""DynadiffModel: loading from a VD folder, LoRA, guidance, the sampler against an
independent DDPM written from its formulas, determinism and batch invariance, the loss."""


import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from dynadiff.models import vd
from dynadiff.models.config import FmriMLPConfig



def _betas_cumprod():
    # SD-1.x "scaled_linear": betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


# -- building ---------------------------------------------------------------------------


def test_build_from_vd_folder_trainable_and_frozen(tiny_model, tiny_vd):
    m = tiny_model
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in m.named_parameters() if n.startswith("brain_modules.clip_image.") or ".lora_" in n}
    assert not any(p.requires_grad for p in m.vae.parameters())
    # LoRA exactly on attn2.to_{q,k,v,out.0} of every transformer block, rank 4: count it from the base UNet
    base = UNet2DConditionModel.from_pretrained(tiny_vd, subfolder="image_unet")
    expected = 0
    for name, module in base.named_modules():
        if name.endswith(("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")):
            expected += 4 * (module.in_features + module.out_features)
    assert expected > 0
    assert sum(p.numel() for n, p in m.named_parameters() if ".lora_" in n) == expected
    assert all(p.dtype == torch.float32 for p in m.trainable_parameters())
    assert m.vae_scale_factor == 8 and m.dtype == torch.float32


def test_unet_attention_uses_sdpa(tiny_model):
    attentions = [mod for mod in tiny_model.unet.modules() if isinstance(mod, Attention)]
    assert attentions and all(isinstance(a.processor, AttnProcessor2_0) for a in attentions)


def test_missing_vd_folder_is_a_clear_error(tmp_path, vd_config_factory, brain_config):
    from dynadiff.models import build_model

    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.*does not exist.*hf download shi-labs/versatile-diffusion.*vd_cache_dir"):
        build_model(vd_config_factory(vd_cache_dir=missing), brain_config, n_voxels=23)
    (tmp_path / "partial" / "image_unet").mkdir(parents=True)
    (tmp_path / "partial" / "image_unet" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"lacks vae/, scheduler/"):
        build_model(vd_config_factory(vd_cache_dir=tmp_path / "partial"), brain_config, n_voxels=23)


def test_incompatible_sizes_are_clear_errors(vd_config_factory, tiny_vd):
    from dynadiff.models import build_model

    with pytest.raises(ValueError, match="token_dim=768"):
        build_model(vd_config_factory(), FmriMLPConfig(hidden=8, token_dim=32), n_voxels=5)
    with pytest.raises(ValueError, match="multiple of the VAE's factor 8"):
        build_model(vd_config_factory(image_size=60), FmriMLPConfig(hidden=8), n_voxels=5)


# -- LoRA and guidance ----------------------------------------------------------------


def test_lora_at_init_leaves_unet_unchanged(model_factory, tiny_vd):
    m = model_factory(seed=4)
    base = UNet2DConditionModel.from_pretrained(tiny_vd, subfolder="image_unet").eval()
    g = torch.Generator().manual_seed(0)
    latents, tokens = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 257, 768, generator=g)
    with torch.no_grad():
        want = base(latents, 300, encoder_hidden_states=tokens).sample
        torch.testing.assert_close(m.unet(latents, 300, encoder_hidden_states=tokens).sample, want, atol=1e-6, rtol=1e-6)
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.normal_()
        assert (m.unet(latents, 300, encoder_hidden_states=tokens).sample - want).abs().max() > 1e-3  # LoRA is live


def test_classifier_free_guidance_combines_u_plus_s_c_minus_u(tiny_model):
    m = tiny_model
    g = torch.Generator().manual_seed(1)
    latents, tokens = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 257, 768, generator=g)
    with torch.no_grad():
        c = m.unet(latents, 600, encoder_hidden_states=tokens).sample
        u = m.unet(latents, 600, encoder_hidden_states=torch.zeros_like(tokens)).sample
        for s in (3.5, 0.0):
            torch.testing.assert_close(m.predict_noise(latents, 600, tokens, s), u + s * (c - u), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m.predict_noise(latents, 600, tokens, 1.0), c, atol=0, rtol=0)


# -- sampling ---------------------------------------------------------------------------


def test_ddpm_schedule_is_leading_with_offset(tiny_model):
    sched = vd.build_scheduler("ddpm", tiny_model.scheduler_config)
    sched.set_timesteps(20)
    assert sched.timesteps.tolist() == [1 + 50 * k for k in range(19, -1, -1)]  # 951, 901, ..., 1
    assert not sched.config.clip_sample and sched.config.variance_type == "fixed_small"


def _reference_sample(m, brain, subject_idx, seed, steps, scale):
    """docs/behaviour.md §4's sampler written from the DDPM formulas, one image at a time."""
    acp = _betas_cumprod()
    ratio = 1000 // steps
    timesteps = [k * ratio + 1 for k in range(steps - 1, -1, -1)]
    images = []
    for b in range(brain.shape[0]):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float32).double()
        with torch.no_grad():
            tokens = m.brain_module(brain[b:b + 1], subject_idx[b:b + 1])
        for t in timesteps:
            with torch.no_grad():
                c = m.unet(x.float(), t, encoder_hidden_states=tokens).sample.double()
                u = m.unet(x.float(), t, encoder_hidden_states=torch.zeros_like(tokens)).sample.double()
            eps = u + scale * (c - u)
            a_t = acp[t]
            a_prev = acp[t - ratio] if t - ratio >= 0 else torch.tensor(1.0, dtype=torch.float64)
            beta = 1 - a_t / a_prev
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)) * x
            var = ((1 - a_prev) / (1 - a_t) * beta).clamp(min=1e-20)
            z = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float32).double()
            x = mean + var.sqrt() * z
        with torch.no_grad():
            img = m.vae.decode(x.float() / 0.18215).sample
        images.append((img / 2 + 0.5).clamp(0, 1))
    return torch.cat(images)


def test_reconstruct_equals_reference_ddpm_sampler(tiny_model, brain_batch):
    brain, subject_idx = brain_batch
    brain, subject_idx = brain[:2], subject_idx[:2]
    got = tiny_model.reconstruct(brain, subject_idx, seed=11, num_inference_steps=3, guidance_scale=3.5)
    want = _reference_sample(tiny_model, brain, subject_idx, seed=11, steps=3, scale=3.5)
    assert got.shape == (2, 3, 64, 64) and got.dtype == torch.float32
    assert 0 <= got.min() and got.max() <= 1 and got.std() > 0.01
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_reconstruct_deterministic_and_batch_invariant(tiny_model, brain_batch):
    brain, subject_idx = brain_batch
    batch = tiny_model.reconstruct(brain, subject_idx, seed=[0, 0, 1])
    torch.testing.assert_close(tiny_model.reconstruct(brain, subject_idx, seed=[0, 0, 1]), batch, atol=0, rtol=0)
    for b, seed in ((1, 0), (2, 1)):
        alone = tiny_model.reconstruct(brain[b:b + 1], subject_idx[b:b + 1], seed=seed)
        torch.testing.assert_close(batch[b:b + 1], alone, atol=2e-5, rtol=1e-5)
    other_seed = tiny_model.reconstruct(brain[2:], subject_idx[2:], seed=0)
    assert (other_seed - batch[2:]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="2 seeds for 3"):
        tiny_model.reconstruct(brain, subject_idx, seed=[0, 1])


def test_default_seed_gives_every_image_the_same_initial_noise(tiny_model):
    """Same fMRI -> same image whatever its place in the batch (per-call seed, docs/behaviour.md §4)."""
    brain = torch.randn(1, 23, 6, generator=torch.Generator().manual_seed(8)).expand(2, -1, -1)
    out = tiny_model.reconstruct(brain, torch.tensor([0, 0]))
    torch.testing.assert_close(out[0], out[1], atol=2e-5, rtol=1e-5)


def test_reconstruct_of_a_model_in_train_mode_samples_in_eval_mode(vd_config_factory, randomise_trainable, brain_batch):
    """train.py's sample grids call reconstruct on the model it trains: no dropout (brain module, its blocks, LoRA)
    may reach the images, and the model goes back to the mode it was in."""
    from dynadiff.models import build_model

    brain_config = FmriMLPConfig(hidden=16, n_blocks=1, dropout=0.9, block_dropout=0.9)
    torch.manual_seed(0)
    m = build_model(vd_config_factory(lora_dropout=0.9), brain_config, n_voxels=23, n_subjects=2, n_timepoints=6)
    randomise_trainable(m, 3)
    brain, subject_idx = brain_batch[0][:2], brain_batch[1][:2]
    assert not m.training
    want = m.reconstruct(brain, subject_idx, seed=4)
    assert not m.training
    m.train()
    with torch.no_grad():  # the dropout is large enough to change the conditioning (else this test proves nothing)
        dropped, kept = m.encode_brain(brain, subject_idx), m.eval().encode_brain(brain, subject_idx)
    assert (dropped - kept).norm() > 0.1 * kept.norm()
    m.train()
    torch.manual_seed(1)  # dropout masks come from the global generator: reconstruct must not draw any
    got = m.reconstruct(brain, subject_idx, seed=4)
    assert m.training and all(mod.training for mod in m.modules())
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
def test_other_schedulers(tiny_model, brain_batch, scheduler):
    brain, subject_idx = brain_batch
    out = tiny_model.reconstruct(brain[:2], subject_idx[:2], scheduler=scheduler, num_inference_steps=3)
    ddpm = tiny_model.reconstruct(brain[:2], subject_idx[:2], num_inference_steps=3, scheduler="ddpm")
    assert out.shape == (2, 3, 64, 64) and 0 <= out.min() and out.max() <= 1
    assert (out - ddpm).abs().max() > 1e-3
    torch.testing.assert_close(out[1:], tiny_model.reconstruct(brain[1:2], subject_idx[1:2], scheduler=scheduler,
                                                               num_inference_steps=3), atol=2e-5, rtol=1e-5)


def test_bf16_close_to_fp32(model_factory, randomise_trainable, brain_batch):
    from dynadiff.checkpoint import load_checkpoint, trainable_state_dict

    m32 = model_factory(seed=0)
    randomise_trainable(m32, 2)
    m16 = model_factory(seed=1, precision="bf16")
    load_checkpoint(m16, trainable_state_dict(m32))
    assert m16.dtype == torch.bfloat16 and m16.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in m16.trainable_parameters())
    brain, subject_idx = brain_batch
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    with torch.no_grad():
        tokens = m32.encode_brain(brain, subject_idx)
        e32 = m32.predict_noise(latents, 500, tokens, 3.5)
        e16 = m16.predict_noise(latents, 500, tokens, 3.5)
    assert e16.dtype == torch.float32
    assert ((e16 - e32).norm() / e32.norm()) < 0.05


# -- training loss --------------------------------------------------------------------


def test_cubic_timesteps_distribution(tiny_model):
    t = tiny_model.sample_timesteps(40000, torch.Generator().manual_seed(0)).double()
    assert t.min() >= 0 and t.max() <= 999
    assert abs(t.mean().item() - 750) < 3  # E[1000 (1 - u^3)] = 750
    assert abs((t < 500).double().mean().item() - (1 - 0.5 ** (1 / 3))) < 0.01  # P(u^3 > 1/2)


def test_training_loss_equals_formula(model_factory, randomise_trainable, brain_batch):
    m = model_factory(seed=0, cond_drop_prob=0.5)
    randomise_trainable(m, 3)
    brain, subject_idx = brain_batch
    img = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    loss = m.training_loss(brain, img, subject_idx, generator=torch.Generator().manual_seed(9))
    assert loss.ndim == 0 and loss.requires_grad

    # the same draws, in the documented order, from a second generator
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        dist = m.vae.encode(2 * img - 1).latent_dist
        z = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)) * 0.18215
        u = torch.rand(3, generator=g)
        t = ((1 - u**3) * 1000).long().clamp(0, 999)
        noise = torch.randn(z.shape, generator=g) + 0.1 * torch.randn(3, 4, 1, 1, generator=g)
        keep = torch.rand(3, generator=g) >= 0.5
        acp = _betas_cumprod().float()
        noisy = acp[t].sqrt()[:, None, None, None] * z + (1 - acp[t]).sqrt()[:, None, None, None] * noise
        tokens = m.brain_module(brain, subject_idx) * keep[:, None, None]
        pred = m.unet(noisy, t, encoder_hidden_states=tokens).sample
        want = ((pred - noise) ** 2).mean()
    assert keep.any() and not keep.all()  # this seed exercises both branches
    torch.testing.assert_close(loss.detach(), want, atol=1e-5, rtol=1e-4)
    loss.backward()
    assert all(p.grad is not None for p in m.trainable_parameters())
    assert not any(p.grad is not None for p in m.vae.parameters())


def test_conditioning_dropout(model_factory, brain_batch):
    brain, subject_idx = brain_batch
    img = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    other = torch.randn_like(brain)
    for p, same in ((1.0, True), (0.0, False)):
        m = model_factory(seed=0, cond_drop_prob=p)
        with torch.no_grad():
            a = m.training_loss(brain, img, subject_idx, generator=torch.Generator().manual_seed(2))
            b = m.training_loss(other, img, subject_idx, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a, b) is same


def test_training_loss_rejects_bad_images(tiny_model, brain_batch):
    brain, subject_idx = brain_batch
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        tiny_model.training_loss(brain, torch.rand(3, 3, 64, 64) * 255, subject_idx)
    with pytest.raises(ValueError, match="height and width have to be divisible by 8 but are 60 and 64"):
        tiny_model.training_loss(brain, torch.rand(3, 3, 60, 64), subject_idx)
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        tiny_model.training_loss(brain, torch.rand(3, 64, 64), subject_idx)
    with pytest.raises(ValueError, match="brain has 3 samples but img has 2"):
        tiny_model.training_loss(brain, torch.rand(2, 3, 64, 64), subject_idx)


def test_fixed_size_batches_make_images_independent_of_the_split(tiny_model):
    """eval.py's batching at size 4: [0..3] + [4, 5, pad, pad] gives, bit for bit, what [0, 1, 2, pad] +
    [3, 4, 5, pad] gives (one local run against two cluster jobs), and drops the padding. (Unpadded, batches
    of 4 and of 3 differ here by about 2e-6.)"""
    from dynadiff.decoder import Decoder

    decoder = Decoder(tiny_model, device="cpu", batch_size=4)
    g = torch.Generator().manual_seed(6)
    windows = [torch.randn(23, 6, generator=g).numpy() for _ in range(6)]  # the tiny model's 23 voxels, 6 TRs
    whole = torch.stack(list(decoder.reconstruct_in_batches(windows, 0, seed=0)))
    halves = [img for part in (windows[:3], windows[3:]) for img in decoder.reconstruct_in_batches(part, 0, seed=0)]
    assert whole.shape == (6, 3, 64, 64)
    assert torch.equal(torch.stack(halves), whole)
    assert (whole[0] - whole[1]).abs().max() > 1e-4  # distinct images (same seed, other fMRI): an order mix-up shows
    # the model's own images of these windows (up to the batch-size rounding)
    direct = tiny_model.reconstruct(torch.from_numpy(np.stack(windows)), torch.zeros(6, dtype=torch.long), seed=0)
    torch.testing.assert_close(whole, direct, atol=2e-5, rtol=1e-5)
