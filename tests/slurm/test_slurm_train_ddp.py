"""Data-parallel ``train.py --infra-yaml`` (``tasks_per_node: 2``) on the local SLURM cluster, gloo on the CPU.

The 2-task job gives the weights of one process with twice the batch (to float tolerance); a job whose rank 1
is killed after a checkpoint fails with a report naming that rank and its log, and ``--resume`` (a 2-task job
again) ends with the uninterrupted job's weights, bit for bit; so does a job that SLURM requeues after a node
failure (its two tasks continue from the checkpoint by themselves).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scripts import finished_training_jobs, started, tiny_training

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
INFRA_YAML = """\
train:
  cluster: slurm
  cpus_per_task: 1
  tasks_per_node: 2
  timeout_min: 10
"""


@pytest.fixture(scope="module")
def setup(slurm_available, synthetic_nsd, tmp_path_factory):
    # eps=1: AdamW's update about lr * m, so that runs equal up to rounding stay close
    return tiny_training(synthetic_nsd[0], tmp_path_factory.mktemp("slurm_ddp"), INFRA_YAML, STEPS, "cpu_threads=1", "optim.lr=0.1", "optim.eps=1.0")


def _cmd(setup, name: str, batch: int, *extra: str, infra: bool = True) -> list[str]:
    root = setup["root"]
    cmd = [sys.executable, str(REPO / "train.py"), *setup["args"], "--batch-size", str(batch),
           "--output", str(root / name), "--cache", str(root / f"cache_{name}"), *extra]
    return cmd + (["--infra-yaml", str(setup["infra"])] if infra else [])


def _env(cluster=None) -> dict:
    return dict(os.environ if cluster is None else cluster.env(), OMP_NUM_THREADS="1")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return {f"{name}/{k}": v for name in ("model", "state")
            for k, v in load_file(str(run / "checkpoints" / "last" / f"{name}.safetensors")).items()}


@pytest.fixture(scope="module")
def job_run(setup, slurm_cluster):
    """The 2-task job; the one-process reference (batch 4, ``local``) runs meanwhile."""
    with started(_cmd(setup, "local", 4, infra=False), _env()) as local:
        proc = subprocess.run(_cmd(setup, "job", 2), env=_env(slurm_cluster), capture_output=True, text=True,
                              timeout=300)
        _, local_err = local.communicate(timeout=300)
    assert local.returncode == 0, local_err[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert summary["steps"] == STEPS and summary["world_size"] == 2
    return setup["root"] / "job"


def test_two_task_job_equals_one_process_with_twice_the_batch(setup, job_run):
    wa, wb = _weights(setup["root"] / "local"), _weights(job_run)
    assert wa.keys() == wb.keys() and len(wa) > 50
    for k in wa:
        assert float((wa[k] - wb[k]).norm()) <= 1e-3 * float(wa[k].norm()) + 1e-7, k
    logs = next((setup["root"] / "cache_job").glob("dynadiff.config.TrainConfig.run,1/logs/*/*[0-9]"))
    assert sorted(p.name.split("_", 1)[1] for p in logs.glob("*_log.err")) == ["0_log.err", "1_log.err"]
    assert "process group: rank 1 of 2" in (job_run / "logs" / "rank1.log").read_text()  # each rank's own log


def test_killed_task_is_reported_by_rank_and_resume_continues_exactly(setup, job_run, slurm_cluster):
    run = setup["root"] / "killed"
    with started(_cmd(setup, "killed", 2), _env(slurm_cluster)) as proc:
        _wait_for_checkpoint(proc, run)
        os.kill(_task_pid(setup["root"] / "cache_killed", rank=1), signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err[-3000:]
    assert "rank 1 stopped first" in err and "Traceback" not in err, err[-3000:]
    line = next(i for i, text in enumerate(err.splitlines()) if "rank 1 (task 1): died without a result" in text)
    log = Path(err.splitlines()[line + 1].split("logs:")[1].strip())
    assert log.name.endswith("_1_log.err") and log.exists()
    assert "(a collective failed: another rank had stopped)" in err  # rank 0's error, listed after
    assert "add --resume" in err
    from dynadiff.training import read_resume_state

    assert 0 < read_resume_state(run / "checkpoints" / "last").step < STEPS

    resumed = subprocess.run(_cmd(setup, "killed", 2, "--resume"), env=_env(slurm_cluster), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    wa, wb = _weights(run), _weights(job_run)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different[:3]


def _task_pid(cache: Path, rank: int) -> int:
    """The process of task ``rank`` of the job whose submitit folder is under ``cache``."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = dict(item.split("=", 1) for item in (entry / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in item)
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if env.get("SLURM_PROCID") == str(rank) and "submitit" in cmdline and str(cache) in cmdline:
                return int(entry.name)
        time.sleep(0.1)
    raise AssertionError(f"no process of task {rank} found")


def test_two_task_job_requeued_after_a_node_failure_continues_from_its_checkpoint(setup, job_run, slurm_cluster):
    """The node fails after a checkpoint and its processes die at once (``abrupt``: SLURM's own SIGTERM, which
    submitit ignores, would leave the tasks seconds to finish the 6 steps): SLURM requeues the job, whose two
    tasks continue from the checkpoint (SLURM_RESTART_COUNT), and train.py, which waited, ends with the
    uninterrupted job's weights, bit for bit."""
    from dynadiff.training import complete_checkpoint_dir, read_resume_state

    run, cache = setup["root"] / "requeued", setup["root"] / "cache_requeued"
    before = {j["id"] for j in slurm_cluster.jobs()}
    with started(_cmd(setup, "requeued", 2), _env(slurm_cluster)) as proc:
        _wait_for_checkpoint(proc, run)
        try:
            requeued = slurm_cluster.fail_node(abrupt=True)
        finally:
            slurm_cluster.restore_node()
        stopped_at = read_resume_state(complete_checkpoint_dir(run / "checkpoints" / "last")).step  # killed there
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert 0 < stopped_at < STEPS
    summary = json.loads(out[: out.rindex("}") + 1])
    assert summary["steps"] == STEPS and summary["world_size"] == 2 and summary["resumed_from"] == stopped_at
    jobs = finished_training_jobs(slurm_cluster, before)
    assert [j["state"] for j in jobs] == ["COMPLETED"] and requeued == [jobs[0]["id"]]  # one job, run twice
    logs = next(cache.glob(f"dynadiff.config.TrainConfig.run,1/logs/*/{jobs[0]['id']}"))
    assert "DUE TO NODE FAILURE" in (logs / f"{jobs[0]['id']}_0_log.err").read_text()
    for rank in (0, 1):
        task = logs / f"{jobs[0]['id']}_{rank}_log"
        assert task.with_suffix(".out").read_text().count("Starting with JobEnvironment") == 2, rank
        for text in (task.with_suffix(".err").read_text(), (run / "logs" / f"rank{rank}.log").read_text()):
            assert "SLURM requeued this job (restart 1)" in text, (rank, text[-2000:])
    wa, wb = _weights(run), _weights(job_run)
    assert wa.keys() == wb.keys() and len(wa) > 50
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, different[:3]


def _wait_for_checkpoint(proc, run: Path) -> None:
    """Until the job of ``proc`` has written its first checkpoint in ``run`` (it must not end first)."""
    checkpoint = run / "checkpoints" / "last" / "state.safetensors"
    deadline = time.monotonic() + 240
    while not checkpoint.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.02)
