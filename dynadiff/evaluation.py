"""The evaluation pipeline behind ``eval.py`` (SPEC §5).

1. the subject's test windows (``dynadiff.data``), cached by exca;
2. one reconstruction per test image, cached per image by exca
   (:class:`dynadiff.config.ReconstructionConfig`): an interrupted run
   resumes with the missing images only;
3. faces pixelated (before saving and before metrics, as the original);
4. ``{i}.png`` / ``{i}_gt.png``, ``metrics.json``, ``metrics.md``,
   ``overview.png`` and ``config.yaml`` in the output folder; ``metrics.json``
   is written last, so its presence means the run finished.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import typing as tp
from pathlib import Path

import numpy as np

if tp.TYPE_CHECKING:
    import torch

from dynadiff.config import EvalConfig, ReconstructionConfig
from dynadiff.files import save_png as _save_png
from dynadiff.files import write_text as _write_text

logger = logging.getLogger(__name__)

GT_SIZE = 512  # ground truths are saved and measured at 512x512 (SPEC §2, §5)


class EvaluationError(RuntimeError):
    """The evaluation cannot run as configured (missing or mismatched inputs)."""


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EvaluationError(f"device {name!r} asked for, but CUDA is not available here: use --device cpu")
    return name


def default_checkpoint(subject: int) -> Path:
    return Path("checkpoints") / f"subj{subject:02d}"


def checkpoint_digest(path: Path) -> str:
    """Digest of a checkpoint file or folder: relative names, sizes and modification times."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha1()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def check_checkpoint(path: Path, subject: int) -> None:
    if not Path(path).exists():
        raise EvaluationError(
            f"checkpoint {path} not found: put the published subj{subject:02d} folder there (see "
            "checkpoints/README.md), or pass --checkpoint PATH (a train.py output or a converted .safetensors)"
        )
    checkpoint_layout(path, subject)


def checkpoint_layout(path: Path, subject: int, n_voxels: int | None = None) -> tuple[int | None, int, int]:
    """(input width of the brain module, number of subject layers, this subject's layer) of a checkpoint.

    A train.py checkpoint names, in its metadata, the subjects it was trained on (in
    layer order) and its input width: with several subjects, windows are zero-padded to
    the largest voxel count. Any other checkpoint (the published ones) has one layer, for
    its own subject, and the subject's own width ``n_voxels``. Without ``n_voxels``, only
    the subject is checked.
    """
    from dynadiff.checkpoint import read_metadata

    path = Path(path)
    meta, subjects = {}, None
    if path.is_file() and path.suffix == ".safetensors":
        try:
            meta = read_metadata(path)
            subjects = json.loads(meta.get("subjects", "null"))
        except (OSError, ValueError):  # not readable as a safetensors checkpoint: the loader says why
            pass
    if not isinstance(subjects, list):
        return n_voxels, 1, 0
    subjects = [int(s) for s in subjects]
    if subject not in subjects:
        raise EvaluationError(
            f"checkpoint {path} was trained on subject(s) {subjects}, not on subject {subject}: evaluate one of "
            f"those (--subject), or pass the checkpoint of subject {subject}"
        )
    if len(subjects) == 1 or n_voxels is None:
        return n_voxels, len(subjects), subjects.index(subject)
    width = int(meta["n_voxels"])
    if n_voxels > width:
        raise EvaluationError(f"this subject has {n_voxels} nsdgeneral voxels, more than the {width} inputs of "
                              f"checkpoint {path}: is the data the one it was trained on?")
    return width, len(subjects), subjects.index(subject)


def build_decoder(cfg: ReconstructionConfig, n_voxels: int, n_subjects: int = 1):
    """The model with the checkpoint's weights, on its device, in eval mode; a clear error on mismatch."""
    from dynadiff.checkpoint import CheckpointError, load_checkpoint

    device = resolve_device(cfg.device)
    model = cfg.versatilediffusion_config.build(cfg.brain_modules_config, n_voxels=n_voxels, n_subjects=n_subjects,
                                                device=device)
    try:
        load_checkpoint(model, cfg.checkpoint, allow_missing=cfg.allow_missing_keys)
    except CheckpointError as e:
        subject = cfg.data.subject
        raise EvaluationError(
            f"checkpoint {cfg.checkpoint} does not fit subject {subject} ({n_voxels} nsdgeneral voxels) with this "
            f"brain_modules_config; is it the checkpoint of another subject?\n{e}"
        ) from e
    model.eval()
    return model, device


def reconstruct_in_batches(model, windows: tp.Iterable[np.ndarray], batch_size: int, seed: int,
                           device: str, subject_idx: int = 0) -> tp.Iterator[torch.Tensor]:
    """(3, S, S) float images in [0, 1] of the fMRI windows, in order, sampled in batches of exactly ``batch_size``.

    A short last batch is padded by repeating its last window, and the padding's images
    are dropped. Float rounding in the sampler depends on the batch size (about 1e-6,
    which can flip an 8-bit pixel), but not on the other rows of a batch: with a fixed
    size, an image does not depend on how the windows were split into jobs or batches.
    """
    import torch

    windows = iter(windows)  # read lazily: a job's windows need not all be in memory
    while batch := list(itertools.islice(windows, batch_size)):
        n = len(batch)
        batch += [batch[-1]] * (batch_size - n)
        brain = torch.from_numpy(np.stack(batch)).to(device)
        subjects = torch.full((batch_size,), subject_idx, dtype=torch.long, device=device)
        with torch.no_grad():
            images = model.reconstruct(brain, subjects, seed=seed)
        yield from images[:n]


def generate_images(cfg: ReconstructionConfig, indices: tp.Sequence[int]) -> tp.Iterator[np.ndarray]:
    """(H, W, 3) uint8 reconstructions of the given test indices, in order (see :func:`reconstruct_in_batches`)."""
    indices = list(indices)
    if not indices:
        return
    ds = cfg.data.build()
    width, n_subjects, subject_idx = checkpoint_layout(cfg.checkpoint, cfg.data.subject, ds.n_voxels)
    model, device = build_decoder(cfg, width, n_subjects)
    logger.info("generating %d image(s) on %s", len(indices), device)
    windows = (np.pad(ds.brain(i), ((0, width - ds.n_voxels), (0, 0))) for i in indices)  # zeros: as in training
    seed = cfg.versatilediffusion_config.seed
    for img in reconstruct_in_batches(model, windows, cfg.batch_size, seed, device, subject_idx):
        yield (img.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def metrics_table(result: dict) -> str:
    """Markdown table: each metric next to its chance level (exact, or measured on shuffled pairs)."""
    from dynadiff.metrics.catalog import METRICS

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
    for m, why in result.get("skipped", {}).items():
        lines.append(f"| {METRICS[m].label} | skipped | | |")
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


def preflight(cfg: EvalConfig) -> str:
    """Check every input before any work, so that a bad one is one clear error and nothing is written.

    Returns the checkpoint's digest, for ``EvalConfig.checkpoint_digest``: a
    checkpoint rewritten in place is then a different run (never stale results).
    """
    from dynadiff.data.nsd import NsdDataError
    from dynadiff.metrics.suite import available_metrics
    from dynadiff.metrics.weights import MissingWeightsError
    from dynadiff.models.vd import check_vd_folder

    nsd_cfg = cfg.data.nsd_dataset_config
    if cfg.compute_miou:
        raise EvaluationError(
            "--compute-miou needs the separate segmentation environment (ViT-Adapter), which this release does "
            "not set up yet; run without it"
        )
    checkpoint = cfg.checkpoint or default_checkpoint(nsd_cfg.subject)
    check_checkpoint(checkpoint, nsd_cfg.subject)
    try:
        check_vd_folder(cfg.versatilediffusion_config.vd_cache_dir)
    except (FileNotFoundError, ValueError) as e:
        raise EvaluationError(str(e)) from e
    try:
        from dynadiff.data.dataset import list_trials

        list_trials(nsd_cfg)
    except NsdDataError as e:
        raise EvaluationError(str(e)) from e
    try:
        available_metrics(cfg.metrics, cfg.metrics_weights)
    except MissingWeightsError as e:
        raise EvaluationError(f"{e}\n(`python -m dynadiff.metrics weights` lists what is present)") from e
    return checkpoint_digest(checkpoint)


def run_evaluation(cfg: EvalConfig) -> dict:
    from dynadiff import jobs
    from dynadiff.data.dataset import load_stimulus
    from dynadiff.faces import blur_faces_batch, load_face_detector
    from dynadiff.metrics import compute_metrics
    from dynadiff.models.vd import check_vd_folder

    nsd_cfg = cfg.data.nsd_dataset_config
    if nsd_cfg.split != "test":
        raise EvaluationError(f"evaluation runs on the test split, got data.nsd_dataset_config.split={nsd_cfg.split!r}")
    checkpoint = cfg.checkpoint or default_checkpoint(nsd_cfg.subject)
    check_checkpoint(checkpoint, nsd_cfg.subject)
    check_vd_folder(cfg.versatilediffusion_config.vd_cache_dir)
    jobs_before = jobs.snapshot(nsd_cfg.infra)
    try:
        ds = nsd_cfg.build()
    except jobs.JOB_ERRORS as e:  # a data preparation job failed (cluster run)
        raise EvaluationError(jobs.failure_report(nsd_cfg.infra, "data preparation (fMRI windows)", jobs_before,
                                                  error=e)) from e
    n = len(ds) if cfg.limit is None else min(cfg.limit, len(ds))
    gen_infra = cfg.image_generation.infra_kwargs(folder=cfg.infra.folder)
    rec_cfg = ReconstructionConfig(
        data=nsd_cfg, brain_modules_config=cfg.brain_modules_config,
        versatilediffusion_config=cfg.versatilediffusion_config, checkpoint=checkpoint,
        checkpoint_digest=cfg.checkpoint_digest or checkpoint_digest(checkpoint), allow_missing_keys=cfg.allow_missing_keys,
        device=cfg.device, batch_size=cfg.batch_size, infra=gen_infra,
    )
    logger.info("reconstructing %d test images of subject %d (cache %s)", n, nsd_cfg.subject, rec_cfg.infra.uid_folder())
    items = list(range(n))
    if rec_cfg.infra.mode == "cached":
        todo = len(jobs.missing_items(rec_cfg.infra, items))
        logger.info("%d of %d images cached, %d to generate", n - todo, n, todo)
    jobs_before = jobs.snapshot(rec_cfg.infra)
    try:
        recs = [np.asarray(r) for r in rec_cfg.generate(items)]
    except jobs.JOB_ERRORS as e:  # a generation job failed (cluster run): report them all, keep what is done
        raise EvaluationError(jobs.failure_report(rec_cfg.infra, "image generation", jobs_before, items, error=e,
                                                  noun="test image")) from e
    except (OSError, ValueError, EOFError, json.JSONDecodeError) as e:
        raise EvaluationError(
            f"reading the image cache {rec_cfg.infra.uid_folder()} failed ({type(e).__name__}: {e}); it may be "
            "corrupt: delete that folder (or rerun with image_generation.mode=force) to regenerate"
        ) from e
    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # written last: present only for a finished run
    if cfg.blur_faces:
        recs = [np.asarray(r) for r in blur_faces_batch(recs, detector=load_face_detector(resolve_device(cfg.device)))]
    gts = [load_stimulus(ds.root, ds.nsd_ids[i], GT_SIZE) for i in range(n)]
    for i in range(n):
        _save_png(recs[i], out / f"{i}.png")
        _save_png(gts[i], out / f"{i}_gt.png")
    import yaml

    _write_text(out / "config.yaml", yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    if cfg.overview_images:
        _save_png(overview_grid(gts, recs, cfg.overview_images), out / "overview.png")
    result = compute_metrics(recs, gts, cfg.metrics, device=resolve_device(cfg.device), batch_size=max(cfg.batch_size, 8),
                             weights=cfg.metrics_weights, identification=cfg.identification, progress=True)
    result["subject"] = nsd_cfg.subject
    result["averaged"] = nsd_cfg.averaged
    result["checkpoint"] = str(checkpoint)
    result["output_dir"] = str(out)
    _write_text(out / "metrics.md", metrics_table(result))
    _write_text(out / "metrics.json", json.dumps(result, indent=1))
    return result
