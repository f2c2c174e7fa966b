"""Correlation and cosine distances against SciPy."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import correlation, cosine

from dynadiff.metrics.distances import correlation_distance
from dynadiff.metrics.dreamsim import cosine_distance


def test_correlation_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3, 7)), rng.normal(size=(5, 3, 7))
    b[2] = 0.3 * a[2] + b[2]
    got = correlation_distance(a, b)
    want = [correlation(x.ravel(), y.ravel()) for x, y in zip(a, b)]
    assert got.shape == (5,)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_identical_features_have_zero_distance():
    feats = torch.rand(4, 2, 9)
    np.testing.assert_allclose(correlation_distance(feats, feats), 0.0, atol=1e-12)
    np.testing.assert_allclose(cosine_distance(feats.flatten(1), feats.flatten(1)), 0.0, atol=1e-12)


def test_shuffled_pairs_are_at_chance():
    rng = np.random.default_rng(1)
    gts = rng.normal(size=(400, 30))
    recs = gts + rng.normal(scale=0.5, size=gts.shape)
    assert correlation_distance(recs, gts).mean() < 0.2
    assert abs(correlation_distance(recs[rng.permutation(400)], gts).mean() - 1.0) < 0.05


def test_cosine_distance_matches_scipy():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    got = cosine_distance(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(got, [cosine(x, y) for x, y in zip(a, b)], rtol=1e-10)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        correlation_distance(np.zeros((3, 4)), np.zeros((2, 4)))
