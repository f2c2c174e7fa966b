"""With mix ratio 0 the text stack of VD's dual-attention UNet contributes nothing: the
plain image UNet fed only the 257 brain tokens gives the same noise prediction."""

import copy

import pytest
import torch
from diffusers.models import DualTransformer2DModel, Transformer2DModel

from dynadiff.models import vd
from dynadiff.models.tiny import build_text_unet, build_unet


@pytest.fixture(scope="module")
def unets():
    image = build_unet(seed=3).eval()
    dual = vd.make_dual_unet(copy.deepcopy(image), build_text_unet(seed=4)).eval()
    return image, dual


def _inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, 8, 8, generator=g)
    tokens = torch.randn(batch, 257, 768, generator=g)
    text = torch.randn(batch, 77, 768, generator=g)
    return latents, tokens, text


def test_dual_unet_is_diffusers_dual_transformer(unets):
    image, dual = unets
    duals = [m for m in dual.modules() if isinstance(m, DualTransformer2DModel)]
    plain = [m for m in image.modules() if isinstance(m, Transformer2DModel)]
    assert len(duals) == len(plain) == 10  # 3 down + 1 mid + 6 up (1 layer per block)
    for m in duals:
        assert (m.mix_ratio, m.condition_lengths, m.transformer_index_for_condition) == (0.0, [77, 257], [1, 0])
        assert type(m).forward is not DualTransformer2DModel.forward  # only the keyword shim...
        assert type(m).__mro__[1] is DualTransformer2DModel  # ...around diffusers' own forward
    # the image stack is the plain UNet's transformer, the text stack is another network
    assert torch.equal(duals[0].transformers[0].proj_in.weight, plain[0].proj_in.weight)
    assert not torch.equal(duals[0].transformers[1].proj_in.weight, plain[0].proj_in.weight)


@pytest.mark.parametrize("timestep", [0, 481, 999])
def test_plain_image_unet_equals_dual_unet_at_mix_ratio_0(unets, timestep):
    image, dual = unets
    latents, tokens, text = _inputs(timestep)
    with torch.no_grad():
        plain_out = image(latents, timestep, encoder_hidden_states=tokens).sample
        dual_zero_text = dual(latents, timestep, encoder_hidden_states=torch.cat([torch.zeros_like(text), tokens], 1)).sample
        dual_any_text = dual(latents, timestep, encoder_hidden_states=torch.cat([text, tokens], 1)).sample
    assert plain_out.abs().mean() > 0.1
    # (a - x) + x rounds differently from a: a few float32 ulps, nothing more
    torch.testing.assert_close(dual_zero_text, plain_out, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(dual_any_text, plain_out, atol=2e-6, rtol=1e-5)


def test_text_stack_is_wired(unets):
    """Control: the equality above is not vacuous -- a non-zero mix ratio changes the output."""
    image, dual = unets
    latents, tokens, text = _inputs(1)
    context = torch.cat([text, tokens], 1)
    try:
        for m in dual.modules():
            if isinstance(m, DualTransformer2DModel):
                m.mix_ratio = 0.5
        with torch.no_grad():
            mixed = dual(latents, 500, encoder_hidden_states=context).sample
            plain_out = image(latents, 500, encoder_hidden_states=tokens).sample
    finally:
        for m in dual.modules():
            if isinstance(m, DualTransformer2DModel):
                m.mix_ratio = 0.0
    assert (mixed - plain_out).abs().max() > 1e-3


def test_dual_model_equals_plain_model_with_lora_and_published_names(model_factory, randomise_trainable):
    """Whole decoders: the dual one loads its LoRA and brain weights from the plain one's
    published-name state dict, and both give the same guided noise prediction."""
    from dynadiff.checkpoint import load_checkpoint, trainable_state_dict

    plain = model_factory(seed=0)
    dual = model_factory(seed=1, dual_attention=True)
    assert dual.dual_attention and not plain.dual_attention
    randomise_trainable(plain, 7)
    report = load_checkpoint(dual, trainable_state_dict(plain))
    assert not report.missing and not report.unexpected
    n_image_lora = sum(".lora_" in k for k in trainable_state_dict(plain))
    assert len(report.missing_text_stack) == n_image_lora  # the text stack keeps its own (zero-B) LoRA
    latents, _, _ = _inputs(2, batch=3)
    g = torch.Generator().manual_seed(3)
    brain, subject_idx = torch.randn(3, 23, 6, generator=g), torch.tensor([0, 1, 1])
    with torch.no_grad():
        tokens = plain.encode_brain(brain, subject_idx)
        torch.testing.assert_close(dual.encode_brain(brain, subject_idx), tokens, atol=0, rtol=0)
        want = plain.predict_noise(latents, 700, tokens, guidance_scale=3.5)
        got = dual.predict_noise(latents, 700, tokens, guidance_scale=3.5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_text_stack_lora_gets_zero_gradient(model_factory):
    dual = model_factory(seed=2, dual_attention=True).train()
    g = torch.Generator().manual_seed(0)
    brain, img = torch.randn(2, 23, 6, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    dual.training_loss(brain, img, torch.tensor([0, 1]), generator=g).backward()
    grads = {n: p.grad for n, p in dual.unet.named_parameters() if "lora_A" in n}
    text = [g for n, g in grads.items() if ".transformers.1." in n]
    image = [g for n, g in grads.items() if ".transformers.0." in n]
    assert len(text) == len(image) > 0
    assert all(g is None or not g.any() for g in text)
    # lora_B starts at zero, so lora_A's gradient is zero too at init: look at lora_B
    grads_b = {n: p.grad for n, p in dual.unet.named_parameters() if "lora_B" in n}
    assert all(g is None or not g.any() for n, g in grads_b.items() if ".transformers.1." in n)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads_b.items() if ".transformers.0." in n)


def test_make_dual_unet_rejects_mismatched_text_unet():
    with pytest.raises(ValueError, match="no transformer at"):
        vd.make_dual_unet(build_unet(seed=0), torch.nn.Module())
    with pytest.raises(ValueError, match="dual already"):
        vd.make_dual_unet(vd.make_dual_unet(build_unet(seed=0), build_text_unet(seed=1)), build_text_unet(seed=1))
