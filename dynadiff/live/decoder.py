"""The decoder of a live session: a checkpoint, ready to turn one causal window into one image."""

from __future__ import annotations

import logging
import typing as tp
from pathlib import Path

import numpy as np

if tp.TYPE_CHECKING:
    from dynadiff.live.watch import Onset

logger = logging.getLogger(__name__)


class WindowDecoder:
    """``decoder(window)``: (voxels, n_trs) float32 -> (H, W, 3) uint8, one window at a time, through the
    checkpoint's :class:`~dynadiff.Decoder` in batches of one (the same images as any other batch size up to float
    rounding: each image has its own random stream, seeded by the config's seed)."""

    def __init__(self, cfg, n_voxels: int, n_trs: int, steps: int | None = None) -> None:
        from dynadiff.evaluation import decoder_of, reconstruction_config

        self.decoder = decoder_of(reconstruction_config(cfg), n_voxels, n_trs, batch_size=1)
        self.n_voxels, self.n_trs, self.steps = n_voxels, n_trs, steps

    @property
    def image_size(self) -> int:
        return self.decoder.image_size

    def __call__(self, window: np.ndarray) -> np.ndarray:
        if window.shape != (self.n_voxels, self.n_trs):
            raise ValueError(f"expected a ({self.n_voxels}, {self.n_trs}) window, got {window.shape}")
        return self.decoder(window[None], steps=self.steps)[0]


def _resized(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC))


def truth_loader(root: Path | None, size: int) -> tp.Callable[[Onset], np.ndarray | None]:
    """Onset -> the stimulus of its NSD id (its prepared PNG under ``root``, resized to ``size``), or None where
    absent."""
    from dynadiff.data import nsd

    def load(onset: Onset) -> np.ndarray | None:
        if root is None or not onset.nsd_id:
            return None
        path = nsd.stimulus_png(root, onset.nsd_id)
        return _resized(path, size) if path.is_file() else None

    return load


def stimuli_loader(folder: Path | None, size: int) -> tp.Callable[[Onset], np.ndarray | None]:
    """Onset -> the image it names (an events.tsv's), ``folder / name`` resized to ``size``; None without a folder
    or a name, or where the file is absent."""

    def load(onset: Onset) -> np.ndarray | None:
        if folder is None or onset.image is None:
            return None
        path = Path(folder) / onset.image
        return _resized(path, size) if path.is_file() else None

    return load
