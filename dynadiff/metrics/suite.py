"""The whole metric suite on paired images: :func:`compute_metrics`."""

from __future__ import annotations

import logging
import typing as tp

import numpy as np
import torch

from dynadiff.metrics import weights as W
from dynadiff.metrics._progress import progress_bar
from dynadiff.metrics.catalog import METRICS
from dynadiff.metrics.config import METRIC_NAMES, IdentificationDirection, MetricsWeightsConfig
from dynadiff.metrics.distances import correlation_distance
from dynadiff.metrics.dreamsim import cosine_distance, load_dreamsim
from dynadiff.metrics.features import METRICS_OF_NETWORK, extract_features, load_network
from dynadiff.metrics.identification import two_way_identification
from dynadiff.metrics.images import ImageLike, check_images, check_pairs
from dynadiff.metrics.pixel import pearson, pixel_array, ssim_arrays

logger = logging.getLogger(__name__)


def resolve_metrics(metrics: tp.Iterable[str] | str | None) -> list[str]:
    """Metric names in canonical order; ``None`` means all; a string may be comma-separated."""
    if metrics is None:
        return list(METRIC_NAMES)
    if isinstance(metrics, str):
        metrics = [m for m in metrics.split(",") if m.strip()]
    names = [m.strip().lower() for m in metrics]
    unknown = [m for m in names if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}: expected names among {list(METRIC_NAMES)}")
    if not names:
        raise ValueError(f"no metric asked for: expected names among {list(METRIC_NAMES)}")
    return [m for m in METRIC_NAMES if m in names]


def available_metrics(
    metrics: tp.Iterable[str] | str | None = None, weights: MetricsWeightsConfig | None = None
) -> tuple[list[str], dict[str, str]]:
    """Split metrics into (computable, {skipped: one-line reason}).

    With ``metrics=None`` a metric whose weights are absent is skipped (and
    logged); with explicit metrics, any absent weights raise
    :class:`~dynadiff.metrics.weights.MissingWeightsError`, naming all of them.
    """
    names = resolve_metrics(metrics)
    weights = weights or MetricsWeightsConfig()
    missing: dict[str, str] = {}
    for name in names:
        status = W.metric_status(name, weights)
        if status is not None and not status.present:
            missing[name] = status.line()
    if missing and metrics is not None:
        raise W.MissingWeightsError(
            "weights missing for requested metric(s):\n" + "\n".join(f"  {m}: {line}" for m, line in missing.items())
        )
    for name, line in missing.items():
        logger.warning("skipping %s: %s", name, line)
    return [m for m in names if m not in missing], missing


def compute_metrics(
    reconstructions: tp.Sequence[ImageLike],
    ground_truths: tp.Sequence[ImageLike],
    metrics: tp.Iterable[str] | str | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    weights: MetricsWeightsConfig | None = None,
    identification: IdentificationDirection = "per_ground_truth",
    shuffled_baseline: bool = True,
    progress: bool = True,
) -> dict[str, tp.Any]:
    """Every requested metric on paired images (reconstruction i ↔ ground truth i).

    ``reconstructions``, ``ground_truths``: PIL images or uint8 arrays (H, W, 3).
    Each network is loaded once, run in batches of ``batch_size`` on ``device``,
    and freed before the next. ``metrics=None`` computes every metric whose
    weights are present and skips the others (reason in ``"skipped"``, and
    logged); naming metrics makes any missing weights an error
    (:class:`~dynadiff.metrics.weights.MissingWeightsError`, raised before any
    work). ``identification`` picks the direction of two-way identification
    (default: the original's, see :mod:`~dynadiff.metrics.identification`).
    ``shuffled_baseline`` also scores every metric on mismatched pairs (needs
    two or more images). Returns a JSON-serialisable dict::

        {"n_images": N,
         "identification": "per_ground_truth",
         "metrics": [names computed],
         "means": {name: float},
         "per_image": {name: [N floats]},   # every metric has per-image values
         "shuffled": {name: float},         # same metric on pairs (rec i, gt i+1 mod N): empirical chance
         "chance": {name: float | None},    # exact chance level where there is one (identification: 0.5)
         "higher_is_better": {name: bool},
         "skipped": {name: one-line reason}}
    """
    weights = weights or MetricsWeightsConfig()
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    names, skipped = available_metrics(metrics, weights)
    check_pairs(reconstructions, ground_truths, min_count=1)
    n = len(reconstructions)
    if n < 2:
        # identification compares each image with the others; a shuffled pair needs two images
        single = [m for m in names if METRICS[m].family == "identification"]
        if single and metrics is not None:
            raise ValueError(f"two-way identification ({', '.join(single)}) needs at least 2 image pairs, got {n}")
        for m in single:
            skipped[m] = "two-way identification needs at least 2 image pairs"
            logger.warning("skipping %s: %s", m, skipped[m])
        names = [m for m in names if m not in single]
        shuffled_baseline = False
    recs, gts = list(reconstructions), list(ground_truths)
    check_images(recs, "reconstructions")
    check_images(gts, "ground_truths")
    _preflight(names, weights)
    shift = [(i + 1) % n for i in range(n)]  # mismatched pairing for the shuffled baseline
    per_image: dict[str, np.ndarray] = {}
    shuffled: dict[str, float] = {}

    # Pixel family: one pass over the pairs, resizing each image once per pass.
    pixel = [m for m in names if METRICS[m].family == "pixel"]
    if pixel:
        values, base = _pixel_metrics(recs, gts, pixel, shift if shuffled_baseline else None, progress)
        per_image.update(values)
        shuffled.update(base)

    # Feature networks: identification and correlation distances.
    for net_name, net_metrics in METRICS_OF_NETWORK.items():
        wanted = [m for m in net_metrics if m in names]
        if not wanted:
            continue
        net = load_network(net_name, weights, device)
        feats_rec = extract_features(recs, net, batch_size, progress, desc=f"{net_name} (reconstructions)")
        feats_gt = extract_features(gts, net, batch_size, progress, desc=f"{net_name} (ground truths)")
        del net
        _free(device)
        for m in wanted:
            if METRICS[m].family == "identification":
                per_image[m] = two_way_identification(feats_rec[m], feats_gt[m], identification, device)
                if shuffled_baseline:
                    shuffled[m] = float(two_way_identification(feats_rec[m], feats_gt[m][shift], identification, device).mean())
            else:
                per_image[m] = correlation_distance(feats_rec[m], feats_gt[m], device)
                if shuffled_baseline:
                    shuffled[m] = float(correlation_distance(feats_rec[m], feats_gt[m][shift], device).mean())

    if "dreamsim" in names:
        model = load_dreamsim(weights, device)
        emb_rec = model.embed(recs, batch_size, progress)
        emb_gt = model.embed(gts, batch_size, progress)
        del model
        _free(device)
        per_image["dreamsim"] = cosine_distance(emb_rec, emb_gt)
        if shuffled_baseline:
            shuffled["dreamsim"] = float(cosine_distance(emb_rec, emb_gt[shift]).mean())

    computed = [m for m in names if m in per_image]
    return {
        "n_images": n,
        "identification": identification,
        "metrics": computed,
        "means": {m: float(np.mean(per_image[m])) for m in computed},
        "per_image": {m: [float(v) for v in per_image[m]] for m in computed},
        "shuffled": {m: shuffled[m] for m in computed if m in shuffled},
        "chance": {m: METRICS[m].chance for m in computed},
        "higher_is_better": {m: METRICS[m].higher_is_better for m in computed},
        "skipped": skipped,
    }


def _pixel_metrics(
    recs: list, gts: list, names: list[str], shift: list[int] | None, progress: bool
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    funcs = {"pixcorr": pearson, "ssim": ssim_arrays}
    values: dict[str, list[float]] = {m: [] for m in names}
    base: dict[str, list[float]] = {m: [] for m in names}
    upcoming = None  # ground truth i+1, resized for the shuffled pair of i and reused as the true pair of i+1
    for i in progress_bar(range(len(recs)), progress, "pixel metrics"):
        rec = pixel_array(recs[i])
        gt = upcoming if upcoming is not None else pixel_array(gts[i])
        for m in names:
            values[m].append(funcs[m](rec, gt))
        if shift is not None:
            upcoming = pixel_array(gts[shift[i]])
            for m in names:
                base[m].append(funcs[m](rec, upcoming))
    shuffled = {m: float(np.mean(v)) for m, v in base.items()} if shift is not None else {}
    return {m: np.array(v) for m, v in values.items()}, shuffled


def _preflight(names: list[str], weights: MetricsWeightsConfig) -> None:
    """Check the published torchvision files' hashes before any work, so a bad file fails now, not after other metrics."""
    if not weights.verify:
        return
    for source in dict.fromkeys(W.SOURCE_OF_METRIC[m] for m in names):
        if source in W.TORCHVISION_FILES:
            W.verify_torchvision_hash(W.source_status(source, weights).path)


def _free(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
