"""``--resume`` with another ``--steps``: a finished run trained longer, an unfinished one to another length.

From the checkpoint's step S on, the learning rate is that of the new N-step schedule (warm-up unchanged,
cosine decay over N steps); the steps before S stay those of the run's own schedule. The expected learning
rates are computed here from the formula, independently of ``dynadiff.training.lr_factor``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dynadiff import training
from dynadiff.checkpoint import read_metadata
from dynadiff.training import TrainingError, loop, read_resume_state, train

LR, WARMUP, FLOOR = 1e-3, 2, 0.1
COMMON = ("checkpoint_every=2", "val_every=3", "log_every=1", f"optim.lr={LR}", f"optim.warmup_steps={WARMUP}",
          f"optim.min_lr_ratio={FLOOR}", "brain_modules_config.dropout=0.5")


def expected_lr(k: int, total: int) -> float:
    """The learning rate of optimizer step ``k`` (0-based) of a ``total``-step run: linear warm-up over
    WARMUP steps from LR / WARMUP, then cosine from LR down to FLOOR * LR at step ``total``."""
    if k < WARMUP:
        return LR * (k + 1) / WARMUP
    t = min(1.0, (k - WARMUP) / (total - WARMUP))
    return LR * (FLOOR + (1 - FLOOR) * (1 + math.cos(math.pi * t)) / 2)


def _rows(run, split=None):
    with open(run / "log.csv", newline="") as f:
        return [(int(r["step"]), r["split"], r["loss"], r["lr"], r["grad_norm"]) for r in csv.DictReader(f)
                if split is None or r["split"] == split]


def _train_lrs(run) -> dict[int, float]:
    """Row ``step = k + 1`` of log.csv holds the learning rate of step ``k``."""
    return {step - 1: float(lr) for step, _, _, lr, _ in _rows(run, "train")}


def _weights(run):
    return {f"{name}/{k}": v for name in ("model", "state")
            for k, v in load_file(str(run / "checkpoints" / "last" / f"{name}.safetensors")).items()}


def _steps_saved(run) -> set[int]:
    """``steps`` as config.yaml and both files of checkpoints/last record it."""
    last = run / "checkpoints" / "last"
    return {yaml.safe_load((run / "config.yaml").read_text())["steps"],
            json.loads(read_metadata(last / "model.safetensors")["train_config"])["steps"],
            read_resume_state(last).config["steps"]}


def _state_lr(run) -> float:
    """The learning rate the optimizer holds in checkpoints/last: that of the checkpoint's step."""
    groups = json.loads(read_metadata(run / "checkpoints" / "last" / "state.safetensors")["param_groups"])
    assert len({g["lr"] for g in groups}) == 1
    return groups[0]["lr"]


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_extend_a_finished_run(make_train_config, tmp_path, monkeypatch, caplog):
    """A finished 6-step run extended to 10: steps 0-5 are the 6-step run's (its log rows, its weights at 6),
    steps 6-9 follow the 10-step schedule; the same extension done in two pieces (interrupted at step 8, then
    resumed) ends with the same weights; an unfinished run resumed with other steps follows the same rule."""
    short = tmp_path / "short"
    train(make_train_config(*COMMON, "steps=6", out=short))
    assert _train_lrs(short) == pytest.approx({k: expected_lr(k, 6) for k in range(6)}, rel=1e-5)
    for name in ("extended", "in_two", "unfinished"):
        shutil.copytree(short, tmp_path / name)

    # beyond the checkpoint: refused before anything is loaded
    with pytest.raises(TrainingError, match=r"checkpoint is at step 6, beyond steps=4"):
        train(make_train_config(*COMMON, "steps=4", "resume=true", out=tmp_path / "extended"))

    caplog.set_level(logging.WARNING, logger="dynadiff.training")
    ext = tmp_path / "extended"
    summary = train(make_train_config(*COMMON, "steps=10", "resume=true", out=ext))
    assert summary["steps"] == 10 and summary["resumed_from"] == 6
    said = _warnings(caplog)
    # 6-step schedule at step 6: the floor, 1e-4; 10-step schedule: FLOOR + 0.9 * (1 + cos(pi / 2)) / 2 = 0.55
    assert expected_lr(6, 6) == pytest.approx(1e-4) and expected_lr(6, 10) == pytest.approx(5.5e-4)
    assert "extended from step 6 to 10 steps" in said and "goes from 0.0001, the 6-step schedule's, to 0.00055" in said
    assert "differs from that of a run of 10 steps from the start" in said

    lrs = _train_lrs(ext)
    assert lrs == pytest.approx({k: expected_lr(k, 6 if k < 6 else 10) for k in range(10)}, rel=1e-5)
    assert lrs[6] != pytest.approx(expected_lr(6, 6)) and lrs[3] != pytest.approx(expected_lr(3, 10))
    assert _rows(ext)[:len(_rows(short))] == _rows(short)  # log.csv continues the 6-step run's
    assert [(s, split) for s, split, *_ in _rows(ext)][len(_rows(short)):] == [
        (7, "train"), (8, "train"), (9, "train"), (9, "val"), (10, "train"), (10, "val")]
    assert _steps_saved(ext) == {10}

    # the same extension in two pieces: interrupted during step 8 (after the checkpoint of step 8), resumed
    real = loop.training_step_loss
    calls = {"n": 0}

    def crash_in_step_8(*args, **kwargs):
        calls["n"] += 1  # one micro-batch per step; steps 6 and 7 first
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    two = tmp_path / "in_two"
    monkeypatch.setattr(loop, "training_step_loss", crash_in_step_8)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_train_config(*COMMON, "steps=10", "resume=true", out=two))
    monkeypatch.setattr(loop, "training_step_loss", real)
    assert read_resume_state(two / "checkpoints" / "last").step == 8 and _steps_saved(two) == {10}
    assert _state_lr(two) == pytest.approx(expected_lr(8, 10), rel=1e-12)  # what AdamW uses at step 8
    unfinished = tmp_path / "unfinished"
    shutil.rmtree(unfinished)
    shutil.copytree(two, unfinished)  # an unfinished 10-step run, checkpoint at step 8

    caplog.clear()
    train(make_train_config(*COMMON, "steps=10", "resume=true", out=two))
    assert "steps=" not in _warnings(caplog)  # the same steps as its checkpoint: a plain resume
    wa, wb = _weights(ext), _weights(two)
    assert wa.keys() == wb.keys() and len(wa) > 10
    assert not [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert _rows(two) == _rows(ext)
    # ... and the extension changed the weights (the comparison above can fail)
    short_w = _weights(short)
    assert not all(torch.equal(short_w[k], wa[k]) for k in short_w if k.startswith("model/"))

    # an unfinished run, resumed with other steps: the same operation (here a shorter schedule, 9 steps)
    with pytest.raises(TrainingError, match=r"at step 8 already, nothing is left to train"):
        train(make_train_config(*COMMON, "steps=8", "resume=true", out=unfinished))
    caplog.clear()
    train(make_train_config(*COMMON, "steps=9", "resume=true", out=unfinished))
    assert "shortened from step 8 to 9 steps" in _warnings(caplog)
    assert _train_lrs(unfinished) == pytest.approx(
        {k: expected_lr(k, 6 if k < 6 else 10 if k < 8 else 9) for k in range(9)}, rel=1e-5)
    assert _steps_saved(unfinished) == {9}


def test_resume_needs_a_checkpoint_unless_slurm_requeued(make_train_config, tmp_path, monkeypatch):
    """``--resume`` on a folder without a checkpoint is an error; a job SLURM requeued before its first
    checkpoint (``SLURM_RESTART_COUNT`` > 0: resume is implicit, not the user's) starts from step 0."""
    out = tmp_path / "run"
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    with pytest.raises(TrainingError, match=rf"nothing to resume, {out} does not exist; without --resume, a new"):
        train(make_train_config("resume=true", out=out))
    out.mkdir()
    (out / "config.yaml").write_text("steps: 4\n")  # a run interrupted before its first checkpoint
    with pytest.raises(TrainingError, match=r"holds no checkpoint \(.*checkpoints/last is missing\)"):
        train(make_train_config("resume=true", out=out))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    for resume in ("true", "false"):  # the user's command, with or without --resume, run again by SLURM
        assert training.check_output(make_train_config(f"resume={resume}", out=out), out) is None
    summary = train(make_train_config("steps=2", "val_every=0", out=out))
    assert summary["resumed_from"] is None and read_resume_state(out / "checkpoints" / "last").step == 2
