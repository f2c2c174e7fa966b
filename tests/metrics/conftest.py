"""Fixtures of the metric tests: small images, random-weight files under the official names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dynadiff.metrics.config import MetricsWeightsConfig
from dynadiff.metrics.weights import TORCHVISION_FILES

# A tiny CLIP (text + vision, like the openai/clip-vit-large-patch14 folder) for speed.
TINY_CLIP_VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=32, projection_dim=24
)
TINY_CLIP_TEXT = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2, vocab_size=50, projection_dim=24)


def random_images(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth-ish random uint8 RGB images (H, W, 3): noise plus a per-image gradient, so images differ in structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(-1, 1, size=3)
        base = 128 + 90 * np.sin(3 * (a * xx + b * yy) + c)
        img = base[..., None] + rng.normal(0, 25, size=(height, width, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


@pytest.fixture
def images_factory():
    return random_images


def _write_torchvision_weights(checkpoints: Path) -> dict[str, Path]:
    from torchvision import models

    torch.manual_seed(0)
    nets = {
        "alexnet": models.alexnet(),
        "inception": models.inception_v3(aux_logits=True, transform_input=True, init_weights=False),
        "effnet": models.efficientnet_b1(),
    }
    paths = {}
    for name, net in nets.items():
        paths[name] = checkpoints / TORCHVISION_FILES[name]
        torch.save(net.state_dict(), paths[name])
    # SwAV as the hub checkpoint stores it: "module." prefix, SwAV heads, no fc.
    resnet = models.resnet50()
    state = {f"module.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    state["module.projection_head.0.weight"] = torch.randn(8, 2048)
    state["module.prototypes.weight"] = torch.randn(5, 8)
    paths["swav"] = checkpoints / "swav_800ep_pretrain.pth.tar"
    torch.save(state, paths["swav"])
    return paths


def _write_tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=TINY_CLIP_TEXT, vision_config=TINY_CLIP_VISION, projection_dim=24)
    CLIPModel(config).eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def weight_files(tmp_path_factory) -> dict[str, Path]:
    """A TORCH_HOME with random AlexNet / Inception-v3 / EfficientNet-B1 / SwAV files under the official names, and a tiny CLIP folder."""
    root = tmp_path_factory.mktemp("weights")
    checkpoints = root / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    paths = _write_torchvision_weights(checkpoints)
    paths["clip"] = _write_tiny_clip(root / "clip")
    paths["torch_home"] = root / "torch"
    paths["root"] = root
    return paths


@pytest.fixture
def weights_config(weight_files, tmp_path) -> MetricsWeightsConfig:
    """Random stand-in weights for every torch network (verification off); DreamSim absent."""
    return MetricsWeightsConfig(
        torch_home=weight_files["torch_home"],
        clip_path=weight_files["clip"],
        weights_dir=tmp_path / "no-weights",
        verify=False,
    )


@pytest.fixture
def empty_weights(tmp_path) -> MetricsWeightsConfig:
    """Nothing on disk."""
    return MetricsWeightsConfig(torch_home=tmp_path / "torch", weights_dir=tmp_path / "weights")
