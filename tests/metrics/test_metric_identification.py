"""Two-way identification against a brute-force double loop, both directions."""

import numpy as np
import pytest
import torch

from dynadiff.metrics.identification import pearson_matrix, two_way_identification


def brute_force(recs: np.ndarray, gts: np.ndarray, direction: str) -> np.ndarray:
    n = len(recs)
    r = np.array([[np.corrcoef(recs[i].ravel(), gts[j].ravel())[0, 1] for j in range(n)] for i in range(n)])
    out = np.zeros(n)
    for k in range(n):
        wins = 0
        for other in range(n):
            if other == k:
                continue
            if direction == "per_ground_truth":  # ground truth k: other reconstructions vs reconstruction k
                wins += r[other, k] < r[k, k]
            else:  # reconstruction k: other ground truths vs ground truth k
                wins += r[k, other] < r[k, k]
        out[k] = wins / (n - 1)
    return out


def _basis(n: int, d: int, seed: int = 0) -> np.ndarray:
    """n orthonormal vectors of R^d, each with zero mean (so dot products are Pearson r)."""
    rng = np.random.default_rng(seed)
    m = rng.normal(size=(d, n))
    m -= m.mean(axis=0)
    q, _ = np.linalg.qr(m)
    return q.T


def test_pearson_matrix_matches_corrcoef():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3, 7)), rng.normal(size=(4, 3, 7))
    want = np.corrcoef(a.reshape(5, -1), b.reshape(4, -1))[:5, 5:]
    np.testing.assert_allclose(pearson_matrix(a, b).numpy(), want, rtol=1e-10)


@pytest.mark.parametrize("direction", ["per_ground_truth", "per_reconstruction"])
def test_matches_brute_force(direction):
    rng = np.random.default_rng(1)
    gts = rng.normal(size=(9, 4, 6))
    recs = gts + rng.normal(scale=4.0, size=gts.shape)  # informative but noisy
    got = two_way_identification(torch.from_numpy(recs).float(), torch.from_numpy(gts).float(), direction)
    want = brute_force(recs.astype(np.float32), gts.astype(np.float32), direction)
    np.testing.assert_array_equal(got, want)
    assert 0.5 < got.mean() < 1.0  # a non-trivial case


def test_directions_differ_on_a_constructed_case():
    # ground truth j = e_j; reconstruction i = sum_k M[i, k] e_k, so r[i, j] = M[i, j] / |M[i]|.
    e = _basis(3, 10)
    m = np.array([[1.0, 1.2, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    gts, recs = e, m @ e
    # reconstruction 0 is closer to ground truth 1 than to its own: it fails one of its two
    # comparisons when reconstructions are scored; ground truth 1 still prefers reconstruction 1.
    per_gt = two_way_identification(recs, gts, "per_ground_truth")
    per_rec = two_way_identification(recs, gts, "per_reconstruction")
    np.testing.assert_array_equal(per_gt, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(per_rec, [0.5, 1.0, 1.0])
    np.testing.assert_array_equal(per_gt, brute_force(recs, gts, "per_ground_truth"))
    np.testing.assert_array_equal(per_rec, brute_force(recs, gts, "per_reconstruction"))
    # the default is the original's direction
    np.testing.assert_array_equal(two_way_identification(recs, gts), per_gt)
    # and the two directions are each other's transpose: swapping the lists swaps them
    np.testing.assert_array_equal(two_way_identification(gts, recs, "per_reconstruction"), per_gt)


def test_identical_features_identify_perfectly():
    feats = np.random.default_rng(2).normal(size=(6, 11))
    for direction in ("per_ground_truth", "per_reconstruction"):
        np.testing.assert_array_equal(two_way_identification(feats, feats, direction), 1.0)


def test_shuffled_pairs_are_at_chance():
    rng = np.random.default_rng(3)
    gts = rng.normal(size=(300, 40))
    recs = gts + rng.normal(scale=0.5, size=gts.shape)
    assert two_way_identification(recs, gts).mean() > 0.99
    shuffled = recs[rng.permutation(300)]
    for direction in ("per_ground_truth", "per_reconstruction"):
        assert abs(two_way_identification(shuffled, gts, direction).mean() - 0.5) < 0.05


def test_bad_inputs_are_errors():
    feats = np.zeros((3, 4)) + np.arange(4)
    with pytest.raises(ValueError, match="at least 2"):
        two_way_identification(feats[:1], feats[:1])
    with pytest.raises(ValueError, match="must pair up"):
        two_way_identification(feats, feats[:2])
    with pytest.raises(ValueError, match="unknown identification direction 'mindeye'"):
        two_way_identification(feats, feats, "mindeye")
    with pytest.raises(ValueError, match="feature sizes differ"):
        two_way_identification(feats, feats[:, :3])
