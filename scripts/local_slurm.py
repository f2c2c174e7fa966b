"""A single-node SLURM cluster on this machine: for the tests, and to try the cluster path.

    python scripts/local_slurm.py start [--dir DIR] [--cpus N]   # then: export PATH=DIR/bin:$PATH
    python scripts/local_slurm.py status [--dir DIR]
    python scripts/local_slurm.py stop [--dir DIR]

(or ``scripts/local_slurm.sh``, which finds the project's Python). Tooling, not part of the ``dynadiff``
package: the tests import it as ``local_slurm`` (``scripts/`` is on their ``sys.path``: ``pythonpath`` in
pyproject.toml). Standard library only.

It runs munged (with its own key), slurmctld and slurmd as root, with every
file (configuration, state, spool, logs, sockets) under one short folder
(Unix socket paths are limited to 108 characters), no accounting database and
no systemd. Needs the Debian packages ``slurmctld slurmd slurm-client munge``
(``scripts/install_slurm.sh``).

``DIR/bin`` holds the client commands to use with it (``sbatch``, ``squeue``,
``scancel``, ...: wrappers that point the real ones at this cluster's
``slurm.conf``) and a ``sacct`` stand-in that answers from ``squeue -t all``.
Both are needed by submitit (hence exca): it submits with the ``SLURM_*``
environment variables removed, so ``SLURM_CONF`` alone would not reach
``sbatch``; and it learns that a job was killed from ``sacct`` only, which
does not work without an accounting database.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing as tp
from pathlib import Path

logger = logging.getLogger(__name__)

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol", "srun", "salloc", "sstat")
_SBIN = ("/usr/sbin", "/sbin")
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes, NUL included
MAX_ARRAY_SIZE = 1001  # SLURM's default: array task ids 0..1000
DEFAULT_DIR = Path(tempfile.gettempdir()) / "dynadiff-slurm"


class SlurmSetupError(RuntimeError):
    """The local cluster cannot be started (missing packages, not root, a daemon failed)."""


def find_program(name: str) -> str | None:
    """Path of an executable, looking in ``/usr/sbin`` too (daemons are not on a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))


def unavailable_reason() -> str | None:
    """Why a local cluster cannot run here, or None if it can."""
    missing = [name for name in DAEMONS + ("sbatch", "squeue", "scancel", "sinfo") if find_program(name) is None]
    if missing:
        return (f"SLURM is not installed (missing {', '.join(missing)}): run scripts/install_slurm.sh "
                "(Debian packages slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        return "a local SLURM cluster runs its daemons as root (SlurmUser=root): run as root"
    return None


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 (all held open while choosing, so none repeats)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _memory_mb() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20)


SACCT_STANDIN = r"""#!/bin/sh
# sacct stand-in for a cluster without accounting database: answers
# `sacct -o JobID,State,NodeList --parsable2 -j ID [-j ID ...]` (what submitit asks)
# from `squeue -t all` (finished jobs stay listed for MinJobAge seconds).
jobs=""
while [ $# -gt 0 ]; do
    case "$1" in
        -j|--jobs) jobs="${jobs:+$jobs,}$2"; shift 2 ;;
        --jobs=*) jobs="${jobs:+$jobs,}${1#--jobs=}"; shift ;;
        *) shift ;;
    esac
done
echo "JobID|State|NodeList"
for id in $(echo "$jobs" | tr ',' ' '); do
    out=$(SLURM_CONF="@CONF@" "@SQUEUE@" -t all -r -h -o '%i|%T|%N' -j "$id" 2>/dev/null)
    # An array task cancelled while pending leaves no record at all: list every task of a
    # known array as CANCELLED first, the tasks squeue knows (printed after) override it.
    case "$out" in
        "${id}_"*) echo "${id}_[0-@MAXTASK@]|CANCELLED|" ;;
    esac
    [ -n "$out" ] && printf '%s\n' "$out"
done
exit 0
"""

WRAPPER = """#!/bin/sh
# {name} of the local cluster in {root}
SLURM_CONF="{conf}"
export SLURM_CONF
exec "{real}" "$@"
"""


@dataclasses.dataclass
class LocalSlurm:
    """A single-node cluster whose files are all under ``root`` (keep the path short)."""

    root: Path = DEFAULT_DIR
    cpus: int = 16  # claimed by the node (may exceed the machine's: SlurmdParameters=config_overrides)
    node: str = dataclasses.field(default_factory=lambda: socket.gethostname().split(".")[0])
    kill_wait: int = 5  # s between a cancelled job's SIGTERM (which submitit ignores) and its SIGKILL
    slurmd_debug: str = "info"  # slurmd's log level (``debug`` also logs each job's end on the node)

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()
        if len(str(self.munge_socket)) > _MAX_SOCKET_PATH:
            raise SlurmSetupError(
                f"{self.root} is too long a path for the munge socket ({len(str(self.munge_socket))} > "
                f"{_MAX_SOCKET_PATH} characters): choose a shorter folder, e.g. under /tmp"
            )

    # -- paths ---------------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def bin_dir(self) -> Path:
        """Client commands pointed at this cluster, and the ``sacct`` stand-in: put it first on PATH."""
        return self.root / "bin"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "run" / "munge.socket.2"

    @property
    def _pid_dir(self) -> Path:
        return self.root / "pids"

    def env(self, base: dict | None = None) -> dict:
        """``base`` (default: this process's environment) with ``bin_dir`` first on PATH and SLURM_CONF set."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", "")])
        env["SLURM_CONF"] = str(self.conf)
        return env

    # -- life cycle ----------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Start munged, slurmctld and slurmd; return once the node accepts jobs."""
        reason = unavailable_reason()
        if reason:
            raise SlurmSetupError(reason)
        if self.running():
            raise SlurmSetupError(f"a local cluster already runs in {self.root}: stop it first")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        for sub in ("state", "spool", "log", "pids", "bin"):
            (self.root / sub).mkdir(exist_ok=True)
        try:
            self._start_munge()
            self._write_conf()
            self._write_bin()
            env = self.env()
            self._spawn("slurmctld", [find_program("slurmctld"), "-D", "-f", str(self.conf)], env)
            self._spawn("slurmd", [find_program("slurmd"), "-D", "-f", str(self.conf), "-N", self.node], env)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        logger.info("local SLURM cluster up in %s (node %s, %d CPUs)", self.root, self.node, self.cpus)

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        for sub, mode in (("etc", 0o700), ("run", 0o755), ("lib", 0o700), ("log", 0o700)):
            (munge / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(munge / sub, mode)
        os.chmod(munge, 0o755)
        key = munge / "etc" / "munge.key"
        if not key.exists():
            subprocess.run([find_program("mungekey"), "--create", "--keyfile", str(key)], check=True,
                           capture_output=True)
        self._spawn("munged", [
            find_program("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={key}", f"--pid-file={munge / 'run' / 'munged.pid'}",
            f"--log-file={munge / 'log' / 'munged.log'}", f"--seed-file={munge / 'lib' / 'munged.seed'}",
        ], os.environ)
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if time.monotonic() > deadline:
                raise SlurmSetupError(f"munged did not start: see {munge / 'log' / 'munged.log'}")
            self._check_alive("munged")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        r = self.root
        ctld_port, slurmd_port = _free_ports(2)
        lines = [
            "ClusterName=dynadiff-local",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'pids' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'pids' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            f"SlurmdDebug={self.slurmd_debug}",
            "ProctrackType=proctrack/pgid",  # linuxproc loses a batch script's child that outlives the script
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=batch_sched_delay=0",  # else ~3 s before each job starts
            f"KillWait={self.kill_wait}",
            "MinJobAge=3600",  # finished jobs stay in `squeue -t all` (the sacct stand-in's source)
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # the node may claim more CPUs than the machine has
            "MailProg=/bin/true",
            f"MaxArraySize={MAX_ARRAY_SIZE}",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN",
            "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _write_bin(self) -> None:
        for name in CLIENTS:
            real = find_program(name)
            if real is None:
                continue
            path = self.bin_dir / name
            path.write_text(WRAPPER.format(name=name, root=self.root, conf=self.conf, real=real))
            path.chmod(0o755)
        sacct = self.bin_dir / "sacct"
        sacct.write_text(SACCT_STANDIN.replace("@CONF@", str(self.conf)).replace("@SQUEUE@", find_program("squeue"))
                         .replace("@MAXTASK@", str(MAX_ARRAY_SIZE - 1)))
        sacct.chmod(0o755)

    def _spawn(self, name: str, cmd: list, env) -> None:
        self._pid_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.stdout", "ab") as out:
            proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        (self._pid_dir / f"{name}.started").write_text(str(proc.pid))

    def _started_pids(self) -> dict[str, int]:
        out = {}
        for path in sorted(self._pid_dir.glob("*.started")) if self._pid_dir.exists() else ():
            try:
                out[path.name.removesuffix(".started")] = int(path.read_text())
            except ValueError:
                continue
        return out

    def _check_alive(self, name: str) -> None:
        pid = self._started_pids().get(name)
        if pid is None or not pid_alive(pid, reap=True):
            log = {"munged": self.root / "munge" / "log" / "munged.log"}.get(name, self.log_dir / f"{name}.log")
            raise SlurmSetupError(f"{name} exited at start: see {log} and {self.log_dir / (name + '.stdout')}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            for name in ("slurmctld", "slurmd"):
                self._check_alive(name)
            res = subprocess.run([find_program("sinfo"), "-h", "-N", "-o", "%T"], env=self.env(),
                                 capture_output=True, text=True)
            state = res.stdout.strip()
            if res.returncode == 0 and state.rstrip("*") in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.1)
        raise SlurmSetupError(f"the node is not up after {timeout:.0f} s (state {state!r}): see {self.log_dir}")

    def jobs(self) -> list[dict]:
        """Every job and array task the cluster knows, finished ones too: ``id``, ``array`` (the array's
        id, or the job's own), ``name``, ``state`` (PENDING, RUNNING, COMPLETED, CANCELLED, TIMEOUT ...)."""
        res = subprocess.run([find_program("squeue"), "-t", "all", "-r", "-h", "-o", "%i|%F|%T|%j"], env=self.env(),
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SlurmSetupError(f"squeue failed: {res.stderr.strip()}")
        keys = ("id", "array", "state", "name")
        return [dict(zip(keys, line.split("|", 3))) for line in res.stdout.splitlines() if line.strip()]

    def running(self) -> bool:
        return any(pid_alive(pid, reap=True) for pid in self._started_pids().values())

    # -- failures ------------------------------------------------------------
    def fail_node(self, timeout: float = 60.0, abrupt: bool = False) -> list[str]:
        """Set the node DOWN, as when it fails: SLURM kills the jobs running on it and requeues them
        (PENDING until the node is back, then held back a few minutes). Returns the requeued jobs' ids
        once their processes have ended on the node and slurmd is done with them: a job started again
        before that is refused ("already running") and the node drained. Needs ``slurmd_debug="debug"``
        (slurmd logs a job's end at that level only).

        SLURM ends the jobs as it ends cancelled ones: SIGCONT and SIGTERM, which a submitit job ignores,
        then SIGKILL max(KillWait, 5) s later, so a job's code may run on after the failure, to its end if
        it is short (its first attempt then completes, and submitit reads that result). ``abrupt``: the jobs'
        processes stop (SIGSTOP) before the node goes down and are killed (SIGKILL) once slurmd has logged
        the failure ("DUE TO NODE FAILURE", in the job's log too), as on a node that lost its power: their
        code stops there."""
        if self.slurmd_debug != "debug":
            raise SlurmSetupError('fail_node needs LocalSlurm(slurmd_debug="debug")')
        log = self.log_dir / "slurmd.log"
        offset = log.stat().st_size if log.exists() else 0
        running = [j for j in self.jobs() if j["state"] == "RUNNING"]
        raw = self.raw_ids([j["id"] for j in running])
        to_kill = {raw[j["id"]] for j in running} if abrupt else set()
        _signal_all(job_processes(to_kill), signal.SIGSTOP)
        self._scontrol("update", f"NodeName={self.node}", "State=DOWN", "Reason=simulated-failure")
        deadline = time.monotonic() + timeout
        terminated: dict[str, float] = {}  # job -> when slurmd began to end it
        while True:
            with open(log, "rb") as f:
                f.seek(offset)
                since = f.read().decode(errors="replace")
            now = time.monotonic()
            for r in to_kill:
                if re.search(rf"_rpc_terminate_job: .*JobId={r}$", since, re.MULTILINE):
                    terminated.setdefault(r, now)
            # the batch script's failure message, written while it is stopped (or, with no batch script left
            # to write it, a second after slurmd began): then the processes die, those SLURM woke up too
            failed = {r for r in terminated if f"*** JOB {r} ON " in since or now > terminated[r] + 1}
            _signal_all(job_processes(failed), signal.SIGKILL)
            to_kill -= failed
            if not to_kill and all(f"JobId={raw[j['id']]}: sent epilog complete msg" in since for j in running):
                return [j["id"] for j in running]
            if now > deadline:
                raise SlurmSetupError(f"jobs {[j['id'] for j in running]} did not end {timeout:.0f} s after the "
                                      f"node went down: see {log}")
            time.sleep(0.02 if to_kill else 0.1)

    def restore_node(self) -> None:
        """Bring the node back after :meth:`fail_node`, and start the requeued jobs at once instead of after
        SLURM's requeue delay (a few minutes)."""
        self._scontrol("update", f"NodeName={self.node}", "State=IDLE")
        for job in self.jobs():
            if job["state"] == "PENDING":
                self._scontrol("update", f"JobId={job['id']}", "StartTime=now")

    def raw_ids(self, job_ids: list[str]) -> dict[str, str]:
        """Each job's own id (an array task ``5_1`` has one of its own, e.g. ``6``)."""
        if not job_ids:
            return {}
        res = subprocess.run([find_program("squeue"), "-h", "-t", "all", "-o", "%i|%A", "-j", ",".join(job_ids)],
                             env=self.env(), capture_output=True, text=True, check=True)
        return dict(line.split("|") for line in res.stdout.splitlines() if line.strip())

    def _scontrol(self, *args: str) -> None:
        res = subprocess.run([find_program("scontrol"), *args], env=self.env(), capture_output=True, text=True)
        if res.returncode != 0:
            raise SlurmSetupError(f"scontrol {' '.join(args)}: {res.stderr.strip()}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the daemons this folder's ``start`` started (by their recorded ids); jobs still running die too."""
        pids = self._started_pids()
        if "slurmctld" in pids and pid_alive(pids["slurmctld"], reap=True):
            self._cancel_all_jobs(timeout)
        # slurmd first (it ends its jobs), munged last (the others need it to shut down cleanly)
        order = [n for n in ("slurmd", "slurmctld", "munged") if n in pids] + [n for n in pids if n not in
                                                                                ("slurmd", "slurmctld", "munged")]
        for name in order:
            pid = pids[name]
            if pid_alive(pid, reap=True):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while pid_alive(pid, reap=True) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if pid_alive(pid, reap=True):
                    logger.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing it", name, pid, timeout)
                    os.kill(pid, signal.SIGKILL)
            (self._pid_dir / f"{name}.started").unlink(missing_ok=True)

    def _cancel_all_jobs(self, timeout: float) -> None:
        """Cancel this cluster's jobs and wait for their processes (slurmstepd outlives slurmd)."""
        env = self.env()
        subprocess.run([find_program("scancel"), "--user", str(os.geteuid())], env=env, capture_output=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            res = subprocess.run([find_program("squeue"), "-h", "-t", "PD,R,CG,S", "-o", "%i"], env=env,
                                 capture_output=True, text=True)
            if res.returncode != 0 or not res.stdout.strip():
                return
            time.sleep(0.2)
        logger.warning("jobs of the local cluster still running after %.0f s: %s", timeout, res.stdout.split())

    def status(self) -> str:
        pids = self._started_pids()
        lines = [f"{name}: pid {pid} {'running' if pid_alive(pid, reap=True) else 'not running'}" for name, pid in pids.items()]
        return "\n".join(lines) if lines else f"no local cluster started in {self.root}"


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def job_processes(raw_ids: tp.Collection[str]) -> list[int]:
    """The processes of these jobs (their own ids, see :meth:`LocalSlurm.raw_ids`) on this machine: those whose
    environment has their ``SLURM_JOB_ID`` (the batch script, srun, the tasks and what they started), not
    SLURM's own ``slurmstepd``."""
    if not raw_ids:
        return []
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = dict(item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0")
                           if b"=" in item)
            name = (entry / "comm").read_text().strip()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if environ.get(b"SLURM_JOB_ID", b"").decode(errors="replace") in raw_ids and name != "slurmstepd":
            out.append(int(entry.name))
    return out


def pid_alive(pid: int, reap: bool = False) -> bool:
    """Whether a process runs (a zombie, finished but not yet reaped by its parent, does not).

    ``reap``: first reap ``pid`` if it is an exited child of this process (only for
    processes this process started itself and nobody else waits for).
    """
    if reap:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
            if waited == pid:
                return False
        except ChildProcessError:
            pass  # not our child: ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:  # no /proc (macOS): trust kill
        return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/local_slurm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"the cluster's folder (default {DEFAULT_DIR})")
    p.add_argument("--cpus", type=int, default=16, help="CPUs the node claims (default 16)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cluster = LocalSlurm(args.dir, cpus=args.cpus)
        if args.action == "start":
            cluster.start()
            print(f"local SLURM cluster running in {cluster.root}; to use it (and stop it later):\n"
                  f"  export PATH={cluster.bin_dir}:$PATH\n"
                  f"  scripts/local_slurm.sh stop --dir {cluster.root}")
        elif args.action == "stop":
            cluster.stop()
            print(f"stopped the local cluster in {cluster.root}")
        else:
            print(cluster.status())
    except SlurmSetupError as e:
        logger.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
