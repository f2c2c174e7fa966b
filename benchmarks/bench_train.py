"""Training throughput (samples/s) of the training step of train.py, random weights and inputs.

Each configuration runs :func:`dynadiff.training.optimizer_step` (the loop's own step:
docs/behaviour.md §4 loss, backward through the UNet to the brain module and LoRA, gradient
clipping, AdamW) on random fMRI windows and images; a few warm-up steps, then the
median over timed steps. Data loading is not included (train.py overlaps it with
``data.num_workers`` processes).

CPU default (a few minutes on 2 cores): two configurations, each with 1 and 2 torch
threads side by side (the demo uses 1: on a small, busy machine the per-op overhead
of tiny models makes a second OpenMP thread a loss):

- ``tiny``: the demo's decoder (UNet 32/32/64/64 with 1 layer per block, 3-level VAE,
  32x32 images -> 8x8 latents, brain module 128 wide, 16 tokens, 332 voxels), batch 16;
- ``mid``: VD's UNet at 1/8 of its widths (40/80/160/160, 2 layers per block),
  4-level VAE, 64x64 images (8x8 latents), brain module 256 wide with the published
  257x768 tokens, subject 1's 15724 voxels, batch 4.

    python benchmarks/bench_train.py

GPU, the published sizes (VD image UNet 320/640/1280/1280, VAE at 512x512, brain module
1552 wide, 15724 voxels, 257x768 tokens), batch 8, bf16 (frozen UNet/VAE stored in bf16
and bf16 autocast; trainable weights float32), with the peak GPU memory:

    python benchmarks/bench_train.py --published --device cuda --json bench_train.json

Data-parallel (issue 14). On the CPU, one run compares 1 process with the global batch against 2 gloo
processes with half of it each (DDP over the trainable parts, one torch thread per process), same global
batch, samples/s of the whole and their ratio:

    python benchmarks/bench_train.py --ddp --setups tiny

Under torchrun the script measures its own world instead (every rank runs the step; rank 0 prints the
global samples/s and the largest per-GPU peak memory); ``--shard-optimizer`` splits the AdamW moments over
the ranks (ZeroRedundancyOptimizer, ZeRO-1), the per-GPU peak with and without it:

    torchrun --nproc_per_node 8 benchmarks/bench_train.py --published --device cuda
    torchrun --nproc_per_node 8 benchmarks/bench_train.py --published --device cuda --shard-optimizer
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import statistics
import time

import torch

from dynadiff.config import OptimizerConfig
from dynadiff.models.config import FmriMLPConfig, VersatileDiffusionConfig
from dynadiff.models.decoder import assemble_model
from dynadiff.models.tiny import SCHEDULER_CONFIG, build_vae, unet_kwargs, vd_unet_kwargs
from dynadiff.training import build_optimizer, optimizer_step, resolve_mixed_precision

VD_VAE_CHANNELS = (128, 256, 512, 512)


@dataclasses.dataclass
class Setup:
    name: str
    unet: dict  # UNet2DConditionModel kwargs
    vae_channels: tuple[int, ...]
    vae_groups: int
    image_size: int
    hidden: int
    n_tokens: int
    voxels: int
    batch: int


SETUPS = {
    "tiny": Setup("tiny", unet_kwargs((32, 32, 64, 64), 1), (16, 32, 32), 8, 32, 128, 16, 332, 16),
    "mid": Setup("mid", vd_unet_kwargs(8), (16, 32, 64, 64), 8, 64, 256, 257, 15724, 4),
    "published": Setup("published", vd_unet_kwargs(1), VD_VAE_CHANNELS, 32, 512, 1552, 257, 15724, 8),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--setups", nargs="+", default=["tiny", "mid"], choices=sorted(SETUPS))
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU threads, one run each (CPU only)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--frozen-dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="storage dtype of the frozen UNet and VAE (versatilediffusion_config.precision)")
    p.add_argument("--published", action="store_true",
                   help="the published sizes, batch 8, bf16 (sets --setups published --mixed-precision bf16 "
                   "--frozen-dtype bf16)")
    p.add_argument("--batch", type=int, default=None, help="override the setups' batch sizes")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (median reported)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--ddp", action="store_true", help="CPU: 1 process vs 2 gloo processes, the same global batch")
    p.add_argument("--shard-optimizer", action="store_true", help="under torchrun: ZeRO-1 (AdamW moments sharded)")
    args = p.parse_args(argv)
    if args.published:
        args.setups, args.mixed_precision, args.frozen_dtype = ["published"], "bf16", "bf16"
    return args


def build(setup: Setup, frozen_dtype: str, device: torch.device):
    """A DynadiffModel of this setup's sizes, random weights (non-zero LoRA), on ``device``."""
    vd_cfg = VersatileDiffusionConfig(image_size=setup.image_size)
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**setup.unet)
    vae = build_vae(0, block_out_channels=setup.vae_channels, norm_num_groups=setup.vae_groups)
    brain = FmriMLPConfig(hidden=setup.hidden, n_tokens=setup.n_tokens).build(n_voxels=setup.voxels)
    model = assemble_model(brain, unet, vae, SCHEDULER_CONFIG, vd_cfg, device=device, dtype=frozen_dtype)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model.train()


def measure(setup: Setup, args, device: torch.device, threads: int | None, world=None) -> dict:
    """Timed optimizer steps in this process; with ``world`` (a started process group), its share of the global
    batch through DDP (the sharded optimizer with ``args.shard_optimizer``)."""
    from dynadiff.training import DataParallel

    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(setup, args.frozen_dtype, device)
    size = world.size if world is not None else 1
    batch_size = (args.batch or setup.batch) // size  # per process: the global batch is the same
    opt, _ = build_optimizer(model, OptimizerConfig(lr=1e-5), shard=bool(world is not None and args.shard_optimizer))
    parallel = None
    if world is not None:
        from dynadiff.training.distributed import wrap_model

        parallel = DataParallel(wrap_model(model, world, device), world, device)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = resolve_mixed_precision(args.mixed_precision, device)
    scaler = torch.amp.GradScaler("cuda") if autocast == torch.float16 else None
    g = torch.Generator().manual_seed(1)
    batch = {
        "brain": torch.randn(batch_size, setup.voxels, 6, generator=g).to(device),
        "img": torch.rand(batch_size, 3, setup.image_size, setup.image_size, generator=g).to(device),
        "subject_idx": torch.zeros(batch_size, dtype=torch.long, device=device),
    }
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss, _ = optimizer_step(model, opt, params, [batch], 1, step, 0, 1.0, autocast, scaler, parallel)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    sec = statistics.median(times)
    local = getattr(opt, "optim", opt)  # a ZeroRedundancyOptimizer's own shard: its local AdamW
    state_bytes = sum(t.numel() * t.element_size() for st in local.state.values() if isinstance(st, dict)
                      for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
    if world is not None:  # the slowest rank sets the pace; memory: the largest per-process figures
        import torch.distributed as dist

        t = torch.tensor([sec, state_bytes], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        sec, state_bytes = float(t[0]), float(t[1])
    out = {
        "setup": setup.name, "device": str(device), "threads": threads, "batch": batch_size * size,
        "processes": size, "shard_optimizer": bool(world is not None and args.shard_optimizer),
        "optimizer_state_gib_per_process": state_bytes / 2**30,
        "image_size": setup.image_size, "unet_channels": list(setup.unet["block_out_channels"]),
        "mixed_precision": args.mixed_precision, "frozen_dtype": args.frozen_dtype,
        "trainable_params": sum(p.numel() for p in params), "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "s_per_step": sec, "samples_per_s": batch_size * size / sec, "final_loss": losses[-1],
    }
    if device.type == "cuda":
        peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
        if world is not None:
            import torch.distributed as dist

            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        out["peak_memory_gib"] = float(peak)
        out["gpu"] = torch.cuda.get_device_name(device)
    del model, opt
    return out


def _row(r: dict) -> str:
    extra = f", peak {r['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in r else ""
    return (f"{r['setup']:>9} | procs {r['processes']}{' zero1' if r['shard_optimizer'] else ''} | threads "
            f"{str(r['threads']):>4} | batch {r['batch']:>2} | {r['mixed_precision']}/{r['frozen_dtype']} | "
            f"{r['s_per_step'] * 1e3:8.1f} ms/step | {r['samples_per_s']:7.2f} samples/s | trainable "
            f"{r['trainable_params'] / 1e6:.1f} M | AdamW state {r['optimizer_state_gib_per_process']:.3f} GiB/proc{extra}")


def _ddp_worker(rank: int, size: int, port: int, setup_name: str, args, queue) -> None:
    """One of ``size`` gloo processes on this machine (torch.multiprocessing.spawn)."""
    from dynadiff.training.distributed import World, destroy_process_group, init_process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    world = World(rank, size, rank, size, "torchrun")
    device = torch.device("cpu")
    init_process_group(world, device, 600)
    try:
        r = measure(SETUPS[setup_name], args, device, 1, world)
        if rank == 0:
            queue.put(r)
    finally:
        destroy_process_group()


def _spawned(setup_name: str, args, size: int) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_ddp_worker, args=(size, port, setup_name, args, queue), nprocs=size, join=True)
    return queue.get()


def main_ddp(args) -> int:
    """CPU: 1 process with the global batch, then 2 gloo processes with half of it each."""
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          "1 torch thread per process")
    results = []
    for name in args.setups:
        rows = [_spawned(name, args, size) for size in (1, 2)]
        for r in rows:
            print(_row(r), flush=True)
        print(f"{name:>9} | 2 processes / 1 process: {rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.2f}x "
              "samples/s", flush=True)
        results += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def main_torchrun(args) -> int:
    """Under torchrun: this world, DDP, one process per GPU (or gloo on the CPU)."""
    from dynadiff.training.distributed import destroy_process_group, detect_world, init_process_group, resolve_device

    world = detect_world()
    device = resolve_device(args.device, world)
    init_process_group(world, device, 1800)
    try:
        results = []
        for name in args.setups:
            r = measure(SETUPS[name], args, device, None, world)
            results.append(r)
            if world.is_main:
                print(_row(r), flush=True)
        if args.json and world.is_main:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        destroy_process_group()
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ddp:
        return main_ddp(args)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return main_torchrun(args)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}")
    results = []
    for name in args.setups:
        for threads in (args.threads if device.type == "cpu" else [None]):
            r = measure(SETUPS[name], args, device, threads)
            results.append(r)
            print(_row(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
