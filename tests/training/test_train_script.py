"""``train.py`` as the user runs it: each bad input is one clear line (no traceback) with the exit status of
its kind, and Ctrl-C says what was kept and the exact command that continues the run.

The bad inputs run ``main()`` in this process (each is refused before any data is loaded); the exca
traceback and Ctrl-C run ``train.py`` in a subprocess and read its stderr.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scripts import load_script

from dynadiff.training import read_resume_state

REPO = Path(__file__).resolve().parents[2]
TINY = [  # 32 px images (8x8 latents), 16 hidden units, 4 tokens: a fraction of a second a step
    "data.nsd_dataset_config.sessions=[1,21]", "data.nsd_dataset_config.image_size=32",
    "versatilediffusion_config.image_size=32", "data.num_workers=0", "progress=false", "cpu_threads=1",
    "brain_modules_config.hidden=16", "brain_modules_config.n_tokens=4", "brain_modules_config.dropout=0.5",
    "versatilediffusion_config.num_inference_steps=2", "batch_size=4", "optim.warmup_steps=2", "optim.lr=1e-3",
    "log_every=1", "val_every=0", "sample_every=0", "checkpoint_every=2", "data.val_fraction=0.1",
]


@pytest.fixture(scope="module")
def cli(synthetic_nsd, train_vd, tmp_path_factory):
    """f(out, *extra) -> train.py's arguments for a tiny run in ``out`` (the windows cached in one folder)."""
    nsd, _ = synthetic_nsd
    cache = tmp_path_factory.mktemp("train_script_cache")

    def args(out: Path, *extra: str) -> list[str]:
        who = [] if "--subjects" in extra else ["--subject", "1"]
        return [*who, "--output", str(out), "--cache", str(cache), "--vd_cache_dir", str(train_vd),
                "--device", "cpu", "--steps", "2", f"data.nsd_dataset_config.nsddata_path={nsd}", *TINY, *extra]

    return args


@pytest.fixture
def script():
    """train.py as a module; the exca logger's level (which main() sets) restored after the test."""
    exca_logger = logging.getLogger("exca")
    level = exca_logger.level
    yield load_script("train")
    exca_logger.setLevel(level)


@pytest.fixture(scope="module")
def finished_run(cli, tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoint at step 2), made by ``train.py``'s main(): copy it to modify it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    exca_logger = logging.getLogger("exca")
    level = exca_logger.level
    assert load_script("train").main(cli(out)) == 0
    exca_logger.setLevel(level)
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


# case -> (how to set up the folder `tmp` and the extra arguments, exit status, the error's regex)
def _resume_nothing(tmp, run):
    return tmp / "new", ["--resume"]


def _resume_before_first_checkpoint(tmp, run):
    out = _copy(run, tmp / "run")
    shutil.rmtree(out / "checkpoints")  # interrupted before its first checkpoint: config.yaml, log.csv only
    return out, ["--resume"]


def _cache_is_a_file(tmp, run):
    (tmp / "cache.txt").write_text("not a folder")
    return tmp / "new", ["--cache", str(tmp / "cache.txt")]


def _output_is_a_file(tmp, run):
    (tmp / "out.txt").write_text("not a folder")
    return tmp / "out.txt", []


def _config_not_yaml(tmp, run):
    (tmp / "bad.yaml").write_text("steps: [1\n")
    return tmp / "new", ["--config", str(tmp / "bad.yaml")]


def _state_truncated(tmp, run):
    out = _copy(run, tmp / "run")
    state = out / "checkpoints" / "last" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    return out, ["--resume"]


def _state_of_another_kind(tmp, run):
    out = _copy(run, tmp / "run")
    last = out / "checkpoints" / "last"
    shutil.copy(last / "model.safetensors", last / "state.safetensors")  # weights only, no training state
    return out, ["--resume"]


def _state_missing(tmp, run):
    out = _copy(run, tmp / "run")
    (out / "checkpoints" / "last" / "state.safetensors").unlink()
    return out, ["--resume"]


def _subject_not_in_data(tmp, run):
    return tmp / "new", ["--subjects", "1", "2"]


def _data_folder_missing(tmp, run):
    return tmp / "new", [f"data.nsd_dataset_config.nsddata_path={tmp / 'nowhere'}"]


def _vd_folder_missing(tmp, run):
    return tmp / "new", ["--vd_cache_dir", str(tmp / "no_vd")]


def _run_exists(tmp, run):
    return _copy(run, tmp / "run"), []


def _steps_below_checkpoint(tmp, run):
    return _copy(run, tmp / "run"), ["--resume", "--steps", "1"]


CASES = {
    "resume-nothing": (_resume_nothing, 1, r"^--resume: nothing to resume, \S+/new does not exist; without --resume, "
                                           r"a new run starts there$"),
    "resume-before-first-checkpoint": (
        _resume_before_first_checkpoint, 1,
        r"^--resume: nothing to resume, \S+/run holds no checkpoint "
        r"\(\S+/checkpoints/last is missing\); without --resume, a new run starts there$"),
    "cache-is-a-file": (_cache_is_a_file, 1,
                        r"^the cache folder \S+/cache.txt \(--cache, .*\) is a file, not a folder"),
    "output-is-a-file": (_output_is_a_file, 1, r"^--output \S+/out.txt is a file, not a folder"),
    "config-not-yaml": (_config_not_yaml, 2, r"^config file \S+/bad.yaml is not valid YAML: line 2, column 1: "),
    "device-tpu": (lambda tmp, run: (tmp / "new", ["--device", "tpu"]), 2, r"unknown device 'tpu': use auto, cpu"),
    "device-cuda-absent": (lambda tmp, run: (tmp / "new", ["--device", "cuda"]), 2,
                           r"^device 'cuda' asked for, but CUDA is not available here: use --device cpu"),
    "state-truncated": (_state_truncated, 1, r"^cannot resume from \S+/last: its state.safetensors is not a readable "
                                             r".safetensors file \(truncated\?\); .*start a new one"),
    "state-of-another-kind": (_state_of_another_kind, 1,
                              r"^cannot resume from \S+/last: its state.safetensors is not a dynadiff training state"),
    "state-missing": (_state_missing, 1, r"^cannot resume from \S+/last: state.safetensors missing; "),
    "subject-not-in-data": (_subject_not_in_data, 1, r"^subject 2 is not in the NSD data at \S+ \(no \S+/subj02\): "
                                                     r"get it with `python prepare_data.py .*--subjects 1 2`"),
    "data-folder-missing": (_data_folder_missing, 1, r"^the NSD data folder \S+/nowhere does not exist"),
    "vd-folder-missing": (_vd_folder_missing, 1, r"^Versatile Diffusion folder \S+/no_vd does not exist: download it"),
    "run-exists-without-resume": (_run_exists, 1, r"^\S+/run already holds a training run \(checkpoint \S+\): pass "
                                                  r"--resume"),
    "steps-below-checkpoint": (_steps_below_checkpoint, 1,
                               r"^cannot resume \S+/last: the checkpoint is at step 2, beyond steps=1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_before_anything_loads(case, cli, finished_run, script, tmp_path, caplog):
    setup, status, pattern = CASES[case]
    if case == "device-cuda-absent" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out, extra = setup(tmp_path, finished_run)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    caplog.set_level(logging.INFO)
    assert script.main(cli(out, *extra)) == status
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.name for r in errors] == ["dynadiff.train"], [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    # one line, and short apart from the paths it names (pytest's tmp_path grows with its run number)
    assert "\n" not in message and len(re.sub(r"/[^\s`']+", "<path>", message)) < 400, message
    assert re.search(pattern, message), message
    # nothing loaded, nothing written
    assert not [r for r in caplog.records if r.name.startswith("dynadiff.data") or "training data" in r.getMessage()]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "new").exists()


def test_resume_on_a_cluster_is_checked_before_submitting(cli, script, tmp_path, caplog):
    """With --infra-yaml the training runs in a job: --resume with nothing to resume is refused here, before
    any job; the device is not checked here (the job's node may have GPUs that this machine lacks)."""
    infra = tmp_path / "infra.yaml"
    infra.write_text(f"train:\n  cluster: local\n  folder: {tmp_path / 'jobs'}\n")
    assert script.main(cli(tmp_path / "new", "--resume", "--infra-yaml", str(infra))) == 1
    assert "nothing to resume" in caplog.text and not (tmp_path / "jobs").exists()
    cfg = script.build_config(script.parse_args(cli(tmp_path / "new", "--device", "cuda", "--infra-yaml", str(infra))))
    script.check_before_run(cfg)  # no error, even without CUDA here
    assert cfg.device == "cuda" and cfg.infra.cluster == "local"


# ----------------------------------------------------------------------------- subprocess runs


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def _command(cli, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), *cli(out, *extra)]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return {f"{name}/{k}": v for name in ("model", "state")
            for k, v in load_file(str(run / "checkpoints" / "last" / f"{name}.safetensors")).items()}


def _log(run: Path) -> list[list[str]]:
    """log.csv without its timing columns."""
    lines = (run / "log.csv").read_text().splitlines()
    return [line.split(",")[:5] for line in lines]


def _interrupted(command: list[str], ready: Path) -> tuple[int, str]:
    """Run ``command``; once ``ready`` exists, SIGINT it (Ctrl-C); (exit status, stderr). The child starts with
    SIGINT's default action: Python raises KeyboardInterrupt only then (a shell's background jobs ignore SIGINT)."""
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never got there"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err
    finally:
        if proc.poll() is None:  # a failed assertion must not leave it behind
            proc.kill()
            proc.communicate()


def test_an_error_raised_in_the_training_task_is_one_line_on_stderr(cli, finished_run, tmp_path):
    """The error comes from inside the exca task (the run already exists): exca logs its traceback as a
    warning, twice (its own handler and ours) unless its logger's level is set after exca is imported."""
    out = _copy(finished_run, tmp_path / "run")
    proc = subprocess.run(_command(cli, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "ERROR dynadiff.train: " in lines[0] and "already holds a training run" in lines[0]
    assert "Traceback" not in proc.stderr and "Computation failed" not in proc.stderr


def test_ctrl_c_keeps_the_last_checkpoint_and_says_how_to_resume(cli, script, tmp_path):
    """SIGINT once the first checkpoint is written: exit 130, no traceback, what was kept and the command
    that continues; that command ends with the weights and log of an uninterrupted run."""
    steps = ["--steps", "20"]
    assert script.main(cli(tmp_path / "uninterrupted", *steps)) == 0
    out = tmp_path / "run"
    command = _command(cli, out, *steps)
    status, err = _interrupted(command, out / "checkpoints" / "last" / "state.safetensors")
    assert status == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    step = read_resume_state(out / "checkpoints" / "last").step
    assert 2 <= step < 20
    assert (f"interrupted: kept the checkpoint of step {step} ({out}/checkpoints/last/model.safetensors) and "
            f"log.csv up to step {step}; the steps after it are lost. Continue the run with:") in err
    resume = shlex.split(err.strip().splitlines()[-1])
    assert resume == command + ["--resume"]

    proc = subprocess.run(resume, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert summary["resumed_from"] == step and summary["steps"] == 20
    wa, wb = _weights(tmp_path / "uninterrupted"), _weights(out)
    assert wa.keys() == wb.keys() and len(wa) > 10
    assert not [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert _log(out) == _log(tmp_path / "uninterrupted") and len(_log(out)) > 20


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_kept(cli, tmp_path):
    out = tmp_path / "run"
    command = _command(cli, out, "--steps", "400", "checkpoint_every=400")
    status, err = _interrupted(command, out / "config.yaml")  # written once the model is built
    assert status == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert not (out / "checkpoints" / "last").exists()
    assert (f"interrupted before the first checkpoint: nothing was kept in {out}. Start again with the same "
            "command, without --resume:") in err
    assert shlex.split(err.strip().splitlines()[-1]) == command
