"""Image-reconstruction metrics of Dynadiff (docs/behaviour.md §5).

Metric names: ``pixcorr, ssim, alexnet2, alexnet5, inception, clip, effnet,
swav, dreamsim``. One module per family:

- :mod:`~dynadiff.metrics.pixel`: PixCorr, SSIM (425x425, PIL bicubic);
- :mod:`~dynadiff.metrics.features`: the feature networks (224x224), local weights;
- :mod:`~dynadiff.metrics.identification`: two-way identification (both directions);
- :mod:`~dynadiff.metrics.distances`: correlation distance (EffNet-B, SwAV);
- :mod:`~dynadiff.metrics.dreamsim`: DreamSim distance;
- :mod:`~dynadiff.metrics.weights`: where each weight file is looked for, how to get it;
- :mod:`~dynadiff.metrics.suite`: :func:`compute_metrics`, the whole suite.

Importing this package (or its ``config``, ``catalog`` and ``weights``
modules) does not import torch; the heavy names load on first use.
"""

from __future__ import annotations

import importlib
import typing as tp

from dynadiff.metrics.catalog import CHANCE_LEVELS, METRICS, MetricInfo
from dynadiff.metrics.config import METRIC_NAMES, MetricsConfig, MetricsWeightsConfig
from dynadiff.metrics.weights import InvalidWeightsError, MissingWeightsError, WeightsError

_LAZY = {
    "compute_metrics": "dynadiff.metrics.suite",
    "available_metrics": "dynadiff.metrics.suite",
    "resolve_metrics": "dynadiff.metrics.suite",
    "pixcorr": "dynadiff.metrics.pixel",
    "ssim": "dynadiff.metrics.pixel",
    "two_way_identification": "dynadiff.metrics.identification",
    "pearson_matrix": "dynadiff.metrics.identification",
    "correlation_distance": "dynadiff.metrics.distances",
    "load_network": "dynadiff.metrics.features",
    "extract_features": "dynadiff.metrics.features",
    "load_dreamsim": "dynadiff.metrics.dreamsim",
}

__all__ = [
    "CHANCE_LEVELS",
    "METRICS",
    "METRIC_NAMES",
    "InvalidWeightsError",
    "MetricInfo",
    "MetricsConfig",
    "MetricsWeightsConfig",
    "MissingWeightsError",
    "WeightsError",
    "available_metrics",
    "compute_metrics",
    "correlation_distance",
    "extract_features",
    "load_dreamsim",
    "load_network",
    "pearson_matrix",
    "pixcorr",
    "resolve_metrics",
    "ssim",
    "two_way_identification",
]


def __getattr__(name: str) -> tp.Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
