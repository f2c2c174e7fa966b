"""The local cluster itself: the sacct stand-in, submission as exca does it, cancelled jobs die, stop leaves
nothing behind."""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path

from local_slurm import LocalSlurm  # scripts/local_slurm.py


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _sbatch(cluster: LocalSlurm, *args: str) -> str:
    res = subprocess.run(["sbatch", "--parsable", *args], env=cluster.env(), capture_output=True, text=True,
                         check=True)
    return res.stdout.strip().split(";")[0]


def test_sacct_standin_reports_pending_and_cancelled_array_tasks(slurm_cluster):
    from submitit.slurm.slurm import SlurmInfoWatcher

    array = _sbatch(slurm_cluster, "--array=0-2%1", "--wrap", "sleep 30", "-o", "/dev/null")
    # task 2 is cancelled while pending: SLURM then keeps no record of it at all
    subprocess.run(["scancel", f"{array}_2"], env=slurm_cluster.env(), check=True)
    _wait_for(lambda: any(j["id"] == f"{array}_0" and j["state"] == "RUNNING" for j in slurm_cluster.jobs()),
              20, "task 0 to run")
    subprocess.run(["scancel", f"{array}_0"], env=slurm_cluster.env(), check=True)
    ids = {j["id"] for j in slurm_cluster.jobs()}
    assert f"{array}_2" not in ids  # what the stand-in has to make up for

    def states():
        out = subprocess.run(["sacct", "-o", "JobID,State,NodeList", "--parsable2", "-j", array],
                             env=slurm_cluster.env(), capture_output=True, text=True, check=True).stdout
        info = SlurmInfoWatcher().read_info(out)  # parsed as submitit parses sacct
        return {t: info.get(f"{array}_{t}", {}).get("State") for t in range(3)}

    got = _wait_for(lambda: (s := states())[0] == "CANCELLED" and s, 15, "task 0 to be cancelled")
    assert got[2] == "CANCELLED"
    assert got[1] in ("PENDING", "RUNNING")
    subprocess.run(["scancel", array], env=slurm_cluster.env(), check=True)


def test_submitit_round_trip_without_slurm_variables(slurm_cluster, tmp_path, monkeypatch):
    """exca submits inside ``submitit.helpers.clean_env()``, which drops SLURM_CONF: the wrappers on PATH
    still reach this cluster. (A killed job is seen through the sacct stand-in: test_slurm_eval.py.)"""
    import submitit

    monkeypatch.setenv("PATH", slurm_cluster.env()["PATH"])
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=5, cpus_per_task=1)
    with submitit.helpers.clean_env():
        assert "SLURM_CONF" not in os.environ
        job = executor.submit(math.factorial, 5)
    assert job.result() == 120  # written by the job a moment before it ends
    _wait_for(lambda: any(j["id"] == job.job_id and j["state"] == "COMPLETED" for j in slurm_cluster.jobs()), 10,
              "the job to complete")


def test_cancelled_job_dies_even_when_it_ignores_sigterm(slurm_cluster, tmp_path):
    """submitit's jobs ignore SIGTERM and run as a child of the batch script: after ``scancel`` they must
    still die, KillWait (1 s here) later, not keep running (and writing results) unseen."""
    pid_file = tmp_path / "job.pid"
    script = f"import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    job = _sbatch(slurm_cluster, "-o", "/dev/null", "--wrap", f"python3 -c \"{script}\"")
    pid = int(_wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 20, "the job to start"))
    assert _running(pid)
    subprocess.run(["scancel", job], env=slurm_cluster.env(), check=True)
    _wait_for(lambda: not _running(pid), 10, "the cancelled job's process to die")


def test_stop_ends_the_daemons_and_the_running_jobs(slurm_available, tmp_path):
    cluster = LocalSlurm(tmp_path / "c", cpus=2)
    cluster.start()
    try:
        pid_file = tmp_path / "job.pid"
        _sbatch(cluster, "-o", "/dev/null", "--wrap", f"echo $$ > {pid_file}; exec sleep 300")
        job_pid = int(_wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 20, "the job to start"))
        daemons = list(cluster._started_pids().values())
        assert len(daemons) == 3 and all(_running(p) for p in daemons + [job_pid])
    finally:
        cluster.stop()
    assert not any(_running(p) for p in daemons + [job_pid])
    assert not cluster.running()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"
