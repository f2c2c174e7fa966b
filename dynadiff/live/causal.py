"""Preprocessing that uses no volume from the future, for decoding while the run is acquired.

Offline decoding (:func:`dynadiff.data.preprocess.detrend_zscore`) removes each voxel's linear trend fitted on the
*whole* run, then divides by the residual's standard deviation over the whole run: both need volumes that, live,
have not been acquired yet. Here a trial's window, whose last volume is ``end - 1``, is normalised with the
statistics of the volumes acquired so far, ``[0, end)``:

- the trend: each voxel's least-squares line ``a + b t`` over the volumes so far (volume indices ``t``, missing
  volumes left out of the fit), evaluated at the window's volumes and subtracted;
- the scale: the standard deviation (ddof=1, as offline) of the residual of that fit over the volumes so far; a
  voxel whose standard deviation is below float64's epsilon is divided by 1, as offline;
- optionally seeded by an earlier run of the subject (:class:`Prior`): its residual variance per voxel, pooled with
  the current run's as ``(w var_prior + (n - 1) var_now) / (w + n - 1)`` where ``w`` is the prior's weight in
  volumes (default its own ``n - 1``). Early in a run, with few volumes, the scale is then mostly the earlier
  run's; the trend is always the current run's (the baseline of another run differs).

With the whole run (``end`` = its length, no prior), the result is the offline preprocessing, to float rounding.
The same function serves live decoding and the offline decoding that checks it, so both give the same windows
bit for bit.

A trial whose onset is in seconds (a BIDS events.tsv, any TR) samples the window at ``onset + times`` seconds
(:func:`dynadiff.data.preprocess.window_times`) on the run's grid, volume ``k`` acquired at ``k * tr``
(:func:`sampled_window`): the causal window of the volumes covering those times, from the one at or before the
first to the one at or after the last (:func:`covering_volumes`), then linear interpolation at the fractional
positions (:func:`dynadiff.data.preprocess.sample_windows`). On NSD's grid (TR 4/3 s, onsets on it) the positions
are whole and the window is the one of the volume onsets, bit for bit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from dynadiff.data.preprocess import sample_positions, sample_windows

MIN_VOLUMES = 3  # a line and a residual variance need at least 3 volumes


@dataclasses.dataclass(frozen=True)
class Prior:
    """An earlier run's residual variance per voxel (after its own linear detrend), and its weight in volumes."""

    var: np.ndarray  # (voxels,) float64
    weight: float

    @classmethod
    def from_run(cls, run: np.ndarray, weight: float | None = None) -> "Prior":
        """From a whole earlier run, (voxels, time): its detrended variance (ddof=1); weight: its ``time - 1``."""
        run = np.asarray(run, dtype=np.float64)
        if run.ndim != 2 or run.shape[1] < MIN_VOLUMES:
            raise ValueError(f"a prior run must be (voxels, time) with time >= {MIN_VOLUMES}, got shape {run.shape}")
        _, _, var, n = _fit(run, np.arange(run.shape[1], dtype=np.float64))
        return cls(var=var, weight=float(n - 1 if weight is None else weight))

    def save(self, path: Path) -> None:
        np.savez(path, var=self.var, weight=self.weight)

    @classmethod
    def load(cls, path: Path) -> "Prior":
        with np.load(path) as f:
            return cls(var=np.asarray(f["var"], dtype=np.float64), weight=float(f["weight"]))


def _fit(x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Per voxel: intercept, slope of the least-squares line over the columns ``t`` of ``x`` (float64), the
    residual variance (ddof=1) and the number of volumes."""
    n = x.shape[1]
    t_mean = t.mean()
    tc = t - t_mean
    mean = x.mean(axis=1)
    xc = x - mean[:, None]
    denom = tc @ tc
    slope = (xc @ tc) / denom if denom > 0 else np.zeros(len(x))
    resid = xc - np.outer(slope, tc)
    var = (resid * resid).sum(axis=1) / (n - 1)
    return mean - slope * t_mean, slope, var, n


def causal_window(series: np.ndarray, start: int, end: int, prior: Prior | None = None,
                  present: np.ndarray | None = None) -> np.ndarray:
    """(voxels, end - start) float32: the window ``[start, end)`` of ``series`` normalised with the statistics of
    its volumes ``[0, end)`` only (see the module's docstring).

    ``series``: (voxels, >= end) raw (masked) volumes, any real dtype. ``present``: (>= end,) booleans, False for a
    missing volume, left out of the fit (default: all present). The window's own volumes must all be present.
    """
    if series.ndim != 2:
        raise ValueError(f"expected a (voxels, time) array, got shape {series.shape}")
    if not 0 <= start < end <= series.shape[1]:
        raise ValueError(f"window [{start}, {end}) is not within the {series.shape[1]} volumes so far")
    so_far = series[:, :end]
    present = np.ones(end, dtype=bool) if present is None else np.asarray(present, dtype=bool)[:end]
    if not present[start:end].all():
        missing = [start + int(i) for i in np.flatnonzero(~present[start:end])]
        raise ValueError(f"window [{start}, {end}) lacks volume(s) {missing}")
    t = np.flatnonzero(present).astype(np.float64)
    if len(t) < MIN_VOLUMES:
        raise ValueError(f"need at least {MIN_VOLUMES} volumes before the end of the window, got {len(t)}")
    intercept, slope, var, n = _fit(np.asarray(so_far[:, present], dtype=np.float64), t)
    if prior is not None:
        if prior.var.shape != var.shape:
            raise ValueError(f"the prior has {prior.var.shape[0]} voxels, the run {var.shape[0]}")
        var = (prior.weight * prior.var + (n - 1) * var) / (prior.weight + n - 1)
    std = np.sqrt(var)
    std[std < np.finfo(np.float64).eps] = 1.0
    ts = np.arange(start, end, dtype=np.float64)
    window = np.asarray(series[:, start:end], dtype=np.float64)
    out = (window - intercept[:, None] - np.outer(slope, ts)) / std[:, None]
    return out.astype(np.float32)


def covering_volumes(onset_s: float, times_s: np.ndarray, tr: float) -> tuple[int, int]:
    """``[start, stop)``: the volumes that the samples at ``onset_s + times_s`` seconds lie between, volume ``k``
    acquired at ``k * tr`` seconds (``start`` may be negative: a window that starts before the run). The trial is
    ready once volume ``stop - 1``, the one at or after its last sample, has arrived."""
    pos = sample_positions([onset_s], times_s, tr)[0]
    return int(np.floor(pos.min())), int(np.ceil(pos.max())) + 1


def sampled_window(series: np.ndarray, onset_s: float, times_s: np.ndarray, tr: float, prior: Prior | None = None,
                   present: np.ndarray | None = None) -> np.ndarray:
    """(voxels, len(times_s)) float32: the window of an onset in seconds, sampled at ``onset_s + times_s`` on the
    grid of ``series`` (volume ``k`` at ``k * tr`` s): :func:`causal_window` over :func:`covering_volumes`, then
    linearly interpolated there (:func:`~dynadiff.data.preprocess.sample_windows`; a sample on a volume is that
    volume, exactly). ``series``, ``prior``, ``present``: as :func:`causal_window`'s."""
    start, stop = covering_volumes(onset_s, times_s, tr)
    window = causal_window(series, start, stop, prior, present)
    # the same times, counted from volume ``start``: positions on the causal window's own grid
    return sample_windows(window, [onset_s - start * tr], times_s, tr)[0]


class GrowingSeries:
    """The masked volumes of a run as they arrive: (voxels, volumes so far) and which of them are present."""

    def __init__(self, n_voxels: int, capacity: int = 256) -> None:
        self._data = np.zeros((n_voxels, capacity), dtype=np.float32)
        self._present = np.zeros(capacity, dtype=bool)
        self.length = 0  # one past the highest volume index received

    def put(self, index: int, volume: np.ndarray) -> None:
        if volume.shape != (self._data.shape[0],):
            raise ValueError(f"expected {self._data.shape[0]} masked voxels, got shape {volume.shape}")
        while index >= self._data.shape[1]:
            size = 2 * self._data.shape[1]
            self._data = np.concatenate([self._data, np.zeros_like(self._data)], axis=1)
            self._present = np.concatenate([self._present, np.zeros(size - len(self._present), dtype=bool)])
        self._data[:, index] = volume
        self._present[index] = True
        self.length = max(self.length, index + 1)

    def has(self, index: int) -> bool:
        return 0 <= index < self.length and bool(self._present[index])

    def window(self, start: int, end: int, prior: Prior | None = None) -> np.ndarray:
        """:func:`causal_window` of the volumes so far."""
        return causal_window(self._data[:, : self.length], start, end, prior, self._present[: self.length])

    def sampled(self, onset_s: float, times_s: np.ndarray, tr: float, prior: Prior | None = None) -> np.ndarray:
        """:func:`sampled_window` of the volumes so far."""
        return sampled_window(self._data[:, : self.length], onset_s, times_s, tr, prior, self._present[: self.length])
