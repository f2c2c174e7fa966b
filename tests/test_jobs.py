"""dynadiff.jobs: a failed job of an exca map is reported with its logs; the others' results are kept."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from dynadiff import jobs

HERE = Path(__file__).parent


@pytest.fixture
def flaky(tmp_path, monkeypatch):
    """FlakyMap factory on submitit's local executor (jobs are subprocesses that import tests/flaky_map.py)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(HERE))
    from flaky_map import FlakyMap

    def make(**kw):
        infra = {"folder": tmp_path / "cache", "cluster": "local", "max_jobs": 3, "timeout_min": 5}
        return FlakyMap(record=tmp_path / "computed.txt", infra=infra, **kw)

    return make


def _computed(tmp_path) -> list[int]:
    path = tmp_path / "computed.txt"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_failed_local_job_is_reported_and_the_rerun_computes_only_the_missing(flaky, tmp_path):
    items = list(range(6))
    cfg = flaky(fail_on=3)
    before = jobs.snapshot(cfg.infra)
    with pytest.raises(jobs.JOB_ERRORS):
        list(cfg.square(items))
    report = jobs.failure_report(cfg.infra, "squaring", before, items, noun="number")
    assert report.startswith("squaring: 1 of 3 cluster job(s) failed (on local)"), report
    job = re.search(r"job (\d+): FAILED: ValueError: item 3 is cursed\n    logs: (\S+)\n +(\S+)", report)
    assert job, report
    assert "item 3 is cursed" in Path(job.group(2)).read_text()  # the stderr log it points to
    assert Path(job.group(3)).name == f"{job.group(1)}_0_log.out"
    missing = [int(x) for x in re.search(r"missing \(([\d, ]+)\)", report).group(1).split(",")]
    assert 3 in missing and len(missing) <= 2  # only the failed job's chunk (2 of the 6 items) is lost
    assert f"{len(missing)} of 6 number(s) missing" in report
    assert "a job whose code raised will raise again" in report
    assert sorted(missing) == sorted(jobs.missing_items(cfg.infra, items))

    done_before = _computed(tmp_path)
    fixed = flaky()  # same cache: fail_on is not part of it
    assert list(fixed.square(items)) == [x * x for x in items]
    assert sorted(_computed(tmp_path)[len(done_before):]) == sorted(missing)


def test_failed_task_job_is_found_in_the_task_log_folder(tmp_path, monkeypatch):
    """A TaskInfra (train.py's) keeps its logs in the method's folder, not in the uid folder as a map."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(HERE))
    from flaky_map import FlakyTask

    cfg = FlakyTask(fail=True, infra={"folder": tmp_path, "cluster": "local", "timeout_min": 5})
    before = jobs.snapshot(cfg.infra)
    with pytest.raises(jobs.JOB_ERRORS):
        cfg.run()
    report = jobs.failure_report(cfg.infra, "training", before)
    assert report.startswith("training: 1 of 1 cluster job(s) failed (on local)"), report
    job = re.search(r"job (\d+): FAILED: ValueError: the task is cursed\n    logs: (\S+)", report)
    assert job, report
    log = Path(job.group(2))
    assert "the task is cursed" in log.read_text()
    assert cfg.infra.uid_folder() not in log.parents and log.is_relative_to(tmp_path)


def test_report_when_no_job_could_be_submitted(flaky):
    cfg = flaky()
    error = RuntimeError("sbatch: error: Invalid generic resource (gres) specification")
    report = jobs.failure_report(cfg.infra, "image generation", jobs.snapshot(cfg.infra), [1, 2], error=error)
    assert "image generation: submitting the cluster jobs failed (cluster='local')" in report
    assert "Invalid generic resource" in report and "gpus_per_node" in report


def test_outcome_of_a_job_that_left_no_result(tmp_path):
    """A job killed before writing its result (here: no such process) is DIED, with its log paths."""
    class Infra:  # the attributes of an exca MapInfra that collect() reads
        cluster = "local"

        def uid_folder(self):
            return tmp_path

        def _log_path(self):
            return tmp_path / "logs" / "me" / "%j"

    folder = jobs.jobs_folder(Infra())
    (folder / "999999999").mkdir(parents=True)
    (folder / "999999999" / "999999999_submitted.pkl").write_bytes(b"")
    [outcome] = jobs.collect(Infra(), ["999999999"], poll_s=0.01)
    assert outcome.state == "DIED" and not outcome.ok
    assert outcome.stderr == folder / "999999999" / "999999999_0_log.err"
