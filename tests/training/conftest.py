"""Fixtures of the training tests: tiny VD folders and tiny training configurations.

Images are 32x32 with a 3-level VAE (factor 4): 8x8 latents, as in the demo.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 32


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def train_vd(tmp_path_factory) -> Path:
    """A tiny random VD folder (32 px images -> 8x8 latents)."""
    from dynadiff.models.tiny import write_tiny_vd

    return write_tiny_vd(tmp_path_factory.mktemp("train_vd"), unet_block_out_channels=(8, 8, 16, 16),
                         vae_block_out_channels=(8, 8, 8))


def tiny_overrides(nsd_root: Path, vd_dir: Path, out: Path, cache: Path, sessions=(1, 21)) -> list[str]:
    return [
        f"data.nsd_dataset_config.nsddata_path={nsd_root}",
        f"data.nsd_dataset_config.sessions=[{','.join(map(str, sessions))}]",
        f"data.nsd_dataset_config.image_size={IMAGE_SIZE}", f"versatilediffusion_config.image_size={IMAGE_SIZE}",
        f"data.nsd_dataset_config.infra.folder={cache}", f"versatilediffusion_config.vd_cache_dir={vd_dir}",
        f"output_dir={out}", "device=cpu", "data.num_workers=0", "progress=false",
        "brain_modules_config.hidden=16", "brain_modules_config.n_tokens=4",
        "versatilediffusion_config.num_inference_steps=2", "batch_size=4", "steps=4", "optim.warmup_steps=2",
        "optim.lr=1e-3", "log_every=1", "val_every=2", "val_max_samples=8", "sample_every=0", "checkpoint_every=2",
        "data.val_fraction=0.1",
    ]


@pytest.fixture
def make_train_config(synthetic_nsd, train_vd, tmp_path):
    """f(*overrides, out=None, nsd_root=None, vd=None) -> a tiny TrainConfig on the synthetic mini-NSD."""
    from dynadiff.cli import apply_overrides, load_yaml
    from dynadiff.config import TrainConfig

    def make(*overrides: str, out: Path | None = None, nsd_root: Path | None = None, vd: Path | None = None,
             sessions=(1, 21)):
        base = load_yaml(REPO / "config" / "train.yaml")
        items = tiny_overrides(nsd_root or synthetic_nsd[0], vd or train_vd, out or tmp_path / "run",
                               tmp_path / "cache", sessions)
        return apply_overrides(TrainConfig, base, items + list(overrides))

    return make


@pytest.fixture
def crash_at(monkeypatch):
    """``crash_at(n, training_only=False)`` makes ``training.loop.training_step_loss`` raise
    ``RuntimeError("simulated crash")`` at its ``n``-th call (``training_only``: counting only calls on a model in
    train mode, i.e. the optimizer steps' micro-batches, not validation batches); ``monkeypatch.undo()`` undoes it."""
    from dynadiff.training import loop

    real = loop.training_step_loss

    def arm(n: int, training_only: bool = False) -> None:
        calls = {"n": 0}

        def crashing(model, *args, **kwargs):
            if model.training or not training_only:
                calls["n"] += 1
                if calls["n"] == n:
                    raise RuntimeError("simulated crash")
            return real(model, *args, **kwargs)

        monkeypatch.setattr(loop, "training_step_loss", crashing)

    return arm
