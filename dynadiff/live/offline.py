"""Offline decoding of the trials of a recorded run, with the offline or the live (causal) preprocessing: what live
decoding costs, measured on the same trials, and the reference live decoding must equal (same causal windows,
same images). Trials are onsets at volumes (NSD's design) or in seconds (a BIDS events.tsv, any TR)."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import numpy as np

from dynadiff.data.preprocess import N_VOLUMES_USED, TR, detrend_zscore, sample_windows
from dynadiff.live.causal import Prior, causal_window, covering_volumes, sampled_window
from dynadiff.live.watch import Onset, design_onsets, events_onsets

PREPROCESSING = ("offline", "causal", "causal+prior")


def load_series(path: Path, mask: np.ndarray) -> np.ndarray:
    """(voxels, volumes) float32 masked raw series of a 4-D run, all its volumes."""
    import nibabel as nib

    from dynadiff.data.dataset import load_masked_run

    return load_masked_run(path, mask, n_volumes=int(nib.load(str(path)).shape[3]))


def run_trials(root: Path, run, mask: np.ndarray) -> tuple[np.ndarray, list[Onset]]:
    """(voxels, volumes) float32 masked raw series of an NSD run (all its volumes), and its trials."""
    return load_series(run.timeseries_path(root), mask), design_onsets(run.design_path(root))


def events_trials(bold: Path, events: Path, mask: np.ndarray,
                  image_column: str = "stim_file") -> tuple[np.ndarray, list[Onset]]:
    """(voxels, volumes) float32 masked raw series of a BIDS run (all its volumes), and the trials of its
    events.tsv (onsets in seconds)."""
    return load_series(bold, mask), events_onsets(events, image_column)


def trial_windows(series: np.ndarray, onsets: tp.Sequence[Onset], window: tuple[int, int], how: str = "causal",
                  prior: Prior | None = None, times_s: np.ndarray | None = None,
                  tr: float = TR) -> list[np.ndarray | None]:
    """Each trial's (voxels, n_trs) window (None where it does not fit the run).

    An onset at a volume: ``window`` = ``(start, stop)`` volumes from it; ``offline``, cut from the run detrended
    and z-scored whole (its first 225 volumes, as for training); ``causal``, normalised with the volumes up to its
    end only (:func:`causal_window`), with ``prior`` for ``causal+prior``. An onset in seconds: sampled at
    ``onset + times_s`` seconds on the run's grid (``tr`` seconds per volume); ``offline``, from the whole run
    detrended and z-scored (as a BIDS run for training, :func:`dynadiff.data.bids.clean_runs`); ``causal``,
    :func:`sampled_window`."""
    if how not in PREPROCESSING:
        raise ValueError(f"preprocessing is one of {PREPROCESSING}, got {how!r}")
    kinds = {o.seconds is not None for o in onsets}
    if len(kinds) > 1:
        raise ValueError("onsets are all at volumes or all in seconds, not both")
    in_seconds = kinds == {True}
    if in_seconds and times_s is None:
        raise ValueError("onsets in seconds need times_s, the seconds after the onset their window samples")
    a, b = window
    clean = None
    if how == "offline":
        clean = detrend_zscore(series if in_seconds else series[:, :N_VOLUMES_USED])
    use_prior = prior if how == "causal+prior" else None
    out = []
    for onset in onsets:
        if onset.seconds is not None:
            start, stop = covering_volumes(onset.seconds, times_s, tr)
            if start < 0 or stop > series.shape[1]:
                out.append(None)
            elif how == "offline":
                out.append(sample_windows(clean, [onset.seconds], times_s, tr)[0])
            else:
                out.append(sampled_window(series, onset.seconds, times_s, tr, use_prior))
            continue
        start, stop = onset.volume + a, onset.volume + b
        limit = N_VOLUMES_USED if how == "offline" else series.shape[1]
        if start < 0 or stop > limit:
            out.append(None)
        elif how == "offline":
            out.append(clean[:, start:stop])
        else:
            out.append(causal_window(series, start, stop, use_prior))
    return out
