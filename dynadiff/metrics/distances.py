"""Correlation distance between paired feature vectors (EffNet-B, SwAV; docs/behaviour.md §5).

``1 - Pearson r`` of each reconstruction's flattened features with its own
ground truth's (``scipy.spatial.distance.correlation``); lower is better.
"""

from __future__ import annotations

import numpy as np
import torch

from dynadiff.metrics.identification import Features, _rows, standardize_rows


def correlation_distance(reconstructions: Features, ground_truths: Features, device: torch.device | str = "cpu") -> np.ndarray:
    """(N,) ``1 - r(reconstruction_i, ground_truth_i)``."""
    a = _rows(reconstructions, device, "reconstruction features")
    b = _rows(ground_truths, device, "ground-truth features")
    if a.shape != b.shape:
        raise ValueError(f"paired features must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    r = (standardize_rows(a) * standardize_rows(b)).sum(dim=1)
    return (1.0 - r).cpu().numpy()
