"""Training (``train.py``): the brain module and the UNet's LoRA, docs/behaviour.md §4 training step.

- data: the non-test windows of the chosen subjects (``TrainDataConfig``), a
  validation split held out by image, windows zero-padded to the largest voxel
  count when there are several subjects (each sample keeps its ``subject_idx``);
- order: an endless stream of samples, one seeded permutation per epoch; the
  samples of optimizer step ``k`` are a pure function of ``(seed, k)``, and so are
  its random draws (:func:`step_seed`): resuming needs no data-loader or RNG state;
- optimisation: AdamW (decay on matrices only), linear warm-up + cosine decay,
  gradient accumulation and clipping, autocast mixed precision (fp16 with loss
  scaling);
- outputs (``TrainConfig`` docstring): ``config.yaml``, ``log.csv``, sample grids,
  ``checkpoints/last`` (model + optimizer/scheduler state) and ``checkpoints/best``;
- resuming (:func:`check_output`) with other ``steps`` than the checkpoint's trains the
  run to the new length: from the checkpoint's step on, the learning rate is that of the
  new schedule (the steps before it keep the old one's).

A checkpoint folder is written under a temporary name and swapped in, so an
interruption never leaves a half-written checkpoint: ``checkpoints/last`` (or,
after a crash during the swap, ``checkpoints/last.old``) is always complete.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import logging
import math
import os
import shlex
import shutil
import time
import typing as tp
from pathlib import Path

import numpy as np
import torch

from dynadiff.config import OptimizerConfig, TrainConfig
from dynadiff.files import save_png as _save_png
from dynadiff.files import write_text as _write_text

logger = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
STATE_FORMAT = "1"
LOG_FIELDS = ("step", "split", "loss", "lr", "grad_norm", "samples_per_s", "epoch", "time_s")
# Streams of random draws, one seed each per (step, micro-batch): see step_seed.
_NOISE, _DROPOUT, _VALIDATION, _INIT = 0, 1, 2, 3


class TrainingError(RuntimeError):
    """The training cannot run or resume as configured."""


# ----------------------------------------------------------------------------- randomness


def _seed_words(seed: int) -> list[int]:
    return [seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF]


def step_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from the run's seed and integer keys (step, micro-batch, stream)."""
    state = np.random.SeedSequence([*_seed_words(seed), *keys]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the ``n`` training samples in epoch ``epoch``."""
    return np.random.default_rng([*_seed_words(seed), epoch, 7]).permutation(n)


class SampleStream:
    """Endless sample order: epoch permutations back to back; ``positions(start, count)`` -> indices.

    Position ``p`` of the stream is sample ``perm(p // n)[p % n]``: any stretch can be
    produced without replaying the ones before it.
    """

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise TrainingError("the training split is empty")
        self.n, self.seed = n, seed
        self._cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            if len(self._cache) >= 2:  # a stretch spans at most two epochs at a time
                self._cache.pop(min(self._cache))
            self._cache[epoch] = epoch_permutation(self.n, self.seed, epoch)
        return self._cache[epoch]

    def positions(self, start: int, count: int) -> list[int]:
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + count)]


class StepBatches:
    """``batch_sampler`` for a DataLoader: the micro-batches of steps ``start_step, start_step + 1, ...``.

    With ``world_size`` processes, micro-batch ``m`` of step ``k`` is the stretch of ``batch_size * world_size``
    stream positions that one process with that batch size takes, and ``rank`` takes its rows
    ``rank * batch_size .. (rank + 1) * batch_size - 1``.
    """

    def __init__(self, stream: SampleStream, batch_size: int, accumulation: int, start_step: int, stop_step: int,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not within world_size {world_size}")
        self.stream, self.batch_size, self.accumulation = stream, batch_size, accumulation
        self.start_step, self.stop_step = start_step, stop_step
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step) * self.accumulation

    def __iter__(self) -> tp.Iterator[list[int]]:
        for step in range(self.start_step, self.stop_step):
            for micro in range(self.accumulation):
                start = ((step * self.accumulation + micro) * self.world_size + self.rank) * self.batch_size
                yield self.stream.positions(start, self.batch_size)


# ----------------------------------------------------------------------------- data


class TrainingSamples:
    """torch ``Dataset`` over samples of several subjects' ``NsdDataset``.

    ``refs[i] = (dataset, sample)``; ``brain_refs`` (default ``refs``) says whose fMRI
    window goes with image ``refs[i]`` (different only for the shuffled-pairs control).
    Items: ``{"brain": (n_voxels, T) float32 zero-padded, "img": (3, S, S) in [0, 1],
    "subject_idx": long}``.
    """

    def __init__(self, datasets: list, refs: list[tuple[int, int]], n_voxels: int,
                 brain_refs: list[tuple[int, int]] | None = None):
        self.datasets, self.refs, self.n_voxels = datasets, list(refs), n_voxels
        self.brain_refs = list(brain_refs) if brain_refs is not None else self.refs
        if len(self.brain_refs) != len(self.refs):
            raise ValueError("brain_refs must pair up with refs")

    def __len__(self) -> int:
        return len(self.refs)

    def nsd_id(self, i: int) -> int:
        d, j = self.refs[i]
        return int(self.datasets[d].nsd_ids[j])

    def image(self, i: int) -> np.ndarray:
        d, j = self.refs[i]
        return self.datasets[d].image(j)

    def __getitem__(self, i: int) -> dict:
        d, j = self.refs[i]
        bd, bj = self.brain_refs[i]
        ds = self.datasets[d]
        window = self.datasets[bd].brain(bj)  # (V_subject, T)
        brain = np.zeros((self.n_voxels, window.shape[1]), dtype=np.float32)
        brain[: window.shape[0]] = window
        img = torch.from_numpy(ds.image(j).copy()).permute(2, 0, 1).float().div_(255.0)
        return {"brain": torch.from_numpy(brain), "img": img,
                "subject_idx": torch.tensor(self.datasets[bd].subject_idx, dtype=torch.long)}


@dataclasses.dataclass
class TrainingData:
    train: TrainingSamples
    val: TrainingSamples
    n_voxels: int  # the largest voxel count of the subjects (the model's input size)
    n_timepoints: int
    voxels_per_subject: dict[int, int]


def build_training_data(cfg: TrainConfig) -> TrainingData:
    """Each subject's train-split dataset, a validation split held out by image, padded samples."""
    from dynadiff.data.dataset import split_by_image

    datasets, refs = [], []
    for idx, subject in enumerate(cfg.subjects):
        ds = cfg.data.subject_config(subject).build(subject_idx=idx)
        datasets.append(ds)
        refs += [(idx, j) for j in range(len(ds))]
    counts = {s: ds.n_voxels for s, ds in zip(cfg.subjects, datasets)}
    trs = {ds.n_trs for ds in datasets}
    if len(trs) != 1:
        raise TrainingError(f"the subjects' windows have different numbers of TRs: {sorted(trs)}")
    ids = [int(datasets[d].nsd_ids[j]) for d, j in refs]
    train_pos, val_pos = split_by_image(ids, cfg.data.val_fraction, cfg.data.val_seed)
    train_refs = [refs[i] for i in train_pos]
    brain_refs = None
    if cfg.data.shuffle_pairs:
        perm = np.random.default_rng([*_seed_words(cfg.seed), 11]).permutation(len(train_refs))
        brain_refs = [train_refs[i] for i in perm]
    n_voxels = max(counts.values())
    data = TrainingData(
        train=TrainingSamples(datasets, train_refs, n_voxels, brain_refs),
        val=TrainingSamples(datasets, [refs[i] for i in val_pos], n_voxels),
        n_voxels=n_voxels, n_timepoints=trs.pop(), voxels_per_subject=counts,
    )
    logger.info("training data: subjects %s (voxels %s), %d training samples, %d validation samples (%d images held out)",
                cfg.subjects, counts, len(data.train), len(data.val), len({ids[i] for i in val_pos}))
    return data


def collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


# ----------------------------------------------------------------------------- optimisation


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based): linear
    warm-up from 1/warmup to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, shard: bool = False
                    ) -> tuple[torch.optim.Optimizer, list[str]]:
    """AdamW over the trainable parameters (weight decay on matrices only); also their names, in order.

    ``shard`` (data-parallel runs): a ``ZeroRedundancyOptimizer`` whose AdamW moments are split over the
    processes (each keeps and updates those of its share of the parameters, then broadcasts them), as
    ZeRO stage 1; the same update as AdamW's.
    """
    decay, no_decay, names = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append((name, p))
    groups = []
    for params, wd in ((decay, cfg.weight_decay), (no_decay, 0.0)):
        if params:
            groups.append({"params": [p for _, p in params], "weight_decay": wd})
            names += [n for n, _ in params]
    if shard:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        opt = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=cfg.lr, betas=tuple(cfg.betas),
                                      eps=cfg.eps)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    return opt, names


def _is_sharded(opt: torch.optim.Optimizer) -> bool:
    return hasattr(opt, "consolidate_state_dict")  # torch.distributed.optim.ZeroRedundancyOptimizer


def _indexed_param_groups(opt: torch.optim.Optimizer) -> list[dict]:
    """``opt.state_dict()["param_groups"]`` (parameters as indices), also for a sharded optimizer whose state
    dict needs a collective."""
    if not _is_sharded(opt):
        return opt.state_dict()["param_groups"]
    out, i = [], 0
    for g in opt.param_groups:
        out.append({**{k: v for k, v in g.items() if k != "params"}, "params": list(range(i, i + len(g["params"])))})
        i += len(g["params"])
    return out


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.optim
    return torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(lr_factor, total=cfg.steps, warmup=o.warmup_steps, min_ratio=o.min_lr_ratio))


def resolve_mixed_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full precision) for ``mixed_precision`` on ``device``."""
    cuda = device.type == "cuda"
    if name == "auto":
        if not cuda:
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "no":
        return None
    if name == "fp16" and not cuda:
        raise TrainingError("mixed_precision=fp16 needs a CUDA device (loss scaling); use bf16 or no on the CPU")
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise TrainingError("this GPU does not support bf16: use mixed_precision=fp16 (or no)")
    return torch.bfloat16 if name == "bf16" else torch.float16


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} asked for, but CUDA is not available here: use device=cpu")
    return device


# ----------------------------------------------------------------------------- checkpoints


def _write_dir_atomically(target: Path, write: tp.Callable[[Path], None]) -> None:
    """``write(tmp_folder)``, then swap it in as ``target`` (``target.old`` kept until the swap is done)."""
    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    tmp.rename(target)
    if old.exists():
        shutil.rmtree(old)


def complete_checkpoint_dir(target: Path) -> Path | None:
    """``target`` if it exists, else ``target.old`` (a crash in the middle of a swap), else None."""
    target = Path(target)
    if target.is_dir():
        return target
    old = target.with_name(target.name + ".old")
    return old if old.is_dir() else None


def _checkpoint_metadata(cfg: TrainConfig, step: int, extra: dict) -> dict:
    return {"step": step, "subjects": cfg.subjects, "train_config": json.loads(cfg.model_dump_json()), **extra}


def save_training_checkpoint(folder: Path, model, opt: torch.optim.Optimizer, param_names: list[str], sched,
                             scaler, cfg: TrainConfig, step: int, best_val: float | None, with_state: bool = True,
                             extra: dict | None = None, log_window: tuple[float, int] = (0.0, 0),
                             world_size: int = 1) -> Path:
    """Write ``folder/model.safetensors`` (what eval.py reads) and, with ``with_state``,
    ``folder/state.safetensors`` (AdamW moments per parameter name, scheduler, loss
    scaler, step, best validation loss, ``log_window``: the summed loss and count of the
    steps since the last logged train row, ``world_size``: the processes that trained it;
    everything ``--resume`` needs). Atomic. A sharded optimizer's state must have been
    consolidated on this process first (``consolidate_state_dict``)."""
    from safetensors.torch import save_file

    from dynadiff.checkpoint import save_checkpoint

    meta = _checkpoint_metadata(cfg, step, dict(extra or {}, best_val_loss=best_val))

    def write(tmp: Path) -> None:
        save_checkpoint(model, tmp / MODEL_FILE, extra_metadata=meta)
        if not with_state:
            return
        opt_state = opt.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        for idx, name in enumerate(param_names):
            for key, value in opt_state["state"].get(idx, {}).items():
                tensors[f"{key}/{name}"] = value.detach().to("cpu").contiguous()
        groups = [{k: v for k, v in g.items() if k != "params"} | {"n_params": len(g["params"])}
                  for g in opt_state["param_groups"]]
        state_meta = {
            "format": "pt", "dynadiff_train_state": STATE_FORMAT, "step": str(step),
            "param_names": json.dumps(param_names), "param_groups": json.dumps(groups),
            "scheduler": json.dumps(sched.state_dict()), "scaler": json.dumps(scaler.state_dict() if scaler else None),
            "best_val_loss": json.dumps(best_val), "train_config": cfg.model_dump_json(),
            "log_window": json.dumps(list(log_window)), "world_size": str(world_size),
        }
        save_file(tensors, str(tmp / STATE_FILE), metadata=state_meta)

    _write_dir_atomically(Path(folder), write)
    return Path(folder) / MODEL_FILE


@dataclasses.dataclass
class ResumeState:
    folder: Path
    step: int
    best_val: float | None
    config: dict
    log_window: tuple[float, int] = (0.0, 0)  # (summed loss, count) of the steps not logged yet
    world_size: int = 1  # processes of the run that wrote it


def read_resume_state(folder: Path) -> ResumeState:
    from dynadiff.checkpoint import read_metadata

    meta = read_metadata(Path(folder) / STATE_FILE)
    if meta.get("dynadiff_train_state") != STATE_FORMAT:
        raise TrainingError(f"{folder / STATE_FILE} is not a dynadiff training state (format {STATE_FORMAT})")
    loss_sum, n = json.loads(meta.get("log_window", "[0.0, 0]"))  # absent from older states: an empty window
    return ResumeState(Path(folder), int(meta["step"]), json.loads(meta["best_val_loss"]), json.loads(meta["train_config"]),
                       (float(loss_sum), int(n)), int(meta.get("world_size", "1")))  # absent before issue 14: 1


def load_training_state(state: ResumeState, model, opt: torch.optim.Optimizer, param_names: list[str], sched,
                        scaler) -> None:
    """Model weights, AdamW moments, scheduler and loss-scaler state from a ``checkpoints/last`` folder."""
    from safetensors.torch import load_file

    from dynadiff.checkpoint import load_checkpoint, read_metadata

    load_checkpoint(model, state.folder / MODEL_FILE)
    meta = read_metadata(state.folder / STATE_FILE)
    saved_names = json.loads(meta["param_names"])
    if saved_names != param_names:
        missing = sorted(set(param_names) - set(saved_names))
        extra = sorted(set(saved_names) - set(param_names))
        raise TrainingError(
            f"{state.folder}: the optimizer state does not match this model's trainable parameters "
            f"(missing {missing[:5]}, unexpected {extra[:5]}, or another order)")
    tensors = load_file(str(state.folder / STATE_FILE))
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        field, name = key.split("/", 1)
        per_param.setdefault(param_names.index(name), {})[field] = value
    current = _indexed_param_groups(opt)
    groups = json.loads(meta["param_groups"])
    if [g["n_params"] for g in groups] != [len(g["params"]) for g in current]:
        raise TrainingError(f"{state.folder}: the optimizer's parameter groups do not match this model's")
    for saved, group in zip(groups, current):
        group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "n_params"})
    opt.load_state_dict({"state": per_param, "param_groups": current})
    sched.load_state_dict(json.loads(meta["scheduler"]))
    # The saved param_groups carry the lr of the schedule the state was saved with; the lr of this step is
    # that of sched's schedule (cfg.steps): the same value unless steps changed (an extended run).
    for group, base_lr, factor in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base_lr * factor(sched.last_epoch)
    sched._last_lr = [group["lr"] for group in opt.param_groups]
    scaler_state = json.loads(meta["scaler"])
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)


# ----------------------------------------------------------------------------- logging outputs


class CsvLog:
    """``log.csv``: one row per logged train step and per validation (``split`` = train / val)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = Path(path)
        rows = []
        if resume_step is not None and self.path.exists():  # drop rows logged after the checkpoint
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path)

    def write(self, **row) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_FIELDS).writerow({k: _fmt(row.get(k)) for k in LOG_FIELDS})


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# ----------------------------------------------------------------------------- the loop


def training_step_loss(model, batch: dict, generator: torch.Generator, autocast_dtype: torch.dtype | None,
                       share: tuple[int, int] | None = None) -> torch.Tensor:
    """The docs/behaviour.md §4 loss of one micro-batch (a hook: tests wrap it to interrupt a run).

    ``share = (start, total)``: ``model`` is the DDP-wrapped :class:`dynadiff.distributed.LossModule` and the
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

    ddp: torch.nn.Module  # DistributedDataParallel(dynadiff.distributed.LossModule(model))
    world: tp.Any  # dynadiff.distributed.World
    device: torch.device


def optimizer_step(model, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], micro_batches: tp.Iterable[dict],
                   accumulation: int, step: int, seed: int, grad_clip: float | None,
                   autocast_dtype: torch.dtype | None = None, scaler=None,
                   parallel: DataParallel | None = None) -> tuple[float, float]:
    """One optimizer step over ``accumulation`` micro-batches: (mean loss, gradient norm before clipping).

    Micro-batch ``m`` of step ``step`` draws its diffusion noise from a generator seeded
    by ``(seed, step, m)`` and its dropout from the global generators seeded likewise.
    With ``parallel``, every process seeds alike, draws for the global micro-batch and keeps its rows;
    DDP averages the gradients (once per step: the other micro-batches accumulate without
    synchronisation) and the returned loss is the mean over the processes.
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
        from dynadiff.distributed import all_mean

        (step_loss,) = all_mean([step_loss], parallel.world, parallel.device)
    if scaler:
        scaler.unscale_(opt)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else float("inf")))
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
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
        from dynadiff.distributed import all_sum

        (total,) = all_sum([total], world, model.device)
    return total / max(n, 1)


@torch.no_grad()
def sample_grid(model, data: TrainingSamples, n: int, seed: int) -> np.ndarray:
    """Ground truths above reconstructions of the first ``n`` validation samples, uint8."""
    from dynadiff.evaluation import overview_grid, to_uint8

    n = min(n, len(data))
    batch = collate([data[i] for i in range(n)])
    recs = model.reconstruct(batch["brain"], batch["subject_idx"], seed=seed)
    recs = [to_uint8(r) for r in recs]  # truncated to 8 bits, as eval.py's (and the original's) images
    gts = [data.image(i) for i in range(n)]
    return overview_grid(gts, recs, n, tile=min(160, max(64, recs[0].shape[0])))


def init_model(cfg: TrainConfig, data: TrainingData, device: torch.device | str = "cpu"):
    """The decoder at step 0 (eval mode): its brain module and LoRA initialisation depend on ``cfg.seed`` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(step_seed(cfg.seed, 0, 0, _INIT))
        return cfg.versatilediffusion_config.build(
            cfg.brain_modules_config, n_voxels=data.n_voxels, n_subjects=len(cfg.subjects),
            n_timepoints=data.n_timepoints, device=device)


def _finished_summary(out: Path, steps: int) -> dict | None:
    """The ``summary.json`` a finished run of ``steps`` steps wrote in ``out``, if readable."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == steps else None


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
    from dynadiff.data import nsd
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
    vd = cfg.versatilediffusion_config
    check_vd_folder(vd.vd_cache_dir, ("image_unet", "vae", "scheduler") + (("text_unet",) if vd.dual_attention else ()))


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


EVAL_KEYS = ("data.nsd_dataset_config.nsddata_path", "data.nsd_dataset_config.offset",
             "data.nsd_dataset_config.duration", "data.nsd_dataset_config.sessions", "brain_modules_config",
             "versatilediffusion_config.vd_cache_dir", "versatilediffusion_config.dual_attention",
             "versatilediffusion_config.image_size", "versatilediffusion_config.lora_rank",
             "versatilediffusion_config.lora_alpha", "versatilediffusion_config.lora_target_modules")


def eval_command(cfg: TrainConfig, checkpoint: str | Path) -> str:
    """The ``eval.py`` command line(s) for a checkpoint of this run, one per subject: the keys that differ from
    eval's defaults."""
    from dynadiff.config import EvalConfig

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    mine = flat(json.loads(cfg.model_dump_json()))
    default = flat(json.loads(EvalConfig().model_dump_json()))
    args = []
    for key, value in mine.items():
        if any(key == k or key.startswith(k + ".") for k in EVAL_KEYS) and default.get(key) != value:
            text = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)
            args.append(f"{key}={text}")
    # one line per subject (a model of several subjects is evaluated one subject at a time)
    return "\n".join(shlex.join(["python", "eval.py", "--subject", str(s), "--checkpoint", str(checkpoint), *args])
                     for s in cfg.subjects)


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


def train(cfg: TrainConfig) -> dict:
    """Run (or continue) the training described by ``cfg``; returns a summary dict.

    Under torchrun or as a SLURM job of several tasks, this process is one of a data-parallel run
    (:mod:`dynadiff.distributed`): it starts the process group, trains its share of every global batch, and
    only rank 0 writes the run folder."""
    from dynadiff import distributed

    world = distributed.detect_world()
    if not world.distributed:
        if cfg.shard_optimizer:
            logger.warning("shard_optimizer=true has no effect in a single process")
        return _train(cfg, world)
    check_inputs(cfg)  # --output a file: the one-line error, before the rank's log goes there
    log_file = _rank_log(cfg, world)
    try:
        return _train(cfg, world)
    except BaseException as e:
        logger.error("rank %d of %d failed: %s: %s (this rank's log: %s)", world.rank, world.size, type(e).__name__,
                     str(e).splitlines()[0] if str(e) else "", log_file)
        raise
    finally:
        distributed.destroy_process_group()
        _drop_rank_log()


_RANK_HANDLER: list[logging.Handler] = []


def _rank_log(cfg: TrainConfig, world) -> Path:
    """Each process of a data-parallel run also logs to ``output_dir/logs/rank<r>.log`` (appended); the
    console keeps rank 0's messages and the others' warnings and errors."""
    path = Path(cfg.output_dir) / "logs" / f"rank{world.rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{world.rank} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if not world.is_main:
        for h in root.handlers:
            if h is not handler and not isinstance(h, logging.FileHandler):
                h.setLevel(max(h.level, logging.WARNING))
    _RANK_HANDLER.append(handler)
    return path


def _drop_rank_log() -> None:
    while _RANK_HANDLER:
        handler = _RANK_HANDLER.pop()
        logging.getLogger().removeHandler(handler)
        handler.close()


def _train(cfg: TrainConfig, world) -> dict:
    import yaml
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from dynadiff import distributed

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
                n_trainable, len(cfg.subjects), data.n_voxels, device, autocast_dtype)
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
                                                  cfg.seed, cfg.optim.grad_clip, autocast_dtype, scaler, parallel)
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
