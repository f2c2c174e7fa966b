"""The demo behind ``demo.py``: a tiny Dynadiff trained and evaluated on a synthetic mini-NSD, on a CPU.

1. write the synthetic mini-NSD (``dynadiff.data.synthetic``) and its stimulus PNGs;
2. pre-train a tiny Versatile Diffusion stand-in on *other* smooth colour images
   (the real VD was pre-trained on other images too): the VAE as an autoencoder,
   then the image UNet as a denoiser conditioned on the tokens of a small
   thumbnail encoder (VD's UNet is conditioned on CLIP image tokens); written in
   VD's folder layout, so the real loader reads it;
3. train the decoder with the real training loop (``train.py``'s configuration
   and :func:`dynadiff.training.train`): brain module + LoRA, docs/behaviour.md §4 step;
4. run the real evaluation (``eval.py``'s configuration and pipeline) on the
   held-out test images, for the trained decoder and for the same decoder
   before training, and compare; the report holds the ``eval.py`` command of the
   trained decoder's evaluation, which re-evaluates it when pasted (it finds
   its images cached).

The synthetic BOLD encodes each image's 4x4 RGB thumbnail, so a decoder that
learns from the fMRI recovers the images' coarse colour layout: PixCorr above
the untrained decoder's and pixel two-way identification above chance (0.5).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shlex
import shutil
import sys
import time
import typing as tp
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

MARKER = ".dynadiff-demo"  # a work folder the demo may clear


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes and lengths of the demo (``FAST`` for tests: everything tiny)."""

    image_size: int = 32  # with a 3-level VAE (factor 4): 8x8 latents; the synthetic images are 32x32 fields upsampled
    subject: int = 1
    synthetic: tuple[tuple[str, tp.Any], ...] = (("n_unique", 300), ("n_test", 40), ("signal_percent", 3.0),
                                                  ("noise_percent", 0.6))
    unet_channels: tuple[int, ...] = (32, 32, 64, 64)
    vae_channels: tuple[int, ...] = (16, 32, 32)
    n_tokens: int = 16  # 4x4 thumbnail tokens
    pretrain_images: int = 2000
    vae_steps: int = 300
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_crop: int = 32  # the VAE trains on crops of this side (it is convolutional; no crop at 32 px)
    unet_steps: int = 300
    unet_batch: int = 32
    unet_lr: float = 1e-3
    train_overrides: tuple[str, ...] = (
        "steps=400", "batch_size=16", "optim.lr=1.5e-3", "optim.warmup_steps=30", "optim.weight_decay=0.0",
        "brain_modules_config.hidden=384", "brain_modules_config.dropout=0.3",
        "val_every=100", "sample_every=150", "checkpoint_every=100", "log_every=10",
        "versatilediffusion_config.num_inference_steps=20",
    )
    eval_args: tuple[str, ...] = ("--averaged-trial",)
    num_inference_steps: int = 20
    sweep_offsets: str = "-6:12:3"  # timecourse.py --offsets of the trained decoder's time course
    sweep_images: int = 16  # its --limit
    generation_batch: int = 20  # eval.py / timecourse.py --batch-size: tiny models are faster in big batches
    # --generalization: one decoder per offset, each on a 1-TR window (train.py --window k:k+1), then every decoder
    # at every offset (timecourse.py --checkpoints ... --generalization)
    generalization_offsets: str = "-3:12:3"
    generalization_overrides: tuple[str, ...] = ("steps=250", "val_every=250", "sample_every=0",
                                                 "checkpoint_every=250")
    threads: int = 2  # torch threads: on an idle 2-core machine, 2 threads pre-train 2x and train 1.4x faster than 1
    seed: int = 0


FAST = DemoSettings(
    synthetic=(("n_unique", 12), ("n_test", 6), ("sessions", (1,))),
    unet_channels=(8, 8, 16, 16), vae_channels=(8, 8, 8), pretrain_images=16,
    vae_steps=2, vae_batch=4, unet_steps=2, unet_batch=4,
    train_overrides=("steps=3", "batch_size=4", "brain_modules_config.hidden=16", "val_every=3", "sample_every=3",
                     "checkpoint_every=3", "log_every=1", "versatilediffusion_config.num_inference_steps=2",
                     "data.val_fraction=0.2"),
    eval_args=("--limit", "4"), num_inference_steps=2, sweep_offsets="2:5", sweep_images=2, generation_batch=4,
    generalization_offsets="-1:2:2", generalization_overrides=("steps=2", "val_every=2", "checkpoint_every=2"),
    threads=1,  # per-op overhead dominates such tiny models: one thread beats two on a busy machine (tests)
)


# ----------------------------------------------------------------------------- tiny VD pre-training


def thumbnail_tokens(images, encoder) -> "torch.Tensor":
    """(B, 3, S, S) images in [0, 1] -> (B, n_tokens, 768): the stand-in image encoder's tokens."""
    import torch.nn.functional as F

    side = int(math.isqrt(encoder.pos.shape[0]))
    thumb = F.adaptive_avg_pool2d(images * 2 - 1, side).flatten(2).transpose(1, 2)  # (B, side^2, 3)
    return encoder.proj(thumb) + encoder.pos


def _make_encoder(n_tokens: int, dim: int):
    import torch
    from torch import nn

    enc = nn.Module()
    enc.proj = nn.Linear(3, dim)
    enc.pos = nn.Parameter(torch.randn(n_tokens, dim) * 0.5)
    return enc


def pretrain_tiny_vd(folder: Path, s: DemoSettings) -> Path:
    """Write a tiny VD folder (``image_unet/``, ``vae/``, ``scheduler/``) pre-trained on fresh smooth images.

    Deterministic given ``s.seed``; the caller's global random state is left as it was.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        return _pretrain_tiny_vd(Path(folder), s)


def _pretrain_tiny_vd(folder: Path, s: DemoSettings) -> Path:
    import torch
    import torch.nn.functional as F

    from dynadiff.data.synthetic import make_images
    from dynadiff.models import vd
    from dynadiff.models.tiny import build_unet, build_vae, write_tiny_vd

    if int(math.isqrt(s.n_tokens)) ** 2 != s.n_tokens:
        raise ValueError(f"n_tokens must be a square (a grid of thumbnail patches), got {s.n_tokens}")
    folder = write_tiny_vd(folder, unet_block_out_channels=s.unet_channels, vae_block_out_channels=s.vae_channels,
                           seed=s.seed)
    rng = np.random.default_rng(s.seed + 1000)  # other images than the synthetic NSD's
    pix = torch.from_numpy(make_images(s.pretrain_images, rng, size=s.image_size)).permute(0, 3, 1, 2).float() / 255
    g = torch.Generator().manual_seed(s.seed)

    # 1. VAE: autoencoder on crops; log-variance started small so that latents are nearly deterministic.
    vae = build_vae(s.seed, block_out_channels=s.vae_channels)
    factor = 2 ** (len(s.vae_channels) - 1)
    crop = max(factor, min(s.vae_crop, s.image_size) // factor * factor)
    with torch.no_grad():
        c = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[c:] = 0
        vae.quant_conv.bias[c:] = -8.0
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.vae_lr, total_steps=max(s.vae_steps, 2), pct_start=0.1)
    t0 = time.perf_counter()
    for step in range(s.vae_steps):
        x = pix[torch.randint(0, len(pix), (s.vae_batch,), generator=g)] * 2 - 1
        i, j = (torch.randint(0, (s.image_size - crop) // factor + 1, (2,), generator=g) * factor).tolist()
        x = x[:, :, i : i + crop, j : j + crop]
        post = vae.encode(x).latent_dist
        loss = F.mse_loss(vae.decode(post.sample(generator=g)).sample, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pix[k : k + 64] * 2 - 1).latent_dist.mode() for k in range(0, len(pix), 64)])
        recon = vae.decode(latents[:64]).sample
        vae_mse = float(F.mse_loss((recon / 2 + 0.5).clamp(0, 1), pix[:64]))
    scale = float(1.0 / latents.std())  # latents * scale ~ unit variance, as 0.18215 does for SD's VAE
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    logger.info("demo VAE: %d steps in %.0f s, reconstruction MSE %.4f (images in [0, 1]), scaling factor %.4f",
                s.vae_steps, time.perf_counter() - t0, vae_mse, scale)

    # 2. UNet: epsilon prediction conditioned on thumbnail tokens (10 % dropped to zero, for guidance).
    unet = build_unet(s.seed, block_out_channels=s.unet_channels)
    encoder = _make_encoder(s.n_tokens, unet.config.cross_attention_dim)
    noise_sched = vd.build_scheduler("ddpm", vd.load_scheduler_config(folder))
    n_train = noise_sched.config.num_train_timesteps
    unet.train()
    params = list(unet.parameters()) + list(encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.unet_lr, total_steps=max(s.unet_steps, 2), pct_start=0.1)
    t0 = time.perf_counter()
    for step in range(s.unet_steps):
        idx = torch.randint(0, len(pix), (s.unet_batch,), generator=g)
        z = latents[idx]
        tokens = thumbnail_tokens(pix[idx], encoder)
        keep = (torch.rand(len(idx), generator=g) >= 0.1).float()[:, None, None]
        t = torch.randint(0, n_train, (len(idx),), generator=g)
        noise = torch.randn(z.shape, generator=g)
        pred = unet(noise_sched.add_noise(z, noise, t), t, encoder_hidden_states=tokens * keep).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    logger.info("demo UNet: %d steps in %.0f s, last loss %.4f", s.unet_steps, time.perf_counter() - t0, float(loss.detach()))
    unet.eval()
    for name, module in (("image_unet", unet), ("vae", vae)):
        shutil.rmtree(folder / name)
        module.save_pretrained(folder / name)
    return folder


# ----------------------------------------------------------------------------- the pipeline


def _command(name: str):
    """The command module of ``train.py``, ``eval.py`` or ``timecourse.py`` (their configuration code is the real
    one)."""
    import importlib

    return importlib.import_module(f"dynadiff.commands.{name}")


def command_line(name: str, argv: list[str]) -> str:
    """The shell command that runs ``name`` with ``argv``, from any folder (this Python's module of it)."""
    return shlex.join([sys.executable, "-m", f"dynadiff.commands.{name}", *argv])


def _prepare_workdir(workdir: Path) -> Path:
    workdir = Path(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise FileExistsError(f"{workdir} exists and was not made by the demo: choose another --output")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("written by demo.py; deleted and rewritten by its next run\n")
    return workdir


def pixel_identification_from_folder(folder: Path, n: int, direction: str) -> float:
    """Two-way identification on the 425x425 RGB pixels of ``{i}.png`` vs ``{i}_gt.png`` in an eval output folder."""
    from PIL import Image

    from dynadiff.metrics.pixel import pixel_identification

    recs = [np.asarray(Image.open(folder / f"{i}.png").convert("RGB")) for i in range(n)]
    gts = [np.asarray(Image.open(folder / f"{i}_gt.png").convert("RGB")) for i in range(n)]
    return float(np.mean(pixel_identification(recs, gts, direction)))


def run_demo(workdir: Path, s: DemoSettings = DemoSettings(), progress: bool = True,
             generalization: bool = False, bids_tr: float | None = None) -> dict:
    """The whole demo in ``workdir``; returns the untrained and trained results and the paths. ``generalization``:
    then one decoder per offset, and the temporal generalisation matrix (:func:`run_generalization`).
    ``bids_tr``: the same synthetic data written as a BIDS dataset at this TR (raw and fMRIPrep-style
    derivatives, :func:`dynadiff.data.synthetic_bids.write_synthetic_bids`), read through the BIDS data source."""
    import torch

    from dynadiff.checkpoint import save_checkpoint
    from dynadiff.data.stimuli import prepare_stimuli
    from dynadiff.data.synthetic import write_synthetic_nsd
    from dynadiff.evaluation import evaluate
    from dynadiff.training import build_training_data, init_model

    t_start = time.perf_counter()
    torch.set_num_threads(s.threads)
    workdir = _prepare_workdir(Path(workdir).resolve())  # absolute: the eval command it prints works anywhere
    times = {}

    t = time.perf_counter()
    synthetic = dict(s.synthetic)
    if bids_tr is None:
        nsd_root = workdir / "nsddata"
        info = write_synthetic_nsd(nsd_root, subjects=(s.subject,), seed=s.seed, **synthetic)
        prepare_stimuli(nsd_root, images="all", subjects=(s.subject,), workers=1)
        sessions = ",".join(str(x) for x in info["sessions"][s.subject])
        data = [f"data.nsd_dataset_config.nsddata_path={nsd_root}", f"data.nsd_dataset_config.sessions=[{sessions}]"]
    else:
        from dynadiff.data.synthetic_bids import write_synthetic_bids

        info = write_synthetic_bids(workdir / "bids", subjects=(s.subject,), seed=s.seed, tr=bids_tr, **synthetic)
        data = list(info["overrides"])  # the BIDS source: dataset, derivatives, mask, test images, sessions
    times["synthetic data"] = time.perf_counter() - t

    t = time.perf_counter()
    vd_dir = pretrain_tiny_vd(workdir / "versatile_diffusion", s)
    times["tiny VD pre-training"] = time.perf_counter() - t

    common = [*data, f"data.nsd_dataset_config.image_size={s.image_size}",
              f"versatilediffusion_config.image_size={s.image_size}", f"brain_modules_config.n_tokens={s.n_tokens}"]
    train_script = _command("train")
    train_argv = ["--subject", str(s.subject), "--output", str(workdir / "train"), "--cache", str(workdir / "cache"),
                  "--vd_cache_dir", str(vd_dir), "--device", "cpu", *common, "data.num_workers=0",
                  f"cpu_threads={s.threads}", f"progress={str(progress).lower()}", *s.train_overrides]
    train_cfg = train_script.build_config(train_script.parse_args(train_argv))

    # The decoder before training: the same initialisation as the training run's first step.
    t = time.perf_counter()
    data = build_training_data(train_cfg)
    untrained = workdir / "untrained" / "model.safetensors"
    save_checkpoint(init_model(train_cfg, data, torch.device("cpu")), untrained, extra_metadata={"step": 0})
    summary = train_cfg.run()
    times["decoder training"] = time.perf_counter() - t

    eval_script = _command("eval")
    results, commands = {}, {}
    t = time.perf_counter()
    for label, ckpt in (("untrained", untrained), ("trained", Path(summary["best_checkpoint"] or summary["last_checkpoint"]))):
        # the brain module's sizes come from the checkpoint's metadata, as for any train.py checkpoint
        argv = ["--subject", str(s.subject), "--cache", str(workdir / f"eval_{label}"), "--checkpoint", str(ckpt),
                "--vd_cache_dir", str(vd_dir), "--device", "cpu", "--metrics", "pixcorr,ssim",
                "--batch-size", str(s.generation_batch), *s.eval_args,
                *common, f"versatilediffusion_config.num_inference_steps={s.num_inference_steps}"]
        cfg = eval_script.resolve_config(eval_script.parse_args(argv))
        result = evaluate(cfg)
        out = Path(result["output_dir"])
        result["pixel_identification"] = pixel_identification_from_folder(out, result["n_images"], result["identification"])
        results[label] = result
        commands[label] = command_line("eval", argv)
    times["evaluation"] = time.perf_counter() - t

    # The trained decoder's time course: its window slid over time (timecourse.py, same options as eval.py)
    t = time.perf_counter()
    tc_script = _command("timecourse")
    tc_argv = ["--subject", str(s.subject), "--cache", str(workdir / "timecourse"), "--checkpoint",
               str(Path(summary["best_checkpoint"] or summary["last_checkpoint"])), "--vd_cache_dir", str(vd_dir),
               "--device", "cpu", "--batch-size", str(s.generation_batch), "--metrics", "pixcorr,ssim",
               "--averaged-trial", "--offsets", s.sweep_offsets,
               "--limit", str(s.sweep_images), *common,
               f"versatilediffusion_config.num_inference_steps={s.num_inference_steps}"]
    from dynadiff.timecourse import run_timecourse

    decoders, offsets, asked = tc_script.resolve(tc_script.parse_args(tc_argv))
    timecourse = run_timecourse(decoders, offsets, asked)
    times["time course"] = time.perf_counter() - t
    matrix = None
    if generalization:
        t = time.perf_counter()
        matrix = run_generalization(workdir, s, vd_dir, train_argv, common, progress)
        times["per-offset decoders and generalisation"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t_start
    report = {"data": "synthetic mini-NSD" if bids_tr is None else f"synthetic BIDS, TR {bids_tr:g} s",
              "untrained": results["untrained"], "trained": results["trained"], "train_summary": summary,
              "times_s": times, "overview": str(Path(results["trained"]["output_dir"]) / "overview.png"),
              "workdir": str(workdir), "eval_command": commands["trained"],
              "timecourse": {k: timecourse[k] for k in ("offsets", "n_images", "peak_offset", "model_offset",
                                                        "output_dir")},
              "timecourse_pixcorr": {r["offset"]: r["metrics"]["pixcorr"]["mean"] for r in timecourse["rows"]},
              "timecourse_command": command_line("timecourse", tc_argv)}
    if matrix is not None:
        report["generalization"] = matrix
    (workdir / "demo_results.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def run_generalization(workdir: Path, s: DemoSettings, vd_dir: Path, train_argv: list[str], common: list[str],
                       progress: bool = True) -> dict:
    """One decoder per offset of ``s.generalization_offsets``, each trained (train.py's loop, the demo's settings
    but ``s.generalization_overrides``) on the 1-TR window at its offset; then timecourse.py's pipeline with
    ``--checkpoints ... --generalization``: each decoder at every offset. Returns where the PixCorr matrix peaks."""
    from dynadiff.timecourse import parse_offsets, run_timecourse

    train_script = _command("train")
    checkpoints = []
    for k in parse_offsets(s.generalization_offsets):
        out = workdir / "per_offset" / f"offset{k:+d}"
        argv = [*[a for a in train_argv if a not in ("--output", str(workdir / "train"))], "--output", str(out),
                "--window", f"{k}:{k + 1}", *s.generalization_overrides]
        cfg = train_script.build_config(train_script.parse_args(argv))
        logger.info("decoder of offset %+d (1-TR window)", k)
        summary = cfg.run()
        checkpoints.append(str(Path(summary["best_checkpoint"] or summary["last_checkpoint"])))
    tc_script = _command("timecourse")
    tc_argv = ["--subject", str(s.subject), "--cache", str(workdir / "generalization"), "--checkpoints", *checkpoints,
               "--generalization", "--vd_cache_dir", str(vd_dir), "--device", "cpu", "--batch-size",
               str(s.generation_batch), "--metrics", "pixcorr,ssim", "--averaged-trial", "--limit", str(s.sweep_images),
               *common, f"versatilediffusion_config.num_inference_steps={s.num_inference_steps}"]
    decoders, offsets, asked = tc_script.resolve(tc_script.parse_args(tc_argv))
    summary = run_timecourse(decoders, offsets, asked, generalization=True)
    g = summary["generalization"]
    means = np.array(g["means"]["pixcorr"], dtype=float)  # (train offset, test offset)
    j, k = np.unravel_index(np.nanargmax(means), means.shape)
    return {"offsets": g["train_offsets"], "pixcorr": means.tolist(), "best_train_offset": g["train_offsets"][j],
            "best_test_offset": g["test_offsets"][k], "output_dir": summary["output_dir"],
            "command": command_line("timecourse", tc_argv)}


def generalization_lines(report: dict) -> str:
    """The generalisation matrix (PixCorr), where it peaks, and its picture."""
    from dynadiff.data.preprocess import TR

    g = report["generalization"]
    offsets = g["offsets"]
    lines = ["Temporal generalisation (PixCorr; rows: the offset a 1-TR decoder was trained on, columns: the offset "
             "it is tested on):", "| train \\ test | " + " | ".join(f"{k:+d}" for k in offsets) + " |",
             "| --- |" + " ---: |" * len(offsets)]
    lines += [f"| {k:+d} | " + " | ".join(f"{v:.2f}" for v in row) + " |" for k, row in zip(offsets, g["pixcorr"])]
    j, k = g["best_train_offset"], g["best_test_offset"]
    lines += [f"Best: trained and tested at {j:+d} and {k:+d} TRs ({k * TR:+.1f} s after the onset)"
              f"{' (on the diagonal)' if j == k else ''}",
              f"Generalisation matrix: {Path(g['output_dir']) / 'generalization.png'}"]
    return "\n".join(lines)


def comparison_table(report: dict) -> str:
    """Markdown: each metric for the untrained and the trained decoder, next to its chance level."""
    un, tr = report["untrained"], report["trained"]
    lines = [f"Data: {report.get('data', 'synthetic mini-NSD')}. Test images: {tr['n_images']} "
             f"({'averaged' if tr['averaged'] else 'one'} repetition"
             f"{'s' if tr['averaged'] else ''} per image).", "",
             "| metric | untrained decoder | trained decoder | chance |", "| --- | ---: | ---: | ---: |"]
    for m, label in (("pixcorr", "PixCorr"), ("ssim", "SSIM")):
        lines.append(f"| {label} | {un['means'][m]:.4f} | {tr['means'][m]:.4f} | {tr['shuffled'][m]:.4f} (shuffled pairs) |")
    lines.append(f"| 2-way identification, pixels | {un['pixel_identification']:.4f} | {tr['pixel_identification']:.4f} | 0.5 |")
    return "\n".join(lines) + "\n"


def timecourse_lines(report: dict) -> str:
    """Where the trained decoder's time course peaks, its PixCorr at each offset, and its pictures."""
    from dynadiff.data.preprocess import TR

    tc = report["timecourse"]
    k = tc["peak_offset"].get("pixcorr")
    curve = ", ".join(f"{int(o):+d}: {v:.2f}" for o, v in report["timecourse_pixcorr"].items())
    out = Path(tc["output_dir"])
    lines = [f"Time course ({tc['n_images']} images; the decoder's 6-TR window slid over the offsets, in TRs from the "
             f"onset): PixCorr {curve}"]
    if k is not None:
        lines.append(f"Peak at offset {int(k):+d} (window from {int(k) * TR:+.1f} s after the onset); the decoder was "
                     f"trained on offset {tc['model_offset']:+d}")
    lines += [f"Time course plot: {out / 'timecourse.png'}", f"Filmstrip (ground truth, then each offset): "
              f"{out / 'filmstrip.png'}"]
    return "\n".join(lines)
