"""mIoU arithmetic (dynadiff.metrics.miou) against hand-computed values and a per-class boolean-mask NumPy loop."""

import numpy as np
import pytest

from dynadiff.metrics.miou import IGNORE, class_counts, image_iou, mean_iou


def reference_iou(pred, label, n_classes):
    """Independent: one boolean mask per class, pixels whose label is 255 left out."""
    keep = label != 255
    ious = []
    for c in range(n_classes):
        lab_c, pred_c = (label == c) & keep, (pred == c) & keep
        if lab_c.sum() == 0:
            continue
        ious.append((lab_c & pred_c).sum() / (lab_c | pred_c).sum())
    return float(np.mean(ious)) if ious else float("nan")


def test_hand_computed_pair():
    label = np.array([[0, 0, 1],
                      [0, 2, 1]], np.uint8)
    pred = np.array([[0, 1, 1],
                     [0, 2, 3]], np.uint8)
    # class 0: label 3 px, pred 2 px, both 2 -> 2/3; class 1: label 2, pred 2, both 1 -> 1/3; class 2: 1/1
    # class 3 is only predicted: not in the label, not averaged
    assert image_iou(pred, label, 5) == pytest.approx((2 / 3 + 1 / 3 + 1) / 3)
    inter, union, area = class_counts(pred, label, 5)
    np.testing.assert_array_equal(inter, [2, 1, 1, 0, 0])
    np.testing.assert_array_equal(union, [3, 3, 1, 1, 0])
    np.testing.assert_array_equal(area, [3, 2, 1, 0, 0])


def test_ignore_label_in_label_and_prediction():
    label = np.array([[0, 255, 255, 1]], np.uint8)
    pred = np.array([[0, 0, 1, 255]], np.uint8)
    # the two pixels labelled 255 are left out; the last pixel (label 1, prediction 255) is a miss for class 1
    assert image_iou(pred, label, 172) == pytest.approx((1.0 + 0.0) / 2)
    assert np.isnan(image_iou(pred, np.full_like(label, IGNORE), 172))


def test_one_class_everywhere():
    label = np.full((7, 9), 4, np.uint8)
    assert image_iou(label, label, 172) == 1.0
    pred = label.copy()
    pred[:, :3] = 5  # a third of the image wrong: IoU of class 4 = 42/63
    assert image_iou(pred, label, 172) == pytest.approx(42 / 63)


@pytest.mark.parametrize("n_classes", [2, 13, 172])
def test_random_maps_equal_the_reference(n_classes):
    rng = np.random.default_rng(n_classes)
    preds, labels = [], []
    for k in range(12):
        shape = (7 + k, 9)
        # labels use a subset of the classes (absent classes must not be averaged), predictions all of them
        label = rng.integers(0, max(1, n_classes // 2), size=shape).astype(np.uint8)
        pred = rng.integers(0, n_classes, size=shape).astype(np.uint8)
        agree = rng.random(shape) < 0.5  # so that intersections are not all empty
        pred[agree] = label[agree]
        label[rng.random(shape) < 0.05] = IGNORE
        pred[rng.random(shape) < 0.05] = IGNORE
        preds.append(pred)
        labels.append(label)
    preds.append(np.zeros((5, 5), np.uint8))
    labels.append(np.full((5, 5), IGNORE, np.uint8))  # nothing to score: left out of the mean
    out = mean_iou(preds, labels, n_classes)
    expected = [reference_iou(p, lab, n_classes) for p, lab in zip(preds, labels)]
    np.testing.assert_allclose(out["per_image"], expected, rtol=1e-12)
    assert out["unscored"] == 1
    assert out["mean"] == pytest.approx(np.nanmean(expected), rel=1e-12)


def test_bad_maps_are_errors():
    ok = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match=r"class 172 found, but there are 172 classes"):
        image_iou(np.full((4, 4), 172, np.uint8), ok, 172)
    with pytest.raises(ValueError, match="dtype int64"):
        image_iou(ok.astype(np.int64), ok, 172)
    with pytest.raises(ValueError, match="differ in size"):
        image_iou(ok, np.zeros((4, 5), np.uint8), 172)
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        mean_iou([ok, ok], [ok], 172)
