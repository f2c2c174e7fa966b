"""Face pixelation of reconstructions (docs/behaviour.md §5), offline.

Detected face boxes are enlarged by 10 % of the box's longer side on each
side, clipped to the image, and each is replaced by the box downsampled to
4x4 (bilinear: PIL's, antialiased) and upsampled back to its size (nearest
neighbour, pixel centres aligned): a 4x4 mosaic.

Detector: MTCNN from ``facenet-pytorch`` (its P/R/O-Net weights, 1.9 MB, ship
inside the package: nothing is downloaded; runs on the chosen torch device,
batched for equal-size images). Chosen over the alternatives because:

- the original's RetinaFace pulled TensorFlow and downloaded its weights;
- OpenCV's Haar cascades are gone from OpenCV 5 (they would pin
  ``opencv-python-headless<5``, a 50 MB wheel), find frontal faces only and
  fire on textures, which would pixelate non-faces and bias the metrics;
- MTCNN is a CNN cascade like RetinaFace (profile and small faces, a
  confidence per box) at no extra dependency beyond torch/torchvision.
  ``facenet-pytorch`` pins ``torch<2.3`` in its metadata, so it is installed
  with ``--no-deps``; its code runs on current torch.

A box is kept when MTCNN's confidence is at least ``min_confidence`` (0.9, the
default threshold of the ``retinaface`` package the original used).

Boxes are ``(x0, y0, x1, y1)`` in pixels, continuous coordinates: the pixel
region of an enlarged box is columns ``floor(x0 - m) .. ceil(x1 + m) - 1``,
clipped to the image (a partly covered pixel is pixelated too).
"""

from __future__ import annotations

import functools
import logging
import math
import typing as tp

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), pixels
ImageLike = Image.Image | np.ndarray

MARGIN = 0.1  # of the box's longer side, added on each side
BLOCKS = 4  # the mosaic is BLOCKS x BLOCKS
MIN_CONFIDENCE = 0.9


class FaceDetectorUnavailable(ImportError):
    """facenet-pytorch, which provides the detector and its weights, is not installed."""


class FaceDetector:
    """MTCNN, loaded once per device (:func:`load_face_detector`)."""

    def __init__(self, device: str = "cpu", min_face_size: int = 20):
        try:
            from facenet_pytorch import MTCNN
        except ImportError as e:
            raise FaceDetectorUnavailable(
                "face blurring needs facenet-pytorch (MTCNN, weights shipped in the package): "
                "`pip install --no-deps facenet-pytorch==2.6.0`"
            ) from e
        import torch

        self.device = torch.device(device)
        self.mtcnn = MTCNN(keep_all=True, select_largest=False, min_face_size=min_face_size, device=self.device).eval()

    def detect(self, images: tp.Sequence[ImageLike], min_confidence: float = MIN_CONFIDENCE) -> list[list[Box]]:
        """Face boxes of each image, most confident first; equal-size images run as one batch."""
        arrays = [_as_array(img) for img in images]
        result: list[list[Box]] = [[] for _ in arrays]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, a in enumerate(arrays):
            by_size.setdefault(a.shape[:2], []).append(i)
        for indices in by_size.values():
            batch = np.stack([arrays[i] for i in indices])  # (B, H, W, 3) uint8
            boxes, probs = self.mtcnn.detect(batch)
            for i, b, p in zip(indices, boxes, probs):
                if b is None:
                    continue
                result[i] = [tuple(float(v) for v in box[:4]) for box, prob in zip(b, p) if prob is not None and prob >= min_confidence]
        return result


@functools.lru_cache(maxsize=4)
def load_face_detector(device: str = "cpu") -> FaceDetector:
    return FaceDetector(str(device))


def detect_faces(img: ImageLike, *, detector: FaceDetector | None = None, min_confidence: float = MIN_CONFIDENCE) -> list[Box]:
    """Face boxes ``(x0, y0, x1, y1)`` of one image (PIL or uint8 (H, W, 3))."""
    detector = detector or load_face_detector("cpu")
    return detector.detect([img], min_confidence)[0]


def enlarge_box(box: Box, width: int, height: int, margin: float = MARGIN) -> tuple[int, int, int, int]:
    """Integer pixel region ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of a box grown by ``margin`` x its longer side on each side, clipped."""
    x0, y0, x1, y1 = box
    if not (x1 >= x0 and y1 >= y0):
        raise ValueError(f"box must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, got {box}")
    m = margin * max(x1 - x0, y1 - y0)
    return (
        min(max(math.floor(x0 - m), 0), width),
        min(max(math.floor(y0 - m), 0), height),
        min(max(math.ceil(x1 + m), 0), width),
        min(max(math.ceil(y1 + m), 0), height),
    )


def pixelate_boxes(img: ImageLike, boxes: tp.Iterable[Box], *, margin: float = MARGIN, blocks: int = BLOCKS) -> ImageLike:
    """A copy of ``img`` with each box (enlarged, clipped) replaced by its ``blocks`` x ``blocks`` mosaic.

    Boxes are applied in order (an overlap is pixelated again). Returns the input's type.
    """
    arr = _as_array(img).copy()
    height, width = arr.shape[:2]
    for box in boxes:
        x0, y0, x1, y1 = enlarge_box(box, width, height, margin)
        if x1 <= x0 or y1 <= y0:
            continue  # entirely outside the image
        small = np.asarray(Image.fromarray(arr[y0:y1, x0:x1]).resize((blocks, blocks), Image.Resampling.BILINEAR))
        arr[y0:y1, x0:x1] = small[_nearest(y1 - y0, blocks)][:, _nearest(x1 - x0, blocks)]
    return Image.fromarray(arr) if isinstance(img, Image.Image) else arr


def blur_faces(img: ImageLike, *, detector: FaceDetector | None = None, min_confidence: float = MIN_CONFIDENCE) -> ImageLike:
    """``img`` with every detected face pixelated (same type as the input)."""
    return pixelate_boxes(img, detect_faces(img, detector=detector, min_confidence=min_confidence))


def blur_faces_batch(
    images: tp.Sequence[ImageLike], *, detector: FaceDetector | None = None, min_confidence: float = MIN_CONFIDENCE
) -> list[ImageLike]:
    """:func:`blur_faces` over many images, detecting in batches."""
    detector = detector or load_face_detector("cpu")
    all_boxes = detector.detect(images, min_confidence)
    return [pixelate_boxes(img, boxes) for img, boxes in zip(images, all_boxes)]


def _nearest(size: int, blocks: int) -> np.ndarray:
    """(size,) source block of each output pixel, nearest neighbour with centres aligned:
    ``floor((i + 0.5) * blocks / size)``, in exact integer arithmetic (PIL's NEAREST
    accumulates the step in floating point and rounds some exact ties down)."""
    return (2 * np.arange(size) + 1) * blocks // (2 * size)


def _as_array(img: ImageLike) -> np.ndarray:
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"))
    if isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3:
        return img
    raise ValueError(
        f"expected a PIL image or a uint8 array (H, W, 3), got {type(img).__name__}"
        + (f" {img.dtype} {img.shape}" if isinstance(img, np.ndarray) else "")
    )
