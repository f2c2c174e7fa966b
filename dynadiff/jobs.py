"""What became of the cluster jobs of an exca ``MapInfra``: which failed, and where their logs are.

exca splits the missing items of a map into submitit jobs (a SLURM job array,
or local processes) and raises at the first failed job it waits for, while
the other jobs may still run. :func:`failure_report` waits for those (their
results land in the cache: a rerun computes only what is missing), then
describes every job of the run: state, log files, the error of a job that
raised.

Usage, around a map call::

    before = jobs.snapshot(cfg.infra)
    try:
        out = list(cfg.method(items))
    except jobs.JOB_ERRORS as e:
        raise MyError(jobs.failure_report(cfg.infra, "image generation", before, items)) from e

Jobs are found in exca's log folder (``logs: {folder}/logs/{user}/%j``, one
sub-folder per job id, holding ``<id>_submitted.pkl`` and the
``<id>_<task>_log.out`` / ``<id>_<task>_log.err`` streams). A job of several
tasks (a data-parallel training: ``nodes x tasks_per_node``) is reported task
by task, the rank that stopped first (no result: killed) before the ranks
whose collectives then failed.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
import typing as tp
from pathlib import Path

import psutil
from submitit.core.utils import FailedJobError, UncompletedJobError

logger = logging.getLogger(__name__)

JOB_ERRORS = (UncompletedJobError, FailedJobError)  # what exca raises when a submitit job fails
_SHOWN_ITEMS = 20  # missing items listed in a report (then "...")


@dataclasses.dataclass(frozen=True)
class TaskOutcome:
    """One task (rank) of a job of several tasks."""

    task_id: int
    state: str  # COMPLETED, FAILED (its code raised), DIED (no result: killed, out of memory, node lost)
    stdout: Path
    stderr: Path
    error: str = ""

    @property
    def peer_failure(self) -> bool:
        """Its code raised because a collective failed (another rank stopped or hung), not by itself."""
        return self.state == "FAILED" and any(m in self.error for m in _PEER_ERRORS)


# what a rank's collective raises when another rank died (gloo, NCCL) or did not answer in time
_PEER_ERRORS = ("Connection reset by peer", "Connection closed by peer", "DistBackendError", "NCCL",
                "timed out", "Timeout", "Broken pipe")


@dataclasses.dataclass(frozen=True)
class JobOutcome:
    """One finished job: its scheduler state and its log files."""

    job_id: str
    state: str  # COMPLETED, FAILED (the function raised), CANCELLED, TIMEOUT, NODE_FAIL, OUT_OF_MEMORY, DIED ...
    stdout: Path
    stderr: Path
    error: str = ""  # last line of the traceback, for a job whose function raised
    tasks: tuple[TaskOutcome, ...] = ()  # a job of several tasks: each, the first to have stopped first

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"


def jobs_folder(infra) -> Path | None:
    """The folder holding one sub-folder per job of this infra (None for a custom ``logs`` layout)."""
    if infra.uid_folder() is None:  # no cache folder: no jobs either
        return None
    # exca's own resolution of ``logs`` (pinned exca): ``{folder}`` is the uid folder of a MapInfra,
    # its parent (the method's folder) for a TaskInfra
    path = Path(infra._log_path())
    return path.parent if path.name == "%j" else None


def _job_ids(folder: Path | None) -> set[str]:
    if folder is None or not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir() if (p / f"{p.name}_submitted.pkl").exists()}


def snapshot(infra) -> set[str]:
    """Ids of the jobs already in the infra's log folder (call before the map, for :func:`failure_report`)."""
    return _job_ids(jobs_folder(infra))


def _scheduler(infra) -> str:
    """``slurm`` or ``local``: where submitit sent the jobs (``auto``: SLURM when ``srun`` exists, as submitit)."""
    if infra.cluster == "auto":
        return "slurm" if shutil.which("srun") else "local"
    return str(infra.cluster)


def _n_tasks(infra) -> int:
    return (getattr(infra, "nodes", 1) or 1) * (getattr(infra, "tasks_per_node", 1) or 1)


def _task_outcomes(pattern: Path, job_id: str, n_tasks: int, job_state: str, load: tp.Callable) -> tuple:
    from submitit.core.utils import JobPaths

    out = []
    for task in range(n_tasks):
        paths = JobPaths(pattern, job_id=job_id, task_id=task)
        state, error = "DIED", ""
        if paths.result_pickle.exists():
            state, error = _read_outcome(paths.result_pickle, load)
        elif job_state in ("CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"):
            state = job_state
        out.append(TaskOutcome(task, state, paths.stdout, paths.stderr, error))
    # the rank that stopped by itself first: died, or raised for its own reason, before those whose peers failed
    order = {"DIED": 0, "OUT_OF_MEMORY": 0, "NODE_FAIL": 0, "TIMEOUT": 1, "CANCELLED": 1, "PREEMPTED": 1}
    return tuple(sorted(out, key=lambda t: (t.state == "COMPLETED", order.get(t.state, 2), t.peer_failure,
                                            t.task_id)))


def _read_outcome(path: Path, load: tp.Callable) -> tuple[str, str]:
    try:
        outcome, payload = _load_result(path, load)
    except Exception as e:  # a truncated or unreadable result: the job did not finish cleanly
        return "FAILED", f"unreadable result file ({type(e).__name__}: {e})"
    if outcome == "success":
        return "COMPLETED", ""
    lines = [line for line in str(payload).strip().splitlines() if line.strip()]
    return "FAILED", lines[-1].strip() if lines else ""


def _process_runs(pid: int) -> bool:
    """Whether process ``pid`` of this machine runs (a local job's process: submitit starts them here).

    A zombie, exited but not yet reaped by its parent (submitit's executor, in this process), does not run:
    :func:`psutil.pid_exists` alone would wait for it forever. A process of another user runs.
    """
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess included
        return False
    except psutil.AccessDenied:
        return True


def collect(infra, job_ids: tp.Iterable[str], poll_s: float = 1.0) -> list[JobOutcome]:
    """Wait until each job has finished, then read its outcome (sorted by job id)."""
    import submitit
    from submitit.core.utils import JobPaths, pickle_load

    folder = jobs_folder(infra)
    if folder is None:
        return []
    pattern = folder / "%j"
    scheduler = _scheduler(infra)
    n_tasks = _n_tasks(infra)
    pending = {}
    for job_id in job_ids:
        pending[job_id] = submitit.SlurmJob(folder=pattern, job_id=job_id) if scheduler == "slurm" else None
    logged = False
    while True:
        running = []
        for job_id, job in pending.items():
            paths = JobPaths(pattern, job_id=job_id, task_id=0)
            if paths.result_pickle.exists() and n_tasks == 1:
                continue
            if job is not None:
                if not job.done():
                    running.append(job_id)
            elif job_id.isdigit() and _process_runs(int(job_id)):  # local jobs: the id is the process id
                running.append(job_id)
        if not running:
            break
        if not logged:
            logger.warning("waiting for %d other job(s) to finish (%s): their results are kept",
                           len(running), ", ".join(sorted(running)))
            logged = True
        time.sleep(poll_s)
    out = []
    for job_id, job in sorted(pending.items(), key=lambda kv: _sort_key(kv[0])):
        paths = JobPaths(pattern, job_id=job_id, task_id=0)
        state, error = "DIED", ""
        if paths.result_pickle.exists():
            try:
                outcome, payload = _load_result(paths.result_pickle, pickle_load)
            except Exception as e:  # a truncated or unreadable result: the job did not finish cleanly
                state, error = "FAILED", f"unreadable result file ({type(e).__name__}: {e})"
            else:
                state = "COMPLETED" if outcome == "success" else "FAILED"
                if outcome != "success":
                    lines = [line for line in str(payload).strip().splitlines() if line.strip()]
                    error = lines[-1].strip() if lines else ""
        elif job is not None:
            state = job.state.split()[0] if job.state else "UNKNOWN"  # e.g. "CANCELLED by 0"
        tasks = ()
        if n_tasks > 1:
            tasks = _task_outcomes(pattern, job_id, n_tasks, state, pickle_load)
            if state == "COMPLETED" and not all(t.state == "COMPLETED" for t in tasks):
                state = "FAILED"
        out.append(JobOutcome(job_id=job_id, state=state, stdout=paths.stdout, stderr=paths.stderr, error=error,
                              tasks=tasks))
    return out


def _load_result(path: Path, load: tp.Callable, retry_s: float = 2.0):
    """(outcome, payload) of a job; once more after ``retry_s`` if the file is still being written."""
    try:
        return load(path)
    except EOFError:
        time.sleep(retry_s)
        return load(path)


def _sort_key(job_id: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in job_id.replace("_", " ").split())


def missing_items(infra, items: tp.Sequence) -> list:
    """The items whose results are not in the infra's cache."""
    if infra.folder is None:  # no cache: nothing is kept
        return list(items)
    cache = infra.cache_dict
    uid = infra.item_uid
    return [item for item in items if uid(item) not in cache]


def in_flight_elsewhere(infra, items: tp.Sequence) -> tuple[int, str]:
    """(how many of ``items`` another live process or job is computing now, who): exca's advisory registry of
    in-flight items, which makes this process wait for them and reuse their results. (0, "") when none."""
    folder = infra.uid_folder()
    if folder is None or not (Path(folder) / "inflight.db").exists():
        return 0, ""
    try:
        from exca.cachedict.inflight import InflightRegistry

        reg = InflightRegistry(folder)
        try:
            uid = infra.item_uid
            claimed = reg.get([uid(item) for item in items])
        finally:
            reg.close()
        alive = {k: w for k, w in claimed.items() if w.is_alive()}
    except Exception as e:  # noqa: BLE001 - advisory: a registry we cannot read is no reason to fail
        logger.debug("in-flight registry of %s unreadable: %s", folder, e)
        return 0, ""
    who = sorted({_worker_name(w.liveness) for w in alive.values()})
    return len(alive), ", ".join(who[:3]) + (", ..." if len(who) > 3 else "")


def _worker_name(liveness) -> str:
    if hasattr(liveness, "pid") and hasattr(liveness, "host"):
        return f"process {liveness.pid} on {liveness.host}"
    return f"job {liveness}"


def _task_lines(o: JobOutcome) -> list[str]:
    """A job of several tasks: each rank's state, error and logs, the one that stopped first first."""
    first = o.tasks[0]
    lines = [f"  job {o.job_id}: {o.state}, {len(o.tasks)} tasks; rank {first.task_id} stopped first"]
    why = {"DIED": "died without a result (killed by a signal, out of memory, or its node failed)"}
    for t in o.tasks:
        text = why.get(t.state, t.state) + (f": {t.error}" if t.error else "")
        if t.peer_failure:
            text += " (a collective failed: another rank had stopped)"
        lines.append(f"    rank {t.task_id} (task {t.task_id}): {text}")
        lines.append(f"      logs: {t.stderr}")
        lines.append(f"            {t.stdout}")
    return lines


def failure_report(infra, what: str, before: set[str], items: tp.Sequence | None = None,
                   error: BaseException | None = None, noun: str = "item") -> str:
    """Describe the jobs this run submitted (those not in ``before``), once they have all finished.

    ``what`` names the step ("image generation"); with ``items`` (what was
    asked of the map), the report also says which are still missing; ``error``
    (what exca raised) is shown when no job was submitted at all (e.g. sbatch
    refused the resources).
    """
    detail = str(error).strip() if error is not None else "unknown error"
    if jobs_folder(infra) is None:  # a logs layout other than exca's default: jobs cannot be listed
        return f"{what}: a cluster job failed (cluster={infra.cluster!r}, logs {infra.logs!r}):\n  {detail}"
    new = sorted(_job_ids(jobs_folder(infra)) - set(before), key=_sort_key)
    if not new:
        return (f"{what}: submitting the cluster jobs failed (cluster={infra.cluster!r}):\n  {detail}\n"
                "Check the resources of this step in the infra YAML (cpus_per_task, gpus_per_node, mem_gb, "
                "slurm_partition, slurm_constraint, timeout_min) against what the cluster offers.")
    outcomes = collect(infra, new)
    failed = [o for o in outcomes if not o.ok]
    lines = [f"{what}: {len(failed)} of {len(outcomes)} cluster job(s) failed (on {_scheduler(infra)}); "
             "the results of the other jobs are kept in the cache."]
    for o in failed:
        if o.tasks:
            lines += _task_lines(o)
            continue
        lines.append(f"  job {o.job_id}: {o.state}" + (f": {o.error}" if o.error else ""))
        if o.stderr.exists() or o.stdout.exists():
            lines.append(f"    logs: {o.stderr}")
            lines.append(f"          {o.stdout}")
        else:
            lines.append(f"    no logs: the job never started (its folder: {o.stderr.parent})")
    if items is not None:
        missing = missing_items(infra, items)
        shown = ", ".join(str(m) for m in missing[:_SHOWN_ITEMS]) + (", ..." if len(missing) > _SHOWN_ITEMS else "")
        lines.append(f"{len(missing)} of {len(items)} {noun}(s) missing ({shown}); the {len(items) - len(missing)} "
                     f"others are cached in {infra.uid_folder()}")
    if any(o.state == "TIMEOUT" for o in failed):
        more_jobs = ", or split it over more jobs (max_jobs)" if items is not None else ""
        lines.append(f"A job reached its time limit: give this step more time (its timeout_min in the infra "
                     f"YAML){more_jobs}.")
    reraise = any((o.state == "FAILED" and not o.tasks) or any(t.state == "FAILED" and not t.peer_failure
                                                                for t in o.tasks) for o in failed)
    lines.append("Run the same command again to compute only what is missing"
                 + (" (a job whose code raised will raise again: read its log first)." if reraise else "."))
    return "\n".join(lines)
