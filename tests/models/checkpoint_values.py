"""Test helper (not a test): the published checkpoint names, and value checks that read the
model's parameters directly, with a name mapping of their own (not dynadiff.checkpoint's).

The published Dynadiff checkpoints (docs/behaviour.md §4) hold 265 trainable tensors under Lightning's
``model.`` prefix: the 9 brain-module tensors and, for each of the dual-attention UNet's 16
attention blocks (VD's layout: down blocks 0-2 x 2, the mid block, up blocks 1-3 x 3) and
each of its two transformer stacks (``transformers.0`` image, ``transformers.1`` text), LoRA
A and B of ``attn2.to_q/to_k/to_v/to_out.0``: 16 x 2 x 4 x 2 = 256.
"""

from __future__ import annotations

import re
import typing as tp

import torch

BRAIN_NAMES = tuple(f"brain_modules.clip_image.{n}" for n in (
    "subject_layers.weights", "lin0.weight", "lin0.bias", "post_lin0.0.weight", "post_lin0.0.bias",
    "out_time_agg.weight", "out_time_agg.bias", "lin1.weight", "lin1.bias"))
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
VD_ATTENTIONS = tuple(
    [f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)]
    + ["mid_block.attentions.0"]
    + [f"up_blocks.{b}.attentions.{a}" for b in (1, 2, 3) for a in range(3)])


def published_trainable_names(attentions: tp.Sequence[str] = VD_ATTENTIONS) -> list[str]:
    """The trainable tensors of a published checkpoint, without the ``model.`` prefix."""
    return list(BRAIN_NAMES) + [
        f"unet.{block}.transformers.{stack}.transformer_blocks.0.attn2.{target}.lora_{ab}.default.weight"
        for block in attentions for stack in (0, 1) for target in LORA_TARGETS for ab in "AB"]


_PLAIN_ATTENTION = re.compile(r"^(unet\..*?\.attentions\.\d+)\.transformer_blocks\.")


def model_trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor ``model`` trains (its parameters with ``requires_grad``, plus any buffer of
    the brain module), under the published name: the plain image UNet's
    ``...attentions.N.transformer_blocks...`` is the image stack ``...attentions.N.transformers.0.transformer_blocks...``.
    """
    out = {}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named += [(n, b) for n, b in model.named_buffers() if n.startswith("brain_modules.")]
    for name, tensor in named:
        published = name if model.dual_attention else _PLAIN_ATTENTION.sub(r"\1.transformers.0.transformer_blocks.", name)
        assert published not in out, f"two model tensors map to {published}"
        out[published] = tensor.detach()
    return out


def assert_model_holds(model: torch.nn.Module, source: tp.Mapping[str, torch.Tensor], prefix: str = "") -> int:
    """Every trainable tensor of ``model`` equals ``source[prefix + published name]`` cast to the
    model tensor's dtype, exactly; returns how many were compared (all of them)."""
    held = model_trainable_tensors(model)
    absent = [name for name in held if prefix + name not in source]
    assert not absent, f"{len(absent)} trainable tensors of the model are not in the source: {absent[:3]}"
    wrong = []
    for name, tensor in held.items():
        want = source[prefix + name]
        if tensor.shape != want.shape or not torch.equal(tensor, want.to(tensor.dtype)):
            wrong.append(name)
    assert not wrong, f"{len(wrong)} of {len(held)} trainable tensors differ from the source, e.g. {wrong[:3]}"
    return len(held)


def assert_model_differs(model: torch.nn.Module, source: tp.Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """No trainable tensor of ``model`` equals its source tensor yet (so that loading has to copy each one)."""
    same = [name for name, t in model_trainable_tensors(model).items()
            if prefix + name in source and torch.equal(t, source[prefix + name].to(t.dtype))]
    assert not same, f"{len(same)} tensors already equal the source before loading: {same[:3]}"
