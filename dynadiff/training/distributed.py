"""Data-parallel training over ``torch.distributed`` (``train.py`` under torchrun or as a multi-task SLURM job).

Who starts the processes sets the environment this module reads:

- ``torchrun --nproc_per_node N train.py ...``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR``, ``MASTER_PORT``;
- a SLURM job of several tasks submitted by exca/submitit (``nodes`` x ``tasks_per_node`` in the ``train``
  section of the infra YAML): submitit's job environment, exported as the variables above by
  ``submitit.helpers.TorchDistributedEnvironment`` (the master is the job's first node, the port derived
  from the job id).

One process per device: ``gloo`` on the CPU, ``nccl`` on GPUs (the GPU of the process's local rank). Every
collective has a time limit (``TrainConfig.dist_timeout_s``), so a process whose peer died or hangs fails
instead of waiting forever.

The sample order and the random draws of a data-parallel step are those of one process whose micro-batch
is the global one (``batch_size x world_size`` samples): rank ``r`` takes rows ``r*B .. (r+1)*B - 1`` of it
(:class:`dynadiff.training.StepBatches`), draws the diffusion noise, timesteps and conditioning dropout of
all the rows and keeps its own (``DynadiffModel.training_loss(share=...)``), and so does the brain module's
dropout (:class:`BatchShareDropout`). DDP averages the gradients of the ranks' mean losses: the mean loss of
the global batch. See docs/training.md, "Several GPUs / nodes".
"""

from __future__ import annotations

import dataclasses
import datetime
import inspect
import logging
import os
import typing as tp

import torch
from torch import nn

logger = logging.getLogger(__name__)

TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedSetupError(RuntimeError):
    """The processes of a data-parallel run cannot start as configured (a one-line reason)."""


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place among the training processes (``size == 1``: a single-process run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    launcher: str = "none"  # none, torchrun, slurm (submitit)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _int_env(name: str, env: tp.Mapping[str, str]) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        raise DistributedSetupError(f"the environment variable {name} is missing or not an integer "
                                    f"({env.get(name)!r}): start the processes with torchrun") from None


def detect_world(env: tp.Mapping[str, str] | None = None) -> World:
    """The world this process belongs to, from its environment (no process group is started).

    torchrun's variables win; otherwise a submitit job of several tasks; otherwise a single process.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "RANK" in env:
        size, rank = _int_env("WORLD_SIZE", env), _int_env("RANK", env)
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_size = int(env.get("LOCAL_WORLD_SIZE", size))
        if not 0 <= rank < size:
            raise DistributedSetupError(f"RANK={rank} is outside WORLD_SIZE={size}")
        return World(rank, size, local_rank, local_size, "torchrun" if size > 1 else "none")
    if "SUBMITIT_FOLDER" in env and env is os.environ:
        import submitit

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            return World(job.global_rank, job.num_tasks, job.local_rank, job.num_tasks // job.num_nodes, "slurm")
    return World()


def resolve_device(name: str, world: World) -> torch.device:
    """The device of this process: ``cuda`` (or ``auto`` with GPUs) is the GPU of its local rank."""
    from dynadiff.device import DeviceError, resolve_device as single_device
    from dynadiff.training.errors import TrainingError

    if not world.distributed:
        try:
            return torch.device(single_device(name))
        except DeviceError as e:
            raise TrainingError(str(e)) from None
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise TrainingError(f"device={name} with {world.size} processes: data-parallel training runs on cpu or cuda")
    if device.index is not None:
        raise TrainingError(f"device={name} with {world.size} processes: give device=cuda, each process takes the "
                            "GPU of its local rank")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count >= world.local_size:
        return torch.device("cuda", world.local_rank)
    if count == 1 and world.launcher == "slurm":  # SLURM bound one GPU to each task (CUDA_VISIBLE_DEVICES)
        return torch.device("cuda", 0)
    how = ("torchrun --nproc_per_node" if world.launcher == "torchrun" else "tasks_per_node in the infra YAML")
    raise TrainingError(f"{world.local_size} processes on this node but {count} GPU(s) visible: one process per GPU "
                        f"({how} {count}), or device=cpu")


def init_process_group(world: World, device: torch.device, timeout_s: float) -> None:
    """Start the default process group (``env://``): gloo on the CPU, nccl on GPUs; collectives time out after
    ``timeout_s`` seconds."""
    import torch.distributed as dist

    if world.launcher == "slurm":
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    missing = [k for k in TORCHRUN_KEYS if k not in os.environ]
    if missing:
        raise DistributedSetupError(f"{world.size} processes but {missing} not set: start them with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    logger.info("process group: rank %d of %d (local rank %d), backend %s, master %s:%s, collective timeout %.0f s",
                world.rank, world.size, world.local_rank, backend, os.environ["MASTER_ADDR"],
                os.environ["MASTER_PORT"], timeout_s)


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_mean(values: tp.Sequence[float], world: World, device: torch.device) -> list[float]:
    """The mean of each value over the processes (the values themselves for one process)."""
    if not world.distributed:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world.size).tolist()


def all_sum(values: tp.Sequence[float], world: World, device: torch.device) -> list[float]:
    if not world.distributed:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------- the data-parallel model


class _Share:
    """The rows ``(start, total)`` of the global micro-batch that this process computes (None: all of them)."""

    value: tuple[int, int] | None = None


class BatchShareDropout(nn.Dropout):
    """``nn.Dropout`` that draws the mask of the whole global micro-batch and keeps this process's rows.

    The global generator is seeded alike on every process, so rank ``r``'s rows of the mask are those a
    single process drawing the global batch gets; with no share set it is ``nn.Dropout`` itself. On the CPU
    the mask is drawn exactly as ``torch.nn.functional.dropout`` draws it (``bernoulli_(1 - p)``, divided by
    ``1 - p``, tested bit for bit).
    """

    def __init__(self, p: float, share: _Share):
        super().__init__(p)
        self._share = share

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        share = self._share.value
        if share is None or not self.training or self.p == 0 or x.numel() == 0:
            return super().forward(x)
        start, total = share
        noise = torch.empty((total, *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        noise = noise[start:start + x.shape[0]]
        noise.div_(1 - self.p)
        return x * noise


class LossModule(nn.Module):
    """What DDP wraps: ``forward`` is the model's training loss of this process's rows of the global batch."""

    def __init__(self, model: nn.Module, share: _Share):
        super().__init__()
        self.model = model
        self._share = share

    def forward(self, brain, img, subject_idx, generator, share: tuple[int, int]):
        self._share.value = share
        try:
            return self.model.training_loss(brain, img, subject_idx, generator=generator, share=share)
        finally:
            self._share.value = None


def share_dropout(model: nn.Module, share: _Share) -> int:
    """Replace every ``nn.Dropout`` of ``model`` by a :class:`BatchShareDropout` (no weights: the state dict
    is unchanged); returns how many."""
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, BatchShareDropout(child.p, share))
                n += 1
    return n


def wrap_model(model: nn.Module, world: World, device: torch.device):
    """``DistributedDataParallel`` over the trainable parameters (brain module + LoRA) of ``model``.

    The frozen UNet and VAE are left out of DDP's synchronisation (each process loaded the same weights);
    the trainable ones start equal (seeded initialisation or the same checkpoint) and DDP checks it by
    broadcasting rank 0's. Buffers are not broadcast (a ``norm: batch`` brain module keeps per-process
    running statistics: rank 0's are saved).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    share = _Share()
    n = share_dropout(model, share)
    module = LossModule(model, share)
    ignore = [f"model.{name}" for name, p in model.named_parameters() if not p.requires_grad]
    ignore += [f"model.{name}" for name, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(module, ignore)
    # buffers are all ignored above: none is synchronised, at the start or at each forward
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})  # the newer name, from torch 2.10 or so
    ddp = DDP(module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False,
              **no_buffer_sync)
    logger.debug("DDP over %d trainable tensors (%d dropout layers drawing global-batch masks)",
                 sum(1 for p in model.parameters() if p.requires_grad), n)
    return ddp
