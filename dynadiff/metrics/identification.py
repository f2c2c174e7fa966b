"""Two-way identification (docs/behaviour.md §5) on flattened features.

``r[i, j] = corr(reconstruction_i, ground_truth_j)``. Two directions:

- ``"per_ground_truth"`` (default; the original Dynadiff's, which passed its two
  image lists in swapped order): score of ground truth j = fraction of the n-1
  other reconstructions i != j with ``r[i, j] < r[j, j]``;
- ``"per_reconstruction"`` (brain-diffuser / MindEye): score of reconstruction
  i = fraction of the n-1 other ground truths j != i with ``r[i, j] < r[i, i]``.

Ties and NaN correlations (constant features) count as failures, as the
strict comparison of the original does. Chance level 0.5.
"""

from __future__ import annotations

import logging
import typing as tp

import numpy as np
import torch

from dynadiff.metrics.config import IdentificationDirection

logger = logging.getLogger(__name__)

Features = torch.Tensor | np.ndarray
DIRECTIONS: tuple[str, ...] = tp.get_args(IdentificationDirection)


def _rows(x: Features, device: torch.device | str, what: str) -> torch.Tensor:
    """(N, D) float64 on ``device``, one flattened feature vector per row."""
    t = torch.as_tensor(x)
    if t.ndim < 2:
        raise ValueError(f"{what} must have one row of features per image, shape (N, ...), got {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1).to(device=device, dtype=torch.float64)


def standardize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows centred and scaled to unit norm, so that ``a @ b.T`` is Pearson r; a constant row gives NaN.

    Each row is first shifted by its first element (r does not change): a constant row
    becomes exactly 0, so its norm is 0 and 0/0 is NaN. Centring it directly would leave
    the rounding error of its mean (e.g. twelve values 0.7), scaled up to a constant
    row ±1/sqrt(D) that correlates at about 0 with anything instead of NaN."""
    x = x - x[:, :1]
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True)


def pearson_matrix(reconstructions: Features, ground_truths: Features, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N_rec, N_gt) float64: ``r[i, j]`` = Pearson r of reconstruction i and ground truth j (flattened features)."""
    a = _rows(reconstructions, device, "reconstruction features")
    b = _rows(ground_truths, device, "ground-truth features")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: reconstructions {a.shape[1]}, ground truths {b.shape[1]}")
    return standardize_rows(a) @ standardize_rows(b).T


def two_way_identification(
    reconstructions: Features,
    ground_truths: Features,
    direction: IdentificationDirection = "per_ground_truth",
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """(N,) per-image two-way identification accuracy; its mean is the metric."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown identification direction {direction!r}: expected one of {list(DIRECTIONS)}")
    r = pearson_matrix(reconstructions, ground_truths, device)
    n = r.shape[0]
    if r.shape[1] != n:
        raise ValueError(f"{n} reconstructions but {r.shape[1]} ground truths: they must pair up")
    if n < 2:
        raise ValueError(f"two-way identification needs at least 2 image pairs, got {n}")
    if torch.isnan(r).any():
        logger.warning("two-way identification: %d NaN correlations (constant features), counted as failures", int(torch.isnan(r).sum()))
    diag = torch.diagonal(r)
    if direction == "per_ground_truth":
        wins = (r < diag[None, :]).sum(dim=0)  # column j: other reconstructions vs ground truth j
    else:
        wins = (r < diag[:, None]).sum(dim=1)  # row i: other ground truths vs reconstruction i
    return (wins.double() / (n - 1)).cpu().numpy()
