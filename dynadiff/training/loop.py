"""The training loop: the loss of a micro-batch, an optimizer step, validation, sample grids, and
:func:`train`, which runs (or continues) a run and writes its folder (``TrainConfig`` docstring)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import typing as tp
from pathlib import Path

import numpy as np
import torch

from dynadiff.config import TrainConfig
from dynadiff.files import save_png as _save_png
from dynadiff.files import write_text as _write_text
from dynadiff.training.checkpoints import MODEL_FILE, load_training_state, save_training_checkpoint
from dynadiff.training.checks import check_inputs, check_output
from dynadiff.training.csvlog import CsvLog
from dynadiff.training.data import TrainingData, TrainingSamples, build_training_data, collate
from dynadiff.training.errors import TrainingError
from dynadiff.training.evalcmd import eval_command
from dynadiff.training.optim import build_optimizer, build_scheduler
from dynadiff.training.precision import resolve_mixed_precision
from dynadiff.training.rank_logs import drop_rank_log, rank_log
from dynadiff.training.seeding import SampleStream, StepBatches, step_seed

logger = logging.getLogger(__package__)  # "dynadiff.training", as before the split

# Streams of random draws, one seed each per (step, micro-batch): see step_seed.
_NOISE, _DROPOUT, _VALIDATION, _INIT = 0, 1, 2, 3


def training_step_loss(model, batch: dict, generator: torch.Generator, autocast_dtype: torch.dtype | None,
                       share: tuple[int, int] | None = None) -> torch.Tensor:
    """The docs/behaviour.md §4 loss of one micro-batch (a hook: tests wrap it to interrupt a run).

    ``share = (start, total)``: ``model`` is the DDP-wrapped :class:`dynadiff.training.distributed.LossModule` and the
    batch is rows ``start ..`` of a global micro-batch of ``total`` samples."""
    if share is None:
        device = model.device
        with _autocast(device, autocast_dtype):
            return model.training_loss(batch["brain"].to(device, non_blocking=True),
                                       batch["img"].to(device, non_blocking=True),
                                       batch["subject_idx"].to(device), generator=generator)
    device = model.module.model.device
    with _autocast(device, autocast_dtype):
        return model(batch["brain"].to(device, non_blocking=True), batch["img"].to(device, non_blocking=True),
                     batch["subject_idx"].to(device), generator, share)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device):
    """Dropout draws from the global generators: seed them for this step, restore them after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@dataclasses.dataclass
class DataParallel:
    """A data-parallel run, for :func:`optimizer_step`: the DDP-wrapped loss and this process's place."""

    ddp: torch.nn.Module  # DistributedDataParallel(dynadiff.training.distributed.LossModule(model))
    world: tp.Any  # dynadiff.training.distributed.World
    device: torch.device


def optimizer_step(model, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], micro_batches: tp.Iterable[dict],
                   accumulation: int, step: int, seed: int, grad_clip: float | None,
                   autocast_dtype: torch.dtype | None = None, scaler=None,
                   parallel: DataParallel | None = None, holds=None) -> tuple[float, float]:
    """One optimizer step over ``accumulation`` micro-batches: (mean loss, gradient norm before clipping).

    Micro-batch ``m`` of step ``step`` draws its diffusion noise from a generator seeded
    by ``(seed, step, m)`` and its dropout from the global generators seeded likewise.
    With ``parallel``, every process seeds alike, draws for the global micro-batch and keeps its rows;
    DDP averages the gradients (once per step: the other micro-batches accumulate without
    synchronisation) and the returned loss is the mean over the processes. ``holds``
    (:class:`dynadiff.training.pretrained.Holds`): what a run from a pretrained model keeps still.
    """
    device = model.device
    opt.zero_grad(set_to_none=True)
    step_loss = 0.0
    for micro, batch in enumerate(micro_batches):
        g = torch.Generator(device).manual_seed(step_seed(seed, step, micro, _NOISE))
        share, no_sync = None, contextlib.nullcontext()
        if parallel is not None:
            b = len(batch["brain"])
            share = (parallel.world.rank * b, parallel.world.size * b)
            if micro < accumulation - 1:
                no_sync = parallel.ddp.no_sync()
        with _seeded_global_rng(step_seed(seed, step, micro, _DROPOUT), device), no_sync:
            if share is None:
                loss = training_step_loss(model, batch, g, autocast_dtype)
            else:
                loss = training_step_loss(parallel.ddp, batch, g, autocast_dtype, share=share)
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite loss {float(loss)} at step {step}: lower optim.lr or use "
                                    "mixed_precision=no")
            scaled = loss / accumulation
            (scaler.scale(scaled) if scaler else scaled).backward()
        step_loss += float(loss.detach()) / accumulation
    if parallel is not None:
        from dynadiff.training.distributed import all_mean

        (step_loss,) = all_mean([step_loss], parallel.world, parallel.device)
    if scaler:
        scaler.unscale_(opt)
    if holds is not None:
        holds.before_step(step)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf")))
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    if holds is not None:
        holds.after_step()
    return step_loss, grad_norm


@torch.no_grad()
def validation_loss(model, data: TrainingSamples, cfg: TrainConfig, autocast_dtype, limit: int | None = None,
                    world=None) -> float:
    """Mean loss over the validation samples (eval mode; the same draws at every validation).

    ``world`` (data-parallel runs): process ``r`` computes batches ``r, r + W, ...`` of ``batch_size`` samples
    and the sums are added over the processes: the value of one process, up to float rounding."""
    n = len(data) if limit is None else min(limit, len(data))
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for b, start in enumerate(range(0, n, cfg.batch_size)):
            if b % size != rank:
                continue
            batch = collate([data[i] for i in range(start, min(n, start + cfg.batch_size))])
            g = torch.Generator(model.device).manual_seed(step_seed(cfg.seed, b, 0, _VALIDATION))
            total += float(training_step_loss(model, batch, g, autocast_dtype)) * len(batch["brain"])
    finally:
        model.train(was_training)
    if world is not None and world.distributed:
        from dynadiff.training.distributed import all_sum

        (total,) = all_sum([total], world, model.device)
    return total / max(n, 1)


@torch.no_grad()
def sample_grid(model, data: TrainingSamples, n: int, seed: int) -> np.ndarray:
    """Ground truths above reconstructions of the first ``n`` validation samples, uint8."""
    from dynadiff.decoder import Decoder, to_uint8
    from dynadiff.evaluation import overview_grid

    n = min(n, len(data))
    batch = collate([data[i] for i in range(n)])
    decoder = Decoder(model, device=str(next(model.parameters()).device))  # the model in training, as it is now
    recs = decoder.reconstruct(batch["brain"], batch["subject_idx"], seed=seed)
    recs = [to_uint8(r) for r in recs]  # truncated to 8 bits, as eval.py's (and the original's) images
    gts = [data.image(i) for i in range(n)]
    return overview_grid(gts, recs, n, tile=min(160, max(64, recs[0].shape[0])))


def init_model(cfg: TrainConfig, data: TrainingData, device: torch.device | str = "cpu"):
    """The decoder at step 0 (eval mode): its brain module and LoRA initialisation depend on ``cfg.seed`` only; from
    a pretrained model (``cfg.init_from``), its tensors loaded (:func:`dynadiff.training.checkpoints.load_pretrained`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_seed(cfg.seed, 0, 0, _INIT))
        model = cfg.versatilediffusion_config.build(
            cfg.brain_modules_config, n_voxels=data.n_voxels,
            n_subjects=len(cfg.model_subjects), n_timepoints=data.n_timepoints, device=device)
    if cfg.init_from is not None:
        from dynadiff.training.checkpoints import load_pretrained

        load_pretrained(model, cfg)
    return model


def _finished_summary(out: Path, steps: int) -> dict | None:
    """The ``summary.json`` a finished run of ``steps`` steps wrote in ``out``, if readable."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == steps else None


def train(cfg: TrainConfig) -> dict:
    """Run (or continue) the training described by ``cfg``; returns a summary dict.

    Under torchrun or as a SLURM job of several tasks, this process is one of a data-parallel run
    (:mod:`dynadiff.training.distributed`): it starts the process group, trains its share of every global batch, and
    only rank 0 writes the run folder."""
    from dynadiff.training import distributed

    world = distributed.detect_world()
    if not world.distributed:
        if cfg.shard_optimizer:
            logger.warning("shard_optimizer=true has no effect in a single process")
        return _train(cfg, world)
    check_inputs(cfg)  # --output a file: the one-line error, before the rank's log goes there
    log_file = rank_log(cfg, world)
    try:
        return _train(cfg, world)
    except BaseException as e:
        logger.error("rank %d of %d failed: %s: %s (this rank's log: %s)", world.rank, world.size, type(e).__name__,
                     str(e).splitlines()[0] if str(e) else "", log_file)
        raise
    finally:
        distributed.destroy_process_group()
        drop_rank_log()


def _train(cfg: TrainConfig, world) -> dict:
    import yaml
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from dynadiff.training import distributed

    out = Path(cfg.output_dir)
    main = world.is_main
    check_inputs(cfg)
    resume = check_output(cfg, out, world.size)
    device = distributed.resolve_device(cfg.device, world)
    autocast_dtype = resolve_mixed_precision(cfg.mixed_precision, device)
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    if world.distributed:
        distributed.init_process_group(world, device, cfg.dist_timeout_s)
    if main:
        out.mkdir(parents=True, exist_ok=True)

    data = build_training_data(cfg)
    if cfg.val_every and not len(data.val):
        raise TrainingError("the validation split is empty: raise data.val_fraction or set val_every=0")
    model = init_model(cfg, data, device)
    model.train()
    shard = cfg.shard_optimizer and world.distributed
    opt, param_names = build_optimizer(model, cfg.optim, shard=shard)
    sched = build_scheduler(opt, cfg)
    scaler = torch.amp.GradScaler("cuda") if autocast_dtype == torch.float16 else None
    start, best_val, window_loss, window_n = 0, None, 0.0, 0
    if resume is not None:
        load_training_state(resume, model, opt, param_names, sched, scaler)
        start, best_val = resume.step, resume.best_val
        # a checkpoint between two logged rows: the next row still averages every step since the last one
        window_loss, window_n = resume.log_window
        logger.info("resumed from %s at step %d", resume.folder, start)
    parallel = None
    if world.distributed:
        if cfg.brain_modules_config.norm == "batch":
            logger.warning("brain_modules_config.norm=batch with %d processes: each normalises over its own %d "
                           "samples and keeps its own running statistics (rank 0's are saved)", world.size,
                           cfg.batch_size)
        parallel = DataParallel(distributed.wrap_model(model, world, device), world, device)
    log = None
    if main:
        _write_text(out / "config.yaml", yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
        log = CsvLog(out / "log.csv", start if resume is not None else None)
    n_trainable = sum(p.numel() for p in model.trainable_parameters())
    logger.info("model: %d trainable parameters (brain module + LoRA), %d subject(s), %d voxels; device %s, autocast %s",
                n_trainable, len(cfg.model_subjects), data.n_voxels, device, autocast_dtype)
    samples_per_step = cfg.batch_size * world.size * cfg.grad_accumulation
    logger.info("global batch: %d samples per optimizer step = batch_size %d x %d process(es) x grad_accumulation %d%s",
                samples_per_step, cfg.batch_size, world.size, cfg.grad_accumulation,
                " (optimizer state sharded over the processes)" if shard else "")

    stream = SampleStream(len(data.train), cfg.seed)
    loader = torch.utils.data.DataLoader(
        data.train, batch_sampler=StepBatches(stream, cfg.batch_size, cfg.grad_accumulation, start, cfg.steps,
                                              world.rank, world.size),
        collate_fn=collate, num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
        persistent_workers=False)
    batches = iter(loader)
    params = [p for p in model.parameters() if p.requires_grad]
    holds = None
    if cfg.init_from is not None:
        from dynadiff.training.pretrained import Holds

        holds = Holds(model, cfg)
    window_t = time.perf_counter()
    t0 = time.perf_counter()
    last_val, last_loss = None, None
    ckpt_dir = out / "checkpoints"

    def checkpoint(step: int) -> None:
        if shard:  # a collective: the AdamW moments of every process to rank 0
            opt.consolidate_state_dict(to=0)
        if main:
            save_training_checkpoint(ckpt_dir / "last", model, opt, param_names, sched, scaler, cfg, step, best_val,
                                     extra={"val_loss": last_val}, log_window=(window_loss, window_n),
                                     world_size=world.size)

    def validate(step: int) -> None:
        nonlocal best_val, last_val
        last_val = validation_loss(model, data.val, cfg, autocast_dtype, cfg.val_max_samples,
                                   world if world.distributed else None)
        improved = best_val is None or last_val < best_val
        if improved:
            best_val = last_val
        if not main:
            return
        log.write(step=step, split="val", loss=last_val, epoch=step * samples_per_step / len(data.train),
                  time_s=time.perf_counter() - t0)
        logger.info("step %d: validation loss %.5f%s", step, last_val, " (best)" if improved else "")
        if improved:
            save_training_checkpoint(ckpt_dir / "best", model, opt, param_names, sched, scaler, cfg, step, best_val,
                                     with_state=False, extra={"val_loss": last_val}, world_size=world.size)

    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and main), desc="train", unit="step",
               dynamic_ncols=True)
    with logging_redirect_tqdm(), bar:
        for step in range(start, cfg.steps):
            lr = sched.get_last_lr()[0]
            micro_batches = (next(batches) for _ in range(cfg.grad_accumulation))
            step_loss, grad_norm = optimizer_step(model, opt, params, micro_batches, cfg.grad_accumulation, step,
                                                  cfg.seed, cfg.optim.grad_clip, autocast_dtype, scaler, parallel,
                                                  holds)
            sched.step()
            done = step + 1
            last_loss = step_loss
            window_loss += step_loss
            window_n += 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                now = time.perf_counter()
                rate = window_n * samples_per_step / max(now - window_t, 1e-9)
                if main:
                    log.write(step=done, split="train", loss=window_loss / window_n, lr=lr, grad_norm=grad_norm,
                              samples_per_s=rate, epoch=done * samples_per_step / len(data.train), time_s=now - t0)
                bar.set_postfix(loss=f"{window_loss / window_n:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
                window_loss, window_n, window_t = 0.0, 0, now
            bar.update(1)
            if len(data.val) and ((cfg.val_every and done % cfg.val_every == 0) or done == cfg.steps):
                validate(done)
            if main and cfg.sample_every and len(data.val) and (done % cfg.sample_every == 0 or done == cfg.steps):
                grid = sample_grid(model, data.val, cfg.n_sample_images, cfg.versatilediffusion_config.seed)
                _save_png(grid, out / "samples" / f"step_{done:07d}.png")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                checkpoint(done)
    distributed.barrier(world)  # the last checkpoint is written before any process returns

    if start == cfg.steps and resume is not None:
        logger.info("the run at %s had already finished (%d steps)", out, cfg.steps)
        previous = _finished_summary(out, cfg.steps)
        if previous is not None:  # e.g. a requeued job whose first attempt finished: its losses, not nulls
            return previous
    summary = {
        "output_dir": str(out),
        "steps": cfg.steps,
        "resumed_from": start if resume is not None else None,
        "last_train_loss": last_loss,
        "last_val_loss": last_val,
        "best_val_loss": best_val,
        "last_checkpoint": str(ckpt_dir / "last" / MODEL_FILE),
        "best_checkpoint": str(ckpt_dir / "best" / MODEL_FILE) if (ckpt_dir / "best").exists() else None,
        "n_train": len(data.train),
        "n_val": len(data.val),
        "n_voxels": data.voxels_per_subject,
    }
    if world.distributed:
        summary["world_size"] = world.size
    summary["eval_command"] = eval_command(cfg, summary["best_checkpoint"] or summary["last_checkpoint"])
    if main:
        _write_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary
