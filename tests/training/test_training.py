"""train.py's loop: sample order, schedule, exact resume, checkpoints eval reads, configuration errors."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dynadiff import training
from dynadiff.cli import ConfigError
from dynadiff.config import OptimizerConfig, TrainConfig
from dynadiff.data.dataset import split_by_image
from dynadiff.files import write_dir_atomically
from dynadiff.training import (SampleStream, StepBatches, TrainingError, complete_checkpoint_dir, epoch_permutation,
                               lr_factor, read_resume_state, train)
from scripts import load_script


# ----------------------------------------------------------------------------- pure parts


def test_split_by_image_holds_out_whole_images():
    ids = [5, 9, 5, 2, 7, 9, 9, 3, 2, 8, 11, 5]  # repetitions of 7 images, in acquisition order
    train_pos, val_pos = split_by_image(ids, 0.3, seed=4)
    assert sorted(train_pos + val_pos) == list(range(len(ids)))
    val_images = {ids[i] for i in val_pos}
    assert len(val_images) == round(0.3 * 7) == 2
    assert not val_images & {ids[i] for i in train_pos}
    assert val_pos == sorted(val_pos) and train_pos == sorted(train_pos)
    assert split_by_image(ids, 0.3, seed=4) == (train_pos, val_pos)  # seeded
    assert any(split_by_image(ids, 0.3, seed=s)[1] != val_pos for s in range(5, 10))
    assert split_by_image(ids, 0.0) == (list(range(len(ids))), [])
    assert len({ids[i] for i in split_by_image(ids, 0.01)[1]}) == 1  # at least one image once asked for
    with pytest.raises(ValueError, match="leaves no training image"):
        split_by_image([1, 1, 2], 0.9)
    with pytest.raises(ValueError, match=r"within \[0, 1\)"):
        split_by_image(ids, 1.0)


def test_sample_stream_is_epoch_permutations_from_any_position():
    n, seed = 7, 3
    stream = SampleStream(n, seed)
    want = np.concatenate([epoch_permutation(n, seed, e) for e in range(4)])
    for e in range(4):
        assert sorted(want[e * n:(e + 1) * n]) == list(range(n))  # every sample once per epoch
    assert not np.array_equal(want[:n], want[n:2 * n])  # a new order each epoch
    assert stream.positions(0, 4 * n) == want.tolist()
    assert SampleStream(n, seed).positions(12, 9) == want[12:21].tolist()  # a fresh stream, mid-epoch: resumable
    batches = list(StepBatches(SampleStream(n, seed), batch_size=3, accumulation=2, start_step=1, stop_step=3))
    assert batches == [want[6:9].tolist(), want[9:12].tolist(), want[12:15].tolist(), want[15:18].tolist()]


def test_lr_schedule_warmup_then_cosine():
    total, warmup, floor = 110, 10, 0.1
    assert [lr_factor(s, total, warmup, floor) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, total, warmup, floor) == pytest.approx(1.0)
    # halfway through the decay: floor + (1 - floor) * (1 + cos(pi / 2)) / 2
    assert lr_factor(60, total, warmup, floor) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(35, total, warmup, floor) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, total, warmup, floor) == pytest.approx(floor)
    assert lr_factor(0, 5, 0, 0.0) == pytest.approx(1.0)


def test_optimizer_decays_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model[1].weight.requires_grad_(False)
    opt, names = training.build_optimizer(model, OptimizerConfig(weight_decay=0.3, lr=0.01))
    assert names == ["0.weight", "0.bias", "1.bias"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 2]


# ----------------------------------------------------------------------------- configuration


def test_config_errors_name_the_problem(make_train_config):
    with pytest.raises(ConfigError, match=r"image_size \(64\) and versatilediffusion_config.image_size \(32\)"):
        make_train_config("data.nsd_dataset_config.image_size=64")
    with pytest.raises(ConfigError, match=r"subject \(1\) must be the first of subjects \[2, 5\]"):
        make_train_config("data.subjects=[2,5]")
    with pytest.raises(ConfigError, match="training reads the train split"):
        make_train_config("data.nsd_dataset_config.split=test")
    with pytest.raises(ConfigError, match=r"subjects must not repeat"):
        make_train_config("data.subjects=[1,1]")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        make_train_config("optim.learning_rate=1")
    with pytest.raises(ConfigError, match=r"invalid value for 'grad_accumulation'"):
        make_train_config("grad_accumulation=0")
    cfg = make_train_config("data.subjects=[2,5]", "data.nsd_dataset_config.subject=2")
    assert cfg.subjects == [2, 5] and cfg.data.subject_config(5).subject == 5
    assert cfg.data.subject_config(5).nsddata_path == cfg.data.nsd_dataset_config.nsddata_path


def test_mixed_precision_resolution():
    cpu = torch.device("cpu")
    assert training.resolve_mixed_precision("auto", cpu) is None
    assert training.resolve_mixed_precision("bf16", cpu) is torch.bfloat16
    with pytest.raises(TrainingError, match="fp16 needs a CUDA device"):
        training.resolve_mixed_precision("fp16", cpu)


def test_train_script_flags_and_resume_base(tmp_path):
    from pathlib import Path

    script = load_script("train")
    infra = tmp_path / "infra.yaml"
    infra.write_text("train:\n  cluster: debug\n  cpus_per_task: 3\n  folder: " + str(tmp_path / "jobs") + "\n")
    args = script.parse_args(["--subjects", "5", "2", "--output", str(tmp_path / "r"), "--steps", "9",
                              "--infra-yaml", str(infra), "optim.lr=0.5"])
    cfg = script.build_config(args)
    assert cfg.subjects == [5, 2] and cfg.data.nsd_dataset_config.subject == 5
    assert cfg.steps == 9 and cfg.optim.lr == 0.5 and str(cfg.output_dir) == str(tmp_path / "r")
    assert cfg.infra.cluster == "debug" and cfg.infra.cpus_per_task == 3
    infra.write_text("train:\n  cluster: local\n  folder: null\n")  # null: the cache folder, --cache wins
    assert Path(script.build_config(script.parse_args(["--infra-yaml", str(infra)])).infra.folder) == Path("cache")
    cfg = script.build_config(script.parse_args(["--infra-yaml", str(infra), "--cache", str(tmp_path / "c")]))
    assert Path(cfg.infra.folder) == Path(cfg.data.nsd_dataset_config.infra.folder) == tmp_path / "c"
    assert script.build_config(script.parse_args(["--cache", str(tmp_path / "c")])).infra.folder is None  # local: no job cache
    # --resume reads the run's own config.yaml as the base
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.yaml").write_text("steps: 77\nbatch_size: 3\n")
    cfg = script.build_config(script.parse_args(["--output", str(tmp_path / "r"), "--resume"]))
    assert cfg.steps == 77 and cfg.batch_size == 3 and cfg.resume
    assert script.main(["--output", str(tmp_path / "r"), "bogus.key=1"]) == 2


# ----------------------------------------------------------------------------- the loop


def _tensors(path):
    return load_file(str(path))


def _log_rows(path):
    with open(path, newline="") as f:
        return [(r["step"], r["split"], r["loss"], r["lr"], r["grad_norm"]) for r in csv.DictReader(f)]


@pytest.mark.parametrize("requeued", [False, True], ids=["--resume", "requeued-by-slurm"])
def test_resume_continues_exactly(make_train_config, tmp_path, monkeypatch, crash_at, requeued):
    """Interrupted during step 5 (after the checkpoint of step 4), then resumed (with ``resume=true``, or
    as a job SLURM requeued: ``SLURM_RESTART_COUNT`` > 0): the same weights, optimizer moments and
    logged losses at step 6 as the uninterrupted run."""
    common = ("steps=6", "grad_accumulation=2", "checkpoint_every=2", "val_every=3", "brain_modules_config.dropout=0.5")
    full = train(make_train_config(*common, out=tmp_path / "full"))
    assert full["steps"] == 6 and full["resumed_from"] is None

    crash_at(4 * 2 + 2 + 1)  # in step 5: 2 micro-batches per step, 2 validation batches after step 3
    out = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_train_config(*common, out=out))
    monkeypatch.undo()
    assert read_resume_state(out / "checkpoints" / "last").step == 4
    assert not (out / "checkpoints" / "last.tmp").exists()

    with pytest.raises(TrainingError, match="pass --resume"):
        train(make_train_config(*common, out=out))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # a SLURM job's first run: the same refusal
    with pytest.raises(TrainingError, match="pass --resume"):
        train(make_train_config(*common, out=out))
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    with pytest.raises(TrainingError, match=r"differs from the checkpoint's in \['optim.lr'\]"):
        train(make_train_config(*common, "resume=true", "optim.lr=0.01", out=out))
    if requeued:  # the same command, run again by SLURM in the requeued job: it resumes
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        with pytest.raises(TrainingError, match=r"differs from the checkpoint's in \['optim.lr'\]"):
            train(make_train_config(*common, "optim.lr=0.01", out=out))
        resumed = train(make_train_config(*common, out=out))
    else:
        resumed = train(make_train_config(*common, "resume=true", out=out))
    assert resumed["resumed_from"] == 4

    for name in ("model.safetensors", "state.safetensors"):
        a, b = _tensors(tmp_path / "full" / "checkpoints" / "last" / name), _tensors(out / "checkpoints" / "last" / name)
        assert a.keys() == b.keys() and len(a) > 10
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    state = _tensors(out / "checkpoints" / "last" / "state.safetensors")
    assert any(k.startswith("exp_avg_sq/brain_modules.clip_image.lin1") for k in state)
    assert any(k.startswith("exp_avg/unet.") and ".lora_A." in k for k in state)
    # the log holds each step once, with the uninterrupted run's values
    assert _log_rows(out / "log.csv") == _log_rows(tmp_path / "full" / "log.csv")
    assert resumed["best_val_loss"] == full["best_val_loss"]
    # a different seed gives different weights (the comparison above can fail)
    other = train(make_train_config(*common, "seed=1", out=tmp_path / "seed1"))
    w = _tensors(other["last_checkpoint"])
    a = _tensors(tmp_path / "full" / "checkpoints" / "last" / "model.safetensors")
    assert not all(torch.equal(w[k], a[k]) for k in a)


def test_checkpoints_are_complete_and_load_into_eval(make_train_config, tmp_path):
    from dynadiff.checkpoint import read_metadata

    out = tmp_path / "run"
    summary = train(make_train_config("steps=3", "val_every=1", "sample_every=3", "n_sample_images=3", out=out))
    last, best = out / "checkpoints" / "last" / "model.safetensors", out / "checkpoints" / "best" / "model.safetensors"
    assert summary["last_checkpoint"] == str(last) and summary["best_checkpoint"] == str(best)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "last"]  # no temporary leftovers
    meta = read_metadata(last)
    assert json.loads(meta["step"]) == 3 and json.loads(meta["train_config"])["steps"] == 3
    rows = list(csv.DictReader(open(out / "log.csv")))
    val = [float(r["loss"]) for r in rows if r["split"] == "val"]
    assert len(val) == 3 and json.loads(read_metadata(best)["val_loss"]) == pytest.approx(min(val), rel=1e-5)
    assert json.loads(read_metadata(best)["step"]) == 1 + val.index(min(val))
    from PIL import Image

    grid = np.asarray(Image.open(out / "samples" / "step_0000003.png"))
    assert grid.shape == (2 * 64, 3 * 64, 3)
    # the eval.py command the run prints reads the checkpoint (every trainable tensor, nothing missing)
    import shlex

    command = shlex.split(summary["eval_command"])
    assert command[:3] == ["python", "eval.py", "--subject"] and str(best) in command
    assert "brain_modules_config.n_tokens=4" in command and "versatilediffusion_config.image_size=32" in command
    script = load_script("eval")
    args = script.parse_args(command[2:] + ["--cache", str(tmp_path / "eval"), "--device", "cpu", "--limit", "3",
                                            "--metrics", "pixcorr", "--no-blur-faces",
                                            "versatilediffusion_config.num_inference_steps=2"])
    result = script.build_config(args).run()
    assert result["n_images"] == 3 and result["checkpoint"] == str(best)


def test_bf16_autocast_and_accumulation_run(make_train_config, tmp_path):
    """The mixed-precision path (bf16 autocast: CPUs support it too) trains and checkpoints float32 weights."""
    summary = train(make_train_config("steps=2", "mixed_precision=bf16", "grad_accumulation=2", "val_every=0",
                                      out=tmp_path / "bf16"))
    weights = _tensors(summary["last_checkpoint"])
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())
    assert np.isfinite(summary["last_train_loss"]) and summary["best_val_loss"] is not None


def test_interrupted_checkpoint_swap_keeps_a_complete_checkpoint(tmp_path):
    target = tmp_path / "last"
    write_dir_atomically(target, lambda d: (d / "a").write_text("1"))
    assert (target / "a").read_text() == "1"

    def crash(d):
        (d / "a").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_dir_atomically(target, crash)
    assert (target / "a").read_text() == "1"  # the complete one is still in place
    target.rename(tmp_path / "last.old")  # a crash between the two renames of a swap
    assert complete_checkpoint_dir(target) == tmp_path / "last.old"
    write_dir_atomically(target, lambda d: (d / "a").write_text("2"))
    assert (target / "a").read_text() == "2" and not (tmp_path / "last.old").exists()


# ----------------------------------------------------------------------------- learning

LEARN_SIZE = 16  # 16 px images, 4x4 latents, 2x2-thumbnail tokens: the cheapest UNet that learns to use them


@pytest.fixture(scope="module")
def pretrained_vd(tmp_path_factory):
    """A tiny VD whose UNet denoises, conditioned on 2x2-thumbnail tokens (the demo's pre-training,
    short; random VAE): brain information can only lower the loss through a UNet that uses its conditioning."""
    from dynadiff.demo import DemoSettings, pretrain_tiny_vd

    torch.set_num_threads(1)
    settings = DemoSettings(image_size=LEARN_SIZE, n_tokens=4, unet_channels=(16, 16, 32, 32), vae_channels=(8, 8, 8),
                            pretrain_images=300, vae_steps=0, unet_steps=300, unet_batch=16, unet_lr=3e-3)
    return pretrain_tiny_vd(tmp_path_factory.mktemp("pretrained_vd"), settings)


def conditional_gain(cfg: TrainConfig, checkpoint) -> tuple[float, float]:
    """(loss with the true fMRI, loss with another image's fMRI - loss with the true fMRI) on the
    validation images: epsilon MSE at timesteps 200 and 500, 3 noise draws, the same for both."""
    from dynadiff.checkpoint import load_checkpoint

    data = training.build_training_data(cfg)
    model = training.init_model(cfg, data)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    n = len(data.val)
    batch = training.collate([data.val[i] for i in range(n)])
    other = torch.roll(torch.arange(n), 1)  # averaged samples: one per image, so another image's window
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = model.vae.encode(2 * batch["img"] - 1).latent_dist.mode() * model.vae.config.scaling_factor
        noises = [torch.randn(latents.shape, generator=g) for _ in range(3)]
        losses = []
        for brain in (batch["brain"], batch["brain"][other]):
            tokens = model.encode_brain(brain, batch["subject_idx"])
            values = []
            for t in (200, 500):
                ts = torch.full((n,), t)
                for noise in noises:
                    pred = model.predict_noise(model.noise_scheduler.add_noise(latents, noise, ts), ts, tokens)
                    values.append(float(((pred - noise) ** 2).mean()))
            losses.append(float(np.mean(values)))
    return losses[0], losses[1] - losses[0]


@pytest.mark.slow
def test_learns_from_brain_image_pairs_and_not_from_shuffled_ones(make_train_config, pretrained_vd, tmp_path):
    """With true pairs the held-out loss drops and the true fMRI beats another image's; trained on
    shuffled pairs (same everything else) the fMRI carries nothing: no such gain."""
    settings = ("steps=80", "batch_size=16", "optim.lr=3e-3", "optim.warmup_steps=10", "val_every=0",
                "checkpoint_every=80", "log_every=10", "data.val_fraction=0.2", "val_max_samples=32",
                "brain_modules_config.dropout=0.1", "brain_modules_config.n_tokens=4",
                f"data.nsd_dataset_config.image_size={LEARN_SIZE}", f"versatilediffusion_config.image_size={LEARN_SIZE}",
                "versatilediffusion_config.timestep_sampling=uniform", "data.nsd_dataset_config.averaged=true")
    results = {}
    for shuffle in (False, True):
        cfg = make_train_config(*settings, f"data.shuffle_pairs={str(shuffle).lower()}", out=tmp_path / f"s{shuffle}",
                                vd=pretrained_vd)
        before = conditional_gain(cfg, None)
        summary = train(cfg)
        results[shuffle] = before, conditional_gain(cfg, summary["last_checkpoint"])
    (loss0, gain0), (loss1, gain1) = results[False]
    _, (_, gain_shuffled) = results[True]
    print(f"held-out loss {loss0:.4f} -> {loss1:.4f}; fMRI gain {gain0:.5f} -> {gain1:.5f}, "
          f"shuffled-pairs model {gain_shuffled:.5f}")
    assert abs(gain0) < 0.0015, gain0  # untrained: the fMRI makes no difference
    assert loss1 < loss0 - 0.003, (loss0, loss1)  # the held-out loss drops
    assert gain1 > 0.003, gain1  # ... and the true fMRI is what helps
    assert gain_shuffled < 0.3 * gain1, (gain_shuffled, gain1)
