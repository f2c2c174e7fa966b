"""prepare_data.py and the data loading on a bad --path or a damaged file: one error line, exit status 1 or 2,
nothing written or destroyed.

Folders that the current user cannot write to are real only when the tests do not run as root (root writes
anywhere); the same checks also run with ``os.access`` answering "no", which is what the code asks.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dynadiff import jobs
from dynadiff.data import nsd
from dynadiff.data import synthetic as synthetic_mod
from dynadiff.data.dataset import compute_run_windows, list_trials
from dynadiff.data.download import download_nsd, parse_bucket_url
from dynadiff.data.nsd import NsdDataError
from dynadiff.data.synthetic import write_synthetic_nsd
from scripts import load_script

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(sessions=(1,), n_unique=8, n_test=4)  # a synthetic mini-NSD written in about a second
AS_ROOT = os.geteuid() == 0

prepare_data = load_script("prepare_data")


@pytest.fixture(scope="module")
def small_nsd(tmp_path_factory) -> Path:
    """A small synthetic mini-NSD of subject 1, session 1, with its test ids (read-only: copy it to modify)."""
    from dynadiff.data.stimuli import write_test_ids

    root = tmp_path_factory.mktemp("bad_paths") / "nsd"
    write_synthetic_nsd(root, subjects=(1,), seed=3, **SMALL)
    write_test_ids(root)  # what the windows need (no PNG)
    return root


@pytest.fixture
def small_synthetic(monkeypatch):
    """prepare_data.py --synthetic writes the small mini-NSD (its defaults take ~10 s)."""
    write = synthetic_mod.write_synthetic_nsd
    monkeypatch.setattr(synthetic_mod, "write_synthetic_nsd", lambda root, **kw: write(root, **SMALL, **kw))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _other_data(root: Path) -> dict[str, bytes]:
    """A folder holding (fake) real NSD files; its content."""
    (root / "nsddata_timeseries").mkdir(parents=True)
    (root / nsd.EXPDESIGN_FILE).write_bytes(b"real expdesign")
    (root / "nsddata_timeseries" / "run.nii.gz").write_bytes(b"real run")
    (root / "notes.txt").write_text("mine")
    return _snapshot(root)


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _no_access(monkeypatch, path: Path) -> None:
    """``os.access`` says ``path`` cannot be written to, as it would for a non-root user on a 0o500 folder."""
    real = os.access
    monkeypatch.setattr(nsd.os, "access", lambda p, mode, **kw: Path(p) != path and real(p, mode, **kw))


# ----------------------------------------------------------------------------- --synthetic


def test_synthetic_refuses_a_folder_with_other_data(tmp_path, caplog, small_synthetic):
    root = tmp_path / "nsddata"
    before = _other_data(root)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO):
        code = prepare_data.main(["--synthetic", "--path", str(root), "--windows", "test", "--cache", str(cache)])
    assert code == 1
    assert _errors(caplog) == [
        f"--path: {root} holds 3 entries such as notes.txt, nsd_expdesign.mat, nsddata_timeseries, not written by "
        "--synthetic (no .dynadiff-synthetic file): refusing to write the synthetic mini-NSD over them; choose an "
        "empty or new folder"
    ]
    assert _snapshot(root) == before and sorted(p.name for p in root.iterdir()) == [
        "notes.txt", "nsd_expdesign.mat", "nsddata_timeseries"]
    assert not cache.exists()  # checked before anything is written
    with pytest.raises(NsdDataError, match=r"holds 1 entry such as x\.txt, not written by --synthetic"):
        (tmp_path / "one").mkdir()
        (tmp_path / "one" / "x.txt").write_text("x")
        write_synthetic_nsd(tmp_path / "one", **SMALL)


def test_synthetic_rewrite_deletes_the_previous_data_first(tmp_path):
    small = dict(SMALL, runs_per_session=2)  # no windows here: 2 runs are enough
    root = tmp_path / "mini"
    write_synthetic_nsd(root, subjects=(1, 2), seed=3, **small)
    (root / nsd.STIMULI_PNG_DIR).mkdir()
    (root / nsd.STIMULI_PNG_DIR / "0.png").write_bytes(b"a PNG of the old brick")
    (root / nsd.TEST_IDS_FILE).write_bytes(b"old ids")
    (root / "cache").mkdir()  # e.g. --cache inside: windows of the old data
    assert nsd.roi_path(root, 2).exists()

    info = write_synthetic_nsd(root, subjects=(1,), seed=4, **small)
    fresh = tmp_path / "fresh"
    write_synthetic_nsd(fresh, subjects=(1,), seed=4, **small)
    assert info["subjects"] == [1] and info["seed"] == 4
    new, expected = _snapshot(root), _snapshot(fresh)
    assert sorted(new) == sorted(expected)  # nothing of the old data: no subject 2, no PNG, no test ids
    assert all(new[name] == expected[name] for name in new if name not in (nsd.SYNTHETIC_SUMMARY, nsd.EXPDESIGN_FILE))
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in fresh.iterdir())  # no empty folder left
    assert (root / nsd.SYNTHETIC_MARKER).read_text().startswith("A synthetic mini-NSD written by ")


def test_synthetic_rewrite_recomputes_the_cached_windows(tmp_path, small_synthetic):
    """Windows cached for the old data of the same path are replaced, not reported as cached."""
    from dynadiff.data.stimuli import write_test_ids

    root, cache = tmp_path / "mini", tmp_path / "cache"
    args = prepare_data.build_parser().parse_args(["--skip-download", "--path", str(root), "--cache", str(cache)])
    write_synthetic_nsd(root, subjects=(1,), seed=3, **SMALL)
    write_test_ids(root)
    cfg = prepare_data.windows_config(args, 1, "test", [1])  # eval.py's (cached mode)
    old = list(cfg.run_windows(list_trials(cfg)[0]))  # the old data's windows, cached

    assert prepare_data.main(["--synthetic", "--path", str(root), "--seed", "4", "--windows", "test", "--cache",
                              str(cache), "--workers", "1", "--images", "test"]) == 0
    cfg = prepare_data.windows_config(args, 1, "test", [1])  # a new object, as in a new eval.py process (an
    items = list_trials(cfg)[0]  # exca infra keeps an index of what it read in memory)
    assert not jobs.missing_items(cfg.infra, items)
    cached, fresh = list(cfg.run_windows(items)), list(compute_run_windows(cfg, items))
    assert len(cached) == len(fresh) and (old[0].shape != fresh[0].shape or not np.array_equal(old[0], fresh[0]))
    for a, b in zip(cached, fresh):
        np.testing.assert_array_equal(a, b)


def test_synthetic_into_a_file_or_under_one(tmp_path, caplog):
    path = tmp_path / "data.bin"
    path.write_bytes(b"keep me")
    with caplog.at_level(logging.ERROR):
        assert prepare_data.main(["--synthetic", "--path", str(path)]) == 1
        assert prepare_data.main(["--synthetic", "--path", str(path / "sub")]) == 1
    assert _errors(caplog) == [
        f"--path: {path} is a file, not a folder: write the synthetic mini-NSD into an empty or new folder",
        f"--path: cannot create {path / 'sub'}: {path} is a file, not a folder",
    ]
    assert path.read_bytes() == b"keep me"


def test_synthetic_into_a_folder_that_cannot_be_written(tmp_path, caplog, monkeypatch):
    root = tmp_path / "ro"
    root.mkdir()
    _no_access(monkeypatch, root)
    with caplog.at_level(logging.ERROR):
        assert prepare_data.main(["--synthetic", "--path", str(root)]) == 1
        assert prepare_data.main(["--synthetic", "--path", str(root / "new")]) == 1
    assert _errors(caplog) == [
        f"--path: cannot write into {root} (permission denied, or a read-only file system): choose a folder you can "
        "write to",
        f"--path: cannot create {root / 'new'}: cannot write into {root} (permission denied, or a read-only file "
        "system): choose a folder you can write to",
    ]
    assert list(root.iterdir()) == []


@pytest.mark.skipif(AS_ROOT, reason="root writes into a 0o500 folder: the permission cannot fail")
def test_synthetic_into_a_read_only_folder_for_real(tmp_path, caplog):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        with caplog.at_level(logging.ERROR):
            assert prepare_data.main(["--synthetic", "--path", str(root)]) == 1
        assert f"cannot write into {root} (permission denied" in caplog.text
        assert list(root.iterdir()) == []
    finally:
        root.chmod(0o700)


def test_a_failed_synthetic_write_is_one_error_and_can_be_rewritten(tmp_path, monkeypatch):
    root = tmp_path / "mini"

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(synthetic_mod, "_write_brick", full_disk)
    with pytest.raises(NsdDataError, match=rf"^cannot write the synthetic mini-NSD into {re.escape(str(root))}: "
                                           r"\[Errno 28\] No space"):
        write_synthetic_nsd(root, **SMALL)
    assert nsd.is_synthetic(root) and not (root / nsd.SYNTHETIC_SUMMARY).exists()  # marked, unfinished
    monkeypatch.undo()
    assert write_synthetic_nsd(root, **SMALL)["subjects"] == [1]  # the marker lets the next write replace it


# ----------------------------------------------------------------------------- --skip-download, download


def test_skip_download_on_a_file_or_a_missing_folder(tmp_path, caplog):
    path = tmp_path / "nsddata"
    path.write_bytes(b"x")
    missing = tmp_path / "nowhere"
    with caplog.at_level(logging.ERROR):
        assert prepare_data.main(["--skip-download", "--path", str(path)]) == 1
        assert prepare_data.main(["--skip-download", "--path", str(missing)]) == 1
    assert _errors(caplog) == [
        f"--path: {path} is a file, not a folder: give the NSD folder (the one prepare_data.py downloads into)",
        f"--path: the NSD folder {missing} does not exist: download the data with `python prepare_data.py "
        f"--nsd_bucket s3://natural-scenes-dataset --path {missing}` (or write a synthetic mini-NSD there with "
        f"`python prepare_data.py --synthetic --path {missing}`)",
    ]
    assert not missing.exists()


def test_download_refuses_a_synthetic_folder_a_file_and_an_unwritable_folder(small_nsd, tmp_path, caplog,
                                                                            monkeypatch):
    """Checked before any request (no S3 server here: a request would fail differently)."""
    mini = tmp_path / "mini"
    shutil.copytree(small_nsd, mini)
    before = _snapshot(mini)
    path = tmp_path / "file"
    path.write_bytes(b"x")
    ro = tmp_path / "ro"
    ro.mkdir()
    _no_access(monkeypatch, ro)
    with caplog.at_level(logging.ERROR):
        for where in (mini, path, ro):
            assert prepare_data.main(["--nsd_bucket", "s3://natural-scenes-dataset", "--path", str(where)]) == 1
    assert _errors(caplog) == [
        f"--path: {mini} holds a synthetic mini-NSD (written by --synthetic): download the real NSD into another "
        f"folder, or delete {mini} first",
        f"--path: {path} is a file, not a folder",
        f"--path: cannot write into {ro} (permission denied, or a read-only file system): choose a folder you can "
        "write to",
    ]
    assert _snapshot(mini) == before and list(ro.iterdir()) == []

    class NoRequests:
        def __getattr__(self, name):
            raise AssertionError(f"a request ({name}) was made")

    with pytest.raises(NsdDataError, match="holds a synthetic mini-NSD"):
        download_nsd("s3://natural-scenes-dataset", mini, subjects=(1,), client=NoRequests())


def test_malformed_bucket_names_are_refused_before_boto():
    for url, message in [("s3://my_bucket!", "'my_bucket!' is not a bucket name"),
                         ("s3:/natural-scenes-dataset", "should look like s3://bucket"),
                         ("s3://", "should look like s3://bucket")]:
        with pytest.raises(ValueError, match=message):
            parse_bucket_url(url)
    assert parse_bucket_url("s3://natural-scenes-dataset/a/b/") == ("natural-scenes-dataset", "a/b/")


def test_cache_that_is_a_file_exits_2(small_nsd, tmp_path, caplog):
    cache = tmp_path / "cache"
    cache.write_bytes(b"x")
    with caplog.at_level(logging.ERROR):
        code = prepare_data.main(["--skip-download", "--path", str(small_nsd), "--windows", "test", "--cache",
                                  str(cache), "--sessions", "1"])
    assert code == 2
    assert _errors(caplog) == [f"--cache: {cache} is a file, not a folder"]


# ----------------------------------------------------------------------------- a truncated time series


def _test_run(root: Path) -> nsd.Run:
    """A run with test events (what --windows test reads)."""
    args = prepare_data.build_parser().parse_args(["--skip-download", "--path", str(root)])
    return list_trials(prepare_data.windows_config(args, 1, "test", [1]))[0][0].run


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _windows_test(root: Path, cache: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "prepare_data.py"), "--skip-download", "--path", str(root), "--subjects", "1",
           "--sessions", "1", "--windows", "test", "--cache", str(cache), "--workers", "1", "--images", "test"]
    return subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("synthetic", [False, True], ids=["downloaded", "synthetic"])
def test_truncated_time_series_is_one_error_line(small_nsd, tmp_path, synthetic):
    root = shutil.copytree(small_nsd, tmp_path / "nsd")
    if not synthetic:  # as a download would have left it
        (root / nsd.SYNTHETIC_MARKER).unlink()
    bad = _test_run(root).timeseries_path(root)
    _truncate(bad)
    proc = _windows_test(root, tmp_path / "cache")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if " ERROR " in line or " WARNING " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "exca" not in proc.stderr
    head = (f"ERROR prepare_data: subject 1: cannot read NIfTI file {bad}: truncated (EOFError: Compressed file ended "
            "before the end-of-stream marker was reached); ")
    fix = (f"write the synthetic mini-NSD again with `python prepare_data.py --synthetic --path {root} --subjects 1 "
           "--seed 3`" if synthetic else
           f"download it again with `python prepare_data.py --nsd_bucket s3://natural-scenes-dataset --path {root} "
           "--subjects 1 --sessions 1`: files whose size differs from the bucket's are fetched again")
    assert errors[0].endswith(head + fix), errors[0]


def test_damaged_time_series_through_the_library(small_nsd, tmp_path):
    """What eval.py and train.py reach: the windows map (exca, in this process) raises the same NsdDataError."""
    root = shutil.copytree(small_nsd, tmp_path / "nsd")
    (root / nsd.SYNTHETIC_MARKER).unlink()
    run = _test_run(root)
    bad = run.timeseries_path(root)
    args = prepare_data.build_parser().parse_args(["--skip-download", "--path", str(root), "--cache",
                                                   str(tmp_path / "cache")])
    cfg = prepare_data.windows_config(args, 1, "test", [1])
    items = [item for item in list_trials(cfg)[0] if item.run == run]
    download = re.escape(f"python prepare_data.py --nsd_bucket s3://natural-scenes-dataset --path {root} --subjects 1 "
                         "--sessions 1")
    name = re.escape(str(bad))

    good = bad.read_bytes()
    _truncate(bad)
    with pytest.raises(NsdDataError, match=rf"^cannot read NIfTI file {name}: truncated \(EOFError: .*\); download "
                                           rf"it again with `{download}`: files whose size differs"):
        list(cfg.run_windows(items))
    # same size, damaged: the download would keep it, so it must be deleted first
    bad.write_bytes(good[:400] + bytes(len(good) - 400))
    with pytest.raises(NsdDataError, match=rf"^cannot read NIfTI file {name}: damaged \(.*\); delete it, then "
                                           rf"download it again with `{download}`$"):
        list(cfg.run_windows(items))
