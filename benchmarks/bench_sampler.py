"""Sampler throughput: our path against the original Dynadiff recipe, same machine, one run.

original: VD's dual-attention image UNet (the text stack runs, then is multiplied by
          mix ratio 0), one image per call, float32;
ours:     the plain image UNet fed the 257 brain tokens (text stack never loaded),
          several images per call, float32 and optionally float16 / bfloat16.
Both: DDPM from VD's scheduler values, classifier-free guidance 3.5, LoRA (rank 4) with
non-zero weights, random weights everywhere (the speed does not depend on them). The
script prints how far apart the two paths' float32 images are and fails when they
disagree (beyond float rounding on CPU; beyond TF32/kernel-choice noise on GPU).

CPU default (a few minutes on 2 cores): the UNet and VAE at 1/4 of VD's channel widths
(UNet 80/160/320/320, 2 layers per block, cross-attention 768), 128x128 images (16x16
latents), 3 sampling steps, 4 images, our path at batch 1 and 4, 5 passes each:

    python benchmarks/bench_sampler.py

GPU, the full VD image UNet (320/640/1280/1280) and VAE at 512x512, 20 steps, the
published brain-module width, batch 1 and 8, float32 and bfloat16, with the peak GPU
memory of each configuration (only the measured model is on the GPU):

    python benchmarks/bench_sampler.py --device cuda --width-divisor 1 --image-size 512 --steps 20 \\
        --images 8 --batch-sizes 1 8 --dtypes fp32 bf16 --repeats 3 --brain-hidden 1552 --json bench.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from dynadiff.checkpoint import load_checkpoint, trainable_state_dict
from dynadiff.models import vd
from dynadiff.models.config import FmriMLPConfig, VersatileDiffusionConfig
from dynadiff.models.decoder import assemble_model
from dynadiff.models.tiny import SCHEDULER_CONFIG, build_vae, vd_unet_kwargs

VD_VAE_CHANNELS = (128, 256, 512, 512)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--width-divisor", type=int, default=4, help="VD channel widths divided by this (1: the real VD sizes)")
    p.add_argument("--image-size", type=int, default=128, help="pixels; latents are 1/8")
    p.add_argument("--steps", type=int, default=3, help="sampling steps per image")
    p.add_argument("--images", type=int, default=4, help="images per timed pass")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="images per call for our path")
    p.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "fp16", "bf16"], help="our path's precisions")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per configuration (median reported)")
    p.add_argument("--voxels", type=int, default=15724, help="brain module input size (subject 1: 15724)")
    p.add_argument("--brain-hidden", type=int, default=256, help="brain module width (published: 1552)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-baseline", action="store_true", help="skip the original recipe (e.g. to measure memory alone)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def build_models(args, device: torch.device):
    """The original-recipe model and one of ours per dtype, same image-stack, VAE, brain and LoRA weights."""
    vd_cfg = VersatileDiffusionConfig(image_size=args.image_size, num_inference_steps=args.steps)
    unet_kw = vd_unet_kwargs(args.width_divisor)
    torch.manual_seed(0)
    from diffusers import UNet2DConditionModel

    image_unet = UNet2DConditionModel(**unet_kw).eval()
    vae = build_vae(0, block_out_channels=tuple(c // args.width_divisor for c in VD_VAE_CHANNELS),
                    norm_num_groups=vd_unet_kwargs(args.width_divisor)["norm_num_groups"]).eval()
    brain = FmriMLPConfig(hidden=args.brain_hidden).build(n_voxels=args.voxels)
    text_source = UNet2DConditionModel(**unet_kw)  # only its transformers are kept: the text stack
    dual = vd.make_dual_unet(copy.deepcopy(image_unet), text_source).eval()
    del text_source
    original = assemble_model(copy.deepcopy(brain), dual, copy.deepcopy(vae), SCHEDULER_CONFIG, vd_cfg, dtype="fp32")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in original.named_parameters():
            if "lora_B" in name:  # a trained LoRA is non-zero; the text stack's stays zero (zero gradient)
                p.copy_(torch.randn(p.shape, generator=g) * 0.01 * (".transformers.1." not in name))
    ours = {}
    for dt in args.dtypes:
        model = assemble_model(copy.deepcopy(brain), copy.deepcopy(image_unet), copy.deepcopy(vae), SCHEDULER_CONFIG, vd_cfg,
                               dtype=dt)  # casts the frozen weights to dt
        load_checkpoint(model, trainable_state_dict(original))  # text-stack LoRA ignored, as in real checkpoints
        ours[dt] = model
    counts = {
        "image_unet_params": sum(p.numel() for p in image_unet.parameters()),
        "text_stack_params": vd.text_stack_parameter_count(original.unet),
    }
    return original, ours, counts


def run_pass(model, brain, subject_idx, batch: int, steps: int, device: torch.device) -> tuple[float, torch.Tensor]:
    """Seconds to reconstruct every window, ``batch`` at a time; and the images."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = [model.reconstruct(brain[i:i + batch], subject_idx[i:i + batch], seed=0, num_inference_steps=steps)
           for i in range(0, len(brain), batch)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cat(out).cpu()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    original, ours, counts = build_models(args, device)
    g = torch.Generator().manual_seed(2)
    brain = torch.randn(args.images, args.voxels, 6, generator=g)
    subject_idx = torch.zeros(args.images, dtype=torch.long)

    configs = [] if args.no_baseline else [("original (dual stacks, batch 1)", original, 1, "fp32")]
    configs += [(f"ours (image stack, batch {b})", ours[dt], b, dt) for dt in args.dtypes for b in args.batch_sizes]
    results = {i: {"path": name, "batch": b, "dtype": dt, "times": [], "peak_mib": None} for i, (name, _, b, dt) in enumerate(configs)}
    outputs = {}

    def measure(i, repeats):
        name, model, b, dt = configs[i]
        for _ in range(repeats):
            seconds, images = run_pass(model, brain, subject_idx, b, args.steps, device)
            results[i]["times"].append(seconds)
            outputs[i] = images

    if device.type == "cpu":
        # warm up, then interleave the repeats so that a busy machine slows every path alike
        for _, model, b, _ in configs:
            run_pass(model, brain[:b], subject_idx[:b], b, 1, device)
        for _ in range(args.repeats):
            for i in range(len(configs)):
                measure(i, 1)
    else:
        for i, (_, model, b, _) in enumerate(configs):
            model.to(device)
            torch.cuda.empty_cache()
            run_pass(model, brain[:b], subject_idx[:b], b, 1, device)
            torch.cuda.reset_peak_memory_stats(device)
            measure(i, args.repeats)
            results[i]["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            model.to("cpu")
            torch.cuda.empty_cache()

    base = statistics.median(results[0]["times"]) if not args.no_baseline else None
    fp32_ours = [i for i, c in enumerate(configs) if i > 0 and c[3] == "fp32"]
    if not args.no_baseline and fp32_ours:
        max_diff = max((outputs[0] - outputs[i]).abs().max().item() for i in fp32_ours)
    else:
        max_diff = None

    print(f"device: {device_name}; torch {torch.__version__}")
    print(f"UNet: VD widths / {args.width_divisor} = {vd_unet_kwargs(args.width_divisor)['block_out_channels']}, "
          f"{counts['image_unet_params'] / 1e6:.1f}M parameters (+{counts['text_stack_params'] / 1e6:.1f}M text stack in the original); "
          f"{args.image_size}x{args.image_size} images, {args.steps} DDPM steps, CFG 3.5, {args.images} images per pass, "
          f"{args.repeats} passes")
    if max_diff is not None:
        print(f"max |original - ours fp32| over the images: {max_diff:.2e}")
    header = f"{'path':34s} {'dtype':5s} {'median s/pass':>13s} {'images/s':>9s} {'speed-up':>9s} {'peak GPU MiB':>13s}"
    print(header)
    rows = []
    for r in results.values():
        med = statistics.median(r["times"])
        row = dict(r, median_s=med, images_per_s=args.images / med, speedup=(base / med) if base else None)
        rows.append(row)
        speed = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        print(f"{r['path']:34s} {r['dtype']:5s} {med:13.2f} {row['images_per_s']:9.3f} {speed:>9s} {peak:>13s}")
    report = {"device": device_name, "args": vars(args), "max_abs_diff_fp32": max_diff, **counts, "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    tolerance = 1e-3 if device.type == "cpu" else 0.1
    if max_diff is not None and max_diff > tolerance:
        raise SystemExit(f"the two paths disagree (max difference {max_diff:.2e})")
    return report


if __name__ == "__main__":
    main()
