"""A single-node SLURM cluster on localhost, started once for the tests of this folder.

The tests that take the ``slurm_cluster`` fixture are skipped, with the reason,
where the Debian packages are not installed (``scripts/install_slurm.sh``) or
not as root; with ``DYNADIFF_REQUIRE_SLURM=1`` (CI) they fail instead, so a
broken install cannot pass as a skip.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from local_slurm import LocalSlurm, SlurmSetupError, unavailable_reason  # scripts/local_slurm.py


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: runs jobs on the local SLURM cluster (tests/slurm)")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def slurm_available() -> None:
    """Skip (or, with DYNADIFF_REQUIRE_SLURM=1, fail) where a local cluster cannot run."""
    reason = unavailable_reason()
    if reason:
        if os.environ.get("DYNADIFF_REQUIRE_SLURM") == "1":
            pytest.fail(f"DYNADIFF_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(slurm_available, tmp_path_factory):
    """The running cluster: a cancelled job dies 1 s after ``scancel``; slurmd logs at debug level (for
    ``fail_node``). Its client commands and ``sacct`` stand-in are on ``cluster.env()``'s PATH (not this
    process's: give that environment to what should submit to it)."""
    root, temporary = tmp_path_factory.mktemp("slurm"), False
    try:
        cluster = LocalSlurm(root, cpus=8, kill_wait=1, slurmd_debug="debug")
    except SlurmSetupError:  # a long basetemp: the sockets need a short path
        root, temporary = Path(tempfile.mkdtemp(prefix="dslurm-", dir="/tmp")), True
        cluster = LocalSlurm(root, cpus=8, kill_wait=1, slurmd_debug="debug")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
