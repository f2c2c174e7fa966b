"""The sampler's DDPM follows VD's ``scheduler/scheduler_config.json`` exactly, as the original's
``DDPMScheduler.from_pretrained(vd, subfolder="scheduler")``: a key the file lacks takes DDPM's default
(``clip_sample`` true, which clips the predicted clean latent at every step), and the effective settings
are logged once."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from diffusers import DDPMScheduler

from dynadiff.models import vd
from dynadiff.models.config import VersatileDiffusionConfig

N_VOXELS = 23


@pytest.fixture(scope="module")
def vd_folders(tiny_vd, tmp_path_factory):
    """The tiny VD twice: its scheduler file as written (clip_sample false), and without the clip_sample key."""
    root = tmp_path_factory.mktemp("schedulers")
    written = root / "written"
    shutil.copytree(tiny_vd, written)
    absent = root / "absent"
    shutil.copytree(tiny_vd, absent)
    path = absent / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    assert config.pop("clip_sample") is False
    path.write_text(json.dumps(config))
    return {"written": written, "absent": absent}


@pytest.mark.parametrize("case, clip", [("written", False), ("absent", True)])
def test_ddpm_is_what_from_pretrained_builds_from_the_file(vd_folders, case, clip):
    ours = vd.build_scheduler("ddpm", vd.load_scheduler_config(vd_folders[case]))
    # the library's own reading of the same file (what the original called)
    theirs = DDPMScheduler.from_pretrained(vd_folders[case], subfolder="scheduler", local_files_only=True)
    assert ours.config["clip_sample"] is clip
    # every setting ours uses is the library's; the library's config also keeps the file's PNDM-only keys
    # (set_alpha_to_one, skip_prk_steps), which DDPM does not use
    public = {k: v for k, v in ours.config.items() if not k.startswith("_")}
    assert {k: theirs.config[k] for k in public} == public
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)


def test_effective_settings_are_logged_once_with_what_came_from_defaults(vd_folders, caplog):
    caplog.set_level(logging.INFO, logger="dynadiff.models.vd")
    vd._LOGGED_SETTINGS.clear()
    config = vd.load_scheduler_config(vd_folders["absent"])
    for _ in range(3):
        vd.build_scheduler("ddpm", config)
    lines = [r.getMessage() for r in caplog.records if "scheduler_config.json" in r.getMessage()]
    assert len(lines) == 1
    assert "clip_sample=True (default: not in the file)" in lines[0]
    assert "beta_schedule='scaled_linear'," in lines[0] and "beta_schedule='scaled_linear' (default" not in lines[0]
    vd.build_scheduler("ddpm", vd.load_scheduler_config(vd_folders["written"]))
    lines = [r.getMessage() for r in caplog.records if "scheduler_config.json" in r.getMessage()]
    assert len(lines) == 2 and "clip_sample=False," in lines[1]


def test_clip_sample_changes_the_images(vd_folders, brain_config, randomise_trainable):
    """With the key absent, sampling clips each step's predicted clean latent to [-1, 1] (DDPM's default), which
    the tiny VD's latents (about unit variance) exceed: the images differ from the file-with-false ones."""
    images = {}
    brain = torch.randn(2, N_VOXELS, 6, generator=torch.Generator().manual_seed(1))
    for case, folder in vd_folders.items():
        model = VersatileDiffusionConfig(vd_cache_dir=folder, image_size=64, num_inference_steps=3).build(
            brain_config, n_voxels=N_VOXELS)
        randomise_trainable(model, 0)
        with torch.no_grad():
            images[case] = model.reconstruct(brain, torch.zeros(2, dtype=torch.long), seed=0)
    assert (images["absent"] - images["written"]).abs().max() > 0.01
