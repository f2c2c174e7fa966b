"""PixCorr and SSIM against independent computations (np.corrcoef, scikit-image)."""

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from dynadiff.metrics.pixel import PIXEL_SIZE, pixcorr, pixel_array, ssim


def _resized(img: np.ndarray) -> np.ndarray:
    # independent of the library: PIL's *default* filter, as the original called it
    return np.asarray(Image.fromarray(img).resize((425, 425)), dtype=np.float64) / 255


def test_pixel_array_is_pil_default_resize_to_425(images_factory):
    img = images_factory(1, 37, 53)[0]
    out = pixel_array(img)
    assert PIXEL_SIZE == 425
    assert out.shape == (425, 425, 3) and out.dtype == np.float64
    np.testing.assert_array_equal(out, _resized(img))
    # the default filter is bicubic, not bilinear: the two differ on this image
    bilinear = np.asarray(Image.fromarray(img).resize((425, 425), Image.Resampling.BILINEAR)) / 255
    assert np.abs(out - bilinear).max() > 1e-3


def test_pixcorr_matches_np_corrcoef(images_factory):
    recs = images_factory(3, 37, 53, seed=1)
    gts = images_factory(3, 41, 29, seed=2)
    got = pixcorr(recs, gts)
    want = [np.corrcoef(_resized(r).ravel(), _resized(g).ravel())[0, 1] for r, g in zip(recs, gts)]
    assert got.shape == (3,)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_pixcorr_accepts_pil_and_arrays_alike(images_factory):
    recs = images_factory(2, 30, 30, seed=3)
    gts = images_factory(2, 30, 30, seed=4)
    np.testing.assert_array_equal(pixcorr([Image.fromarray(r) for r in recs], gts), pixcorr(recs, gts))


def test_ssim_matches_scikit_image(images_factory):
    recs = images_factory(2, 37, 53, seed=5)
    gts = images_factory(2, 50, 44, seed=6)
    got = ssim(recs, gts)
    want = [
        structural_similarity(
            rgb2gray(_resized(r)), rgb2gray(_resized(g)), gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1
        )
        for r, g in zip(recs, gts)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # the parameters matter: scikit-image's defaults (7x7 uniform window) give other values
    default = [structural_similarity(rgb2gray(_resized(r)), rgb2gray(_resized(g)), data_range=1) for r, g in zip(recs, gts)]
    assert np.abs(np.array(default) - got).max() > 1e-3


def test_identical_images_score_one(images_factory):
    imgs = images_factory(2, 33, 35)
    np.testing.assert_allclose(pixcorr(imgs, imgs), 1.0)
    np.testing.assert_allclose(ssim(imgs, imgs), 1.0)


def test_bad_inputs_are_errors(images_factory):
    imgs = images_factory(2, 20, 20)
    with pytest.raises(ValueError, match="2 reconstructions but 1 ground truths"):
        pixcorr(imgs, imgs[:1])
    with pytest.raises(ValueError, match=r"uint8 array \(H, W, 3\)"):
        pixcorr([imgs[0].astype(np.float32)], [imgs[0]])
    with pytest.raises(ValueError, match=r"uint8 array \(H, W, 3\)"):
        ssim([imgs[0][..., 0]], [imgs[0]])
    with pytest.raises(TypeError, match="PIL image or a uint8 array"):
        pixcorr(["x.png"], [imgs[0]])
