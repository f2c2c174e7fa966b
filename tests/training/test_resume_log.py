"""``log.csv`` across a resume: rows logged after the checkpoint and before the crash are not kept twice, and
the first row after the resume averages the same steps as the uninterrupted run's."""

from __future__ import annotations

import csv

import pytest

from dynadiff.training import read_resume_state, train

TIMING = ("samples_per_s", "time_s")


def _rows(path):
    """The log's rows without their timing columns (they differ between any two runs)."""
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


@pytest.mark.parametrize("log_every", [1, 3])
def test_resume_after_a_crash_between_checkpoints_logs_like_the_uninterrupted_run(make_train_config, tmp_path,
                                                                                   monkeypatch, crash_at, log_every):
    """Checkpoint at step 4, validation at step 5, crash during step 7: the crashed run has logged rows after its
    checkpoint (val 5, train 5 and 6 or train 6), which the resumed run logs again from step 4. With
    ``log_every=3`` the row of step 6 averages steps 4-6, one of them before the checkpoint."""
    common = ("steps=8", "checkpoint_every=4", f"log_every={log_every}", "val_every=5", "val_max_samples=4",
              "brain_modules_config.dropout=0.5")
    full = train(make_train_config(*common, out=tmp_path / "full"))
    expected = _rows(tmp_path / "full" / "log.csv")
    train_steps = [s for s in range(1, 9) if s % log_every == 0 or s == 8]  # the last step is always logged
    layout = sorted([(s, "train") for s in train_steps] + [(5, "val"), (8, "val")])  # train before val
    assert [(int(r["step"]), r["split"]) for r in expected] == layout

    crash_at(7, training_only=True)  # in step 7 (one micro-batch a step)
    out = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(make_train_config(*common, out=out))
    monkeypatch.undo()
    assert read_resume_state(out / "checkpoints" / "last").step == 4
    crashed = _rows(out / "log.csv")
    # the crash came after rows the resumed run writes again (else this test proves nothing)
    before_crash = sum(int(r["step"]) <= 6 for r in expected)
    assert crashed == expected[:before_crash] and [r["step"] for r in crashed].count("6") == 1

    resumed = train(make_train_config(*common, "resume=true", out=out))
    assert resumed["resumed_from"] == 4
    got = _rows(out / "log.csv")
    assert [(int(r["step"]), r["split"]) for r in got] == layout  # each row once
    assert got == expected  # same losses, learning rates, gradient norms and epochs, written with the same digits
    assert resumed["best_val_loss"] == full["best_val_loss"]


def test_resuming_a_finished_run_keeps_its_summary(make_train_config, tmp_path):
    """``--resume`` on a finished run (or a requeued job whose first attempt finished meanwhile) trains nothing
    and returns the finished run's summary, its losses included; summary.json is not rewritten with nulls."""
    import json

    out = tmp_path / "run"
    full = train(make_train_config("steps=3", "checkpoint_every=3", "val_max_samples=4", out=out))
    written = (out / "summary.json").read_text()
    assert full["last_train_loss"] is not None and full["last_val_loss"] is not None
    again = train(make_train_config("steps=3", "checkpoint_every=3", "val_max_samples=4", "resume=true", out=out))
    assert again == json.loads(written) and again["last_train_loss"] == full["last_train_loss"]
    assert (out / "summary.json").read_text() == written
