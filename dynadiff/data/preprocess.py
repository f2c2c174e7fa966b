"""Pure signal processing on fMRI arrays: no I/O, no globals.

Shapes: ``(voxels, time)`` for a masked run, ``(voxels, n_trs)`` for a window.
Times are in seconds, indices are volume (TR) indices.
"""

from __future__ import annotations

import math

import numpy as np

TR = 4.0 / 3.0  # NSD 1.8 mm time series, seconds per volume
N_VOLUMES_USED = 225  # 226 volumes per run; the design TSV has one row fewer


def window_bounds(t: int, offset: float = 4.6, duration: float = 8.0, tr: float = TR) -> tuple[int, int]:
    """Volume range ``[start, end)`` of the fMRI window for an event at volume ``t``.

    Reproduces the original exactly, quirk included: the end is computed by
    rounding ``offset + duration`` in seconds *before* dividing by the TR
    (``int(round(4.6 + 8.0) / TR) == 9``). Python's ``round`` (half to even).
    """
    start = t + round(offset / tr)
    end = t + int(round(offset + duration) / tr)
    if end <= start:
        raise ValueError(f"empty window for offset={offset} s, duration={duration} s (TR {tr:.4f} s)")
    return start, end


def detrend_zscore(x: np.ndarray) -> np.ndarray:
    """Remove each voxel's least-squares linear trend, then z-score it over time.

    ``x``: (voxels, time), any real dtype; returns float32 of the same shape.
    Standard deviation with ddof=1 (``zscore_sample``); a voxel whose standard
    deviation is below float64 machine epsilon is divided by 1, so a constant
    voxel becomes exact zeros. Equivalent to
    ``nilearn.signal.clean(x.T, detrend=True, standardize="zscore_sample").T``.
    Works in float32 for the (voxels, time) array; reductions accumulate in
    float64.
    """
    if x.ndim != 2:
        raise ValueError(f"expected a (voxels, time) array, got shape {x.shape}")
    n_time = x.shape[1]
    if n_time < 2:
        raise ValueError(f"need at least 2 time points to z-score, got {n_time}")
    out = np.asarray(x, dtype=np.float32).copy()
    # Mean first, then the centred ramp: a constant voxel stays exactly zero.
    out -= out.mean(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    ramp = np.arange(n_time, dtype=np.float64)
    ramp -= ramp.mean()
    slope = _chunked_dot(out, ramp) / (ramp @ ramp)  # (voxels,)
    out -= np.outer(slope, ramp).astype(np.float32)
    std = out.std(axis=1, ddof=1, keepdims=True, dtype=np.float64)
    std[std < np.finfo(np.float64).eps] = 1.0
    out /= std.astype(np.float32)
    return out


def _chunked_dot(x: np.ndarray, v: np.ndarray, rows: int = 4096) -> np.ndarray:
    """``x @ v`` in float64 without a float64 copy of all of ``x``."""
    return np.concatenate([x[i : i + rows].astype(np.float64) @ v for i in range(0, len(x), rows)])


def extract_windows(run: np.ndarray, volumes, offset: float = 4.6, duration: float = 8.0, tr: float = TR) -> np.ndarray:
    """Windows of a preprocessed run for events at the given volume indices.

    ``run``: (voxels, time); returns (n_events, voxels, n_trs) float32.
    A window that would run past the end of the run is an error, never padded.
    """
    n_time = run.shape[1]
    out = []
    for t in volumes:
        start, end = window_bounds(int(t), offset, duration, tr)
        if start < 0 or end > n_time:
            raise ValueError(
                f"window [{start}, {end}) of the event at volume {t} runs past the run's {n_time} volumes "
                f"(offset={offset} s, duration={duration} s)"
            )
        out.append(run[:, start:end])
    if not out:
        n_trs = window_bounds(0, offset, duration, tr)
        return np.zeros((0, run.shape[0], n_trs[1] - n_trs[0]), dtype=np.float32)
    return np.stack(out).astype(np.float32, copy=False)


def window_seconds(start: int, stop: int, tr: float = TR) -> tuple[float, float]:
    """``(offset, duration)`` in seconds whose :func:`window_bounds` are the volumes ``[t + start, t + stop)``.

    The inverse of the original's rounding: ``offset = start * TR`` (a multiple of the TR), and ``duration`` chosen so
    that ``offset + duration`` is a whole number of seconds ``R`` with ``int(R / TR) == stop`` (one exists for any
    ``stop``: ``int`` truncates, so R may be any number in an interval of one TR, longer than 1 s).
    The published window, volumes 3 to 8, comes back as (4.0, 8.0); the original wrote (4.6, 8.0), the same volumes.
    """
    if stop <= start:
        raise ValueError(f"a window needs stop > start, got [{start}, {stop})")
    offset = round(start * tr, 10)
    # int() truncates towards zero: for a window ending before the onset, R lies in ((stop - 1) * TR, stop * TR]
    candidates = [r for r in range(math.floor(stop * tr) - 2, math.ceil(stop * tr) + 3) if int(r / tr) == stop]
    whole = min(candidates, key=lambda r: (abs(r - stop * tr), r)) if candidates else stop * tr
    duration = round(whole - offset, 10)
    if window_bounds(0, offset, duration, tr) != (start, stop):  # cannot happen; said plainly if it does
        raise ValueError(f"no (offset, duration) gives the volumes [{start}, {stop}) with TR {tr}")
    return offset, duration


def window_times(offset: float = 4.6, duration: float = 8.0) -> np.ndarray:
    """Seconds after an event's onset at which its window samples the BOLD signal.

    The window is defined on NSD's grid, the one the model was trained on: the volumes
    :func:`window_bounds` gives for an event at volume 0, at TR 4/3 s. The published window
    (4.6 s, 8.0 s) samples 4, 5.33, ..., 10.67 s after the onset. On a dataset with another TR
    these times are read from its volumes by :func:`sample_windows`, so the same configuration
    means the same seconds on any scanner.
    """
    start, end = window_bounds(0, offset, duration, TR)
    return np.arange(start, end, dtype=np.float64) * TR


# A sample whose position on the volume grid is within this many volumes of a volume is that volume: onsets
# written in decimal (1.3333333 s) still hit the grid exactly, so a TR-4/3 dataset gives NSD's windows unchanged.
_ON_GRID = 1e-4


def sample_positions(onsets_s, times_s, tr: float) -> np.ndarray:
    """(events, samples) positions on a run's volume grid (volume ``k`` acquired at ``k * tr`` s) of the
    times ``onset + times_s``; positions within ``1e-4`` volumes of a whole number are snapped to it."""
    pos = (np.asarray(onsets_s, dtype=np.float64)[:, None] + np.asarray(times_s, dtype=np.float64)[None, :]) / tr
    whole = np.round(pos)
    return np.where(np.abs(pos - whole) < _ON_GRID, whole, pos)


def sample_windows(run: np.ndarray, onsets_s, times_s, tr: float) -> np.ndarray:
    """Windows of a preprocessed run sampled at ``onset + times_s`` seconds, by linear interpolation in time.

    ``run``: (voxels, time), volume ``k`` acquired at ``k * tr`` seconds; returns (n_events, voxels,
    len(times_s)) float32. A sample between volumes ``i`` and ``i + 1`` at fraction ``f`` is
    ``(1 - f) * run[:, i] + f * run[:, i + 1]``; one on a volume is that volume, exactly. A sample before the
    first volume or after the last is an error, never extrapolated.
    """
    n_time = run.shape[1]
    pos = sample_positions(onsets_s, times_s, tr)
    if pos.size and (pos.min() < 0 or pos.max() > n_time - 1):
        bad = int(np.flatnonzero((pos.min(axis=1) < 0) | (pos.max(axis=1) > n_time - 1))[0])
        raise ValueError(f"the window of the event at {float(np.asarray(onsets_s)[bad]):.3f} s samples "
                         f"{pos[bad, 0] * tr:.2f} .. {pos[bad, -1] * tr:.2f} s, outside the run's "
                         f"0 .. {(n_time - 1) * tr:.2f} s")
    lo = np.minimum(np.floor(pos).astype(np.int64), n_time - 1).ravel()
    frac = (pos.ravel() - lo).astype(np.float32)
    out = np.asarray(run[:, lo], dtype=np.float32)  # (voxels, events * samples): every sample's lower volume
    between = np.flatnonzero(frac > 0)  # samples off the grid: (1 - f) * lower + f * upper
    if between.size:
        f = frac[between]
        out[:, between] = (1 - f) * out[:, between] + f * np.asarray(run[:, np.minimum(lo[between] + 1, n_time - 1)],
                                                                      dtype=np.float32)
    return np.ascontiguousarray(out.reshape(run.shape[0], *pos.shape).transpose(1, 0, 2))
