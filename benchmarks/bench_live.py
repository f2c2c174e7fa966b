"""Live decoding (live.py): end-to-end latency on a replayed run, and what causal preprocessing costs.

Latency: a recorded run of the synthetic mini-NSD replayed through the real path (live.py --replay: volume files
written at the scanner's pace times --speed, the watcher, causal preprocessing, the decoder, the PNG and
latency.csv); per trial, last volume of its window written -> its image written; median and 95th percentile, for
two sampling-step counts in one run, next to the decoder's own time per image (the rest is watching, preprocessing
and writing). With the demo's trained tiny decoder (run `python demo.py` first):

    python benchmarks/bench_live.py --demo demo_output latency

Quality: the test-image trials of every run of the demo's data (each image's first presentation, single trials),
decoded by the same decoder from windows preprocessed three ways: offline (each run detrended and z-scored whole,
as in training and eval.py), causal (live.py: the volumes up to the window's end only), causal seeded with the
previous run's voxel scales (live.py --prior-run; the first run takes the second's); PixCorr and pixel two-way
identification (425x425 RGB pixels, chance 0.5) against the stimuli:

    python benchmarks/bench_live.py --demo demo_output quality

GPU, the published sizes (VD's image UNet and VAE from their real configs with random weights, the published
brain module for 15,724 voxels, 512x512, bf16), a synthetic run replayed at the scanner's pace (windows padded with
zeros to 15,724 voxels, as for a checkpoint wider than the data):

    python benchmarks/bench_live.py --published --device cuda latency
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="+", choices=["latency", "quality"])
    p.add_argument("--demo", type=Path, default=Path("demo_output"), help="a demo.py output folder")
    p.add_argument("--published", action="store_true", help="the published sizes, random weights (GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tiny", action="store_true", help="--published with bench_gpu.py's tiny models: checks the "
                   "script on a CPU")
    p.add_argument("--speed", type=float, default=None, help="replay speed (default 4 on the demo, 1 published)")
    p.add_argument("--volumes", type=int, default=None, help="replay only the first N volumes (default all; "
                   "published: 80)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20], help="sampling steps, each a latency row")
    p.add_argument("--run", default="1,2", help="SESSION,RUN replayed for latency (default 1,2)")
    p.add_argument("--json", type=Path, help="write the numbers here too")
    return p.parse_args(argv)


def demo_paths(demo: Path) -> dict:
    paths = {"nsd": demo / "nsddata", "vd": demo / "versatile_diffusion",
             "checkpoint": demo / "train" / "checkpoints" / "best" / "model.safetensors"}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        sys.exit(f"bench_live: {', '.join(missing)} missing: run `python demo.py --output {demo}` first")
    return paths


def live_args(paths: dict, out: Path, steps: int) -> list[str]:
    train_cfg = paths["checkpoint"].parents[2] / "config.yaml"
    import yaml

    size = yaml.safe_load(train_cfg.read_text())["versatilediffusion_config"]["image_size"]
    return ["--out", str(out), "--subject", "1", "--checkpoint", str(paths["checkpoint"]), "--vd_cache_dir",
            str(paths["vd"]), "--nsddata_path", str(paths["nsd"]), "--device", "cpu", "--steps", str(steps),
            f"versatilediffusion_config.image_size={size}"]


def percentiles(latencies: list[float]) -> dict:
    a = np.array(latencies)
    return {"n": len(a), "median_s": float(np.median(a)), "p95_s": float(np.percentile(a, 95)),
            "max_s": float(a.max())}


def latency_demo(args, paths: dict) -> list[dict]:
    from dynadiff.data import nsd
    from dynadiff.live.decoder import WindowDecoder
    from dynadiff.live.record import read_latency

    live = _live_script()
    session, run_no = (int(x) for x in args.run.split(","))
    run = nsd.Run(1, session, run_no)
    speed = args.speed or 4.0
    rows = []
    for steps in args.steps:
        with tempfile.TemporaryDirectory() as tmp:
            argv = live_args(paths, Path(tmp) / "live", steps) + [
                "--replay", str(run.timeseries_path(paths["nsd"])), "--design", str(run.design_path(paths["nsd"])),
                "--speed", str(speed)]
            if live.main(argv) != 0:
                sys.exit("bench_live: live.py failed")
            lat = [r["latency_s"] for r in read_latency(Path(tmp) / "live" / "latency.csv")]
            cfg = live.resolve_config(live.parse_args(argv))
            dec = WindowDecoder(cfg, _n_voxels(paths), 6, steps=steps)
            times = []
            for i in range(6):  # the decoder alone, on a random window
                w = np.random.default_rng(i).standard_normal((dec.n_voxels, 6)).astype(np.float32)
                t0 = time.perf_counter()
                dec(w)
                times.append(time.perf_counter() - t0)
        row = {"setup": "demo (tiny, CPU)", "steps": steps, "speed": speed, "tr_s": 4 / 3 / speed,
               **percentiles(lat), "decode_median_s": statistics.median(times[1:])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _live_script():
    """live.py as a module (its configuration and checks)."""
    from dynadiff.commands import live

    return live


def _n_voxels(paths: dict) -> int:
    from dynadiff.data.dataset import load_mask

    return int(load_mask(paths["nsd"], 1).sum())


def latency_published(args) -> list[dict]:
    import torch
    from bench_gpu import build_model

    from dynadiff.data import nsd
    from dynadiff.data.dataset import load_mask
    from dynadiff.data.preprocess import TR
    from dynadiff.data.synthetic import write_synthetic_nsd
    from dynadiff.decoder import to_uint8
    from dynadiff.live.record import LiveRecord
    from dynadiff.live.replay import Replay, prepare_folder
    from dynadiff.live.session import LiveSession
    from dynadiff.live.watch import VolumeWatcher, design_onsets

    device = torch.device(args.device)
    speed, volumes = args.speed or 1.0, args.volumes or 80
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "nsd"
        # 2 runs of ~40 trials (NSD's runs have 62-63, one every 3 TRs; here one every ~5 TRs)
        write_synthetic_nsd(root, subjects=(1,), seed=0, sessions=(1,), runs_per_session=2, n_unique=22, n_test=8)
        logging.getLogger("dynadiff.live").setLevel(logging.ERROR)  # the trials past --volumes are skipped: said
        run = nsd.Run(1, 1, 2)
        mask = load_mask(root, 1)
        n_vox = int(mask.sum())
        width = n_vox if args.tiny else 15724
        for steps in args.steps:
            ns = argparse.Namespace(tiny=args.tiny, image_size=64 if args.tiny else 512, steps=steps, voxels=width)
            model = build_model(ns, "fp32" if args.tiny else "bf16", False, device)
            subjects = torch.zeros(1, dtype=torch.long, device=device)

            def decode(window, model=model, steps=steps):
                brain = torch.from_numpy(np.pad(window, ((0, width - n_vox), (0, 0)))[None]).to(device)
                with torch.no_grad():
                    return to_uint8(model.reconstruct(brain, subjects, seed=0, num_inference_steps=steps)[0])

            decode(np.zeros((n_vox, 6), np.float32))  # warm-up
            times = []
            for _ in range(5):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                decode(np.zeros((n_vox, 6), np.float32))
                times.append(time.perf_counter() - t0)
            out = Path(tmp) / f"live_{steps}"
            folder = prepare_folder(out / "replay_volumes")
            replay = Replay(run.timeseries_path(root), folder, speed=speed, n_volumes=volumes)
            session = LiveSession(VolumeWatcher(folder, mask), design_onsets(run.design_path(root)), (3, 9), decode,
                                  LiveRecord(out, TR), TR, n_volumes=replay.n_volumes)
            replay.start()
            summary = session.run()
            replay.join()
            lat = [r.latency_s for r in session.results]
            name = torch.cuda.get_device_name() if device.type == "cuda" else str(device)
            row = {"setup": f"tiny (script check), {name}" if args.tiny else f"published, {name}, bf16",
                   "steps": steps, "speed": speed, "tr_s": TR / speed, **percentiles(lat),
                   "decode_median_s": statistics.median(times), "skipped": len(summary["skipped"])}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def quality(args, paths: dict) -> dict:
    from PIL import Image

    from dynadiff.data import nsd
    from dynadiff.data.dataset import load_mask
    from dynadiff.live.causal import Prior
    from dynadiff.live.decoder import WindowDecoder
    from dynadiff.live.offline import PREPROCESSING, run_trials, trial_windows
    from dynadiff.metrics.pixel import pixcorr, pixel_identification

    live = _live_script()
    steps = args.steps[0]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = live.resolve_config(live.parse_args(live_args(paths, Path(tmp), steps) + ["--serve"]))
    root = paths["nsd"]
    mask = load_mask(root, 1)
    test_ids = set(nsd.load_test_ids(root).tolist())
    sessions = sorted({int(p.name.split("_session")[1][:2]) for p in
                       (root / nsd.TIMESERIES_DIR.format(subject=1)).glob("timeseries_session*_run*.nii.gz")})
    runs = [r for r in nsd.list_runs(1, sessions) if r.timeseries_path(root).exists()]
    series = {r: run_trials(root, r, mask) for r in runs}
    decoder = WindowDecoder(cfg, int(mask.sum()), 6, steps=steps)
    seen, recs, gts = set(), {how: [] for how in PREPROCESSING}, []
    for k, r in enumerate(runs):
        x, onsets = series[r]
        prior = Prior.from_run(series[runs[k - 1 if k else 1]][0][:, :225])
        keep = [i for i, o in enumerate(onsets) if o.nsd_id in test_ids and o.nsd_id not in seen]
        if not keep:
            continue
        chosen = [onsets[i] for i in keep]
        seen.update(o.nsd_id for o in chosen)
        for how in PREPROCESSING:
            recs[how] += [decoder(w) for w in trial_windows(x, chosen, (3, 9), how, prior)]
        gts += [np.asarray(Image.open(nsd.stimulus_png(root, o.nsd_id)).convert("RGB")) for o in chosen]
    result = {"n_trials": len(gts), "steps": steps, "rows": {}}
    for how in PREPROCESSING:
        result["rows"][how] = {"pixcorr": float(np.mean(pixcorr(recs[how], gts))),
                               "identification": float(np.mean(pixel_identification(recs[how], gts)))}
        print(json.dumps({how: result["rows"][how], "n": len(gts)}), flush=True)
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = {}
    paths = None if args.published else demo_paths(args.demo)
    if "latency" in args.what:
        results["latency"] = latency_published(args) if args.published else latency_demo(args, paths)
    if "quality" in args.what:
        if args.published:
            sys.exit("bench_live: quality needs a trained decoder: --demo, not --published")
        results["quality"] = quality(args, paths)
    print("\n" + markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def markdown(results: dict) -> str:
    lines = []
    if "latency" in results:
        lines += ["| setup | steps | TR (replay) | trials | latency median | p95 | max | decoder alone (median) |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['setup']} | {r['steps']} | {r['tr_s']:.3f} s (x{r['speed']:g}) | {r['n']} | "
                  f"{r['median_s']:.3f} s | {r['p95_s']:.3f} s | {r['max_s']:.3f} s | {r['decode_median_s']:.3f} s |"
                  for r in results["latency"]]
    if "quality" in results:
        q = results["quality"]
        lines += ["", f"| preprocessing ({q['n_trials']} single trials, {q['steps']} steps) | PixCorr | "
                  "2-way identification, pixels (chance 0.5) |", "|---|---|---|"]
        lines += [f"| {how} | {v['pixcorr']:.3f} | {v['identification']:.3f} |" for how, v in q["rows"].items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
