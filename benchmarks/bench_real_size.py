"""Real-size smoke run: eval.py end to end at the published sizes, on the CPU, from nothing.

Writes, under a fresh working folder (deleted at the end unless --keep; about 11 GB on disk):

1. a synthetic mini-NSD (dynadiff.data.synthetic) whose subject 1 has exactly 15,724 nsdgeneral voxels
   (subject 1's real count; volumes 41x52x42, the 12 runs of session 1, 2 test images), stimuli prepared;
2. a Versatile Diffusion folder in VD's layout (``image_unet/``, ``vae/``, ``scheduler/``) holding the
   real config files and random weights: the full image UNet (859.5 M parameters) and VAE (83.7 M)
   (benchmarks/real_size.py: write_real_vd);
3. a published-format checkpoint for those 15,724 voxels: the 265 trainable tensors (9 brain module of the
   published FmriMLP -- hidden 1552, per-TR layer, 257x768 tokens --, 256 LoRA of which 128 on the text
   stack ``transformers.1``), written as the published DeepSpeed ZeRO-2 folder (world size 8, fp32
   master partitions and Adam moments per rank, Lightning's ``model.`` prefix, tag ``checkpoint``, the
   whole module with the frozen dual-attention UNet and VAE in fp16), directly with torch.save (DeepSpeed's
   own reader reads it: tests/test_real_size.py); ``--formats safetensors`` also evaluates it converted by
   ``python -m dynadiff.checkpoint convert``;

then runs ``eval.py`` on 1 test image, 2 DDPM sampling steps at 512x512, on the CPU, in a child process
whose wall time and peak RSS (the kernel's ru_maxrss of that process, from wait4) are measured, and
checks: the load report says no trainable tensor is missing, the reconstruction is a 512x512 PNG,
metrics.json exists. Prints the Markdown row for BENCHMARKS.md and the command.

    python benchmarks/bench_real_size.py                        # ZeRO folder (the published format)
    python benchmarks/bench_real_size.py --formats zero safetensors --json real_size.json

Memory: the setup peaks at about 6 GB in this process (freed before eval.py starts); eval.py holds the
fp32 UNet (3.4 GB), VAE (0.3 GB) and brain module (1.4 GB) plus what the checkpoint reader reads.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SUBJECT1_VOXELS = 15724  # nsdgeneral voxels of NSD subject 1 (docs/behaviour.md §1)
VOLUME_SHAPE = (41, 52, 42)  # about half of subject 1's 81x104x83 along each axis: 37,252 brain voxels
IMAGE_SIZE = 512


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None, help="working folder (default: a new temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the working folder (data, VD folder, checkpoint, outputs)")
    p.add_argument("--formats", nargs="+", default=["zero"], choices=["zero", "safetensors"],
                   help="checkpoint formats to evaluate, one eval.py run each (default: zero, the published one)")
    p.add_argument("--no-frozen", action="store_true",
                   help="leave the frozen UNet/VAE weights out of the ZeRO folder's module state (published: in)")
    p.add_argument("--steps", type=int, default=2, help="DDPM sampling steps (published: 20)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for eval.py (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def brain_voxel_count(shape: tuple[int, int, int]) -> int:
    """Brain voxels of dynadiff.data.synthetic.make_roi's ellipsoid for ``shape``."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    return int(((grid**2).sum(0) < 0.9).sum())


def visual_fraction_for(n_visual: int, shape: tuple[int, int, int]) -> float:
    """The ``visual_fraction`` that makes make_roi label exactly ``n_visual`` voxels: it keeps the brain
    voxels whose score is at most the fraction's quantile (linear interpolation), i.e. floor(q (n - 1)) + 1
    of them; q is put half-way between two counts so rounding cannot change it (all of them: q = 1)."""
    n = brain_voxel_count(shape)
    if not 0 < n_visual <= n:
        raise ValueError(f"a {shape} volume has {n} brain voxels: cannot label {n_visual} of them visual")
    return 1.0 if n_visual == n else (n_visual - 1 + 0.5) / (n - 1)


def write_data(root: Path) -> dict:
    from dynadiff.data.stimuli import prepare_stimuli
    from dynadiff.data.synthetic import write_synthetic_nsd

    info = write_synthetic_nsd(root, subjects=(1,), seed=0, sessions=(1,), n_test=2, n_unique=2,
                               volume_shapes={1: VOLUME_SHAPE},
                               visual_fraction=visual_fraction_for(SUBJECT1_VOXELS, VOLUME_SHAPE))
    if info["n_voxels"][1] != SUBJECT1_VOXELS:
        raise SystemExit(f"the synthetic subject 1 has {info['n_voxels'][1]} visual voxels, not {SUBJECT1_VOXELS}")
    prepare_stimuli(root, images="all", subjects=(1,), workers=1)
    return info


def write_checkpoint(folder: Path, frozen: bool) -> dict:
    import real_size  # benchmarks/real_size.py, beside this script
    import torch

    trainable = real_size.random_trainable_tensors(SUBJECT1_VOXELS, seed=0)
    counts = {
        "tensors": len(trainable),
        "brain": sum(k.startswith("brain_modules.") for k in trainable),
        "lora": sum(".lora_" in k for k in trainable),
        "lora_text_stack": sum(".lora_" in k and ".transformers.1." in k for k in trainable),
        "elements": sum(t.numel() for t in trainable.values()),
    }
    if (counts["tensors"], counts["brain"], counts["lora"], counts["lora_text_stack"]) != (265, 9, 256, 128):
        raise SystemExit(f"the synthesized checkpoint does not have the published tensors: {counts}")
    frozen_shapes = real_size.frozen_shapes() if frozen else None
    real_size.write_published_zero_checkpoint(folder, trainable, world_size=8, frozen=frozen_shapes,
                                              module_dtype=torch.float16)
    counts["frozen_tensors"] = len(frozen_shapes or {})
    del trainable
    gc.collect()
    return counts


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def eval_command(work: Path, checkpoint: Path, cache: Path, steps: int) -> list[str]:
    return [sys.executable, str(REPO / "eval.py"), "--subject", "1", "--vd_cache_dir", str(work / "vd"),
            "--checkpoint", str(checkpoint), "--device", "cpu", "--batch-size", "1", "--limit", "1",
            "--metrics", "pixcorr,ssim", "--cache", str(cache),
            f"data.nsd_dataset_config.nsddata_path={work / 'nsd'}", "data.nsd_dataset_config.sessions=[1]",
            f"versatilediffusion_config.num_inference_steps={steps}"]


def run_measured(cmd: list[str], env: dict) -> tuple[int, float, float, str, str, float]:
    """(exit status, wall seconds, peak RSS in MiB of the process, stdout, stderr, start time) of ``cmd``."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.time()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: tell Popen
        out.seek(0)
        err.seek(0)
        return proc.returncode, wall, usage.ru_maxrss / 1024, out.read(), err.read(), started


def _log_seconds(stderr: str) -> list[tuple[int, str]]:
    """(seconds since midnight, message) of each timestamped log line."""
    out = []
    for line in stderr.splitlines():
        m = re.match(r"(\d\d):(\d\d):(\d\d) \w+ ", line)
        if m:
            out.append((int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]), line))
    return out


def check_outputs(stderr: str, cache: Path, started: float) -> dict:
    from PIL import Image

    report = {}
    m = re.search(r"loaded (\d+) tensors from .*\(brain module: (\d+), LoRA: (\d+)\)", stderr)
    report["loaded"] = int(m[1]) if m else None
    m = re.search(r"MISSING \(left at their initial values\): (none|\d+)", stderr)
    report["missing"] = (0 if m[1] == "none" else int(m[1])) if m else None
    m = re.search(r"unexpected \(not loaded\): (none|\d+)", stderr)
    report["unexpected"] = (0 if m[1] == "none" else int(m[1])) if m else None
    m = re.search(r"ignored (\d+) text-stack LoRA tensors", stderr)
    report["ignored_text_stack"] = int(m[1]) if m else 0
    m = re.search(r"ignored (\d+) frozen UNet/VAE base tensors", stderr)
    report["ignored_frozen"] = int(m[1]) if m else 0
    out = cache / "reconstructions_subj01_unaveraged"
    image = out / "0.png"
    report["image_size"] = list(Image.open(image).size) if image.is_file() else None
    report["metrics_json"] = (out / "metrics.json").is_file()
    if report["metrics_json"]:
        result = json.loads((out / "metrics.json").read_text())
        report["metrics"] = {k: result["means"][k] for k in result["metrics"]}
    generating = [t for t, line in _log_seconds(stderr) if "generating " in line]
    if generating:  # logged once the model is built and the checkpoint loaded (1 s resolution)
        local = time.localtime(started)
        report["s_to_model_loaded"] = (generating[0] - (local.tm_hour * 3600 + local.tm_min * 60 + local.tm_sec)) % 86400
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dynadiff_real_size_"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise SystemExit(f"{work} is not empty: give a new or empty --workdir")
    results: dict = {"host": f"{platform.machine()}, {os.cpu_count()} CPUs", "steps": args.steps, "runs": []}
    try:
        setup = {}
        t = time.perf_counter()
        info = write_data(work / "nsd")
        setup["data_s"] = time.perf_counter() - t
        print(f"mini-NSD: subject 1 with {info['n_voxels'][1]} nsdgeneral voxels ({setup['data_s']:.0f} s)", flush=True)

        import real_size

        t = time.perf_counter()
        real_size.write_real_vd(work / "vd")
        gc.collect()
        setup["vd_s"] = time.perf_counter() - t
        setup["vd_gb"] = folder_bytes(work / "vd") / 1e9
        print(f"VD folder (real configs, random weights): {setup['vd_gb']:.2f} GB ({setup['vd_s']:.0f} s)", flush=True)

        t = time.perf_counter()
        counts = write_checkpoint(work / "subj01", frozen=not args.no_frozen)
        setup["checkpoint_s"] = time.perf_counter() - t
        setup["checkpoint_gb"] = folder_bytes(work / "subj01") / 1e9
        print(f"checkpoint: {counts} as a ZeRO-2 folder of 8 ranks, {setup['checkpoint_gb']:.2f} GB "
              f"({setup['checkpoint_s']:.0f} s)", flush=True)
        checkpoints = {"zero": work / "subj01"}
        if "safetensors" in args.formats:
            from dynadiff.checkpoint import convert

            t = time.perf_counter()
            convert(work / "subj01", work / "subj01.safetensors")
            setup["convert_s"] = time.perf_counter() - t
            checkpoints["safetensors"] = work / "subj01.safetensors"
        results.update(setup=setup, checkpoint=counts)

        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        ok = True
        for fmt in args.formats:
            cache = work / f"cache_{fmt}"
            cmd = eval_command(work, checkpoints[fmt], cache, args.steps)
            print(f"running: {shlex.join(cmd)}", flush=True)
            code, wall, rss, _stdout, stderr, started = run_measured(cmd, env)
            report = check_outputs(stderr, cache, started)
            run = {"format": fmt, "exit_status": code, "wall_s": wall, "peak_rss_mib": rss, **report}
            run["ok"] = (code == 0 and report["missing"] == 0 and report["image_size"] == [IMAGE_SIZE, IMAGE_SIZE]
                         and report["metrics_json"])
            ok &= run["ok"]
            results["runs"].append(run)
            if not run["ok"]:
                print(stderr[-4000:], file=sys.stderr)
            print(json.dumps(run, indent=1), flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    cmd = "python benchmarks/bench_real_size.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    print()
    print(f"```bash\n{cmd}\n```\n")
    print(f"| checkpoint (1 image, 512x512, {args.steps} DDPM steps, CPU) | eval.py wall time | peak RSS "
          "| model built + loaded | load report | image, metrics.json |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    s = results["setup"]
    for r in results["runs"]:
        what = ("published ZeRO-2 folder, 8 ranks" + (", no frozen weights" if args.no_frozen else "")
                + f" ({s['checkpoint_gb']:.1f} GB)") if r["format"] == "zero" else "converted .safetensors"
        image = f"{r['image_size'][0]}x{r['image_size'][1]}" if r["image_size"] else "none"
        loaded = f"{r['s_to_model_loaded']:.0f} s" if r.get("s_to_model_loaded") is not None else "-"
        print(f"| {what} | {r['wall_s'] / 60:.1f} min ({r['wall_s']:.0f} s) | {r['peak_rss_mib'] / 1024:.1f} GiB | "
              f"{loaded} | {r['loaded']} loaded, {r['missing']} missing, {r['unexpected']} unexpected, "
              f"{r['ignored_text_stack']} text-stack LoRA ignored | {image}, {'yes' if r['metrics_json'] else 'no'} |")
    print(f"\nSet-up (not in the times above): mini-NSD {s['data_s']:.0f} s, VD folder {s['vd_s']:.0f} s "
          f"({s['vd_gb']:.1f} GB), checkpoint {s['checkpoint_s']:.0f} s ({s['checkpoint_gb']:.1f} GB)"
          + (f", conversion {s['convert_s']:.0f} s" if "convert_s" in s else "") + ".")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not ok:
        raise SystemExit("the real-size run failed (see above)")
    return results


if __name__ == "__main__":
    main()
