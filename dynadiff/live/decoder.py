"""The decoder of a live session: a checkpoint, ready to turn one causal window into one image."""

from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


class WindowDecoder:
    """``decoder(window)``: (voxels, n_trs) float32 -> (H, W, 3) uint8, one window at a time (the same images as
    any other batch of one: each image has its own random stream, seeded by the config's seed)."""

    def __init__(self, cfg, n_voxels: int, n_trs: int, steps: int | None = None) -> None:
        from dynadiff.evaluation import build_decoder, checkpoint_layout, reconstruction_config

        rec = reconstruction_config(cfg)
        subject = cfg.data.nsd_dataset_config.subject
        self.width, n_subjects, self.subject_idx = checkpoint_layout(rec.checkpoint, subject, n_voxels)
        self.model, self.device = build_decoder(rec, self.width, n_subjects, n_trs)
        self.n_voxels, self.n_trs = n_voxels, n_trs
        self.seed = cfg.versatilediffusion_config.seed
        self.steps = steps
        self.to_uint8 = cfg.to_uint8

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def __call__(self, window: np.ndarray) -> np.ndarray:
        import torch

        from dynadiff.evaluation import to_uint8

        if window.shape != (self.n_voxels, self.n_trs):
            raise ValueError(f"expected a ({self.n_voxels}, {self.n_trs}) window, got {window.shape}")
        brain = torch.from_numpy(np.pad(window, ((0, self.width - self.n_voxels), (0, 0)))[None]).to(self.device)
        subjects = torch.full((1,), self.subject_idx, dtype=torch.long, device=self.device)
        with torch.no_grad():
            image = self.model.reconstruct(brain, subjects, seed=self.seed, num_inference_steps=self.steps)[0]
        return to_uint8(image, self.to_uint8)


def truth_loader(root: Path | None, size: int) -> tp.Callable[[int], np.ndarray | None]:
    """NSD id -> the stimulus (its prepared PNG under ``root``, resized to ``size``), or None where absent."""
    from PIL import Image

    from dynadiff.data import nsd

    def load(nsd_id: int) -> np.ndarray | None:
        if root is None:
            return None
        path = nsd.stimulus_png(root, nsd_id)
        if not path.is_file():
            return None
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC))

    return load
