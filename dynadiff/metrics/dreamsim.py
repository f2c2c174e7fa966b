"""DreamSim distance (docs/behaviour.md §5): the ``dreamsim`` package's default ensemble, from a local cache.

``dreamsim(pretrained=True, cache_dir=...)`` downloads whatever its cache lacks
(from GitHub releases and through ``torch.hub``): we check the cache first
(:data:`dynadiff.metrics.weights.DREAMSIM_FILES`) so that it never does.
Images go through DreamSim's own preprocessing (bicubic resize to 224x224,
``to_tensor``); the distance is ``1 - cos`` of the two embeddings, what the
model's forward computes, from embeddings computed once per image.

The cache folder must be writable: ``torch.hub`` (which DreamSim uses for
DINO) records trusted repositories in a ``trusted_list`` file there.
"""

from __future__ import annotations

import contextlib
import io
import logging
import typing as tp

import numpy as np
import torch

from dynadiff.metrics import weights as W
from dynadiff.metrics._progress import progress_bar
from dynadiff.metrics.config import MetricsWeightsConfig
from dynadiff.metrics.images import ImageLike, as_pil, check_pairs

logger = logging.getLogger(__name__)


class DreamSim:
    """A loaded DreamSim model: ``embed(images) -> (N, D)``, ``distance(recons, gts) -> (N,)``."""

    def __init__(self, model: torch.nn.Module, preprocess: tp.Callable[[tp.Any], torch.Tensor], device: torch.device):
        self.model = model
        self.preprocess = preprocess
        self.device = device

    @torch.inference_mode()
    def embed(self, images: tp.Sequence[ImageLike], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """(N, D) float32 CPU embeddings."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        parts = []
        for start in progress_bar(range(0, len(images), batch_size), progress, "dreamsim"):
            batch = torch.cat([self.preprocess(as_pil(img)) for img in images[start : start + batch_size]])
            parts.append(self.model.embed(batch.to(self.device)).float().cpu())
        return torch.cat(parts)

    def distance(self, reconstructions: tp.Sequence[ImageLike], ground_truths: tp.Sequence[ImageLike], batch_size: int = 32) -> np.ndarray:
        check_pairs(reconstructions, ground_truths)
        return cosine_distance(self.embed(reconstructions, batch_size), self.embed(ground_truths, batch_size))


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """(N,) ``1 - cos(a_i, b_i)``, DreamSim's distance between embeddings."""
    return (1.0 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)).numpy()


def load_dreamsim(weights: MetricsWeightsConfig | None = None, device: torch.device | str = "cpu") -> DreamSim:
    """The default DreamSim ensemble from ``weights.dreamsim_cache``; :class:`MissingWeightsError` if incomplete."""
    weights = weights or MetricsWeightsConfig()
    status = W.require("dreamsim", weights)
    device = torch.device(device)
    model, preprocess = _build(str(status.path), str(device))
    return DreamSim(model, preprocess, device)


def _build(cache_dir: str, device: str) -> tuple[torch.nn.Module, tp.Callable]:
    from dreamsim import dreamsim

    saved_hub_dir = torch.hub._hub_dir  # dreamsim calls torch.hub.set_dir(cache_dir): undo it afterwards
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # it prints "Using cached ..."
            model, preprocess = dreamsim(pretrained=True, device=device, cache_dir=cache_dir)
    finally:
        torch.hub._hub_dir = saved_hub_dir
        if printed.getvalue().strip():
            logger.info("dreamsim: %s", printed.getvalue().strip())
    return model, preprocess
