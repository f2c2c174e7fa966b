"""Pre-flight checks: the run's inputs and output folder, and whether a checkpoint may be continued, before
anything is loaded or written (one-line errors saying what to do)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dynadiff.config import TrainConfig
from dynadiff.training.checkpoints import (MODEL_FILE, STATE_FILE, STATE_FORMAT, ResumeState, complete_checkpoint_dir,
                                           read_resume_state)
from dynadiff.training.errors import TrainingError
from dynadiff.training.optim import lr_factor

logger = logging.getLogger(__package__)  # "dynadiff.training", as before the split


def slurm_restarts() -> int:
    """How many times SLURM has requeued the job this process runs in (after a node failure, a preemption,
    ``scontrol requeue``): ``SLURM_RESTART_COUNT``, which SLURM sets in a restarted job; 0 elsewhere."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def check_inputs(cfg: TrainConfig) -> None:
    """The run's folders, before anything is loaded or written: a :class:`TrainingError` (or, for the Versatile
    Diffusion folder, a FileNotFoundError) of one line naming the first bad one and what to do."""
    from dynadiff.models.vd import check_vd_folder

    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--output {out} is a file, not a folder: give the folder of the run "
                            "(it holds config.yaml, log.csv and checkpoints/; created if missing)")
    for key, folder in (("data.nsd_dataset_config.infra.folder", cfg.data.nsd_dataset_config.infra.folder),
                        ("infra.folder", cfg.infra.folder)):
        if folder is not None and Path(folder).exists() and not Path(folder).is_dir():
            raise TrainingError(f"the cache folder {folder} (--cache, or {key}) is a file, not a folder: "
                                "give a folder (created if missing)")
    if cfg.data.nsd_dataset_config.bids is not None:
        from dynadiff.data import bids

        try:
            layout = bids.open_layout(cfg.data.nsd_dataset_config.bids)
            for subject in cfg.subjects:
                bids.subject_label(layout, subject)
        except bids.BidsDataError as e:
            raise TrainingError(str(e)) from None
    else:
        _check_nsd_folder(cfg)
    vd = cfg.versatilediffusion_config
    check_vd_folder(vd.vd_cache_dir, ("image_unet", "vae", "scheduler") + (("text_unet",) if vd.dual_attention else ()))


def _check_nsd_folder(cfg: TrainConfig) -> None:
    from dynadiff.data import nsd

    root = Path(cfg.data.nsd_dataset_config.nsddata_path)
    if not root.is_dir():
        raise TrainingError(f"the NSD data folder {root} does not exist (data.nsd_dataset_config.nsddata_path): "
                            f"download the data with `{nsd.fetch_command(root, cfg.subjects)}`, or set "
                            "data.nsd_dataset_config.nsddata_path to where it is")
    for subject in cfg.subjects:
        folders = [root / Path(d.format(subject=subject)).parents[1] for d in (nsd.ROI_DIR, nsd.TIMESERIES_DIR)]
        if not any(f.is_dir() for f in folders):
            get = (f"python prepare_data.py --synthetic --path {root} --subjects {' '.join(map(str, cfg.subjects))}"
                   if nsd.is_synthetic(root) else nsd.fetch_command(root, [subject]))
            raise TrainingError(f"subject {subject} is not in the NSD data at {root} (no {folders[0]}): "
                                f"get it with `{get}`, or leave it out of --subjects")


def _read_last(last: Path) -> ResumeState:
    """The resume state of a ``checkpoints/last`` folder, checked readable; a one-line TrainingError otherwise."""
    from dynadiff.checkpoint import CheckpointError, read_metadata

    advice = "this run cannot continue from it: start a new one (another --output)"
    missing = [name for name in (MODEL_FILE, STATE_FILE) if not (last / name).is_file()]
    if missing:
        raise TrainingError(f"cannot resume from {last}: {' and '.join(missing)} missing; {advice}")
    for name in (MODEL_FILE, STATE_FILE):
        try:
            meta = read_metadata(last / name)
        except CheckpointError:
            raise TrainingError(f"cannot resume from {last}: its {name} is not a readable .safetensors file "
                                f"(truncated?); {advice}") from None
    if meta.get("dynadiff_train_state") != STATE_FORMAT:
        raise TrainingError(f"cannot resume from {last}: its {STATE_FILE} is not a dynadiff training state "
                            f"(format {STATE_FORMAT}); {advice}")
    try:
        return read_resume_state(last)
    except (KeyError, ValueError) as e:
        raise TrainingError(f"cannot resume from {last}: its {STATE_FILE} is incomplete ({e!r}); {advice}") from None


def check_output(cfg: TrainConfig, out: Path, world_size: int = 1) -> ResumeState | None:
    """The checkpoint to continue from (None: a run from step 0), after checking that ``cfg`` may continue it.

    ``steps`` may differ from the checkpoint's (a finished run trained longer, an unfinished one to another
    length): from the checkpoint's step on, the learning rate follows the schedule of ``cfg.steps``.
    ``world_size`` (the processes that will train) must be the checkpoint's: the global batch and the split of
    the samples over the processes depend on it.
    """
    last = complete_checkpoint_dir(out / "checkpoints" / "last")
    restarts = slurm_restarts()
    resume = cfg.resume
    if not resume and restarts:  # the same command again, by SLURM: its run goes on
        logger.warning("SLURM requeued this job (restart %d): continuing the run in %s as with --resume",
                       restarts, out)
        resume = True
    if not resume:
        if last is not None:
            raise TrainingError(
                f"{out} already holds a training run (checkpoint {last}): pass --resume to continue it, "
                "or choose another --output")
        return None
    if last is None:
        if restarts:  # requeued before its first checkpoint: the run starts again (not the user's --resume)
            logger.warning("no checkpoint under %s yet: starting from step 0", out / "checkpoints")
            return None
        what = (f"holds no checkpoint ({out / 'checkpoints' / 'last'} is missing)" if out.exists()
                else "does not exist")
        raise TrainingError(f"--resume: nothing to resume, {out} {what}; without --resume, a new run starts there")
    state = _read_last(last)
    if state.world_size != world_size:
        global_batch = cfg.batch_size * cfg.grad_accumulation
        raise TrainingError(
            f"cannot resume {last} with {world_size} process(es): it was trained by {state.world_size} (global batch "
            f"{global_batch * state.world_size} = batch_size {cfg.batch_size} x {state.world_size} x grad_accumulation "
            f"{cfg.grad_accumulation}); resume it with {state.world_size} (torchrun --nproc_per_node, or nodes x "
            "tasks_per_node in the infra YAML), or start a new run (another --output)")
    mismatch = [k for k in config_differences(state.config, json.loads(cfg.model_dump_json())) if k != "steps"]
    if mismatch:
        raise TrainingError(
            f"cannot resume {last}: the configuration differs from the checkpoint's in {mismatch}; resuming "
            "continues the same run (change them in a new run with another --output)")
    if state.step > cfg.steps:
        raise TrainingError(f"cannot resume {last}: the checkpoint is at step {state.step}, beyond steps={cfg.steps} "
                            f"(give --steps {state.step} or more)")
    saved_steps = int(state.config["steps"])
    if saved_steps != cfg.steps:
        if state.step == cfg.steps:
            raise TrainingError(f"cannot resume {last} with steps={cfg.steps}: the checkpoint is at step {state.step} "
                                f"already, nothing is left to train (its weights: {last / MODEL_FILE})")
        o = cfg.optim
        before, after = (o.lr * lr_factor(state.step, total, o.warmup_steps, o.min_lr_ratio)
                         for total in (saved_steps, cfg.steps))
        logger.warning(
            "steps=%d instead of the run's %d: the run is %s from step %d to %d steps; from step %d on the learning "
            "rate follows the %d-step schedule (at step %d it goes from %.4g, the %d-step schedule's, to %.4g), so "
            "the result differs from that of a run of %d steps from the start",
            cfg.steps, saved_steps, "extended" if cfg.steps > saved_steps else "shortened", state.step, cfg.steps,
            state.step, cfg.steps, state.step, before, saved_steps, after, cfg.steps)
    return state


# Keys that may change between an interrupted run and its continuation without changing its results.
RESUMABLE_CHANGES = ("device", "cpu_threads", "progress", "resume", "infra", "data.num_workers", "log_every",
                     "dist_timeout_s", "shard_optimizer",
                     "sample_every", "n_sample_images", "checkpoint_every", "output_dir",
                     "data.nsd_dataset_config.nsddata_path", "data.nsd_dataset_config.infra",
                     "versatilediffusion_config.vd_cache_dir", "versatilediffusion_config.num_inference_steps",
                     "versatilediffusion_config.guidance_scale", "versatilediffusion_config.scheduler",
                     "versatilediffusion_config.seed")  # the last four: sample grids only


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, except those in ``RESUMABLE_CHANGES``."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if name in RESUMABLE_CHANGES:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out
