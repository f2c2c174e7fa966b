import numpy as np
import pytest

from dynadiff.data.preprocess import TR, detrend_zscore, extract_windows, window_bounds


@pytest.mark.parametrize(
    "t, offset, duration, expected",
    [
        (0, 4.6, 8.0, (3, 9)),  # the published default: TRs t+3 .. t+8
        (100, 4.6, 8.0, (103, 109)),
        (10, 0.0, 8.0, (10, 16)),  # 8 s = 6 TRs
        (10, 2.0, 6.0, (12, 16)),  # round(1.5) == 2
        # quirk: 13.4 s is rounded to 13 s before dividing by the TR: end t+9, not t+10
        (0, 4.6, 8.8, (3, 9)),
    ],
)
def test_window_bounds_hand_computed(t, offset, duration, expected):
    assert window_bounds(t, offset, duration) == expected


def test_tr_value():
    assert TR == pytest.approx(1.3333333333)


def _reference_clean(x: np.ndarray) -> np.ndarray:
    """Independent float64 reference: least-squares line fit per voxel, then ddof=1 z-score."""
    n = x.shape[1]
    design = np.stack([np.ones(n), np.arange(n, dtype=np.float64)], axis=1)
    coef, *_ = np.linalg.lstsq(design, x.astype(np.float64).T, rcond=None)
    resid = x.T - design @ coef
    std = resid.std(axis=0, ddof=1)
    std[std < np.finfo(np.float64).eps] = 1.0
    return (resid / std).T


def test_detrend_zscore_matches_least_squares_reference():
    rng = np.random.default_rng(0)
    t = np.arange(225)
    x = 1000 + 3.0 * t[None] * rng.standard_normal((7, 1)) + 20 * rng.standard_normal((7, 225))
    out = detrend_zscore(x.astype(np.int16))
    assert out.dtype == np.float32 and out.shape == (7, 225)
    np.testing.assert_allclose(out, _reference_clean(x.astype(np.int16)), atol=2e-5)
    # z-scored with the sample std, trend removed
    np.testing.assert_allclose(out.std(axis=1, ddof=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out @ (t - t.mean()), 0.0, atol=1e-2)


def test_detrend_zscore_matches_nilearn():
    signal = pytest.importorskip("nilearn.signal")
    rng = np.random.default_rng(1)
    x = (500 + np.cumsum(rng.standard_normal((225, 9)), axis=0)).astype(np.float32)
    ref = signal.clean(x.astype(np.float64), detrend=True, standardize="zscore_sample", high_pass=None, t_r=TR)
    np.testing.assert_allclose(detrend_zscore(x.T), ref.T, atol=5e-5)


def test_constant_and_linear_voxels_become_exact_zeros():
    x = np.zeros((3, 225), dtype=np.int16)
    x[0] = 1234
    x[1] = -7
    x[2] = np.arange(225) * 2 + 100  # a pure linear trend leaves rounding noise only
    out = detrend_zscore(x)
    assert np.isfinite(out).all()
    assert (out[:2] == 0).all()
    assert np.abs(out[2]).max() < 1e-3  # not amplified to unit variance


def test_detrend_zscore_rejects_bad_shapes():
    with pytest.raises(ValueError, match="voxels, time"):
        detrend_zscore(np.zeros(10))
    with pytest.raises(ValueError, match="at least 2"):
        detrend_zscore(np.zeros((3, 1)))


def test_extract_windows_slices_and_refuses_overflow():
    run = np.arange(4 * 225, dtype=np.float32).reshape(4, 225)
    w = extract_windows(run, [0, 10, 216])
    assert w.shape == (3, 4, 6)
    np.testing.assert_array_equal(w[1], run[:, 13:19])
    np.testing.assert_array_equal(w[2], run[:, 219:225])
    with pytest.raises(ValueError, match="runs past the run's 225 volumes"):
        extract_windows(run, [217])
