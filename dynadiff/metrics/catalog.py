"""What each metric is: family, direction, chance level (cheap to import).

Chance levels: the expected value when reconstructions carry no information
about their ground truths. Only two-way identification has an exact one
(0.5, whatever the images). For the others it depends on the image statistics
(natural images correlate with each other even when unrelated), so the table
gives ``None`` and :func:`dynadiff.metrics.compute_metrics` measures it: the
same metric on mismatched pairs (reconstruction i against ground truth i+1),
reported under ``"shuffled"``.
"""

from __future__ import annotations

import dataclasses

from dynadiff.metrics.config import METRIC_NAMES


@dataclasses.dataclass(frozen=True)
class MetricInfo:
    name: str
    label: str  # as printed in tables
    family: str  # "pixel", "identification", "distance", "dreamsim"
    higher_is_better: bool
    chance: float | None
    description: str


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in [
        MetricInfo("pixcorr", "PixCorr", "pixel", True, None, "Pearson r of the 425x425 RGB pixels"),
        MetricInfo("ssim", "SSIM", "pixel", True, None, "SSIM of the 425x425 grayscale images (Gaussian, sigma 1.5)"),
        MetricInfo("alexnet2", "AlexNet(2)", "identification", True, 0.5, "two-way identification, AlexNet features[4]"),
        MetricInfo("alexnet5", "AlexNet(5)", "identification", True, 0.5, "two-way identification, AlexNet features[11]"),
        MetricInfo("inception", "Inception", "identification", True, 0.5, "two-way identification, Inception-v3 avgpool"),
        MetricInfo("clip", "CLIP", "identification", True, 0.5, "two-way identification, CLIP ViT-L/14 image embedding"),
        MetricInfo("effnet", "EffNet-B", "distance", False, None, "correlation distance, EfficientNet-B1 avgpool"),
        MetricInfo("swav", "SwAV", "distance", False, None, "correlation distance, SwAV ResNet-50 avgpool"),
        MetricInfo("dreamsim", "DreamSim", "dreamsim", False, None, "DreamSim distance (default ensemble)"),
    ]
}
if tuple(METRICS) != METRIC_NAMES:  # the two tables must list the same metrics, in the same order
    raise RuntimeError(f"metric tables disagree: {tuple(METRICS)} vs {METRIC_NAMES}")

CHANCE_LEVELS: dict[str, float | None] = {name: info.chance for name, info in METRICS.items()}
