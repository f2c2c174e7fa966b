"""prepare_data.py end to end: download from a local S3 server, synthetic mode, usage errors."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from dynadiff.data import nsd
from scripts import load_script

REPO = Path(__file__).resolve().parents[2]


prepare_data = load_script("prepare_data")


def _bucket_objects(root: Path) -> dict[str, Path]:
    """The synthetic mini-NSD's raw files under their NSD bucket keys."""
    special = {nsd.EXPDESIGN_FILE: nsd.EXPDESIGN_KEY, nsd.STIMULI_FILE: nsd.STIMULI_KEY}
    objects = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel.startswith(("nsddata/", "nsddata_timeseries/")):
            objects[rel] = p
        elif rel in special:
            objects[special[rel]] = p
    return objects


def _assert_pngs_match_brick(root: Path, brick: Path, rows) -> None:
    with h5py.File(brick) as f:
        for k in rows:
            png = np.asarray(Image.open(root / nsd.STIMULI_PNG_DIR / f"{k}.png"))
            np.testing.assert_array_equal(png, f["imgBrick"][k])


def test_download_and_prepare_the_synthetic_nsd(synthetic_nsd, s3_make_bucket, s3_server, tmp_path, caplog):
    src, info = synthetic_nsd
    bucket = s3_make_bucket(_bucket_objects(src))
    root = tmp_path / "nsddata"
    sessions = [str(s) for s in info["sessions"][1]]
    with caplog.at_level(logging.INFO):
        code = prepare_data.main([
            "--nsd_bucket", f"s3://{bucket}", "--path", str(root), "--subjects", "1", "--sessions", *sessions,
            "--aws_args", f"--endpoint-url={s3_server}",  # one word starting with '--', as the original CLI took it
            "--workers", "2", "--images", "test",
        ])
    assert code == 0, caplog.text

    runs = nsd.list_runs(1, info["sessions"][1])
    for run in runs:
        for path in (run.timeseries_path, run.design_path):
            assert path(root).read_bytes() == path(src).read_bytes()
    assert nsd.roi_path(root, 1).read_bytes() == nsd.roi_path(src, 1).read_bytes()
    for name in (nsd.EXPDESIGN_FILE, nsd.STIMULI_FILE):
        assert (root / name).read_bytes() == (src / name).read_bytes()
    rest = nsd.Run(1, 21, 1).timeseries_path(src)  # the synthetic data has the rest runs; they are not needed
    assert rest.exists() and not nsd.Run(1, 21, 1).timeseries_path(root).exists()

    sharedix = loadmat(src / nsd.EXPDESIGN_FILE)["sharedix"].ravel()
    np.testing.assert_array_equal(np.load(root / nsd.TEST_IDS_FILE), sharedix)
    pngs = {int(p.stem) for p in (root / nsd.STIMULI_PNG_DIR).glob("*.png")}
    assert pngs == set((sharedix - 1).tolist())
    _assert_pngs_match_brick(root, root / nsd.STIMULI_FILE, sorted(pngs))
    assert "downloaded " in caplog.text and "skipped 0 already complete" in caplog.text


def test_synthetic_mode_writes_and_prepares(synthetic_nsd, tmp_path):
    src, info = synthetic_nsd
    root = tmp_path / "mini"
    assert prepare_data.main(["--synthetic", "--path", str(root), "--subjects", "1", "--seed", "0",
                              "--images", "test", "--workers", "1"]) == 0
    # Same seed, same data as the shared fixture (which used seed 0).
    a, b = loadmat(root / nsd.EXPDESIGN_FILE), loadmat(src / nsd.EXPDESIGN_FILE)
    for name in ("sharedix", "subjectim", "masterordering"):
        np.testing.assert_array_equal(a[name], b[name])
    for run in nsd.list_runs(1, info["sessions"][1])[:2]:
        assert run.design_path(root).read_text() == run.design_path(src).read_text()
    np.testing.assert_array_equal(np.load(root / nsd.TEST_IDS_FILE), info["test_ids"])
    rows = sorted(k - 1 for k in info["test_ids"])
    assert sorted(int(p.stem) for p in (root / nsd.STIMULI_PNG_DIR).glob("*.png")) == rows
    _assert_pngs_match_brick(root, root / nsd.STIMULI_FILE, rows)


def test_skip_download_prepares_and_download_only_does_not(synthetic_nsd, s3_make_bucket, s3_server, tmp_path):
    src, info = synthetic_nsd
    bucket = s3_make_bucket(_bucket_objects(src))
    root = tmp_path / "nsddata"
    common = ["--path", str(root), "--subjects", "1", "--workers", "2"]
    assert prepare_data.main(["--nsd_bucket", f"s3://{bucket}", "--sessions", "1",
                              "--aws_args", f"--endpoint-url {s3_server}", "--download-only", *common]) == 0
    assert (root / nsd.STIMULI_FILE).exists()
    assert not (root / nsd.STIMULI_PNG_DIR).exists() and not (root / nsd.TEST_IDS_FILE).exists()
    assert not nsd.Run(1, 21, 2).timeseries_path(root).exists()  # --sessions 1 only

    assert prepare_data.main(["--skip-download", "--images", "test", *common]) == 0
    expected = {k - 1 for k in info["test_ids"]}
    assert {int(p.stem) for p in (root / nsd.STIMULI_PNG_DIR).glob("*.png")} == expected
    np.testing.assert_array_equal(np.load(root / nsd.TEST_IDS_FILE), info["test_ids"])


@pytest.mark.parametrize("argv, message", [
    ([], "--nsd_bucket is required"),
    (["--nsd_bucket", "natural-scenes-dataset"], "should look like s3://bucket"),
    (["--nsd_bucket", "s3://b", "--aws_args", "--request-payer requester"], "unsupported option '--request-payer'"),
    (["--nsd_bucket", "s3://b", "--aws_args=--profile"], "--profile in --aws_args needs a value"),
    (["--synthetic", "--nsd_bucket", "s3://b"], "--synthetic writes the data itself"),
    (["--skip-download", "--download-only"], "not allowed with argument"),
    (["--skip-download", "--subjects", "3"], "invalid choice: 3"),
    (["--skip-download", "--workers", "0"], "--workers must be >= 1"),
    (["--skip-download", "--images", "some"], "invalid choice: 'some'"),
    (["--nsd_bucket", "s3://b", "--sessions", "41"], "--sessions must be in 1..40"),
    (["--nsd_bucket", "s3://b", "--max-bandwidth", "0"], "--max-bandwidth must be a positive number"),
    (["--nsd_bucket", "s3://b", "--max-bandwidth", "nan"], "--max-bandwidth must be a positive number"),
    (["--nsd_bucket", "s3://b", "--max-bandwidth", "inf"], "--max-bandwidth must be a positive number"),
    (["--nsd_bucket", "s3://b", "--sessions", "0"], "--sessions must be in 1..40, got [0]"),
    (["--nsd_bucket", "s3://natural scenes"], "'natural scenes' is not a bucket name"),
    (["--nsd_bucket", "s3://nsd!/x"], "'nsd!' is not a bucket name"),
    (["--synthetic", "--seed", "-1"], "--seed must be >= 0, got -1"),
])
def test_bad_usage_exits_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        prepare_data.main([*argv, "--path", str(tmp_path / "nsd")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "nsd").exists()


def test_runtime_error_exits_1_with_a_clear_message(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        assert prepare_data.main(["--skip-download", "--path", str(tmp_path)]) == 1
    assert "nsd_expdesign.mat is missing" in caplog.text


def test_missing_objects_exit_1(s3_make_bucket, s3_server, tmp_path, caplog):
    bucket = s3_make_bucket({"unrelated/file.txt": b"x"})
    with caplog.at_level(logging.ERROR):
        code = prepare_data.main(["--nsd_bucket", f"s3://{bucket}", "--path", str(tmp_path / "nsd"), "--subjects", "2",
                                  "--sessions", "3", "--aws_args", f"--endpoint-url {s3_server}"])
    assert code == 1
    # 2 root files + 12 runs x 2 + the roi/ folder, all named (the first 20) or counted
    assert "27 object(s) missing" in caplog.text and "... and 7 more" in caplog.text
    assert f"s3://{bucket}/nsddata/experiments/nsd/nsd_expdesign.mat" in caplog.text
    assert "subj02/func1pt8mm/design/design_session03_run01.tsv" in caplog.text


def test_help_runs_as_a_script():
    proc = subprocess.run([sys.executable, str(REPO / "prepare_data.py"), "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0
    for flag in ("--nsd_bucket", "--path", "--aws_args", "--subjects", "--workers", "--images", "--skip-download",
                 "--synthetic", "--seed"):
        assert flag in proc.stdout


def test_aws_args_value_starting_with_dashes_is_joined():
    assert prepare_data._join_aws_args(["--aws_args", "--no-sign-request", "--path", "x"]) == [
        "--aws_args=--no-sign-request", "--path", "x"]
    assert prepare_data._join_aws_args(["--aws_args=--profile p"]) == ["--aws_args=--profile p"]
