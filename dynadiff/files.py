"""Atomic file writes: a crash never leaves a half-written file under its final name."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_png(array: np.ndarray, path: Path) -> None:
    """(H, W, 3) uint8 array -> PNG, written to a temporary name then renamed."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)


def write_text(path: Path, text: str) -> None:
    """Text file written to a temporary name then renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
