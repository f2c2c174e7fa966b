"""``prepare_data.py --infra-yaml`` through the local SLURM cluster: one job array per subject, all submitted at once.

Concurrency is checked without a timing race: the partition is set DOWN
while prepare_data.py submits, so queued jobs cannot start (let alone finish);
both subjects' arrays must appear in the queue before it is set UP again. A
one-subject-after-the-other submission would wait forever on the first array.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INFRA_YAML = """\
task_infra_data:
  cluster: slurm
  cpus_per_task: 1
  max_jobs: 2
  min_samples_per_job: 1
  timeout_min: 10
"""


@pytest.fixture(scope="module")
def two_subjects(slurm_available, tmp_path_factory):
    """Synthetic mini-NSD of subjects 1 and 2 (session 1 only), the infra YAML, the prepare_data.py command."""
    from dynadiff.data.synthetic import write_synthetic_nsd

    root = tmp_path_factory.mktemp("slurm_prepare")
    write_synthetic_nsd(root / "nsd", subjects=(1, 2), seed=3, sessions=(1,), n_unique=8, n_test=4)
    (root / "infra.yaml").write_text(INFRA_YAML)
    cmd = [sys.executable, str(REPO / "prepare_data.py"), "--skip-download", "--path", str(root / "nsd"),
           "--subjects", "1", "2", "--sessions", "1", "--infra-yaml", str(root / "infra.yaml"),
           "--cache", str(root / "cache"), "--workers", "1"]
    return {"root": root, "cmd": cmd}


def _env(cluster) -> dict:
    """The cluster's commands first on PATH; one OpenMP thread per job (the jobs inherit it)."""
    return dict(cluster.env(), OMP_NUM_THREADS="1")


def _partition(cluster, state: str) -> None:
    subprocess.run(["scontrol", "update", "PartitionName=local", f"State={state}"], env=cluster.env(), check=True,
                   capture_output=True, timeout=30)


def _data_jobs(cluster, before: set[str]) -> list[dict]:
    return [j for j in cluster.jobs() if j["id"] not in before and j["name"].startswith("NsdDatasetConfig")]


def _n_items(nsd_root: Path) -> dict[int, int]:
    """Run items (test and train) per subject, once prepare_data.py has written the test ids."""
    from dynadiff.config import NsdDatasetConfig
    from dynadiff.data.dataset import list_trials

    return {s: sum(len(list_trials(NsdDatasetConfig(nsddata_path=nsd_root, subject=s, split=split, sessions=[1]))[0])
                   for split in ("test", "train")) for s in (1, 2)}


def _job_dirs_per_subject(cache: Path) -> list[set[str]]:
    """Per exca cache folder of the windows (one per subject): the job ids exca logged there."""
    out = []
    for uid_folder in sorted(cache.glob("dynadiff.config.NsdDatasetConfig.run_windows,1/*")):
        logs = uid_folder.glob("logs/*/*")
        out.append({p.name for p in logs if (p / f"{p.name}_submitted.pkl").exists()})
    return out


def test_each_subject_is_a_job_array_submitted_at_once_and_a_rerun_submits_nothing(two_subjects, slurm_cluster):
    root, cmd = two_subjects["root"], two_subjects["cmd"]
    before = {j["id"] for j in slurm_cluster.jobs()}
    log, proc = root / "first.log", None
    _partition(slurm_cluster, "DOWN")  # jobs are queued, none starts
    try:
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, env=_env(slurm_cluster), stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 60
            queued = _data_jobs(slurm_cluster, before)
            while len({j["array"] for j in queued}) < 2:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"one array only, the other subject waits for it: {queued}"
                time.sleep(0.2)
                queued = _data_jobs(slurm_cluster, before)
            assert all(j["state"] == "PENDING" for j in queued), queued  # neither array had finished
        finally:
            _partition(slurm_cluster, "UP")
        proc.wait(timeout=300)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]

    data_jobs = _data_jobs(slurm_cluster, before)
    assert data_jobs and all(j["state"] == "COMPLETED" for j in data_jobs), data_jobs
    arrays = {}
    for j in data_jobs:
        arrays.setdefault(j["array"], set()).add(j["id"])
    assert len(arrays) == 2 and all(len(ids) == 2 for ids in arrays.values())  # max_jobs: 2 per subject
    # each subject's cache folder logged exactly one of the arrays
    per_subject = _job_dirs_per_subject(root / "cache")
    assert len(per_subject) == 2 and sorted(map(sorted, per_subject)) == sorted(map(sorted, arrays.values()))
    n_items = _n_items(root / "nsd")
    for subject, n in n_items.items():
        assert f"subject {subject}: {n} run items (" in text and f"): 0 cached, {n} to compute" in text, text[-3000:]
        assert f"subject {subject}: windows cached (" in text

    before = {j["id"] for j in slurm_cluster.jobs()}
    rerun = subprocess.run(cmd, env=_env(slurm_cluster), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not _data_jobs(slurm_cluster, before)
    for subject, n in n_items.items():
        assert f"): {n} cached, 0 to compute" in rerun.stderr and f"subject {subject}: {n} run items (" in rerun.stderr
