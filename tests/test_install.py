"""A non-editable install (a wheel of the repository, as ``pip install .`` builds) gives working commands from any
folder: the package carries its default configurations and the live page, and loads no file by path."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["dynadiff-eval", "dynadiff-train", "dynadiff-timecourse", "dynadiff-live", "dynadiff-demo",
            "dynadiff-prepare-data", "dynadiff-prepare-weights"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The repository's tracked files copied, built into a wheel and installed (no dependencies: this
    environment's) into a folder of its own; returns its site folder and its scripts' folder."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source, target = REPO / name, src / name
        if not source.exists() and not source.is_symlink():
            continue  # deleted in the work tree, not yet committed
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(src), "-w",
                    str(root / "wheel")], check=True, capture_output=True)
    wheel = next((root / "wheel").glob("dynadiff-*.whl"))
    site = root / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)], check=True,
                   capture_output=True)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    return {"site": site, "bin": site / "bin", "cwd": elsewhere, "env": env}


def _run(installed: dict, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), cwd=installed["cwd"], env=installed["env"], capture_output=True, text=True,
                          timeout=300)


def test_the_installed_package_is_the_one_imported(installed):
    proc = _run(installed, sys.executable, "-c", "import dynadiff, dynadiff.commands; print(dynadiff.__file__); "
                "print(dynadiff.commands.default_config('config.yaml'))")
    module, config = proc.stdout.split()
    assert Path(module).is_relative_to(installed["site"])
    assert Path(config).is_relative_to(installed["site"]) and Path(config).is_file()


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_is_installed_and_answers_help(installed, command):
    proc = _run(installed, str(installed["bin"] / command), "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: {command}")


def test_eval_reads_its_packaged_defaults_and_says_what_is_missing(installed):
    """From a folder holding nothing: the packaged config.yaml is read, and the missing checkpoint is one line
    naming the command that fetches it (no traceback)."""
    proc = _run(installed, str(installed["bin"] / "dynadiff-eval"), "--subject", "1", "--device", "cpu")
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "no checkpoint of subject 1" in errors[0] and "prepare_weights.py" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not list(installed["cwd"].iterdir())  # nothing written where it ran


def test_the_live_page_is_packaged(installed):
    proc = _run(installed, sys.executable, "-c", "from importlib import resources; "
                "print(sorted(p.name for p in (resources.files('dynadiff.live') / 'page').iterdir()))")
    assert proc.returncode == 0, proc.stderr
    assert {"index.html", "page.css", "page.js"} <= set(eval(proc.stdout))
