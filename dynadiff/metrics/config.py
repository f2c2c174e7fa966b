"""Configuration of the metric suite: cheap to import (pydantic only, no torch).

Weight locations resolve as: explicit field, then environment variable, then
default. Nothing here touches the file system; :mod:`dynadiff.metrics.weights`
checks what is present.
"""

from __future__ import annotations

import os
import typing as tp
from pathlib import Path

import pydantic

# Metric names, in the order they are computed and reported.
METRIC_NAMES: tuple[str, ...] = (
    "pixcorr",
    "ssim",
    "alexnet2",
    "alexnet5",
    "inception",
    "clip",
    "effnet",
    "swav",
    "dreamsim",
)
MetricName = tp.Literal["pixcorr", "ssim", "alexnet2", "alexnet5", "inception", "clip", "effnet", "swav", "dreamsim"]

# Two-way identification, for each image index k:
#  - "per_ground_truth" (the original Dynadiff's, default): among the n-1 *other
#    reconstructions*, the fraction less correlated with ground truth k than
#    reconstruction k is;
#  - "per_reconstruction" (brain-diffuser / MindEye convention): among the n-1
#    *other ground truths*, the fraction less correlated with reconstruction k
#    than ground truth k is.
IdentificationDirection = tp.Literal["per_ground_truth", "per_reconstruction"]

WEIGHTS_DIR_ENV = "DYNADIFF_WEIGHTS"


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)


class MetricsWeightsConfig(_Strict):
    """Where the feature networks' weights are read from (local files only).

    - ``torch_home``: torchvision's cache root; AlexNet, Inception-v3 and
      EfficientNet-B1 are read from ``{torch_home}/hub/checkpoints/<torchvision
      file name>``. ``None``: ``$TORCH_HOME``, else ``$XDG_CACHE_HOME/torch``,
      else ``~/.cache/torch`` (torch's own rule, so a cache filled by torchvision
      is found as is).
    - ``swav_path``: SwAV ResNet-50 state dict. ``None``: the file the
      ``facebookresearch/swav`` hub model downloads,
      ``{torch_home}/hub/checkpoints/swav_800ep_pretrain.pth.tar``.
    - ``weights_dir``: root of the other local weights. ``None``:
      ``$DYNADIFF_WEIGHTS``, else ``./weights``.
    - ``clip_path``: CLIP ViT-L/14 in Hugging Face layout (``config.json`` and
      weights). ``None``: ``{weights_dir}/clip-vit-large-patch14``.
    - ``dreamsim_cache``: DreamSim's ``cache_dir``. ``None``: ``{weights_dir}/dreamsim``.
    - ``verify``: check that the files are the published ones: torchvision files
      against the hash in their name, the CLIP folder against the ViT-L/14
      architecture. Turn off only to run the pipeline with stand-in weights.
    """

    torch_home: Path | None = None
    swav_path: Path | None = None
    weights_dir: Path | None = None
    clip_path: Path | None = None
    dreamsim_cache: Path | None = None
    verify: bool = True

    def resolved_torch_home(self) -> Path:
        if self.torch_home is not None:
            return Path(self.torch_home).expanduser()
        if os.environ.get("TORCH_HOME"):
            return Path(os.environ["TORCH_HOME"]).expanduser()
        cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
        return Path(cache, "torch").expanduser()

    def checkpoints_dir(self) -> Path:
        """torchvision / torch.hub weight cache: ``{torch_home}/hub/checkpoints``."""
        return self.resolved_torch_home() / "hub" / "checkpoints"

    def resolved_weights_dir(self) -> Path:
        if self.weights_dir is not None:
            return Path(self.weights_dir).expanduser()
        return Path(os.environ.get(WEIGHTS_DIR_ENV) or "./weights").expanduser()

    def resolved_swav_path(self) -> Path:
        if self.swav_path is not None:
            return Path(self.swav_path).expanduser()
        return self.checkpoints_dir() / "swav_800ep_pretrain.pth.tar"

    def resolved_clip_path(self) -> Path:
        if self.clip_path is not None:
            return Path(self.clip_path).expanduser()
        return self.resolved_weights_dir() / "clip-vit-large-patch14"

    def resolved_dreamsim_cache(self) -> Path:
        if self.dreamsim_cache is not None:
            return Path(self.dreamsim_cache).expanduser()
        return self.resolved_weights_dir() / "dreamsim"


class MetricsConfig(_Strict):
    """The metric suite as a config: ``MetricsConfig(...).compute(recons, gts)``.

    ``metrics=None`` computes every metric whose weights are present and skips
    the others with a one-line explanation; a list asks for those metrics
    explicitly, and a missing weight file is then an error.
    """

    metrics: list[MetricName] | None = None
    device: str = "cpu"
    batch_size: int = pydantic.Field(default=32, gt=0)
    identification: IdentificationDirection = "per_ground_truth"
    shuffled_baseline: bool = True
    progress: bool = True
    weights: MetricsWeightsConfig = MetricsWeightsConfig()

    def compute(self, reconstructions: tp.Sequence[tp.Any], ground_truths: tp.Sequence[tp.Any]) -> dict[str, tp.Any]:
        from dynadiff.metrics.suite import compute_metrics

        return compute_metrics(
            reconstructions,
            ground_truths,
            metrics=self.metrics,
            device=self.device,
            batch_size=self.batch_size,
            weights=self.weights,
            identification=self.identification,
            shuffled_baseline=self.shuffled_baseline,
            progress=self.progress,
        )
