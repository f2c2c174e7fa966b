"""Face pixelation: geometry against an independent numpy computation, detection on real photographs."""

import math

import numpy as np
import pytest
import skimage.data
from PIL import Image

from dynadiff import faces


# ----------------------------------------------------------------------------- independent reference


def _region(box, width, height):
    x0, y0, x1, y1 = box
    m = 0.1 * max(x1 - x0, y1 - y0)
    clip = lambda v, hi: int(np.clip(v, 0, hi))
    return clip(math.floor(x0 - m), width), clip(math.floor(y0 - m), height), clip(math.ceil(x1 + m), width), clip(math.ceil(y1 + m), height)


def _triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) antialiased bilinear (triangle filter stretched by the scale) resampling matrix."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centres = (np.arange(n_out) + 0.5) * scale
    w = np.maximum(0.0, 1.0 - np.abs(np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / support)
    return w / w.sum(axis=1, keepdims=True)


def _mosaic(region: np.ndarray, blocks: int = 4) -> np.ndarray:
    h, w = region.shape[:2]
    small = np.einsum("ai,ijc,bj->abc", _triangle_weights(h, blocks), region.astype(np.float64), _triangle_weights(w, blocks))
    rows = np.floor((np.arange(h) + 0.5) * blocks / h).astype(int)  # nearest upsampling
    cols = np.floor((np.arange(w) + 0.5) * blocks / w).astype(int)
    return small[rows][:, cols]


# ----------------------------------------------------------------------------- geometry


def test_enlarge_box_adds_ten_percent_of_the_longer_side_and_clips():
    assert faces.enlarge_box((10.3, 20.0, 30.3, 50.0), 100, 100) == (7, 17, 34, 53)  # margin 3 px
    assert faces.enlarge_box((2.0, 5.0, 42.0, 15.0), 40, 100) == (0, 1, 40, 19)  # margin 4 px, clipped left and right
    assert faces.enlarge_box((200.0, 200.0, 220.0, 230.0), 100, 100) == (100, 100, 100, 100)  # outside: empty
    with pytest.raises(ValueError, match="x0 <= x1"):
        faces.enlarge_box((30, 0, 10, 10), 100, 100)


def test_pixelation_matches_numpy_reference():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(61, 83, 3), dtype=np.uint8)
    original = img.copy()
    boxes = [(10.3, 20.0, 30.3, 50.0), (70.5, 40.2, 90.0, 70.0), (-5.0, -3.0, 7.0, 4.0), (500.0, 500.0, 510.0, 510.0)]
    out = faces.pixelate_boxes(img, boxes)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == img.shape
    changed = np.zeros(img.shape[:2], bool)
    for box in boxes[:3]:
        x0, y0, x1, y1 = _region(box, 83, 61)
        want = _mosaic(img[y0:y1, x0:x1])
        got = out[y0:y1, x0:x1].astype(np.float64)
        assert np.abs(got - want).max() <= 1.0, box  # PIL rounds to uint8 between its two passes
        assert len(np.unique(got.reshape(-1, 3), axis=0)) <= 16  # a 4x4 mosaic
        changed[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(out[~changed], img[~changed])  # nothing else touched
    assert (out[changed] != img[changed]).any()
    np.testing.assert_array_equal(img, original)  # the input is not modified


def test_pixelation_block_layout():
    # a region of 10 columns: block of column i = floor((i + 0.5) * 4 / 10); columns 2 and 7 fall
    # exactly on a boundary (1.0 and 3.0) and start a new block: widths 2, 3, 2, 3
    img = np.zeros((20, 20, 3), np.uint8)
    img[:, :, 0] = np.arange(20)[None, :] * 12
    out = faces.pixelate_boxes(img, [(5.0, 5.0, 15.0, 15.0)], margin=0.0)
    row = out[7, 5:15, 0]
    starts = np.flatnonzero(np.diff(row.astype(int))) + 1
    assert list(starts) == [2, 5, 7]
    assert out.shape == img.shape and (out[:, :5] == img[:, :5]).all()


def test_pil_in_pil_out():
    """A PIL image is pixelated exactly like its array: the box's region becomes the mosaic, nothing else moves."""
    arr = np.random.default_rng(2).integers(0, 256, size=(30, 41, 3), dtype=np.uint8)  # H != W: no axis mix-up
    box = (3.0, 5.0, 13.0, 21.0)
    out = faces.pixelate_boxes(Image.fromarray(arr), [box])
    assert isinstance(out, Image.Image) and out.size == (41, 30) and out.mode == "RGB"
    got = np.asarray(out)
    np.testing.assert_array_equal(got, faces.pixelate_boxes(arr, [box]))
    x0, y0, x1, y1 = _region(box, 41, 30)  # margin 1.6 px: columns 1..14, rows 3..22
    assert (x0, y0, x1, y1) == (1, 3, 15, 23)
    inside = np.zeros((30, 41), bool)
    inside[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(got[~inside], arr[~inside])
    assert np.abs(got[y0:y1, x0:x1].astype(np.float64) - _mosaic(arr[y0:y1, x0:x1])).max() <= 1.0
    assert np.abs(got[inside].astype(int) - arr[inside]).mean() > 20  # random pixels vs their block means


# ----------------------------------------------------------------------------- detection


@pytest.fixture(scope="module")
def detector():
    return faces.load_face_detector("cpu")


def test_astronaut_face_is_found_and_pixelated(detector):
    img = skimage.data.astronaut()  # Eileen Collins; her face is around x 170-270, y 60-175
    boxes = faces.detect_faces(img, detector=detector)
    assert len(boxes) == 1
    x0, y0, x1, y1 = boxes[0]
    assert 190 < (x0 + x1) / 2 < 250 and 90 < (y0 + y1) / 2 < 150
    assert 50 < x1 - x0 < 150 and 50 < y1 - y0 < 150
    out = faces.blur_faces(img, detector=detector)
    rx0, ry0, rx1, ry1 = faces.enlarge_box(boxes[0], 512, 512)
    inside = np.zeros((512, 512), bool)
    inside[ry0:ry1, rx0:rx1] = True
    np.testing.assert_array_equal(out[~inside], img[~inside])
    assert len(np.unique(out[inside].reshape(-1, 3), axis=0)) <= 16
    assert np.abs(out[inside].astype(int) - img[inside]).mean() > 5  # the face is really gone
    # and once pixelated, no face is found there any more
    assert faces.detect_faces(out, detector=detector) == []


def test_no_face_no_change(detector):
    coffee = skimage.data.coffee()
    texture = np.random.default_rng(1).integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    for img in (coffee, texture):
        assert faces.detect_faces(img, detector=detector) == []
        np.testing.assert_array_equal(faces.blur_faces(img, detector=detector), img)


def test_pil_photograph_is_blurred_like_its_array(detector):
    img = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((256, 256)))
    want = faces.blur_faces(img, detector=detector)
    assert (want != img).any()  # a face was found and pixelated
    out = faces.blur_faces(Image.fromarray(img), detector=detector)
    assert isinstance(out, Image.Image)
    np.testing.assert_array_equal(np.asarray(out), want)


def test_batch_matches_single(detector):
    small = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((256, 256)))
    imgs = [small, small[:, ::-1].copy()]  # equal sizes: one batch
    batch = faces.blur_faces_batch(imgs, detector=detector)
    for img, out in zip(imgs, batch):
        np.testing.assert_array_equal(out, faces.blur_faces(img, detector=detector))
        assert (out != img).any()  # the face was found at half size too


def test_bad_image_is_an_error():
    with pytest.raises(ValueError, match=r"uint8 array \(H, W, 3\)"):
        faces.pixelate_boxes(np.zeros((4, 4), np.float32), [])
