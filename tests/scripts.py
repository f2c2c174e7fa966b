"""The entry-point scripts (eval.py, train.py, prepare_data.py, demo.py) imported as modules, or run in the
background, for the tests.

``tests/`` is on ``sys.path`` (pytest puts the folder of the root conftest.py there): ``from scripts import
load_script`` works from every test folder.
"""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import types
import typing as tp
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str) -> types.ModuleType:
    """The command behind ``{REPO}/{name}.py``: the module ``dynadiff.commands.{name}`` (the root script only calls
    its ``main``)."""
    return importlib.import_module(f"dynadiff.commands.{name}")


def default_sigint() -> None:
    """``preexec_fn`` of a child that a test sends Ctrl-C (SIGINT): its default action, as a terminal's foreground
    command has. pytest started in the background by a non-interactive shell (``pytest &``) runs with SIGINT
    ignored, and its children inherit that: they would never see the Ctrl-C."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def started(cmd: list[str], env: dict) -> tp.Iterator[subprocess.Popen]:
    """``cmd`` running in the background (stdout and stderr piped, as text; SIGINT at its default action); killed
    when the block is left while it still runs (a failed assertion must not leave it behind)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def eval_command(setup: dict, cache: Path, *extra: str, checkpoint: Path | None = None) -> list[str]:
    """The ``eval.py`` command line on the ``eval_setup`` fixture's data, tiny VD and checkpoint (``setup["ckpt"]``
    unless ``checkpoint``)."""
    return [sys.executable, str(REPO / "eval.py"), *setup["base"], "--cache", str(cache),
            "--checkpoint", str(checkpoint or setup["ckpt"]), *extra]


def run_eval(setup: dict, cache: Path, *extra: str, checkpoint: Path | None = None, wait: bool = True):
    """:func:`eval_command` in a subprocess: the finished ``CompletedProcess``, or with ``wait=False`` the running
    ``Popen``."""
    cmd = eval_command(setup, cache, *extra, checkpoint=checkpoint)
    if not wait:
        return subprocess.Popen(cmd, env=setup["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=setup["env"], capture_output=True, text=True, timeout=600)


def eval_here(setup: dict, cache: Path, *extra: str, caplog, monkeypatch, checkpoint: Path | None = None
              ) -> tuple[int, str]:
    """:func:`eval_command`'s run in this process, with the fixture's environment: (exit status, its log). No
    interpreter start and imports (about 8 s a run), for tests of what eval.py says, not of how it starts."""
    import logging
    import os

    for key, value in setup["env"].items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    caplog.set_level(logging.INFO)  # "generating N image(s)" is an INFO line
    caplog.clear()
    code = load_script("eval").main([*setup["base"], "--cache", str(cache), "--checkpoint",
                                     str(checkpoint or setup["ckpt"]), *extra])
    return code, caplog.text


def generated(stderr: str) -> int:
    """Images an eval.py run generated, from its log (0 when it generated none)."""
    return sum(int(line.split("generating ")[1].split()[0]) for line in stderr.splitlines() if "generating " in line)


# 32 px images (8x8 latents), 16 hidden units, 4 tokens: about 0.1 s a step
TINY_TRAINING = ["data.nsd_dataset_config.sessions=[1,21]", "data.nsd_dataset_config.image_size=32",
                 "versatilediffusion_config.image_size=32", "data.num_workers=0", "progress=false",
                 "brain_modules_config.hidden=16", "brain_modules_config.n_tokens=4",
                 "versatilediffusion_config.num_inference_steps=2", "optim.warmup_steps=2", "log_every=1",
                 "val_every=0", "sample_every=0", "checkpoint_every=2", "data.val_fraction=0.1"]


def tiny_training(nsd: Path, root: Path, infra_yaml: str, steps: int, *overrides: str) -> dict:
    """A tiny VD in ``root``, the infra YAML, and the train.py arguments of a tiny run on the mini-NSD ``nsd``
    (``TINY_TRAINING`` then ``overrides``): ``{"root", "infra", "args"}``."""
    from dynadiff.models.tiny import write_tiny_vd

    vd = write_tiny_vd(root / "vd", unet_block_out_channels=(8, 8, 16, 16), vae_block_out_channels=(8, 8, 8))
    infra = root / "infra.yaml"
    infra.write_text(infra_yaml)
    args = ["--subject", "1", "--vd_cache_dir", str(vd), "--device", "cpu", "--steps", str(steps),
            f"data.nsd_dataset_config.nsddata_path={nsd}", *TINY_TRAINING, *overrides]
    return {"root": root, "infra": infra, "args": args}


def finished_training_jobs(cluster, before: set[str], timeout: float = 30) -> list[dict]:
    """The training jobs of the local SLURM ``cluster`` submitted since ``before`` (job ids), once ended (a job
    writes its results a moment before it ends)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        jobs = [j for j in cluster.jobs() if j["id"] not in before and j["name"].startswith("TrainConfig")]
        if all(j["state"] not in ("PENDING", "RUNNING", "COMPLETING") for j in jobs) or time.monotonic() > deadline:
            return jobs
        time.sleep(0.1)
