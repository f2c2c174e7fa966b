"""The mIoU segmentation environment: ``setup_miou.sh`` against fake tools, ``miou/segment.py`` against fake mmseg.

setup_miou.sh runs with a PATH holding only fake ``conda``, ``nvcc``, ``g++``, ``gcc``, ``git``, ``curl`` and
``wget`` (small shell scripts that log their arguments) and links to the few system tools it needs, so neither a
real conda nor a real nvcc can be found. The fake conda makes an environment whose ``bin/python`` is a fake too:
it logs, plays pip (install / freeze), the op build and the in-environment checks, and hands anything else (the
checkpoint unpacking and checking) to this Python.

segment.py runs under this Python with fake ``torch``, ``mmcv`` and ``mmseg`` packages and a fake ViT-Adapter
folder, whose "model" labels each pixel from its colour (a rule recomputed here independently).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "setup_miou.sh"
SEGMENT = ROOT / "miou" / "segment.py"
MODEL = "mask2former_beitv2_adapter_large_896_80k_cocostuff164k"
COMMIT = "fd64a5190f9f4530e8e5961cc87b2a3ad591190b"
CKPT_URL = f"https://github.com/czczup/ViT-Adapter/releases/download/v0.3.1/{MODEL}.zip"
MMCV_INDEX = "https://download.openmmlab.com/mmcv/dist/cu111/torch1.9.0/index.html"
TORCH_INDEX = "https://download.pytorch.org/whl/torch_stable.html"
PINS = ["torch==1.9.0+cu111", "torchvision==0.10.0+cu111", "mmcv-full==1.4.2", "mmdet==2.22.0",
        "mmsegmentation==0.20.2", "timm==0.4.12"]
SYSTEM_TOOLS = ["bash", "env", "mkdir", "rm", "mv", "ln", "cp", "chmod"]

# ---------------------------------------------------------------------------------------------------------------
# setup_miou.sh
# ---------------------------------------------------------------------------------------------------------------

FAKE_CONDA = r"""#!/bin/bash
echo "conda $*" >> "$FAKE_LOG"
prefix=""; prev=""
for a in "$@"; do [[ $prev == -p ]] && prefix=$a; prev=$a; done
[[ $1 == create && -n $prefix ]] || { echo "fake conda: unexpected call" >&2; exit 2; }
mkdir -p "$prefix/bin"
if [[ -n ${FAKE_CONDA_FAIL:-} ]]; then echo "CondaHTTPError: HTTP 000 CONNECTION FAILED" >&2; exit 1; fi
cp "$FAKE_HOME/python" "$prefix/bin/python"
chmod +x "$prefix/bin/python"
"""

# The environment's Python. Its state (what pip installed, whether the op was built) lives in the environment.
FAKE_PYTHON = r"""#!/bin/bash
echo "python $* [in $PWD]" >> "$FAKE_LOG"
env=${0%/bin/python}
if [[ $1 == -m && $2 == pip ]]; then
    case $3 in
        install)
            if [[ -n ${FAKE_PIP_FAIL:-} ]]; then echo "ERROR: No matching distribution" >&2; exit 1; fi
            for a in "${@:4}"; do [[ $a == *==* ]] && echo "$a" >> "$env/fake-freeze"; done
            exit 0 ;;
        freeze)
            if [[ -f $env/fake-freeze ]]; then while IFS= read -r l; do echo "$l"; done < "$env/fake-freeze"; fi
            exit 0 ;;
    esac
fi
if [[ $1 == setup.py ]]; then
    [[ -z ${FAKE_BUILD_FAIL:-} ]] || exit 1
    : > "$env/fake-op"
    exit 0
fi
if [[ $1 == -c ]]; then
    case $2 in
        *check:version*) echo "${FAKE_PY_VERSION:-3.7}"; exit 0 ;;
        *check:op*) [[ -f $env/fake-op ]]; exit ;;
        *check:cuda*) exit "${FAKE_NO_CUDA:-0}" ;;
    esac
fi
if [[ $1 == */segment.py ]]; then echo "self-check passed"; exit "${FAKE_SELFCHECK_RC:-0}"; fi
exec "$REAL_PYTHON" "$@"
"""

FAKE_GIT = r"""#!/bin/bash
echo "git $*" >> "$FAKE_LOG"
dir=.
if [[ $1 == -C ]]; then dir=$2; shift 2; fi
while [[ $1 == -c ]]; do shift 2; done
case $1 in
    init) mkdir -p "${@: -1}/.git" ;;
    fetch)
        if [[ -n ${FAKE_GIT_FAIL:-} ]]; then echo "fatal: unable to access github.com" >&2; exit 128; fi
        echo "${@: -1}" > "$dir/.git/FETCH_HEAD" ;;
    checkout)
        read -r commit < "$dir/.git/FETCH_HEAD"
        mkdir -p "$dir/segmentation/mmseg_custom" "$dir/segmentation/configs/coco_stuff164k" "$dir/detection/ops"
        : > "$dir/detection/ops/setup.py"
        : > "$dir/segmentation/configs/coco_stuff164k/MODEL_ss.py"
        echo "$commit" > "$dir/.git/HEAD" ;;
    *) echo "fake git: unexpected call" >&2; exit 2 ;;
esac
""".replace("MODEL", MODEL)

FAKE_CURL = r"""#!/bin/bash
echo "curl $*" >> "$FAKE_LOG"
out=""; prev=""
for a in "$@"; do [[ $prev == -o ]] && out=$a; prev=$a; done
if [[ -n ${FAKE_DOWNLOAD_FAIL:-} ]]; then
    echo "partial" >> "$out"
    echo "curl: (6) Could not resolve host: github.com" >&2
    exit 6
fi
cp "$FAKE_HOME/release.zip" "$out"
"""

FAKE_WGET = r"""#!/bin/bash
echo "wget $*" >> "$FAKE_LOG"
out=""; prev=""
for a in "$@"; do [[ $prev == -O ]] && out=$a; prev=$a; done
if [[ -n ${FAKE_DOWNLOAD_FAIL:-} ]]; then echo "unable to resolve host address" >&2; exit 4; fi
cp "$FAKE_HOME/release.zip" "$out"
"""

FAKE_NVCC = r"""#!/bin/bash
echo "nvcc $*" >> "$FAKE_LOG"
echo "nvcc: NVIDIA (R) Cuda compiler driver"
echo "Cuda compilation tools, release ${FAKE_CUDA:-11.1}, V${FAKE_CUDA:-11.1}.105"
"""

FAKE_CXX = r"""#!/bin/bash
echo "${0##*/} $*" >> "$FAKE_LOG"
[[ $1 == -dumpversion ]] && echo "${FAKE_GCC:-9}"
exit 0
"""


def _zipped(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:  # stored, not compressed
        for name, data in files.items():
            z.writestr(name, data)
    return buffer.getvalue()


def _torch_file() -> bytes:
    """Bytes laid out as torch.save's zip format (what the checker looks at: a data.pkl inside)."""
    return _zipped({"archive/data.pkl": b"\x80\x02}q\x00.", "archive/version": b"3\n",
                    "archive/data/0": os.urandom(4096)})


class World:
    """A folder with fake tools on a PATH of their own, and where setup_miou.sh is told to build."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.home = tmp / "fakehome"
        self.bin = tmp / "bin"
        self.system = tmp / "system"
        for d in (self.home, self.bin, self.system):
            d.mkdir(parents=True)
        for tool in SYSTEM_TOOLS:
            (self.system / tool).symlink_to(shutil.which(tool))
        fakes = {"conda": FAKE_CONDA, "git": FAKE_GIT, "curl": FAKE_CURL, "wget": FAKE_WGET, "nvcc": FAKE_NVCC,
                 "g++": FAKE_CXX, "gcc": FAKE_CXX}
        for name, text in fakes.items():
            self.write_tool(name, text)
        (self.home / "python").write_text(FAKE_PYTHON)
        self.checkpoint = _torch_file()
        with zipfile.ZipFile(self.home / "release.zip", "w") as z:
            z.writestr(f"{MODEL}.pth", self.checkpoint)
        self.release_sha256 = hashlib.sha256((self.home / "release.zip").read_bytes()).hexdigest()
        self.log = tmp / "log.txt"
        self.prefix = tmp / "out" / "env"
        self.vit = tmp / "out" / "ViT-Adapter"
        self.weights = tmp / "out" / "weights"
        self.ckpt = self.weights / f"{MODEL}.pth"

    def write_tool(self, name: str, text: str) -> None:
        path = self.bin / name
        path.write_text(text)
        path.chmod(0o755)

    def remove_tool(self, *names: str) -> None:
        for name in names:
            (self.bin / name).unlink()

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        self.log.write_text("")
        full_env = {"PATH": f"{self.bin}:{self.system}", "HOME": str(self.home), "FAKE_LOG": str(self.log),
                    "FAKE_HOME": str(self.home), "REAL_PYTHON": sys.executable, **env}
        return subprocess.run([str(SETUP), "--prefix", str(self.prefix), "--vit-adapter", str(self.vit),
                               "--weights", str(self.weights), *args],
                              env=full_env, capture_output=True, check=False, text=True, timeout=60, cwd=self.tmp)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines()

    def tree(self) -> dict[str, tuple[int, int]]:
        """Every path under the build folder with its size and modification time (links not followed)."""
        out = self.tmp / "out"
        if not out.exists():
            return {}
        return {str(p.relative_to(out)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in out.rglob("*")}


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("setup_miou.sh: error:")]


def _starting(calls: list[str], prefix: str) -> list[str]:
    return [c for c in calls if c.startswith(prefix)]


def test_builds_everything_with_the_pinned_commands_then_skips_what_is_done(world):
    proc = world.run()
    assert proc.returncode == 0, proc.stderr
    calls = world.calls()

    creates = _starting(calls, "conda create")
    assert len(creates) == 1
    create = creates[0].split()
    assert create[create.index("-p") + 1] == str(world.prefix)
    assert "python=3.7" in create

    installs = _starting(calls, "python -m pip install")
    assert len(installs) == 1
    install = installs[0].split()
    for pin in PINS:
        assert pin in install
    assert install[install.index(MMCV_INDEX) - 1] == "-f"
    assert install[install.index(TORCH_INDEX) - 1] == "-f"
    assert "--only-binary=mmcv-full" in install  # never a half-hour source build of mmcv-full

    fetch = _starting(calls, f"git -C {world.vit}.part fetch")
    assert len(fetch) == 1 and fetch[0].split()[-2:] == ["https://github.com/czczup/ViT-Adapter.git", COMMIT]
    assert (world.vit / ".git" / "HEAD").read_text().strip() == COMMIT
    assert os.readlink(world.vit / "segmentation" / "ops") == "../detection/ops"
    assert not Path(f"{world.vit}.part").exists()

    downloads = _starting(calls, "curl")
    assert len(downloads) == 1 and downloads[0].split()[-1] == CKPT_URL
    assert world.ckpt.read_bytes() == world.checkpoint  # the .pth unpacked from the release zip
    assert sorted(p.name for p in world.weights.iterdir()) == [world.ckpt.name]  # no zip, no .part left

    builds = _starting(calls, "python setup.py build install")
    assert len(builds) == 1 and builds[0].endswith(f"[in {world.vit}/detection/ops]")
    checks = [c for c in calls if "segment.py --self-check" in c]
    assert len(checks) == 1 and str(SEGMENT) in checks[0]
    order = [calls.index(c) for c in (creates[0], installs[0], fetch[0], downloads[0], builds[0], checks[0])]
    assert order == sorted(order)
    assert f"SHA-256 {world.release_sha256}" in proc.stdout
    # Not the default folders: it prints the miou.segmenter eval.py needs, and the command that runs.
    assert f'miou.segmenter=["{world.prefix}/bin/python", "{SEGMENT}", "--vit-adapter", "{world.vit}"' in proc.stdout
    assert f"{world.prefix}/bin/python {SEGMENT} --vit-adapter {world.vit} --checkpoint {world.ckpt} IN_DIR OUT_DIR" \
        in proc.stdout

    again = world.run()
    assert again.returncode == 0, again.stderr
    calls = world.calls()
    for done in ("conda create", "python -m pip install", "git -C", "git init", "curl", "wget",
                 "python setup.py"):
        assert not _starting(calls, done), done
    assert [c for c in calls if "segment.py --self-check" in c]  # the verification always runs


def test_check_changes_nothing(world):
    proc = world.run("--check")
    assert proc.returncode == 1
    assert world.tree() == {} and not (world.tmp / "out").exists()
    for line in ("env          missing", "ViT-Adapter  missing", "checkpoint   missing"):
        assert line in proc.stdout
    assert CKPT_URL in proc.stdout
    assert not [c for c in world.calls() if c.startswith(("conda", "git", "curl", "wget", "python -m pip install"))]

    assert world.run().returncode == 0
    before = world.tree()
    proc = world.run("--check")
    assert proc.returncode == 0, proc.stdout
    assert "complete" in proc.stdout
    assert world.tree() == before
    calls = world.calls()
    assert not [c for c in calls if c.startswith(("conda", "git", "curl", "wget", "python -m pip install",
                                                  "python setup.py"))]

    (world.prefix / "fake-op").unlink()  # the op no longer loads: reported, still nothing changed
    before = world.tree()
    proc = world.run("--check")
    assert proc.returncode == 1 and "op           missing" in proc.stdout
    assert world.tree() == before


@pytest.mark.parametrize(("removed", "message"), [
    (("conda",), "no conda on PATH (nor mamba or micromamba)"),
    (("nvcc",), "no CUDA toolkit: nvcc is not on PATH"),
    (("g++",), "no C++ compiler: g++ and gcc are not both on PATH"),
    (("gcc",), "no C++ compiler: g++ and gcc are not both on PATH"),
    (("git",), "no git on PATH"),
    (("curl", "wget"), "neither curl nor wget on PATH"),
])
def test_a_missing_tool_is_one_clear_message_before_any_work(world, removed, message):
    world.remove_tool(*removed)
    proc = world.run()
    assert proc.returncode == 1
    errors = _errors(proc)
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "run setup_miou.sh again" in errors[0]
    assert not [c for c in world.calls() if c.startswith(("conda", "git", "curl", "wget"))]
    assert not (world.tmp / "out").exists()


def test_every_missing_tool_is_named_at_once(world):
    world.remove_tool("conda", "nvcc", "git")
    proc = world.run()
    assert proc.returncode == 1
    errors = _errors(proc)
    assert len(errors) == 3
    assert "no conda" in errors[0] and "no git" in errors[1] and "no CUDA toolkit" in errors[2]


def test_micromamba_or_an_explicit_conda_is_used(world):
    world.remove_tool("conda")
    world.write_tool("micromamba", FAKE_CONDA)
    assert world.run().returncode == 0
    assert _starting(world.calls(), "conda create")  # the fake logs as "conda"

    other = World(world.tmp / "second")
    other.remove_tool("conda")
    tool = other.tmp / "tools" / "myconda"
    tool.parent.mkdir()
    tool.write_text(FAKE_CONDA)
    tool.chmod(0o755)
    proc = other.run(MIOU_CONDA=str(tool))
    assert proc.returncode == 0, proc.stderr
    proc = other.run("--check", MIOU_CONDA=str(other.tmp / "nowhere"))
    assert "conda: none" in proc.stdout


def test_tools_are_needed_only_for_the_steps_left(world):
    assert world.run().returncode == 0
    world.remove_tool("conda", "git", "curl", "wget", "nvcc", "g++", "gcc")
    proc = world.run()
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("cuda", "warned"), [("11.1", False), ("11.3", True), ("12.4", True)])
def test_a_cuda_other_than_11_1_is_a_warning_naming_it(world, cuda, warned):
    proc = world.run(FAKE_CUDA=cuda)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("setup_miou.sh: warning:")]
    if warned:
        assert len(warnings) == 1 and f"is CUDA {cuda}, not 11.1" in warnings[0]
        assert "CUDA_HOME" in warnings[0]
    else:
        assert warnings == []


def test_cuda_home_is_where_nvcc_is_looked_for(world):
    world.remove_tool("nvcc")
    cuda_home = world.tmp / "cuda-11.1"
    (cuda_home / "bin").mkdir(parents=True)
    (cuda_home / "bin" / "nvcc").write_text(FAKE_NVCC)
    (cuda_home / "bin" / "nvcc").chmod(0o755)
    assert world.run(CUDA_HOME=str(cuda_home)).returncode == 0
    assert _starting(world.calls(), "nvcc --version")

    other = World(world.tmp / "second")
    proc = other.run(CUDA_HOME=str(other.tmp / "nocuda"))  # nvcc on PATH, but CUDA_HOME says elsewhere
    assert proc.returncode == 1
    assert f"there is no {other.tmp / 'nocuda'}/bin/nvcc (CUDA_HOME)" in _errors(proc)[0]


def test_a_new_gcc_is_a_warning(world):
    proc = world.run(FAKE_GCC="12")
    assert proc.returncode == 0
    assert "g++ is version 12; CUDA 11.1's nvcc accepts gcc 10 at most" in proc.stderr


@pytest.mark.parametrize("downloader", ["curl", "wget"])
def test_a_failed_download_names_the_url_and_leaves_nothing_under_the_final_name(world, downloader):
    if downloader == "wget":
        world.remove_tool("curl")
    proc = world.run(FAKE_DOWNLOAD_FAIL="1")
    assert proc.returncode == 1
    errors = _errors(proc)
    assert len(errors) == 1
    assert f"could not download {CKPT_URL}" in errors[0]
    assert f"put the file at {world.weights}/{MODEL}.zip" in errors[0]
    assert not world.ckpt.exists() and not (world.weights / f"{MODEL}.zip").exists()
    assert not world.ckpt.with_name(world.ckpt.name + ".part").exists()
    assert _starting(world.calls(), f"{downloader} ")
    if downloader == "wget":
        wget = _starting(world.calls(), "wget")[0].split()
        assert wget[-1] == CKPT_URL and "-c" in wget and wget[wget.index("-O") + 1].endswith(".zip.part")

    proc = world.run()  # internet is back: only what is missing is done
    assert proc.returncode == 0, proc.stderr
    assert world.ckpt.read_bytes() == world.checkpoint
    calls = world.calls()
    assert not _starting(calls, "conda create") and not _starting(calls, "python -m pip install")
    assert len(_starting(calls, downloader)) == 1
    assert not list(world.weights.glob("*.part"))


def test_a_curl_download_resumes_from_its_part_file(world):
    world.run(FAKE_DOWNLOAD_FAIL="1")
    assert (world.weights / f"{MODEL}.zip.part").read_text() == "partial\n"
    world.run()
    curl = _starting(world.calls(), "curl")[0].split()
    assert curl[curl.index("-C") + 1] == "-" and curl[curl.index("-o") + 1] == f"{world.weights}/{MODEL}.zip.part"


def test_a_zip_placed_by_hand_needs_no_downloader_and_is_kept(world):
    world.weights.mkdir(parents=True)
    shutil.copy(world.home / "release.zip", world.weights / f"{MODEL}.zip")
    world.remove_tool("curl", "wget")
    proc = world.run()
    assert proc.returncode == 0, proc.stderr
    assert world.ckpt.read_bytes() == world.checkpoint
    assert (world.weights / f"{MODEL}.zip").exists()


def test_a_checkpoint_placed_by_hand_is_used(world):
    world.weights.mkdir(parents=True)
    world.ckpt.write_bytes(world.checkpoint)
    world.remove_tool("curl", "wget")
    assert world.run().returncode == 0
    assert world.ckpt.read_bytes() == world.checkpoint


def test_the_checksum_is_checked_when_given(world):
    proc = world.run(MIOU_CKPT_SHA256="0" * 64)
    assert proc.returncode == 1
    assert f"has SHA-256 {world.release_sha256}, not MIOU_CKPT_SHA256=" in proc.stderr
    assert not world.ckpt.exists() and not world.ckpt.with_name(world.ckpt.name + ".part").exists()
    assert world.run(MIOU_CKPT_SHA256=world.release_sha256.upper()).returncode == 0
    assert world.ckpt.read_bytes() == world.checkpoint


@pytest.mark.parametrize(("content", "message"), [
    ({"README.txt": b"no weights here"}, "holds no single checkpoint (.pth) but README.txt"),
    ({f"{MODEL}.pth": b"not a checkpoint"}, "is not a loadable checkpoint"),
    ({f"{MODEL}.pth": _zipped({"weights.bin": b"x"})}, "is not a torch checkpoint (no data.pkl inside)"),
])
def test_a_release_without_a_loadable_checkpoint_is_refused(world, content, message):
    with zipfile.ZipFile(world.home / "release.zip", "w") as z:
        for name, data in content.items():
            z.writestr(name, data)
    proc = world.run()
    assert proc.returncode == 1
    assert len(_errors(proc)) == 1 and message in _errors(proc)[0]
    assert f"the download was deleted; nothing was written at {world.ckpt}" in proc.stderr
    assert not (world.weights / f"{MODEL}.zip").exists()  # a bad download is not kept under its final name
    assert not world.ckpt.exists() and not world.ckpt.with_name(world.ckpt.name + ".part").exists()


def test_a_damaged_checkpoint_fails_its_crc_check(world):
    data = bytearray(world.checkpoint)
    at = data.index(b"\x80\x02}q")  # the stored (uncompressed) data.pkl: flip a byte, keep the zip's layout
    data[at + 1] ^= 0xFF
    with zipfile.ZipFile(world.home / "release.zip", "w") as z:
        z.writestr(f"{MODEL}.pth", bytes(data))
    proc = world.run()
    assert proc.returncode == 1
    assert "fails its CRC check" in proc.stderr
    assert not world.ckpt.exists()


def test_a_failed_conda_create_leaves_no_environment(world):
    proc = world.run(FAKE_CONDA_FAIL="1")
    assert proc.returncode == 1
    assert "could not create" in _errors(proc)[0] and "nothing is left there" in _errors(proc)[0]
    assert not world.prefix.exists()
    assert "CondaHTTPError" in proc.stderr  # conda's own message is shown, not swallowed


def test_a_failed_pip_install_is_an_error_and_is_retried(world):
    proc = world.run(FAKE_PIP_FAIL="1")
    assert proc.returncode == 1
    assert "pip could not install the pinned packages" in _errors(proc)[0]
    assert MMCV_INDEX in _errors(proc)[0]
    assert "No matching distribution" in proc.stderr
    proc = world.run()
    assert proc.returncode == 0
    assert not _starting(world.calls(), "conda create") and _starting(world.calls(), "python -m pip install")


def test_a_failed_fetch_of_vit_adapter_leaves_no_folder(world):
    proc = world.run(FAKE_GIT_FAIL="1")
    assert proc.returncode == 1
    assert f"could not fetch https://github.com/czczup/ViT-Adapter.git at {COMMIT}" in _errors(proc)[0]
    assert not world.vit.exists() and not Path(f"{world.vit}.part").exists()


def test_no_gpu_stops_before_the_op_and_keeps_the_other_steps(world):
    proc = world.run(FAKE_NO_CUDA="1")
    assert proc.returncode == 1
    assert "torch sees no CUDA GPU here" in _errors(proc)[0] and "run setup_miou.sh on a GPU machine" in proc.stderr
    assert world.ckpt.exists() and (world.vit / ".git").exists()
    assert not _starting(world.calls(), "python setup.py")
    proc = world.run()
    assert proc.returncode == 0
    calls = world.calls()
    assert _starting(calls, "python setup.py build install")
    assert not _starting(calls, "conda create") and not _starting(calls, "curl")


def test_a_failed_op_build_and_a_failed_self_check_are_errors(world):
    proc = world.run(FAKE_BUILD_FAIL="1")
    assert proc.returncode == 1 and "compiling the op failed" in _errors(proc)[0]
    proc = world.run(FAKE_SELFCHECK_RC="3")
    assert proc.returncode == 1 and "the self-check failed" in _errors(proc)[0]


def test_a_prefix_that_is_not_python_3_7_is_left_alone(world):
    assert world.run().returncode == 0
    before = world.tree()
    proc = world.run(FAKE_PY_VERSION="3.9")
    assert proc.returncode == 1
    assert f"{world.prefix}/bin/python is Python 3.9, not 3.7" in _errors(proc)[0]
    assert world.tree() == before


def test_vit_adapter_at_another_commit_is_left_alone(world):
    assert world.run().returncode == 0
    (world.vit / ".git" / "HEAD").write_text("0123456789abcdef0123456789abcdef01234567\n")
    before = world.tree()
    proc = world.run()
    assert proc.returncode == 1
    assert f"is not ViT-Adapter at commit {COMMIT}" in _errors(proc)[0]
    assert world.tree() == before


def test_locations_from_environment_variables(world):
    env = {"MIOU_ENV": str(world.tmp / "e"), "MIOU_VIT_ADAPTER": str(world.tmp / "v"),
           "MIOU_WEIGHTS": str(world.tmp / "w")}
    full_env = {"PATH": f"{world.bin}:{world.system}", "HOME": str(world.home), "FAKE_LOG": str(world.log),
                "FAKE_HOME": str(world.home), "REAL_PYTHON": sys.executable, **env}
    proc = subprocess.run([str(SETUP)], env=full_env, capture_output=True, check=False, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (world.tmp / "e" / "bin" / "python").exists()
    assert (world.tmp / "v" / ".git" / "HEAD").read_text().strip() == COMMIT
    assert (world.tmp / "w" / f"{MODEL}.pth").exists()


def test_default_locations_are_beside_the_script_and_it_prints_eval_py_s_command(world):
    repo = world.tmp / "repo"
    (repo / "miou").mkdir(parents=True)
    shutil.copy(SETUP, repo / "setup_miou.sh")
    shutil.copy(SEGMENT, repo / "miou" / "segment.py")
    full_env = {"PATH": f"{world.bin}:{world.system}", "HOME": str(world.home), "FAKE_LOG": str(world.log),
                "FAKE_HOME": str(world.home), "REAL_PYTHON": sys.executable}
    proc = subprocess.run(["bash", "setup_miou.sh"], env=full_env, capture_output=True, check=False, text=True,
                          timeout=60, cwd=repo)
    assert proc.returncode == 0, proc.stderr
    assert (repo / "miou" / "env" / "bin" / "python").exists()
    assert (repo / "miou" / "ViT-Adapter" / ".git" / "HEAD").read_text().strip() == COMMIT
    assert (repo / "miou" / "weights" / f"{MODEL}.pth").read_bytes() == world.checkpoint
    assert f"{repo}/miou/env/bin/python {repo}/miou/segment.py --device DEVICE IN_DIR OUT_DIR" in proc.stdout
    assert "miou.segmenter" not in proc.stdout


def test_a_bad_zip_placed_by_hand_is_left_as_it_is(world):
    world.weights.mkdir(parents=True)
    (world.weights / f"{MODEL}.zip").write_bytes(_zipped({"README.txt": b"no weights"}))
    proc = world.run()
    assert proc.returncode == 1
    assert len(_errors(proc)) == 1 and "holds no single checkpoint (.pth) but README.txt" in _errors(proc)[0]
    assert f"{world.weights}/{MODEL}.zip is left as it is; nothing was written" in proc.stderr
    assert (world.weights / f"{MODEL}.zip").exists() and not world.ckpt.exists()
    assert not _starting(world.calls(), "curl")


def test_help_and_bad_arguments(world):
    proc = world.run("--help")
    assert proc.returncode == 0 and "--check" in proc.stdout and "MIOU_ENV" in proc.stdout
    proc = world.run("--frobnicate")
    assert proc.returncode == 2 and "unknown argument --frobnicate" in proc.stderr
    full_env = {"PATH": f"{world.bin}:{world.system}"}
    proc = subprocess.run([str(SETUP), "--prefix"], env=full_env, capture_output=True, check=False, text=True, timeout=60)
    assert proc.returncode == 2 and "--prefix needs a folder" in proc.stderr
    assert world.calls() == [] and not (world.tmp / "out").exists()


def test_the_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SETUP)], check=True)
    assert os.access(SETUP, os.X_OK)


# ---------------------------------------------------------------------------------------------------------------
# miou/segment.py
# ---------------------------------------------------------------------------------------------------------------

FAKE_TORCH = """
import os
__version__ = "1.9.0-fake"
class version:
    cuda = "11.1"
class cuda:
    @staticmethod
    def is_available():
        return os.environ.get("FAKE_CUDA") == "1"
"""

FAKE_MMCV_RUNNER = """
import json
def load_checkpoint(model, filename, map_location=None, strict=False, logger=None, revise_keys=()):
    with open(filename) as f:
        content = json.load(f)
    if content.get("missing"):
        msg = ("The model and loaded state dict do not match exactly\\n\\n"
               "missing keys in source state_dict: " + ", ".join(content["missing"]) + "\\n")
        logger.warning(msg)
    if content.get("unexpected"):
        logger.warning("The model and loaded state dict do not match exactly\\n\\n"
                       "unexpected key in source state_dict: " + ", ".join(content["unexpected"]) + "\\n")
    model.loaded = (filename, map_location)
    return content
"""

# The fake model: label = (R + 2 G + 3 B) % 200 - 5 per pixel, so some values fall outside 0..170.
FAKE_MMSEG_APIS = """
import os
import numpy as np
from PIL import Image
REGISTERED = False

class _Head:
    num_classes = 171

class _Model:
    decode_head = _Head()
    def __init__(self, config, device):
        self.config, self.device, self.loaded, self.evaluated = config, device, None, False
    def eval(self):
        self.evaluated = True
        return self

def init_segmentor(config, checkpoint=None, device="cuda:0"):
    if checkpoint is not None:
        raise AssertionError("segment.py loads the checkpoint itself")
    return _Model(config, device)

def inference_segmentor(model, img):
    if not REGISTERED:
        raise KeyError("BEiTAdapter is not in the backbone registry")
    if model.loaded is None or not model.evaluated:
        raise AssertionError("inference before the checkpoint was loaded or eval() was called")
    name = os.path.basename(img)
    if "fail" in name:
        raise RuntimeError("CUDA out of memory.\\nmore lines")
    rgb = np.asarray(Image.open(img).convert("RGB")).astype(np.int64)
    labels = (rgb[..., 0] + 2 * rgb[..., 1] + 3 * rgb[..., 2]) % 200 - 5
    if "wrongsize" in name:
        labels = labels[:-1]
    return [labels]
"""

REGISTER = "import mmseg.apis\nmmseg.apis.REGISTERED = True\n"


def _expected(image: Image.Image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB")).astype(np.int64)
    v = (rgb[..., 0] + 2 * rgb[..., 1] + 3 * rgb[..., 2]) % 200 - 5
    out = np.full(v.shape, 255, dtype=np.uint8)
    ok = (v >= 0) & (v <= 170)
    out[ok] = v[ok]
    return out


class Fakes:
    """Fake torch/mmcv/mmseg packages, a fake ViT-Adapter folder and checkpoint; ``run`` calls segment.py."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.packages = tmp / "packages"
        files = {"torch/__init__.py": FAKE_TORCH, "mmcv/__init__.py": "__version__ = '1.4.2-fake'\n",
                 "mmcv/runner.py": FAKE_MMCV_RUNNER, "mmseg/__init__.py": "__version__ = '0.20.2-fake'\n",
                 "mmseg/apis.py": FAKE_MMSEG_APIS}
        for name, text in files.items():
            self.write(self.packages / name, text)
        self.vit = tmp / "ViT-Adapter"
        self.write(self.vit / "segmentation" / "mmseg_custom" / "__init__.py", REGISTER)
        self.write(self.vit / "segmentation" / "mmcv_custom" / "__init__.py", "")
        (self.vit / "detection" / "ops").mkdir(parents=True)
        (self.vit / "segmentation" / "ops").symlink_to("../detection/ops")
        self.write(self.vit / "segmentation" / "configs" / "coco_stuff164k" / f"{MODEL}_ss.py", "model = dict()\n")
        self.ckpt = tmp / "weights" / f"{MODEL}.pth"
        self.write(self.ckpt, json.dumps({"state_dict": "fake"}))

    @staticmethod
    def write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def env(self, **extra: str) -> dict[str, str]:
        path = [str(self.packages), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIOU_")}
        return {**env, "PYTHONPATH": os.pathsep.join(path), **extra}

    def run(self, *args: str, python: str = sys.executable, model_args: bool = True,
            **extra: str) -> subprocess.CompletedProcess:
        flags = ["--vit-adapter", str(self.vit), "--checkpoint", str(self.ckpt)] if model_args else []
        return subprocess.run([python, str(SEGMENT), *args, *flags], env=self.env(**extra), capture_output=True, check=False,
                              text=True, timeout=60)


@pytest.fixture
def fakes(tmp_path):
    return Fakes(tmp_path)


def _images(folder: Path, seed: int = 0) -> dict[str, Image.Image]:
    """Images of unequal, non-512 sizes and several modes, written as PNGs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = {
        "a.png": Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)),
        "b.png": Image.fromarray(rng.integers(0, 256, (64, 29), dtype=np.uint8), mode="L"),
        "c.png": Image.fromarray(rng.integers(0, 256, (11, 700, 4), dtype=np.uint8), mode="RGBA"),
    }
    for name, image in images.items():
        image.save(folder / name)
    return images


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("segment.py: error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("segment.py: error: ")
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_every_png_gets_a_same_size_8_bit_label_map(fakes, tmp_path):
    images = _images(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "d.jpg").write_bytes(b"")
    out = tmp_path / "deep" / "out"
    proc = fakes.run(str(tmp_path / "in"), str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(images)  # no other file, no temporary one
    for name, image in images.items():
        with Image.open(out / name) as label:
            assert label.mode == "L"
            assert label.size == image.size
            np.testing.assert_array_equal(np.asarray(label), _expected(image))
    values = np.concatenate([np.asarray(Image.open(out / n)).ravel() for n in images])
    assert (values == 255).any() and (values == 0).any() and values[values != 255].max() <= 170


def test_paths_default_from_environment_variables(fakes, tmp_path):
    images = _images(tmp_path / "in")
    proc = fakes.run(str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cpu", model_args=False,
                     MIOU_VIT_ADAPTER=str(fakes.vit), MIOU_WEIGHTS=str(fakes.ckpt.parent))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(images)


def test_without_paths_it_looks_beside_itself_and_names_setup_miou(fakes, tmp_path):
    if (ROOT / "miou" / "ViT-Adapter" / "segmentation" / "mmseg_custom").is_dir():
        pytest.skip("a real ViT-Adapter is installed beside segment.py")
    _images(tmp_path / "in")
    proc = fakes.run(str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cpu", model_args=False)
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert str(ROOT / "miou" / "ViT-Adapter") in line and "./setup_miou.sh" in line


def test_cuda_is_checked_when_asked_for(fakes, tmp_path):
    _images(tmp_path / "in")
    proc = fakes.run(str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cuda:0")
    assert proc.returncode == 1
    assert "--device cuda:0: CUDA is not available to torch 1.9.0-fake" in _one_error_line(proc)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    proc = fakes.run(str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cuda", FAKE_CUDA="1")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("case", "message"), [
    ("missing", "input folder {tmp}/in does not exist"),
    ("empty", "no .png image in {tmp}/in"),
    ("same", "OUT_DIR is IN_DIR"),
    ("no_checkpoint", "checkpoint {tmp}/weights/" + MODEL + ".pth not found (or empty): run ./setup_miou.sh"),
    ("no_ops", "{tmp}/ViT-Adapter/segmentation/ops is missing"),
    ("no_config", "config {tmp}/ViT-Adapter/segmentation/configs/coco_stuff164k/" + MODEL + "_ss.py not found"),
])
def test_bad_inputs_are_one_line_errors(fakes, tmp_path, case, message):
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    if case == "empty":
        in_dir.mkdir()
        (in_dir / "x.jpg").write_bytes(b"")
    elif case != "missing":
        _images(in_dir)
    if case == "same":
        out_dir = in_dir
    if case == "no_checkpoint":
        fakes.ckpt.write_text("")
    if case == "no_ops":
        (fakes.vit / "segmentation" / "ops").unlink()
    if case == "no_config":
        (fakes.vit / "segmentation" / "configs" / "coco_stuff164k" / f"{MODEL}_ss.py").unlink()
    proc = fakes.run(str(in_dir), str(out_dir), "--device", "cpu")
    assert proc.returncode == 1
    assert message.format(tmp=tmp_path) in _one_error_line(proc)
    if case == "same":
        assert sorted(p.name for p in in_dir.iterdir()) == ["a.png", "b.png", "c.png"]


@pytest.mark.parametrize(("module", "file", "text"), [
    ("mmseg", "packages/mmseg/__init__.py", "raise ImportError('libcudart.so.11.0: cannot open shared object')\n"),
    ("mmcv.runner", "packages/mmcv/runner.py", "raise AssertionError('MMCV==1.7.0 is used but incompatible')\n"),
    ("mmseg_custom", "ViT-Adapter/segmentation/mmseg_custom/__init__.py",
     "raise ModuleNotFoundError(\"No module named 'MultiScaleDeformableAttention'\")\n"),
])
def test_an_import_failure_names_the_module_and_setup_miou(fakes, tmp_path, module, file, text):
    _images(tmp_path / "in")
    (tmp_path / file).write_text(text)
    proc = fakes.run(str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cpu")
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert f"cannot import {module} (" in line and "run ./setup_miou.sh" in line


def test_no_mmseg_at_all(fakes, tmp_path):
    _images(tmp_path / "in")
    shutil.rmtree(fakes.packages / "mmseg")
    proc = fakes.run(str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cpu")
    assert proc.returncode == 1
    assert "cannot import mmseg (ModuleNotFoundError: No module named 'mmseg')" in _one_error_line(proc)


def test_a_failure_in_the_middle_leaves_only_whole_maps(fakes, tmp_path):
    images = _images(tmp_path / "in")
    images["b_fail.png"] = images.pop("b.png")
    (tmp_path / "in" / "b.png").rename(tmp_path / "in" / "b_fail.png")
    out = tmp_path / "out"
    proc = fakes.run(str(tmp_path / "in"), str(out), "--device", "cpu")
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert f"segmenting {tmp_path}/in/b_fail.png failed: RuntimeError: CUDA out of memory." in line
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # written before; no partial b, no c, no temp file
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a.png")), _expected(images["a.png"]))


def test_a_map_of_the_wrong_size_is_an_error_not_a_resized_map(fakes, tmp_path):
    _images(tmp_path / "in")
    (tmp_path / "in" / "a.png").rename(tmp_path / "in" / "a_wrongsize.png")
    proc = fakes.run(str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cpu")
    assert proc.returncode == 1
    assert "returned a map of shape (36, 53) for a 53x37 image (expected (37, 53))" in _one_error_line(proc)
    assert list((tmp_path / "out").iterdir()) == []


def test_an_existing_map_is_replaced_whole(fakes, tmp_path):
    images = _images(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"stale")
    assert fakes.run(str(tmp_path / "in"), str(out), "--device", "cpu").returncode == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a.png")), _expected(images["a.png"]))


def test_a_checkpoint_missing_model_weights_is_an_error(fakes, tmp_path):
    _images(tmp_path / "in")
    fakes.ckpt.write_text(json.dumps({"missing": ["backbone.blocks.0.attn.qkv.weight", "decode_head.query_embed"]}))
    proc = fakes.run(str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cpu")
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "lacks weights of the model" in line and "backbone.blocks.0.attn.qkv.weight" in line
    fakes.ckpt.write_text(json.dumps({"unexpected": ["optimizer.state"]}))  # extra keys: a warning only
    proc = fakes.run(str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "unexpected key in source state_dict: optimizer.state" in proc.stderr


def test_self_check(fakes):
    proc = fakes.run("--self-check", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "self-check passed" in proc.stdout
    assert "mmseg 0.20.2-fake" in proc.stdout
    (fakes.vit / "segmentation" / "mmseg_custom" / "__init__.py").write_text("")  # modules no longer registered
    proc = fakes.run("--self-check", "--device", "cpu")
    assert proc.returncode == 1
    assert "BEiTAdapter is not in the backbone registry" in _one_error_line(proc)


def test_help_and_usage_errors_need_no_mmseg(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(SEGMENT), "--help"], env=env, capture_output=True, check=False, text=True)
    assert proc.returncode == 0 and "IN_DIR" in proc.stdout and "--self-check" in proc.stdout
    for args, message in ((["in"], "IN_DIR and OUT_DIR are required"),
                          (["a", "b", "--device", "gpu"], "--device must be cpu, cuda or cuda:N"),
                          (["a", "b", "--self-check"], "--self-check takes no IN_DIR OUT_DIR")):
        proc = subprocess.run([sys.executable, str(SEGMENT), *args], env=env, capture_output=True, check=False, text=True)
        assert proc.returncode == 2 and message in proc.stderr


def test_segment_py_is_python_3_7():
    source = SEGMENT.read_text()
    tree = ast.parse(source, feature_version=(3, 7))
    for node in ast.walk(tree):  # what feature_version does not refuse by itself
        assert not isinstance(node, ast.NamedExpr)
        if isinstance(node, ast.FunctionDef):
            assert not node.args.posonlyargs
    assert not re.search(r"\{[A-Za-z_][\w.\[\]()]*\s*=\s*(![rsa])?(:[^}]*)?\}", source)  # f"{x=}" (3.8)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    top = {alias.name.split(".")[0] for n in imports for alias in n.names} | {
        n.module.split(".")[0] for n in imports if isinstance(n, ast.ImportFrom) and n.module}
    assert not top & {"torch", "mmcv", "mmseg", "numpy", "PIL", "mmseg_custom", "mmcv_custom"}


def _python_3_7() -> str | None:
    """A Python 3.7 with numpy and Pillow: $DYNADIFF_PY37, else python3.7 on PATH."""
    candidate = os.environ.get("DYNADIFF_PY37") or shutil.which("python3.7")
    if not candidate:
        return None
    probe = subprocess.run([candidate, "-c", "import sys, numpy, PIL; assert sys.version_info[:2] == (3, 7)"],
                           capture_output=True, check=False)
    return candidate if probe.returncode == 0 else None


def test_runs_under_python_3_7(fakes, tmp_path):
    python = _python_3_7()
    if python is None:
        pytest.skip("no Python 3.7 with numpy and Pillow (set DYNADIFF_PY37 to one)")
    images = _images(tmp_path / "in")
    proc = fakes.run(str(tmp_path / "in"), str(tmp_path / "out"), "--device", "cpu", python=python)
    assert proc.returncode == 0, proc.stderr
    for name, image in images.items():
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / name)), _expected(image))
    assert fakes.run("--self-check", "--device", "cpu", python=python).returncode == 0
