"""PixCorr and SSIM (docs/behaviour.md §5): both images resized to 425x425 with PIL's bicubic filter.

The one resize path of this family is :func:`pixel_array`.
"""

from __future__ import annotations

import typing as tp

import numpy as np
from PIL import Image

from dynadiff.metrics.images import ImageLike, as_pil, check_pairs

PIXEL_SIZE = 425  # NSD stimuli's native size


def pixel_array(img: ImageLike) -> np.ndarray:
    """(425, 425, 3) float64 in [0, 1]: ``Image.resize((425, 425))`` (PIL's default filter, bicubic)."""
    pil = as_pil(img).resize((PIXEL_SIZE, PIXEL_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(pil, dtype=np.float64) / 255.0


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two arrays, flattened (NaN if either is constant, as ``np.corrcoef``)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a = a - a.mean()
    b = b - b.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def pixcorr(reconstructions: tp.Sequence[ImageLike], ground_truths: tp.Sequence[ImageLike]) -> np.ndarray:
    """(N,) Pearson r between each reconstruction and its ground truth, RGB pixels at 425x425."""
    check_pairs(reconstructions, ground_truths)
    return np.array([pearson(pixel_array(r), pixel_array(g)) for r, g in zip(reconstructions, ground_truths)])


def ssim(reconstructions: tp.Sequence[ImageLike], ground_truths: tp.Sequence[ImageLike]) -> np.ndarray:
    """(N,) SSIM of each pair: 425x425, ``rgb2gray``, Gaussian weights sigma 1.5, population covariance, data range 1."""
    check_pairs(reconstructions, ground_truths)
    return np.array([ssim_arrays(pixel_array(r), pixel_array(g)) for r, g in zip(reconstructions, ground_truths)])


def ssim_arrays(reconstruction: np.ndarray, ground_truth: np.ndarray) -> float:
    """SSIM of two RGB float arrays in [0, 1] (already at the metric's size)."""
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    return float(
        structural_similarity(
            rgb2gray(reconstruction),
            rgb2gray(ground_truth),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
        )
    )


def pixel_identification(reconstructions: tp.Sequence[ImageLike], ground_truths: tp.Sequence[ImageLike],
                         direction: str = "per_ground_truth") -> np.ndarray:
    """(N,) two-way identification on the 425x425 RGB pixels (the PixCorr resize): needs no network weights.

    Not one of the published metrics; the demo uses it as a weight-free identification score (chance 0.5).
    """
    from dynadiff.metrics.identification import two_way_identification

    check_pairs(reconstructions, ground_truths)
    recs = np.stack([pixel_array(r) for r in reconstructions])
    gts = np.stack([pixel_array(g) for g in ground_truths])
    return two_way_identification(recs, gts, direction)
