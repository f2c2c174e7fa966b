"""Input images for the metrics: PIL images or uint8 arrays (H, W, 3)."""

from __future__ import annotations

import typing as tp

import numpy as np
from PIL import Image

ImageLike = Image.Image | np.ndarray


def as_pil(img: ImageLike, what: str = "image") -> Image.Image:
    """An RGB PIL image from a PIL image or a uint8 array (H, W, 3)."""
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"{what} must be a uint8 array (H, W, 3), got {img.dtype} {img.shape}")
        return Image.fromarray(img, mode="RGB")
    raise TypeError(f"{what} must be a PIL image or a uint8 array (H, W, 3), got {type(img).__name__}")


def check_images(images: tp.Sequence[ImageLike], what: str) -> None:
    """Fail early on a bad image, without converting anything (conversion happens per batch)."""
    for i, img in enumerate(images):
        if isinstance(img, Image.Image):
            continue
        if isinstance(img, np.ndarray):
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"{what}[{i}] must be a uint8 array (H, W, 3), got {img.dtype} {img.shape}")
            continue
        raise TypeError(f"{what}[{i}] must be a PIL image or a uint8 array (H, W, 3), got {type(img).__name__}")


def check_pairs(reconstructions: tp.Sequence[ImageLike], ground_truths: tp.Sequence[ImageLike], min_count: int = 1) -> None:
    if len(reconstructions) != len(ground_truths):
        raise ValueError(f"{len(reconstructions)} reconstructions but {len(ground_truths)} ground truths: they must pair up")
    if len(reconstructions) < min_count:
        raise ValueError(f"need at least {min_count} image pair(s), got {len(reconstructions)}")
