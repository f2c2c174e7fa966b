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


# ±1 rows of zero mean, pairwise orthogonal: standardised, their entries are ±1/2 (D = 4), so every r below is
# computed exactly (products ±1/4) and equal r's are equal bit for bit.
U1, U2, U3 = np.array([1.0, 1, -1, -1]), np.array([1.0, -1, 1, -1]), np.array([1.0, -1, -1, 1])


@pytest.mark.parametrize("level", [5.0, 0.7], ids=["exact-mean", "inexact-mean"])
def test_constant_reconstruction_fails_every_comparison(level, caplog):
    """A constant reconstruction has NaN correlations: every comparison involving it fails (not r = 0).

    Features repeat the 4-vectors 3 times (D = 12). The mean of twelve 0.7 is not exactly 0.7 in float64: a
    row centred by its mean alone keeps that rounding error and correlates at 0 instead of NaN."""
    gts = np.stack([np.tile(u, 3) for u in (U1, U2, U3)])
    recs = np.stack([np.full(12, level), np.tile(U2, 3), np.tile(2 * U3 - U1 - U2, 3)])
    # r (rows: reconstructions, columns: ground truths), from the coefficients on the orthogonal U's:
    #   rec 0: NaN    NaN    NaN
    #   rec 1: 0      1      0
    #   rec 2: -1/√6  -1/√6  2/√6
    r = pearson_matrix(recs, gts).numpy()
    assert np.isnan(r[0]).all()
    np.testing.assert_allclose(r[1:], [[0, 1, 0], np.array([-1, -1, 2]) / np.sqrt(6)], atol=1e-12)
    # per ground truth j: the other reconstructions i with r[i, j] < r[j, j]
    #   gt 0: r[0, 0] is NaN -> both comparisons fail                      -> 0
    #   gt 1: rec 0 NaN fails; rec 2: -1/√6 < 1 wins                        -> 1/2
    #   gt 2: rec 0 NaN fails; rec 1: 0 < 2/√6 wins                         -> 1/2
    # (NaN read as r = 0 would give [1/2, 1, 1]: rec 2's -1/√6 < 0 and 0 < 1, 0 < 2/√6.)
    with caplog.at_level("WARNING", logger="dynadiff.metrics.identification"):
        per_gt = two_way_identification(recs, gts, "per_ground_truth")
    np.testing.assert_array_equal(per_gt, [0.0, 0.5, 0.5])
    assert "3 NaN correlations (constant features), counted as failures" in caplog.text
    # per reconstruction i: the other ground truths j with r[i, j] < r[i, i]
    #   rec 0: NaN -> 0; rec 1: 0 < 1 twice -> 1; rec 2: -1/√6 < 2/√6 twice -> 1
    np.testing.assert_array_equal(two_way_identification(recs, gts, "per_reconstruction"), [0.0, 1.0, 1.0])
    # a constant ground truth, scored per reconstruction (the lists swapped): the same failures
    np.testing.assert_array_equal(two_way_identification(gts, recs, "per_reconstruction"), [0.0, 0.5, 0.5])


def test_exact_ties_count_as_failures():
    """r[i, j] == r[j, j] is not a win (the original's strict ``<``)."""
    gts = np.stack([U1, U2, U3])
    recs = np.stack([U1, U1, U3])  # reconstruction 1 duplicates reconstruction 0
    # r: rec 0: [1, 0, 0]; rec 1: [1, 0, 0]; rec 2: [0, 0, 1] (exact: entries ±1/2, products ±1/4)
    np.testing.assert_array_equal(pearson_matrix(recs, gts).numpy(), [[1, 0, 0], [1, 0, 0], [0, 0, 1]])
    # per ground truth:
    #   gt 0: rec 1 ties (1 vs 1) fails; rec 2: 0 < 1 wins          -> 1/2
    #   gt 1: r[1, 1] = 0; rec 0 ties (0), rec 2 ties (0)           -> 0
    #   gt 2: rec 0: 0 < 1 wins; rec 1: 0 < 1 wins                  -> 1
    np.testing.assert_array_equal(two_way_identification(recs, gts, "per_ground_truth"), [0.5, 0.0, 1.0])
    # per reconstruction:
    #   rec 0: 0 < 1 twice -> 1; rec 1: r[1, 1] = 0: 1 < 0 fails, 0 < 0 ties -> 0; rec 2: 0 < 1 twice -> 1
    np.testing.assert_array_equal(two_way_identification(recs, gts, "per_reconstruction"), [1.0, 0.0, 1.0])
