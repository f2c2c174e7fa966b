"""The published-size sampler on a GPU: images/s and peak GPU memory, one run (called by bench_gpu.sh).

Model: VD's image UNet and VAE built from their real configs (benchmarks/real_size.py: 859.5 M + 83.7 M
parameters, random weights, nothing downloaded), LoRA rank 4 on the cross-attention projections, the
published brain module (15,724 voxels -> hidden 1552, per-TR layer -> 257x768 tokens); the sampler of
eval.py (``DynadiffModel.reconstruct``: brain module, DDPM, classifier-free guidance 3.5 -- the UNet runs
on 2 x batch latents --, VAE decode) at 512x512, 20 steps (the published setting).

Configurations, each in its own try/except (an OOM or an error is recorded and the run goes on):
ours (plain image UNet, text stack skipped) for every precision (fp32 / bf16 / fp16: the frozen UNet and
VAE weights and compute; brain module and LoRA float32) x batch (1, 8) x torch.compile (off / on: the UNet,
inductor), plus the original recipe (dual-attention UNet, both stacks run, fp32, batch 1) to check the
original's claim that reconstruction needs 8 GB of VRAM. Eager configurations come first, compiled ones
after (compilation takes a minute or more each); a configuration is skipped, and said so, when the time
budget is spent. Each: the model alone on the GPU, a warm-up pass (2 steps; it compiles, for compiled
ones), then timed 20-step passes (at least 1, up to --repeats while under --min-time s), CUDA synchronised;
peak = torch.cuda.max_memory_allocated over warm-up and timed passes, weights included
(max_memory_reserved too: what the caching allocator held, closer to what nvidia-smi shows).

Results are written after every configuration (Markdown rows to --markdown, all numbers to --json), so a
run killed by its time limit keeps what it measured.

    python benchmarks/bench_gpu.py --device cuda --budget 420 --markdown bench_gpu.md --json bench_gpu.json
    python benchmarks/bench_gpu.py --tiny --device cpu      # the same code on tiny models, seconds on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import time
import traceback
from pathlib import Path

import real_size  # benchmarks/real_size.py, beside this script
import torch

from dynadiff.models import vd
from dynadiff.models.config import FmriMLPConfig, VersatileDiffusionConfig
from dynadiff.models.decoder import PRECISIONS, assemble_model

SUBJECT1_VOXELS = 15724
# --tiny: VD's layout at toy widths (CPU, seconds)
TINY_UNET = dict(real_size.VD_IMAGE_UNET_CONFIG, block_out_channels=[32, 32, 64, 64], layers_per_block=1,
                 norm_num_groups=8)
TINY_VAE = dict(real_size.VD_VAE_CONFIG, block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true",
                   help="tiny UNet/VAE/brain module, 64x64 images, 2 steps: checks the script itself on a CPU")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16"], choices=sorted(PRECISIONS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=["off", "on"], dest="compile_modes")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: eager)")
    p.add_argument("--no-original", action="store_true", help="skip the original recipe (dual attention, fp32, batch 1)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; --tiny: 2)")
    p.add_argument("--image-size", type=int, default=None, help="pixels (default 512; --tiny: 64)")
    p.add_argument("--voxels", type=int, default=None, help="brain module input (default 15724; --tiny: 300)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes at most per configuration")
    p.add_argument("--min-time", type=float, default=10.0, help="stop repeating once this many seconds are timed")
    p.add_argument("--budget", type=float, default=420.0, help="seconds; no configuration starts after that")
    p.add_argument("--compile-reserve", type=float, default=90.0,
                   help="a compiled configuration starts only with this many seconds of budget left")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls in fp32 (default: PyTorch's, off)")
    p.add_argument("--markdown", type=Path, default=None, help="write the Markdown rows here too")
    p.add_argument("--json", type=Path, default=None, help="write every number here too")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 20)
    args.image_size = args.image_size or (64 if args.tiny else 512)
    args.voxels = args.voxels or (300 if args.tiny else SUBJECT1_VOXELS)
    return args


def configurations(args) -> list[dict]:
    """Eager first (ours, then the original), compiled after: bf16, fp16, fp32 (the likely fastest first)."""
    out = []
    if "off" in args.compile_modes:
        out += [{"path": "ours", "dtype": d, "batch": b, "compiled": False} for d in args.dtypes for b in args.batches]
        if not args.no_original:
            out.append({"path": "original", "dtype": "fp32", "batch": 1, "compiled": False})
    if "on" in args.compile_modes:
        order = [d for d in ("bf16", "fp16", "fp32") if d in args.dtypes]
        out += [{"path": "ours", "dtype": d, "batch": b, "compiled": True} for d in order for b in args.batches]
    return out


def build_model(args, dtype: str, dual: bool, device: torch.device):
    """The sampler's model, built directly on ``device`` (random weights from the real configs)."""
    unet_cfg = TINY_UNET if args.tiny else real_size.VD_IMAGE_UNET_CONFIG
    vae_cfg = TINY_VAE if args.tiny else real_size.VD_VAE_CONFIG
    brain_cfg = FmriMLPConfig(hidden=32) if args.tiny else FmriMLPConfig()
    vd_cfg = VersatileDiffusionConfig(image_size=args.image_size, num_inference_steps=args.steps)
    unet = real_size.build_image_unet(0, device, unet_cfg)
    if dual:  # the text stack: transformers of the same shapes as the image stack's (VD's text UNet)
        vd.make_dual_unet(unet, real_size.build_image_unet(1, device, unet_cfg))
    vae = real_size.build_vae(0, device, vae_cfg)
    with torch.device(device):
        brain = brain_cfg.build(n_voxels=args.voxels)
    model = assemble_model(brain, unet, vae, real_size.VD_SCHEDULER_CONFIG, vd_cfg, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained LoRA is non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.device, p.dtype))
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sample(model, brain, subjects, steps: int, device: torch.device) -> tuple[float, torch.Tensor]:
    _sync(device)
    start = time.perf_counter()
    images = model.reconstruct(brain, subjects, seed=0, num_inference_steps=steps)
    _sync(device)
    return time.perf_counter() - start, images


def measure(args, cfg: dict, device: torch.device) -> dict:
    row = dict(cfg, status="ok")
    t0 = time.perf_counter()
    model = build_model(args, cfg["dtype"], cfg["path"] == "original", device)
    row["build_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["weights_gib"] = torch.cuda.memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    if cfg["compiled"]:
        model.unet.compile(backend=args.compile_backend, dynamic=False)
    g = torch.Generator().manual_seed(2)
    brain = torch.randn(cfg["batch"], args.voxels, 6, generator=g).to(device)
    subjects = torch.zeros(cfg["batch"], dtype=torch.long, device=device)
    row["warmup_s"], _ = sample(model, brain, subjects, 2, device)  # compiles, for compiled configurations
    times = []
    while len(times) < args.repeats and (not times or sum(times) < args.min_time):
        seconds, images = sample(model, brain, subjects, args.steps, device)
        times.append(seconds)
    row["times_s"] = times
    row["s_per_pass"] = sorted(times)[len(times) // 2]
    row["images_per_s"] = cfg["batch"] / row["s_per_pass"]
    row["finite"] = bool(torch.isfinite(images).all())
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    del model, images
    return row


def _cleanup(device: torch.device) -> None:
    gc.collect()
    with contextlib.suppress(Exception):  # best effort between configurations
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _gib(row, key):
    return f"{row[key]:.2f}" if row.get(key) is not None else "-"


def markdown(args, env: dict, rows: list[dict]) -> str:
    lines = [
        (f"Device: {env['device']}; torch {env['torch']} (CUDA {env['cuda']}); fp32 matmul TF32: "
         f"{env['tf32_matmul']}, cuDNN TF32: {env['tf32_cudnn']}. {'TINY models (script check), ' if args.tiny else ''}"
         f"{args.image_size}x{args.image_size}, {args.steps} DDPM steps, CFG 3.5, {args.voxels} voxels; "
         f"random weights from VD's real configs."),
        "",
        ("| path | dtype | batch | torch.compile | images/s | s / pass | peak allocated GiB | peak reserved GiB "
         "| weights GiB | warm-up s | status |"),
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        path = "original (dual attention)" if r["path"] == "original" else "ours (image stack)"
        ips = f"{r['images_per_s']:.3f}" if r.get("images_per_s") else "-"
        spp = f"{r['s_per_pass']:.2f}" if r.get("s_per_pass") else "-"
        warm = f"{r['warmup_s']:.1f}" if r.get("warmup_s") is not None else "-"
        status = r["status"] + ("" if r.get("finite", True) else " (non-finite pixels, random weights)")
        lines.append(f"| {path} | {r['dtype']} | {r['batch']} | {'on' if r['compiled'] else 'off'} | {ips} | {spp} | "
                     f"{_gib(r, 'peak_gib')} | {_gib(r, 'reserved_gib')} | {_gib(r, 'weights_gib')} | {warm} | {status} |")
    orig = [r for r in rows if r["path"] == "original" and r.get("peak_gib") is not None]
    if orig:
        r = orig[0]
        verdict = "within" if r["reserved_gib"] <= 8 else "above"
        lines += ["", (f"Original's claim (8 GB of VRAM): the original recipe (fp32, batch 1) peaks at "
                       f"{r['peak_gib']:.2f} GiB allocated, {r['reserved_gib']:.2f} GiB reserved: {verdict} 8 GiB.")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but CUDA is not available here (use --tiny --device cpu to check the script)")
    start = time.perf_counter()
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__, "cuda": torch.version.cuda, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32, "args": {k: str(v) for k, v in vars(args).items()},
    }
    rows: list[dict] = []

    def write():
        text = markdown(args, env, rows)
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text(text)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        return text

    for cfg in configurations(args):
        left = args.budget - (time.perf_counter() - start)
        need = args.compile_reserve if cfg["compiled"] else 0.0
        label = f"{cfg['path']} {cfg['dtype']} batch {cfg['batch']} compile {'on' if cfg['compiled'] else 'off'}"
        if left <= need:
            rows.append(dict(cfg, status=f"skipped: time budget ({args.budget:.0f} s) spent"))
            print(f"{label}: skipped (time budget)", flush=True)
            write()
            continue
        print(f"{label}: ...", flush=True)
        try:
            row = measure(args, cfg, device)
        except torch.OutOfMemoryError as e:
            row = dict(cfg, status="OOM: " + str(e).splitlines()[0][:120])
        except Exception as e:  # noqa: BLE001 - record it and go on with the next configuration
            traceback.print_exc()
            row = dict(cfg, status=f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")
        _cleanup(device)
        rows.append(row)
        print(f"{label}: {row['status']}" + (f", {row['images_per_s']:.3f} images/s" if row.get("images_per_s") else "")
              + (f", peak {row['peak_gib']:.2f} GiB" if row.get("peak_gib") is not None else ""), flush=True)
        write()
    print()
    print(write())
    print(f"total {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
