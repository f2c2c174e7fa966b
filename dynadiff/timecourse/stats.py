"""The statistics of a time course: bootstrap intervals over images, and where a metric peaks."""

from __future__ import annotations

import typing as tp

import numpy as np

N_BOOTSTRAP = 2000


def bootstrap_interval(values: tp.Sequence[float], n_boot: int = N_BOOTSTRAP, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over images (resampled with replacement; NaN-free values)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def peak(rows: list[dict], metric: str, higher_is_better: bool) -> int | None:
    """The offset of the best mean of ``metric`` (None: no offset has it)."""
    scored = [(r["metrics"][metric]["mean"], r["offset"]) for r in rows
              if metric in r["metrics"] and np.isfinite(r["metrics"][metric]["mean"])]
    if not scored:
        return None
    return (max if higher_is_better else min)(scored)[1]
