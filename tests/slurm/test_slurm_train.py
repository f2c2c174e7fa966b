"""``train.py --infra-yaml`` (section ``train``) through the local SLURM cluster, with a tiny decoder.

The training runs as one SLURM job and gives, bit for bit, the weights of the same
training run in the ``train.py`` process. A second cluster run loses its job to
``scancel`` after a checkpoint: ``train.py`` reports the cancelled job and its logs
and says to add ``--resume``; resumed (again as a job) it ends with the weights of the
uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scripts import finished_training_jobs, started, tiny_training

REPO = Path(__file__).resolve().parents[2]
STEPS = 120  # a few seconds: the cancelled job (killed 1 s after scancel) cannot finish first
INFRA_YAML = """\
train:
  cluster: slurm
  cpus_per_task: 1
  timeout_min: 10
"""


@pytest.fixture(scope="module")
def setup(slurm_available, synthetic_nsd, tmp_path_factory):
    return tiny_training(synthetic_nsd[0], tmp_path_factory.mktemp("slurm_train"), INFRA_YAML, STEPS, "batch_size=4", "optim.lr=1e-3", "val_max_samples=8")


def _train_cmd(setup, name: str, *extra: str, infra: bool = True) -> list[str]:
    root = setup["root"]
    cmd = [sys.executable, str(REPO / "train.py"), *setup["args"], "--output", str(root / name),
           "--cache", str(root / f"cache_{name}"), *extra]
    return cmd + (["--infra-yaml", str(setup["infra"])] if infra else [])


def _env(cluster=None) -> dict:
    return dict(os.environ if cluster is None else cluster.env(), OMP_NUM_THREADS="1")


def _summary(stdout: str) -> dict:
    return json.loads(stdout[: stdout.rindex("}") + 1])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return {f"{name}/{k}": v for name in ("model", "state")
            for k, v in load_file(str(run / "checkpoints" / "last" / f"{name}.safetensors")).items()}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 10
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _job_past_a_checkpoint(proc, run: Path, cluster, before: set[str]) -> dict:
    """The training job of ``proc`` (submitted since ``before``), once it has saved a checkpoint in ``run``."""
    checkpoint = run / "checkpoints" / "last" / "state.safetensors"
    deadline = time.monotonic() + 240
    while not checkpoint.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)
    (job,) = finished_training_jobs(cluster, before, timeout=0)
    return job


@pytest.fixture(scope="module")
def local_run(setup):
    """The same training in a train.py process here, the reference weights: ``local_run()`` waits for it and
    gives its output folder. It runs in the background meanwhile (one thread, as each job: the first cluster
    run uses the other core)."""
    with started(_train_cmd(setup, "local", infra=False), _env()) as proc:
        finished = []

        def wait() -> Path:
            if not finished:
                out, err = proc.communicate(timeout=420)
                assert proc.returncode == 0, err[-3000:]
                assert _summary(out)["steps"] == STEPS
                finished.append(setup["root"] / "local")
            return finished[0]

        yield wait


def test_training_runs_as_one_slurm_job_with_the_local_run_weights(setup, local_run, slurm_cluster):
    before = {j["id"] for j in slurm_cluster.jobs()}
    proc = subprocess.run(_train_cmd(setup, "cluster"), env=_env(slurm_cluster), capture_output=True, text=True,
                          timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(proc.stdout)
    assert summary["steps"] == STEPS and summary["resumed_from"] is None
    jobs = finished_training_jobs(slurm_cluster, before)
    assert len(jobs) == 1 and jobs[0]["state"] == "COMPLETED", jobs
    # exca logged that job in the --cache folder, where the training's own outputs are not
    logs = list((setup["root"] / "cache_cluster").glob(f"dynadiff.config.TrainConfig.run,1/logs/*/{jobs[0]['id']}"))
    assert len(logs) == 1, logs
    _assert_same_weights(setup["root"] / "cluster", local_run())


def test_cancelled_training_job_is_reported_and_resumes_exactly(setup, local_run, slurm_cluster):
    run = setup["root"] / "cancelled"
    before = {j["id"] for j in slurm_cluster.jobs()}
    with started(_train_cmd(setup, "cancelled"), _env(slurm_cluster)) as proc:
        job = _job_past_a_checkpoint(proc, run, slurm_cluster, before)  # cancel it mid-run
        subprocess.run(["scancel", job["id"]], env=slurm_cluster.env(), check=True)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert f"job {job['id']}: CANCELLED" in err, err[-3000:]
    assert "add --resume" in err and "Traceback" not in err
    log_line = next(line for line in err.splitlines() if "logs:" in line)
    assert Path(log_line.split("logs:")[1].strip()).exists()
    from dynadiff.training import read_resume_state

    stopped_at = read_resume_state(run / "checkpoints" / "last").step
    assert 0 < stopped_at < STEPS

    resumed = subprocess.run(_train_cmd(setup, "cancelled", "--resume"), env=_env(slurm_cluster),
                             capture_output=True, text=True, timeout=420)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = _summary(resumed.stdout)
    assert summary["steps"] == STEPS and summary["resumed_from"] is not None and summary["resumed_from"] >= stopped_at
    assert sorted(j["state"] for j in finished_training_jobs(slurm_cluster, before)) == ["CANCELLED", "COMPLETED"]
    _assert_same_weights(run, local_run())


def test_training_job_requeued_after_a_node_failure_continues_from_its_checkpoint(setup, local_run, slurm_cluster):
    """The node fails after a checkpoint: SLURM requeues the job, which runs train.py's job again; it
    continues from the checkpoint (SLURM_RESTART_COUNT), and train.py ends with the uninterrupted run's weights."""
    run = setup["root"] / "requeued"
    before = {j["id"] for j in slurm_cluster.jobs()}
    with started(_train_cmd(setup, "requeued"), _env(slurm_cluster)) as proc:
        job = _job_past_a_checkpoint(proc, run, slurm_cluster, before)
        try:
            requeued = slurm_cluster.fail_node()
        finally:
            slurm_cluster.restore_node()
        assert requeued == [job["id"]]
        from dynadiff.training import read_resume_state

        stopped_at = read_resume_state(run / "checkpoints" / "last").step
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert 0 < stopped_at < STEPS
    summary = _summary(out)
    assert summary["steps"] == STEPS and summary["resumed_from"] is not None and summary["resumed_from"] >= stopped_at
    assert [j["state"] for j in finished_training_jobs(slurm_cluster, before)] == ["COMPLETED"]  # one job, run twice
    log = next((setup["root"] / "cache_requeued").glob(f"dynadiff.config.TrainConfig.run,1/logs/*/{job['id']}"))
    text = (log / f"{job['id']}_0_log.err").read_text()
    assert "DUE TO NODE FAILURE" in text and "SLURM requeued this job (restart 1)" in text
    _assert_same_weights(run, local_run())
