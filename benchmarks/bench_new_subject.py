"""A new subject from a few sessions: fine-tuned from a model pre-trained on the other subjects vs trained from
scratch, against the number of sessions (issue 22; MindEye2's protocol at the demo's scale, on a CPU).

Synthetic data whose subjects share how images drive the response (each voxel is a weighted sum of the same image
features) but each have their own voxels and weights: the mini-NSD of subjects 1, 2, 5 and 7 over ``--n-sessions``
sessions. The demo's tiny Versatile Diffusion stand-in (pre-trained on other images) and its decoder settings;
then, through train.py's and eval.py's configurations:

1. pre-train one model on subjects 2, 5 and 7, every session (``--pretrain-steps``);
2. for each K of ``--sessions``: subject 1's first K sessions (``--first-sessions K``), ``--steps`` steps each,
   fine-tuned from that model (``--init-from``, the subject layer alone for ``--layer-steps`` first) and from
   scratch, the same steps and settings otherwise;
3. evaluate each on subject 1's test images, repetitions averaged: PixCorr and pixel two-way identification;
4. the schedule: with the fewest sessions, fine-tuned again without the subject-layer-only steps.

Writes ``learning_curve.png``, ``learning_curve.md`` and ``learning_curve.json`` in ``--out``; prints the table.

    .venv/bin/python benchmarks/bench_new_subject.py [--out bench_new_subject] [--sessions 1 2 4 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

SUBJECTS = (1, 2, 5, 7)
NEW = 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_new_subject"))
    p.add_argument("--n-sessions", type=int, default=8, help="sessions of the synthetic data")
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8], help="K: the new subject's first K")
    p.add_argument("--steps", type=int, default=200, help="steps of each new-subject run")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--layer-steps", type=int, default=50, help="fine-tuning: the subject layer alone first")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fast", action="store_true", help="the demo's --fast sizes: checks the script in a minute")
    return p.parse_args(argv)


def main(argv=None) -> None:
    import numpy as np
    import torch

    from dynadiff.commands import eval as eval_script
    from dynadiff.commands import train as train_script
    from dynadiff.data.stimuli import prepare_stimuli
    from dynadiff.data.synthetic import write_synthetic_nsd
    from dynadiff.demo import FAST, DemoSettings, pixel_identification_from_folder, pretrain_tiny_vd
    from dynadiff.evaluation import evaluate

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("exca").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = FAST if args.fast else DemoSettings()
    t0 = time.perf_counter()
    nsd = out / "nsddata"
    sessions = tuple(range(1, args.n_sessions + 1))
    if not (nsd / "synthetic.json").is_file():
        write_synthetic_nsd(nsd, subjects=SUBJECTS, seed=0, sessions=sessions,
                            n_unique=12 if args.fast else 150, n_test=6 if args.fast else 30, signal_percent=3.0,
                            noise_percent=0.6)
        prepare_stimuli(nsd, images="all", subjects=SUBJECTS, workers=1)
    vd = out / "versatile_diffusion"
    if not (vd / "image_unet").is_dir():
        pretrain_tiny_vd(vd, s)
    common = [f"data.nsd_dataset_config.nsddata_path={nsd}",
              f"data.nsd_dataset_config.sessions=[{','.join(map(str, sessions))}]",
              f"data.nsd_dataset_config.image_size={s.image_size}",
              f"versatilediffusion_config.image_size={s.image_size}", f"brain_modules_config.n_tokens={s.n_tokens}"]
    base = [a for a in s.train_overrides
            if not a.startswith(("steps=", "val_every=", "sample_every=", "checkpoint_every="))]
    run_args = ["--cache", str(out / "cache"), "--vd_cache_dir", str(vd), "--device", "cpu", *common, *base,
                "data.num_workers=0", f"cpu_threads={args.threads}", "progress=false", "sample_every=0"]

    def train(name: str, *extra: str) -> Path:
        folder = out / "runs" / name
        summary_file = folder / "summary.json"
        if not summary_file.is_file():
            cfg = train_script.build_config(train_script.parse_args(["--output", str(folder), *run_args, *extra]))
            cfg.run()
        return folder / "checkpoints" / "last" / "model.safetensors"

    others = [s for s in SUBJECTS if s != NEW]
    pretrained = train("pretrained", f"steps={args.pretrain_steps}", f"val_every={args.pretrain_steps}",
                       f"checkpoint_every={args.pretrain_steps}", "--subjects", *map(str, others))
    rows = []
    (out / "eval").mkdir(exist_ok=True)
    fine = ["--init-from", str(pretrained), f"init_subject_steps={args.layer_steps}"]
    runs = [(k, how, extra) for k in args.sessions for how, extra in (("fine-tuned", fine), ("scratch", []))]
    runs.append((min(args.sessions), "fine-tuned, no layer-only steps", fine[:2]))
    for k, how, extra in runs:
        name = {"fine-tuned": "fine-tuned", "scratch": "scratch"}.get(how, "fine-tuned-all-at-once")  # its folder
        ckpt = train(f"{name}_{k}", "--subject", str(NEW), "--first-sessions", str(k), f"steps={args.steps}",
                     f"val_every={args.steps}", f"checkpoint_every={args.steps}", *extra)
        argv = ["--subject", str(NEW), "--cache", str(out / "eval" / f"{name}_{k}"), "--checkpoint", str(ckpt),
                "--vd_cache_dir", str(vd), "--device", "cpu", "--metrics", "pixcorr,ssim", "--batch-size",
                str(s.generation_batch), "--averaged-trial", *common,
                f"versatilediffusion_config.num_inference_steps={s.num_inference_steps}"]
        result = evaluate(eval_script.resolve_config(eval_script.parse_args(argv)))
        ident = pixel_identification_from_folder(Path(result["output_dir"]), result["n_images"],
                                                 result["identification"])
        rows.append({"sessions": k, "how": how, "pixcorr": result["means"]["pixcorr"],
                     "pixcorr_shuffled": result["shuffled"]["pixcorr"], "pixel_identification": ident,
                     "n_images": result["n_images"]})
        print(json.dumps(rows[-1]), flush=True)
    (out / "learning_curve.json").write_text(json.dumps({"rows": rows, "args": vars(args) | {"out": str(out)},
                                                         "seconds": time.perf_counter() - t0}, indent=1))
    lines = ["| sessions of subject 1 | fine-tuned: PixCorr | from scratch: PixCorr | fine-tuned: identification "
             "| from scratch: identification |", "| ---: | ---: | ---: | ---: | ---: |"]
    for k in args.sessions:
        f = next(r for r in rows if r["sessions"] == k and r["how"] == "fine-tuned")
        c = next(r for r in rows if r["sessions"] == k and r["how"] == "scratch")
        lines.append(f"| {k} | {f['pixcorr']:.3f} | {c['pixcorr']:.3f} | {f['pixel_identification']:.3f} | "
                     f"{c['pixel_identification']:.3f} |")
    for r in rows:
        if r["how"] == "fine-tuned, no layer-only steps":
            lines.append(f"| {r['sessions']}, fine-tuned without the {args.layer_steps} subject-layer-only steps | "
                         f"{r['pixcorr']:.3f} | | {r['pixel_identification']:.3f} | |")
    table = "\n".join(lines)
    (out / "learning_curve.md").write_text(table + "\n")
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, label in ((axes[0], "pixcorr", "PixCorr"), (axes[1], "pixel_identification",
                                                              "2-way identification, pixels")):
        for how, style in (("fine-tuned", "o-"), ("scratch", "s--")):
            pts = [(r["sessions"], r[key]) for r in rows if r["how"] == how]
            ax.plot(*zip(*pts), style, label=how)
        chance = np.mean([r["pixcorr_shuffled"] for r in rows]) if key == "pixcorr" else 0.5
        ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.sessions, [str(k) for k in args.sessions])
        ax.set_xlabel("sessions of the new subject")
        ax.set_title(label)
    axes[0].legend()
    fig.suptitle(f"A new subject: fine-tuned from 3 other subjects vs from scratch ({args.steps} steps each)")
    fig.tight_layout()
    fig.savefig(out / "learning_curve.png", dpi=110)
    print(f"{out / 'learning_curve.png'} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
