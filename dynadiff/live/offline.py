"""Offline decoding of the trials of a recorded run, with the offline or the live (causal) preprocessing: what live
decoding costs, measured on the same trials, and the reference live decoding must equal (same causal windows,
same images)."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import numpy as np

from dynadiff.data.preprocess import N_VOLUMES_USED, detrend_zscore
from dynadiff.live.causal import Prior, causal_window
from dynadiff.live.watch import Onset, design_onsets

PREPROCESSING = ("offline", "causal", "causal+prior")


def run_trials(root: Path, run, mask: np.ndarray) -> tuple[np.ndarray, list[Onset]]:
    """(voxels, volumes) float32 masked raw series of an NSD run (all its volumes), and its trials."""
    import nibabel as nib

    from dynadiff.data.dataset import load_masked_run

    path = run.timeseries_path(root)
    series = load_masked_run(path, mask, n_volumes=int(nib.load(str(path)).shape[3]))
    return series, design_onsets(run.design_path(root))


def trial_windows(series: np.ndarray, onsets: tp.Sequence[Onset], window: tuple[int, int], how: str = "causal",
                  prior: Prior | None = None) -> list[np.ndarray | None]:
    """Each trial's (voxels, n_trs) window (None where it does not fit the run): ``offline``, cut from the run
    detrended and z-scored whole (its first 225 volumes, as for training); ``causal``, normalised with the volumes
    up to its end only (:func:`causal_window`), with ``prior`` for ``causal+prior``."""
    if how not in PREPROCESSING:
        raise ValueError(f"preprocessing is one of {PREPROCESSING}, got {how!r}")
    a, b = window
    clean = detrend_zscore(series[:, :N_VOLUMES_USED]) if how == "offline" else None
    out = []
    for onset in onsets:
        start, stop = onset.volume + a, onset.volume + b
        limit = N_VOLUMES_USED if how == "offline" else series.shape[1]
        if start < 0 or stop > limit:
            out.append(None)
        elif how == "offline":
            out.append(clean[:, start:stop])
        else:
            out.append(causal_window(series, start, stop, prior if how == "causal+prior" else None))
    return out
