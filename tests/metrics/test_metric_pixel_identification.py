"""Pixel two-way identification (the demo's weight-free identification) against a brute-force loop."""

import numpy as np
import pytest
from PIL import Image

from dynadiff.metrics.pixel import pixel_identification


def _resized(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((425, 425)), dtype=np.float64) / 255


def _brute_force(recs, gts, direction):
    r = np.array([[np.corrcoef(_resized(a).ravel(), _resized(b).ravel())[0, 1] for b in gts] for a in recs])
    n = len(recs)
    if direction == "per_ground_truth":
        return np.array([sum(r[i, j] < r[j, j] for i in range(n) if i != j) / (n - 1) for j in range(n)])
    return np.array([sum(r[i, j] < r[i, i] for j in range(n) if j != i) / (n - 1) for i in range(n)])


@pytest.mark.parametrize("direction", ["per_ground_truth", "per_reconstruction"])
def test_matches_brute_force(images_factory, direction):
    gts = images_factory(6, 31, 23, seed=5)
    others = images_factory(6, 31, 23, seed=6)
    recs = [(0.15 * g + 0.85 * o).astype(np.uint8) for g, o in zip(gts, others)]  # informative, mostly unrelated
    got = pixel_identification(recs, gts, direction)
    want = _brute_force(recs, gts, direction)
    np.testing.assert_array_equal(got, want)
    assert 0.5 < got.mean() < 1.0  # not trivially perfect


def test_identical_images_identify_perfectly_and_errors(images_factory):
    imgs = images_factory(4, 20, 20, seed=7)
    np.testing.assert_array_equal(pixel_identification(imgs, imgs), np.ones(4))
    with pytest.raises(ValueError, match="must pair up"):
        pixel_identification(imgs, imgs[:3])


def test_a_constant_reconstruction_fails_every_comparison(images_factory):
    """A flat grey reconstruction (37/255 everywhere: its float64 mean over 425x425x3 pixels is not exactly 37/255)
    has NaN correlations, and every comparison involving it fails; the others are identical to their ground truths.

    per ground truth: gt 0 (its reconstruction is flat) 0; gt k > 0: wins over the 2 other real reconstructions
    (r < 1), fails against the flat one -> 2/3. Per reconstruction: flat 0, the others beat every other ground
    truth -> 1."""
    gts = images_factory(4, 20, 24, seed=9)
    recs = [np.full((20, 24, 3), 37, np.uint8)] + gts[1:]
    np.testing.assert_array_equal(pixel_identification(recs, gts), [0, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_array_equal(pixel_identification(recs, gts, "per_reconstruction"), [0, 1, 1, 1])
