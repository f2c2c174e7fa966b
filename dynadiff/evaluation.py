"""The evaluation pipeline behind ``eval.py`` (docs/behaviour.md §5).

1. the subject's test windows (``dynadiff.data``), cached by exca;
2. one reconstruction per test image, cached per image by exca
   (:class:`dynadiff.config.ReconstructionConfig`): an interrupted run
   resumes with the missing images only;
3. faces pixelated (before saving and before metrics, as the original);
4. ``{i}.png`` / ``{i}_gt.png``, ``metrics.json``, ``metrics.md``,
   ``overview.png``, ``config.yaml`` and ``run.json`` in the run's own output
   folder; ``metrics.json`` is written last, so its presence means the run
   finished.

Each run has its own folder, ``{cache}/reconstructions_subjXX_{mode}_{run id}``:
the run id is a digest of everything that changes the outputs (the cache key of
``EvalConfig.run``: checkpoint path and digest, sampler settings, data
selection, ``limit``, metrics...), so two runs never write into one folder, and
a cached result is only ever reported next to the files of the same run
(:func:`evaluate` checks them and writes them again if they do not match).
``{cache}/reconstructions_subjXX_{mode}`` (the original's place) is a link to
the latest run's folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import typing as tp
from pathlib import Path

import numpy as np

if tp.TYPE_CHECKING:
    from dynadiff.config import SweepGenerationConfig

from dynadiff.config import EvalConfig, ReconstructionConfig
from dynadiff.decoder import (
    CheckpointInfo,
    Decoder,
    DecoderError,
    checkpoint_candidates,
    checkpoint_digest,
    default_checkpoint,
)
from dynadiff.files import save_png as _save_png
from dynadiff.files import write_text as _write_text

logger = logging.getLogger(__name__)

GT_SIZE = 512  # ground truths are saved and measured at 512x512 (docs/behaviour.md §2, §5)


# The evaluation cannot run as configured (missing or mismatched inputs): one error type with the decoder's.
EvaluationError = DecoderError


RUN_FILE = "run.json"  # in a run's output folder: which run wrote it
_OUTPUT_PNG = re.compile(r"\d+(_gt)?\.png")


def resolve_device(name: str) -> str:
    """``auto`` -> what this machine has; a device it lacks is an :class:`EvaluationError`."""
    from dynadiff.device import resolve_device as resolve

    try:
        return resolve(name)
    except ValueError as e:
        raise EvaluationError(str(e)) from None


def generate_images(cfg: ReconstructionConfig, indices: tp.Sequence[int]) -> tp.Iterator[np.ndarray]:
    """(H, W, 3) uint8 reconstructions of the given test indices, in order (see :class:`dynadiff.Decoder`)."""
    indices = list(indices)
    if not indices:
        return
    ds = cfg.data.build()
    decoder = decoder_of(cfg, ds.n_voxels, ds.n_trs)
    logger.info("generating %d image(s) on %s", len(indices), decoder.device)
    yield from decoder.images((ds.brain(i) for i in indices), cfg.data.subject)


def decoder_of(cfg: "ReconstructionConfig | SweepGenerationConfig", n_voxels: int, n_timepoints: int,
               batch_size: int | None = None) -> Decoder:
    """The :class:`~dynadiff.Decoder` of a generation config (its checkpoint, model configuration and device)."""
    return Decoder.from_checkpoint(
        cfg.checkpoint, device=cfg.device, subject=cfg.data.subject, n_voxels=n_voxels, n_timepoints=n_timepoints,
        brain_config=cfg.brain_modules_config, vd_config=cfg.versatilediffusion_config,
        allow_missing_keys=cfg.allow_missing_keys, batch_size=batch_size or cfg.batch_size, to_uint8=cfg.to_uint8)


def metrics_table(result: dict) -> str:
    """Markdown table: each metric next to its chance level (exact, or measured on shuffled pairs)."""
    from dynadiff.metrics.catalog import METRICS
    from dynadiff.miou import MODELS

    model_labels = {name: info.label for name, info in MODELS.items()}

    lines = [
        f"Metrics on {result['n_images']} test images "
        f"(identification: {result['identification'].replace('_', ' ')}).",
        "",
        "| metric | value | chance | better |",
        "| --- | ---: | ---: | :---: |",
    ]
    for m in result["metrics"]:
        info = METRICS[m]
        chance = result["chance"].get(m)
        if chance is None and m in result.get("shuffled", {}):
            chance_text = f"{result['shuffled'][m]:.4f} (shuffled pairs)"
        else:
            chance_text = "n/a" if chance is None else f"{chance:.4f}"
        lines.append(f"| {info.label} | {result['means'][m]:.4f} | {chance_text} | {'↑' if info.higher_is_better else '↓'} |")
    miou = result.get("miou")
    if miou is not None:
        chance = "n/a" if miou["shuffled"] is None else f"{miou['shuffled']:.4f} (shuffled pairs)"
        lines.append(f"| mIoU ({model_labels.get(miou['segmenter']['model'], miou['segmenter']['model'])}) | "
                     f"{miou['mean']:.4f} | {chance} | ↑ |")
    for m, why in result.get("skipped", {}).items():
        lines.append(f"| {METRICS[m].label} | skipped | | |")
    if miou is not None and not miou["segmenter"]["comparable_with_paper"]:
        lines += ["", f"mIoU: {miou['segmenter']['description']}." if miou["segmenter"]["model"] != "vit-adapter" else
                  "mIoU: segmented by the command in miou.segmenter, not the paper's set-up: not comparable with the "
                  "paper's numbers."]
    if result.get("skipped"):
        lines += ["", "Skipped:"] + [f"- {METRICS[m].label}: {why}" for m, why in result["skipped"].items()]
    return "\n".join(lines) + "\n"


def overview_grid(gts: list[np.ndarray], recs: list[np.ndarray], n: int, tile: int = 160) -> np.ndarray:
    """(2*tile, k*tile, 3) uint8: ground truths above their reconstructions, k evenly spaced images."""
    from PIL import Image

    k = min(n, len(recs))
    picks = np.linspace(0, len(recs) - 1, k).round().astype(int) if k else []
    rows = []
    for images in (gts, recs):
        rows.append(np.concatenate(
            [np.asarray(Image.fromarray(images[i]).resize((tile, tile), Image.Resampling.BILINEAR)) for i in picks], axis=1))
    return np.concatenate(rows, axis=0)


@dataclasses.dataclass(frozen=True)
class Checked:
    """What :func:`preflight` found: the checkpoint (what it records, read once) and the data files' digest."""

    checkpoint: CheckpointInfo
    data_digest: str


def preflight(cfg: EvalConfig) -> Checked:
    """Check every input before any work, so that a bad one is one clear error and nothing is written.

    The digest is for ``EvalConfig.checkpoint_digest``: a checkpoint rewritten in
    place is then a different run (never stale results).
    """
    from dynadiff.data.nsd import NsdDataError
    from dynadiff.metrics.suite import available_metrics
    from dynadiff.metrics.weights import MissingWeightsError
    from dynadiff.models.vd import check_vd_folder

    nsd_cfg = cfg.data.nsd_dataset_config
    if nsd_cfg.split != "test":
        raise EvaluationError(f"evaluation runs on the test split, got data.nsd_dataset_config.split={nsd_cfg.split!r}")
    if cfg.infra.cluster is None and cfg.image_generation.cluster is None:  # else: the nodes' devices count
        resolve_device(cfg.device)
    if cfg.checkpoint is None and not default_checkpoint(nsd_cfg.subject).exists():
        names = " nor ".join(str(p) for p in checkpoint_candidates(nsd_cfg.subject))
        raise EvaluationError(
            f"no checkpoint of subject {nsd_cfg.subject}: neither {names} exists. Fetch the published one with "
            f"`python prepare_weights.py --only checkpoints --subjects {nsd_cfg.subject}` (see checkpoints/README.md), "
            "or pass --checkpoint PATH (a train.py output or a converted .safetensors)")
    checkpoint = CheckpointInfo.read(cfg.checkpoint or default_checkpoint(nsd_cfg.subject))
    checkpoint.layout(nsd_cfg.subject)
    try:
        check_vd_folder(cfg.versatilediffusion_config.vd_cache_dir)
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationError(str(e)) from e
    try:
        from dynadiff.data.dataset import data_digest

        data = data_digest(nsd_cfg)
    except NsdDataError as e:
        raise EvaluationError(str(e)) from e
    try:
        available_metrics(cfg.metrics, cfg.metrics_weights)
    except MissingWeightsError as e:
        raise EvaluationError(f"{e}\n(`python -m dynadiff.metrics weights` lists what is present)") from e
    if cfg.compute_miou:
        from dynadiff.miou import SegmentationError, check_segmenter

        try:
            check_segmenter(miou_segmenter(cfg))
        except SegmentationError as e:
            raise EvaluationError(str(e)) from None
    return Checked(checkpoint, data)


def miou_segmenter(cfg: EvalConfig):
    """The :class:`dynadiff.miou.Segmenter` of ``cfg.miou``, on the evaluation's device."""
    from dynadiff.miou import build_segmenter

    device = cfg.device if cfg.infra.cluster is not None else resolve_device(cfg.device)  # a node's: resolved there
    return build_segmenter(cfg.miou, cfg.metrics_weights.resolved_weights_dir(), "auto" if device == "auto" else device)


def reconstruction_config(cfg: EvalConfig) -> ReconstructionConfig:
    """The per-image generation map of an evaluation (its exca cache holds the images)."""
    nsd_cfg = cfg.data.nsd_dataset_config
    checkpoint = cfg.checkpoint or default_checkpoint(nsd_cfg.subject)
    return ReconstructionConfig(
        data=nsd_cfg, brain_modules_config=cfg.brain_modules_config,
        versatilediffusion_config=cfg.versatilediffusion_config, checkpoint=checkpoint,
        checkpoint_digest=cfg.checkpoint_digest or checkpoint_digest(checkpoint), data_digest=cfg.data_digest,
        allow_missing_keys=cfg.allow_missing_keys,
        device=cfg.device, batch_size=cfg.batch_size, to_uint8=cfg.to_uint8,
        infra=cfg.image_generation.infra_kwargs(folder=cfg.infra.folder),
    )


def run_evaluation(cfg: EvalConfig) -> dict:
    from dynadiff import jobs
    from dynadiff.faces import blur_faces_batch, load_face_detector
    from dynadiff.metrics import compute_metrics
    from dynadiff.models.vd import check_vd_folder

    nsd_cfg = cfg.data.nsd_dataset_config
    if nsd_cfg.split != "test":
        raise EvaluationError(f"evaluation runs on the test split, got data.nsd_dataset_config.split={nsd_cfg.split!r}")
    info = CheckpointInfo.read(cfg.checkpoint or default_checkpoint(nsd_cfg.subject))
    info.layout(nsd_cfg.subject)
    checkpoint = info.path
    check_vd_folder(cfg.versatilediffusion_config.vd_cache_dir)
    jobs_before = jobs.snapshot(nsd_cfg.infra)
    try:
        ds = nsd_cfg.build()
    except jobs.JOB_ERRORS as e:  # a data preparation job failed (cluster run)
        raise EvaluationError(jobs.failure_report(nsd_cfg.infra, "data preparation (fMRI windows)", jobs_before,
                                                  error=e)) from e
    n = len(ds) if cfg.limit is None else min(cfg.limit, len(ds))
    rec_cfg = reconstruction_config(cfg.model_copy(update={"checkpoint": checkpoint}))
    logger.info("reconstructing %d test images of subject %d (cache %s)", n, nsd_cfg.subject, rec_cfg.infra.uid_folder())
    items = list(range(n))
    if rec_cfg.infra.mode == "cached":
        missing = jobs.missing_items(rec_cfg.infra, items)
        logger.info("%d of %d images cached, %d to generate", n - len(missing), n, len(missing))
        busy, who = jobs.in_flight_elsewhere(rec_cfg.infra, missing)
        if busy:
            logger.warning("%d of the images to generate are being generated by another run (%s): waiting for them, "
                           "then they are reused, not generated twice", busy, who)
    jobs_before = jobs.snapshot(rec_cfg.infra)
    try:
        cached = rec_cfg.generate(items)  # computes the missing images (exca reads the cache when iterated)
    except jobs.JOB_ERRORS as e:  # a generation job failed (cluster run): report them all, keep what is done
        raise EvaluationError(jobs.failure_report(rec_cfg.infra, "image generation", jobs_before, items, error=e,
                                                  noun="test image")) from e
    try:
        recs = [np.asarray(r) for r in cached]
    except (OSError, ValueError, EOFError, json.JSONDecodeError) as e:
        raise EvaluationError(
            f"reading the image cache {rec_cfg.infra.uid_folder()} failed ({type(e).__name__}: {e}); it may be "
            "corrupt: delete that folder (or rerun with image_generation.mode=force) to regenerate"
        ) from e
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # written last: present only for a finished run
    _write_text(out / RUN_FILE, json.dumps(run_record(cfg, checkpoint, n), indent=1))
    if cfg.blur_faces:
        recs = [np.asarray(r) for r in blur_faces_batch(recs, detector=load_face_detector(resolve_device(cfg.device)))]
    gts = [ds.image(i, GT_SIZE) for i in range(n)]
    for i in range(n):
        _save_png(recs[i], out / f"{i}.png")
        _save_png(gts[i], out / f"{i}_gt.png")
    for stale in stray_images(out, n):  # none unless the data changed under this run
        stale.unlink()
    import yaml

    _write_text(out / "config.yaml", yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    if cfg.overview_images:
        _save_png(overview_grid(gts, recs, cfg.overview_images), out / "overview.png")
    miou = None
    if cfg.compute_miou:  # first: a segmenter that fails does so before the other metrics' work
        from dynadiff.miou import SegmentationError, compute_miou

        try:
            miou = compute_miou(recs, gts, miou_segmenter(cfg), Path(cfg.infra.folder or "./cache"), cfg.miou.timeout_s)
        except SegmentationError as e:
            raise EvaluationError(f"mIoU: {e}\nNo metrics were written; run without --compute-miou to get the others"
                                  ) from None
    result = compute_metrics(recs, gts, cfg.metrics, device=resolve_device(cfg.device), batch_size=max(cfg.batch_size, 8),
                             weights=cfg.metrics_weights, identification=cfg.identification, progress=True)
    if miou is not None:
        result["miou"] = miou
    result["subject"] = nsd_cfg.subject
    result["averaged"] = nsd_cfg.averaged
    result["checkpoint"] = str(checkpoint)
    result["checkpoint_digest"] = rec_cfg.checkpoint_digest
    result["run_id"] = cfg.run_id
    result["output_dir"] = str(out)
    _write_text(out / "metrics.md", metrics_table(result))
    _write_text(out / "metrics.json", json.dumps(result, indent=1))
    return result


def run_record(cfg: EvalConfig, checkpoint: Path, n_images: int) -> dict:
    """``run.json``: which run the folder's files belong to (written before them)."""
    nsd_cfg = cfg.data.nsd_dataset_config
    return {"run_id": cfg.run_id, "uid": cfg.infra.uid(), "subject": nsd_cfg.subject, "averaged": nsd_cfg.averaged,
            "checkpoint": str(checkpoint), "checkpoint_digest": cfg.checkpoint_digest,
            "data": str(nsd_cfg.data_folder), "data_digest": cfg.data_digest, "n_images": n_images}


def stray_images(folder: Path, n: int) -> list[Path]:
    """Numbered PNGs (``{i}.png``, ``{i}_gt.png``) in ``folder`` that are not among the first ``n`` images."""
    return sorted(p for p in Path(folder).iterdir()
                  if _OUTPUT_PNG.fullmatch(p.name) and int(p.name.split(".")[0].split("_")[0]) >= n)


def output_problems(cfg: EvalConfig, result: dict) -> list[str]:
    """Why the run's output folder does not hold exactly this result's files (empty: it does)."""
    out = cfg.output_dir
    if not out.is_dir():
        return [f"{out} does not exist"]
    problems = []
    try:
        record = json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or record.get("run_id") != cfg.run_id:
        problems.append(f"{RUN_FILE} missing or of another run")
    try:
        saved = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        saved = None
    if saved is None or _canonical(saved) != _canonical(json.loads(json.dumps(result))):
        problems.append("metrics.json missing or different from the run's result")
    n = int(result["n_images"])
    missing = [name for i in range(n) for name in (f"{i}.png", f"{i}_gt.png") if not (out / name).is_file()]
    if missing:
        problems.append(f"{len(missing)} image file(s) missing (e.g. {missing[0]})")
    stray = stray_images(out, n)
    if stray:
        problems.append(f"{len(stray)} image file(s) of no image of this run (e.g. {stray[0].name})")
    problems += [f"{name} missing" for name in ("config.yaml", "metrics.md") if not (out / name).is_file()]
    return problems


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)  # NaN -> "NaN": equal to itself, unlike the float


def latest_link(cfg: EvalConfig) -> Path:
    """``{cache}/reconstructions_subjXX_{mode}``: the original's output place, a link to the latest run's folder."""
    return cfg.output_dir.with_name(cfg.output_dir.name.rsplit("_", 1)[0])


def point_latest_link(cfg: EvalConfig) -> Path | None:
    """Point :func:`latest_link` at this run's folder (atomically); None, with a warning, where it cannot."""
    from dynadiff.files import point_link

    link, target = latest_link(cfg), cfg.output_dir
    return point_link(link, target, f"{link} is a folder (an earlier version of dynadiff wrote its outputs there, or "
                                    f"you made it): left as it is; this run's outputs are in {target}")


def evaluate(cfg: EvalConfig) -> dict:
    """``cfg.run()`` (cached by exca), with its outputs guaranteed to be the reported run's.

    - One run at a time per output folder: a second process with the same run waits for
      the first (then reports its cached result) instead of redoing and rewriting it.
    - A cached result whose folder no longer matches it (files deleted, edited, left by
      a crash) is computed again from the image cache, and its files rewritten.
    - The latest-run link is pointed at the folder.
    """
    from dynadiff.files import exclusive

    out = cfg.output_dir
    with exclusive(out.with_name(f".{out.name}.lock"), f"the output folder {out} (same run)"):
        result = cfg.run()
        problems = output_problems(cfg, result)
        if problems:
            logger.warning("the outputs in %s do not match this run's cached result (%s): writing them again from the "
                           "image cache", out, "; ".join(problems))
            cfg.infra.clear_job()
            result = cfg.run()
            problems = output_problems(cfg, result)
            if problems:
                raise EvaluationError(f"the outputs in {out} do not match the run's result after writing them: "
                                      f"{'; '.join(problems)}")
    link = point_latest_link(cfg)
    if link is not None:
        result = dict(result, latest_link=str(link))
    return result
