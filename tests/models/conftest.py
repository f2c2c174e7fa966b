"""Tiny random Versatile Diffusion folder and decoders for the models tests.

Sizes are deliberately unequal (V = 23 voxels, T = 6 TRs, hidden = 16, 2 subjects,
batch 3) so that an axis mix-up fails; images are 64x64 -> 8x8 latents (VAE factor 8).
"""

from __future__ import annotations

import pytest
import torch

from dynadiff.models.config import FmriMLPConfig, VersatileDiffusionConfig

N_VOXELS = 23
N_SUBJECTS = 2
N_TIMEPOINTS = 6
IMAGE_SIZE = 64


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_vd(tmp_path_factory):
    """A tiny VD folder in the Hugging Face layout, text_unet/ included."""
    from dynadiff.models.tiny import write_tiny_vd

    return write_tiny_vd(tmp_path_factory.mktemp("versatile_diffusion"), text_unet=True)


@pytest.fixture(scope="session")
def brain_config() -> FmriMLPConfig:
    return FmriMLPConfig(hidden=16)


@pytest.fixture(scope="session")
def vd_config_factory(tiny_vd):
    def make(**kw) -> VersatileDiffusionConfig:
        return VersatileDiffusionConfig(**dict(dict(vd_cache_dir=tiny_vd, image_size=IMAGE_SIZE, num_inference_steps=2), **kw))

    return make


def _randomise_trainable(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="session")
def randomise_trainable():
    """f(model, seed): non-zero LoRA (B starts at zero) and a fresh brain module."""
    return _randomise_trainable


@pytest.fixture(scope="session")
def model_factory(vd_config_factory, brain_config):
    """f(seed=0, **vd_config_fields) -> a fresh tiny DynadiffModel (eval mode)."""
    from dynadiff.models import build_model

    def make(seed: int = 0, **kw):
        torch.manual_seed(seed)
        return build_model(vd_config_factory(**kw), brain_config, n_voxels=N_VOXELS, n_subjects=N_SUBJECTS,
                           n_timepoints=N_TIMEPOINTS)

    return make


@pytest.fixture(scope="session")
def tiny_model(model_factory):
    """Plain-UNet decoder with random non-zero LoRA. Shared: do not modify."""
    model = model_factory()
    _randomise_trainable(model, 1)
    return model


@pytest.fixture
def brain_batch():
    """(3, 23, 6) fMRI windows and subject indices [1, 0, 1]."""
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, N_VOXELS, N_TIMEPOINTS, generator=g), torch.tensor([1, 0, 1])
