"""Feature networks of the metric suite, loaded from local files only (docs/behaviour.md §5).

One preprocessing path for the family (:func:`feature_input`): torchvision's
resize of the PIL image to 224x224 (bilinear, antialiased), ``to_tensor``,
normalisation with the ImageNet mean/std (CLIP: CLIP's). Networks and layers:

- ``alexnet2``: AlexNet IMAGENET1K_V1, ``features[4]`` (192x27x27);
- ``alexnet5``: the same AlexNet (same forward pass), ``features[11]`` (256x13x13);
- ``inception``: Inception-v3 IMAGENET1K_V1 (``transform_input`` on), ``avgpool`` (2048);
- ``clip``: CLIP ViT-L/14 (OpenAI), image embedding (768), through transformers'
  ``CLIPVisionModelWithProjection``;
- ``effnet``: EfficientNet-B1 IMAGENET1K_V1 (not V2), ``avgpool`` (1280);
- ``swav``: SwAV ResNet-50 (the ``facebookresearch/swav`` hub model), ``avgpool`` (2048).
"""

from __future__ import annotations

import dataclasses
import logging
import typing as tp

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from dynadiff.metrics import weights as W
from dynadiff.metrics._progress import progress_bar
from dynadiff.metrics.config import MetricsWeightsConfig
from dynadiff.metrics.images import ImageLike, as_pil

logger = logging.getLogger(__name__)

FEATURE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Architecture of OpenAI's CLIP ViT-L/14 vision tower (Hugging Face CLIPVisionConfig fields).
CLIP_VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
)
# Metrics computed from each network, in one forward pass.
METRICS_OF_NETWORK: dict[str, tuple[str, ...]] = {
    "alexnet": ("alexnet2", "alexnet5"),
    "inception": ("inception",),
    "clip": ("clip",),
    "effnet": ("effnet",),
    "swav": ("swav",),
}


def feature_input(img: ImageLike, mean: tp.Sequence[float] = IMAGENET_MEAN, std: tp.Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """(3, 224, 224) float32: resize (bilinear, antialiased) → ``to_tensor`` → normalise."""
    pil = TF.resize(as_pil(img), [FEATURE_SIZE, FEATURE_SIZE], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.normalize(TF.to_tensor(pil), list(mean), list(std))


@dataclasses.dataclass
class FeatureNetwork:
    """A frozen network and the features it gives: ``net(batch) -> {metric: (B, D)}``."""

    name: str
    module: torch.nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    taps: dict[str, torch.nn.Module]  # metric -> module whose output is the feature; empty for CLIP
    device: torch.device

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = batch.to(self.device)
        if self.name == "clip":
            return {"clip": self.module(pixel_values=batch).image_embeds.float().cpu()}
        out: dict[str, torch.Tensor] = {}
        handles = [
            module.register_forward_hook(lambda _m, _i, y, metric=metric: out.__setitem__(metric, y.flatten(1).float().cpu().clone()))
            for metric, module in self.taps.items()
        ]
        try:
            self.module(batch)
        finally:
            for h in handles:
                h.remove()
        return out


def load_network(name: str, weights: MetricsWeightsConfig | None = None, device: torch.device | str = "cpu") -> FeatureNetwork:
    """Build network ``name`` (a key of :data:`METRICS_OF_NETWORK`) from its local weights, in eval mode on ``device``."""
    weights = weights or MetricsWeightsConfig()
    device = torch.device(device)
    if name not in METRICS_OF_NETWORK:
        raise ValueError(f"unknown feature network {name!r}: expected one of {list(METRICS_OF_NETWORK)}")
    status = W.require(name, weights)
    logger.info("loading %s from %s", name, status.path)
    if name == "clip":
        module = _load_clip(status.path, weights.verify)
        mean, std, taps = CLIP_MEAN, CLIP_STD, {}
    else:
        module = _load_torchvision(name, status.path, weights.verify)
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if name == "alexnet":
            taps = {"alexnet2": module.features[4], "alexnet5": module.features[11]}
        else:
            taps = {METRICS_OF_NETWORK[name][0]: module.avgpool}
    module = module.eval().requires_grad_(False).to(device)
    return FeatureNetwork(name, module, tuple(mean), tuple(std), taps, device)


def extract_features(
    images: tp.Sequence[ImageLike], network: FeatureNetwork, batch_size: int = 32, progress: bool = False, desc: str = ""
) -> dict[str, torch.Tensor]:
    """``{metric: (N, D) float32 CPU tensor}``, the flattened features of each image, in batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    chunks: dict[str, list[torch.Tensor]] = {}
    starts = range(0, len(images), batch_size)
    for start in progress_bar(starts, progress, desc or network.name):
        batch = torch.stack([feature_input(img, network.mean, network.std) for img in images[start : start + batch_size]])
        for metric, feats in network(batch).items():
            chunks.setdefault(metric, []).append(feats)
    if not chunks:
        raise ValueError("no images to extract features from")
    return {metric: torch.cat(parts) for metric, parts in chunks.items()}


# ----------------------------------------------------------------------------- loaders


def _load_state_dict(path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated download, an HTML error page saved as .pth, ...
        raise W.InvalidWeightsError(f"cannot read {path} as a PyTorch state dict ({type(e).__name__}: {e}); download it again") from e
    if not isinstance(state, dict):
        raise W.InvalidWeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _strict_load(module: torch.nn.Module, state: dict[str, torch.Tensor], path, ignore: tuple[str, ...] = ()) -> None:
    """Load every key of ``module``; extra keys starting with ``ignore`` are allowed, anything else missing or extra is an error."""
    result = module.load_state_dict(state, strict=False)
    unexpected = [k for k in result.unexpected_keys if not k.startswith(ignore)]
    if result.missing_keys or unexpected:
        raise W.InvalidWeightsError(
            f"{path} does not match the network: missing keys {result.missing_keys[:8]}"
            f"{' ...' if len(result.missing_keys) > 8 else ''}, unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )


def _load_torchvision(name: str, path, verify: bool) -> torch.nn.Module:
    from torchvision import models

    if verify and name != "swav":
        W.verify_torchvision_hash(path)
    state = _load_state_dict(path)
    if name == "alexnet":
        module = models.alexnet(weights=None)
        _strict_load(module, state, path)
    elif name == "inception":
        # What Inception_V3_Weights.IMAGENET1K_V1 builds: transform_input on, aux head present (unused in eval).
        module = models.inception_v3(weights=None, transform_input=True, aux_logits=True, init_weights=False)
        _strict_load(module, state, path)
    elif name == "effnet":
        module = models.efficientnet_b1(weights=None)
        _strict_load(module, state, path)
    elif name == "swav":
        # The facebookresearch/swav hub model: torchvision ResNet-50 without fc; the
        # checkpoint's keys carry "module." and include the SwAV heads, unused here.
        module = models.resnet50(weights=None)
        module.fc = torch.nn.Identity()
        state = {k.removeprefix("module."): v for k, v in state.items()}
        if any(k.startswith("fc.") for k in state):
            logger.warning("%s has classifier keys fc.*, which SwAV's checkpoint lacks: is it a supervised ResNet-50?", path)
        _strict_load(module, state, path, ignore=("projection_head.", "prototypes.", "fc."))
    else:
        raise ValueError(f"no torchvision loader for {name!r}")
    return module


def _load_clip(path, verify: bool) -> torch.nn.Module:
    from transformers import CLIPVisionModelWithProjection
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the text tower's keys are "unexpected" for the vision model: expected
    try:
        module, info = CLIPVisionModelWithProjection.from_pretrained(
            str(path), local_files_only=True, output_loading_info=True, dtype=torch.float32
        )
    except (OSError, ValueError) as e:
        raise W.InvalidWeightsError(f"cannot load CLIP from {path}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if info["missing_keys"] or info.get("mismatched_keys"):
        raise W.InvalidWeightsError(
            f"{path} is not a complete CLIP vision model: missing {sorted(info['missing_keys'])[:8]}, "
            f"mismatched {sorted(info.get('mismatched_keys') or [])[:8]}"
        )
    if verify:
        found = {k: getattr(module.config, k) for k in CLIP_VIT_L14}
        if found != CLIP_VIT_L14:
            raise W.InvalidWeightsError(
                f"{path} is not CLIP ViT-L/14: {found} (expected {CLIP_VIT_L14}); "
                "set weights.verify=False to use it anyway"
            )
    return module
