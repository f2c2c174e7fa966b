"""Live decoding's inputs: causal preprocessing, volume files read only once complete, onset lines as they come.

Numbers are checked against independent computations: NumPy's polyfit and std on the volumes so far, the offline
preprocessing of the whole run, the pooled-variance formula by hand.
"""

from __future__ import annotations

import gzip
import logging

import nibabel as nib
import numpy as np
import pytest

from dynadiff.data.preprocess import detrend_zscore
from dynadiff.live.causal import GrowingSeries, Prior, causal_window
from dynadiff.live.watch import LiveInputError, OnsetStream, VolumeWatcher, design_onsets, read_nifti_volume

RNG = np.random.default_rng(0)


def _run(voxels: int = 40, volumes: int = 60) -> np.ndarray:
    t = np.arange(volumes)
    base = RNG.uniform(500, 1500, size=(voxels, 1))
    return (base + 0.3 * t * RNG.standard_normal((voxels, 1)) + 8 * RNG.standard_normal((voxels, volumes))).astype(np.float32)


def _reference(x: np.ndarray, start: int, stop: int, present: np.ndarray) -> np.ndarray:
    """Per voxel: np.polyfit on the present volumes of [0, stop), residual std (ddof=1) over them."""
    t = np.flatnonzero(present[:stop])
    out = np.empty((len(x), stop - start))
    for v in range(len(x)):
        slope, intercept = np.polyfit(t, x[v, t].astype(np.float64), 1)
        resid = x[v, t] - (intercept + slope * t)
        out[v] = (x[v, start:stop] - (intercept + slope * np.arange(start, stop))) / np.std(resid, ddof=1)
    return out


def test_causal_window_uses_only_the_volumes_so_far():
    x = _run()
    present = np.ones(x.shape[1], dtype=bool)
    got = causal_window(x, 20, 26)
    np.testing.assert_allclose(got, _reference(x, 20, 26, present), rtol=1e-5, atol=1e-5)
    # the future does not matter: anything after the window's end changes nothing
    future = x.copy()
    future[:, 26:] = RNG.uniform(-1e4, 1e4, size=future[:, 26:].shape)
    np.testing.assert_array_equal(causal_window(future, 20, 26), got)


def test_missing_volumes_are_left_out_of_the_fit():
    x = _run()
    present = np.ones(x.shape[1], dtype=bool)
    present[[4, 11, 12]] = False
    x_gap = x.copy()
    x_gap[:, ~present] = 1e6  # whatever a missing column holds must not count
    got = causal_window(x_gap, 30, 36, present=present)
    np.testing.assert_allclose(got, _reference(x, 30, 36, present), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"lacks volume\(s\) \[11, 12\]"):
        causal_window(x_gap, 10, 16, present=present)


def test_with_the_whole_run_causal_is_the_offline_preprocessing():
    x = _run(volumes=225)
    x[3] = 700.0  # a constant voxel: zeros, as offline
    np.testing.assert_allclose(causal_window(x, 0, 225), detrend_zscore(x), rtol=1e-4, atol=2e-5)
    assert not causal_window(x, 100, 106)[3].any()


def test_prior_pools_the_variances():
    x, earlier = _run(), _run()
    prior = Prior.from_run(earlier)
    t = np.arange(earlier.shape[1])
    var_prior = np.array([np.var(e - np.polyval(np.polyfit(t, e.astype(np.float64), 1), t), ddof=1) for e in earlier])
    np.testing.assert_allclose(prior.var, var_prior, rtol=1e-9)
    assert prior.weight == earlier.shape[1] - 1
    stop = 15
    plain = causal_window(x, 9, stop)
    pooled = causal_window(x, 9, stop, prior)
    t_now = np.arange(stop)
    var_now = np.array([np.var(v - np.polyval(np.polyfit(t_now, v[:stop].astype(np.float64), 1), t_now), ddof=1)
                        for v in x[:, :stop]])
    # same detrended numbers, another scale: plain * std_now / std_pooled
    expected = plain * np.sqrt(var_now / ((59 * var_prior + 14 * var_now) / (59 + 14)))[:, None]
    np.testing.assert_allclose(pooled, expected, rtol=1e-4)


def test_growing_series_matches_the_array():
    x = _run(volumes=300)  # past the initial capacity
    series = GrowingSeries(len(x), capacity=8)
    for i in [0, 1, 2, 4, 5, *range(6, 300)]:  # volume 3 never comes
        series.put(i, x[:, i])
    assert series.length == 300 and not series.has(3) and series.has(299)
    present = np.ones(300, dtype=bool)
    present[3] = False
    np.testing.assert_array_equal(series.window(290, 296), causal_window(x, 290, 296, present=present))


# ----------------------------------------------------------------------------- volume files


def _nifti_bytes(data: np.ndarray, gz: bool = False) -> bytes:
    raw = nib.Nifti1Image(data, np.eye(4)).to_bytes()
    return gzip.compress(raw) if gz else raw


@pytest.mark.parametrize("gz", [False, True])
def test_a_volume_is_read_only_once_its_file_is_complete(tmp_path, gz):
    mask = RNG.random((5, 6, 4)) > 0.5
    data = RNG.integers(0, 2000, size=(5, 6, 4)).astype(np.int16)
    raw = _nifti_bytes(data, gz)
    name = f"vol_0007.nii{'.gz' if gz else ''}"
    watcher = VolumeWatcher(tmp_path, mask, first_number=2)
    for cut in (10, len(raw) // 2, len(raw) - 1):  # a writer at work: a header piece, half, all but one byte
        (tmp_path / name).write_bytes(raw[:cut])
        assert watcher.poll() == []
    (tmp_path / name).write_bytes(raw)
    (vol,) = watcher.poll()
    assert vol.index == 5 and not vol.problem
    np.testing.assert_array_equal(vol.data, data[mask].astype(np.float32))
    assert watcher.poll() == []  # each volume once
    np.testing.assert_array_equal(read_nifti_volume(tmp_path / name), data)


def test_volume_problems_are_reported_not_raised(tmp_path):
    mask = np.ones((4, 4, 3), dtype=bool)
    watcher = VolumeWatcher(tmp_path, mask, incomplete_s=0.0)
    (tmp_path / "vol_0000.nii").write_bytes(_nifti_bytes(np.zeros((4, 4, 2), np.float32)))  # wrong shape
    (tmp_path / "vol_0001.nii.gz").write_bytes(b"this is no gzip file at all, but long enough")  # damaged
    (tmp_path / "vol_0002.nii").write_bytes(_nifti_bytes(np.ones((4, 4, 3), np.float32))[:400])  # stuck writer
    (tmp_path / ".vol_0003.nii").write_bytes(b"")  # a writer's hidden temporary file: not a volume
    (tmp_path / "notes.txt").write_text("not a volume")
    got = {v.index: v for v in watcher.poll()}
    assert sorted(got) == [0, 1]  # at once; the incomplete file not yet (its size may still change)
    got.update({v.index: v for v in watcher.poll()})  # the same size, incomplete_s later: said
    assert sorted(got) == [0, 1, 2]
    assert "has shape (4, 4, 2), the mask (4, 4, 3)" in got[0].problem and got[0].data is None
    assert "cannot be read" in got[1].problem
    assert "still incomplete" in got[2].problem and "400 of its 544 bytes" in got[2].problem  # 352 + 48 float32 voxels
    assert got[2].incomplete and not got[0].incomplete and not got[1].incomplete  # waited for, the others left out
    assert watcher.poll() == []  # said once
    (tmp_path / "vol_0002.nii").write_bytes(_nifti_bytes(np.ones((4, 4, 3), np.float32)))
    (vol,) = watcher.poll()  # still waited for: read once complete
    assert vol.index == 2 and vol.data is not None and not vol.problem


# ----------------------------------------------------------------------------- onsets


def test_onset_stream_reads_lines_as_they_come(tmp_path):
    path = tmp_path / "onsets.txt"
    stream = OnsetStream(path)
    assert stream.poll() == []  # no file yet
    path.write_text("# volume nsd_id\n3 17\n9")  # the last line is still being written
    assert [(o.volume, o.nsd_id) for o in stream.poll()] == [(3, 17)]
    with open(path, "a") as f:
        f.write(" 5\nten 4\n8 2\n15 -\n20 0 1\n")
    assert [(o.volume, o.nsd_id) for o in stream.poll()] == [(9, 5), (15, None)]
    assert len(stream.problems) == 3
    assert "'ten 4'" in stream.problems[0] and "not after the previous one (9)" in stream.problems[1]
    with open(path, "a") as f:
        f.write("22 8\nend\n30 1\n")
    assert [(o.volume, o.nsd_id) for o in stream.poll()] == [(22, 8)] and stream.ended
    assert stream.poll() == []


def test_design_onsets(tmp_path):
    path = tmp_path / "design.tsv"
    path.write_text("0\n0\n12\n0\n7\n")
    assert [(o.volume, o.nsd_id) for o in design_onsets(path)] == [(2, 12), (4, 7)]
    path.write_text("0\n1.5\n")
    with pytest.raises(LiveInputError, match="one non-negative integer per line"):
        design_onsets(path)
    with pytest.raises(LiveInputError, match="cannot read the design"):
        design_onsets(tmp_path / "missing.tsv")


logging.getLogger("dynadiff").setLevel(logging.INFO)
