"""mIoU of segmentations: the arithmetic only (docs/behaviour.md §5; segmenting is :mod:`dynadiff.miou`).

Each image pair is segmented by the same model: the ground truth's label map is
the label, the reconstruction's the prediction. Per image, the IoU of each
class is ``|pred == c and label == c| / |pred == c or label == c|``, averaged
over the classes present in the label; the score is the mean over images.

Labels are class indices ``0 .. n_classes - 1`` in ``uint8`` maps. The original
counts them with ``histc`` over 172 bins of the labels shifted by one (COCO-Stuff's
171 classes fit), so ``n_classes`` is 172 for the paper's protocol. ``255`` means
"no class" (mmsegmentation's ignore index; the original's arithmetic crashes on it):

- where the *label* is 255, the pixel is left out of every count (nothing to
  score it against);
- where only the *prediction* is 255, the pixel counts in the union of the
  label's class and in no intersection: a miss.

A label map with no class at all (every pixel 255) has no score: NaN, left out
of the mean (:func:`mean_iou` says how many). Any other value ``>= n_classes`` is
an error, not silently dropped.
"""

from __future__ import annotations

import typing as tp

import numpy as np

IGNORE = 255  # "no class" in a label map
PAPER_BINS = 172  # the original's histc bins: COCO-Stuff's 171 classes, labels shifted by one


def _check(name: str, a: np.ndarray, n_classes: int) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        raise ValueError(f"{name}: label maps are uint8 class indices, got dtype {a.dtype}")
    bad = a[(a >= n_classes) & (a != IGNORE)]
    if bad.size:
        raise ValueError(f"{name}: class {int(bad.max())} found, but there are {n_classes} classes "
                         f"(0 .. {n_classes - 1}; {IGNORE} = no class)")
    return a


def class_counts(pred: np.ndarray, label: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection, union, label area): three (n_classes,) int64 pixel counts of one (H, W) pair."""
    if n_classes < 1 or n_classes > IGNORE:
        raise ValueError(f"n_classes must be 1 .. {IGNORE} (8-bit maps, {IGNORE} = no class), got {n_classes}")
    pred, label = _check("prediction", pred, n_classes), _check("label", label, n_classes)
    if pred.shape != label.shape:
        raise ValueError(f"prediction {pred.shape} and label {label.shape} differ in size")
    scored = label != IGNORE
    pred, label = pred[scored].astype(np.int64), label[scored].astype(np.int64)
    area_label = np.bincount(label, minlength=n_classes)
    area_pred = np.bincount(pred[pred != IGNORE], minlength=n_classes)[:n_classes]
    intersection = np.bincount(label[pred == label], minlength=n_classes)
    return intersection, area_pred + area_label - intersection, area_label


def image_iou(pred: np.ndarray, label: np.ndarray, n_classes: int = PAPER_BINS) -> float:
    """Mean IoU over the classes present in ``label`` (NaN when it has none)."""
    intersection, union, area_label = class_counts(pred, label, n_classes)
    present = area_label > 0
    if not present.any():
        return float("nan")
    return float(np.mean(intersection[present] / union[present]))


def mean_iou(preds: tp.Sequence[np.ndarray], labels: tp.Sequence[np.ndarray],
             n_classes: int = PAPER_BINS) -> dict:
    """``{"mean": mIoU over the images that have a score, "per_image": [...], "unscored": n}``."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    per_image = [image_iou(p, lab, n_classes) for p, lab in zip(preds, labels)]
    scored = [v for v in per_image if not np.isnan(v)]
    return {"mean": float(np.mean(scored)) if scored else float("nan"), "per_image": per_image,
            "unscored": len(per_image) - len(scored)}
