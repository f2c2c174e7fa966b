"""Session-wide test set-up: no network beyond localhost, offline libraries."""

import os
import sys
from pathlib import Path

_GUARD_DIR = Path(__file__).parent / "netguard"
sys.path.insert(0, str(_GUARD_DIR))
import netguard  # noqa: E402

netguard.install()
# Subprocesses started by tests inherit the guard through sitecustomize.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(_GUARD_DIR), str(Path(__file__).parents[1])] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("TQDM_DISABLE", "1")


import pytest  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """Tiny models are dominated by per-op overhead: on a shared 2-core machine two OpenMP threads make them
    5-8x slower than one. Restored after the test."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def synthetic_nsd(tmp_path_factory):
    """A prepared synthetic mini-NSD for subject 1, sessions 1 and 21 (read-only: copy it to modify)."""
    from dynadiff.data.stimuli import prepare_stimuli
    from dynadiff.data.synthetic import write_synthetic_nsd

    root = tmp_path_factory.mktemp("mini_nsd")
    info = write_synthetic_nsd(root, subjects=(1,), seed=0)
    prepare_stimuli(root, images="all", subjects=(1,), workers=1)
    return root, info


@pytest.fixture(scope="session")
def eval_setup(synthetic_nsd, tmp_path_factory):
    """What eval.py needs on the mini-NSD: a tiny VD, two checkpoints of subject 1 (``ckpt``, ``ckpt_b``: other
    weights) and one of a model with 7 voxels fewer (``other``), saved through the real save path; ``base``:
    the eval.py arguments that use them (no metric weights: ``env`` points the weight folders at an empty one)."""
    import torch

    from dynadiff.checkpoint import save_checkpoint
    from dynadiff.models.config import FmriMLPConfig, VersatileDiffusionConfig
    from dynadiff.models.tiny import write_tiny_vd

    nsd, info = synthetic_nsd
    root = tmp_path_factory.mktemp("eval")
    vd = write_tiny_vd(root / "vd")
    vd_cfg = VersatileDiffusionConfig(vd_cache_dir=vd, image_size=64)
    n_voxels = info["n_voxels"][1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ckpt = save_checkpoint(vd_cfg.build(FmriMLPConfig(hidden=32), n_voxels=n_voxels), root / "subj01.safetensors")
        ckpt_b = save_checkpoint(vd_cfg.build(FmriMLPConfig(hidden=32), n_voxels=n_voxels), root / "subj01_b.safetensors")
        other = save_checkpoint(vd_cfg.build(FmriMLPConfig(hidden=32), n_voxels=n_voxels - 7),
                                root / "other_subject.safetensors")
    empty = root / "no_weights"
    empty.mkdir()
    env = dict(os.environ, TORCH_HOME=str(empty), DYNADIFF_WEIGHTS=str(empty), OMP_NUM_THREADS="1")
    base = ["--subject", "1", "--vd_cache_dir", str(vd), "--device", "cpu", "--batch-size", "2",
            f"data.nsd_dataset_config.nsddata_path={nsd}", "data.nsd_dataset_config.sessions=[1,21]",
            "versatilediffusion_config.image_size=64", "versatilediffusion_config.num_inference_steps=2"]
    return {"root": root, "nsd": nsd, "vd": vd, "ckpt": ckpt, "ckpt_b": ckpt_b, "other": other, "env": env,
            "base": base, "n_voxels": n_voxels}
