"""The S3 download, run for real against a local moto S3 server (tests/data/conftest.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from scripts import default_sigint

from dynadiff.data import download as dl
from dynadiff.data.download import AwsOptions, DownloadError, RemoteObject, download_nsd, parse_aws_args

REPO = Path(__file__).resolve().parents[2]


def _files_under(root: Path) -> dict[str, Path]:
    """Relative POSIX path → path, of every regular file under ``root`` (manifest excluded)."""
    return {
        p.relative_to(root).as_posix(): p
        for p in root.rglob("*")
        if p.is_file() and p.name != dl.MANIFEST_FILE
    }


def _download(root, bucket, endpoint, **kwargs):
    return download_nsd(
        f"s3://{bucket}", root, subjects=[1], sessions=[21], aws_args=f"--endpoint-url {endpoint}", **kwargs
    )


# ----------------------------------------------------------------------------- full download and resume


def test_full_download_equals_bucket_and_skips_the_rest(tmp_path, s3_server, s3_make_bucket, s3_fake_nsd):
    bucket = s3_make_bucket(s3_fake_nsd.objects)
    root = tmp_path / "nsd"
    summary = _download(root, bucket, s3_server, workers=4)

    expected = s3_fake_nsd.expected_local(root)
    files = _files_under(root)
    assert set(files) == set(expected)  # no rest run, no other session/subject/folder, no temp file
    for rel, data in expected.items():
        assert files[rel].read_bytes() == data, rel
    assert (root / "nsd_expdesign.mat").exists() and (root / "nsd_stimuli.hdf5").exists()
    assert summary.downloaded == len(expected) == 2 + 24 + 3  # root files, 12 runs x 2, whole roi/ folder
    assert summary.skipped == 0
    assert summary.bytes_downloaded == sum(len(v) for v in expected.values())

    # Second run: everything is complete, nothing is fetched or rewritten.
    before = {rel: (p.stat().st_ino, p.stat().st_mtime_ns) for rel, p in files.items()}
    again = _download(root, bucket, s3_server, workers=4)
    assert (again.downloaded, again.skipped, again.bytes_downloaded) == (0, len(expected), 0)
    assert {rel: (p.stat().st_ino, p.stat().st_mtime_ns) for rel, p in _files_under(root).items()} == before


def test_bucket_prefix_is_honoured(tmp_path, s3_server, s3_make_bucket, s3_fake_nsd):
    bucket = s3_make_bucket({f"mirror/nsd/{k}": v for k, v in s3_fake_nsd.objects.items()})
    root = tmp_path / "nsd"
    download_nsd(f"s3://{bucket}/mirror/nsd/", root, subjects=[1], sessions=[21],
                 aws_args=f"--endpoint-url={s3_server}", workers=2)
    expected = s3_fake_nsd.expected_local(root)
    assert {rel: p.read_bytes() for rel, p in _files_under(root).items()} == expected


def test_wrong_size_and_wrong_content_files_are_replaced(tmp_path, s3_server, s3_make_bucket, s3_fake_nsd):
    bucket = s3_make_bucket(s3_fake_nsd.objects)
    root = tmp_path / "nsd"
    _download(root, bucket, s3_server, workers=4)
    files = _files_under(root)
    truncated = files["nsd_stimuli.hdf5"]
    truncated.write_bytes(truncated.read_bytes()[:1000])  # a partial file under its final name
    garbled = files["nsddata_timeseries/ppdata/subj01/func1pt8mm/timeseries/timeseries_session21_run05.nii.gz"]
    data = bytearray(garbled.read_bytes())
    data[100:110] = b"0123456789"  # same size, different content
    garbled.write_bytes(bytes(data))
    later = time.time() + 60  # an edit made later than the download
    os.utime(garbled, (later, later))
    untouched = {rel: p.stat().st_ino for rel, p in files.items() if p not in (truncated, garbled)}

    summary = _download(root, bucket, s3_server, workers=4)

    assert summary.downloaded == 2
    expected = s3_fake_nsd.expected_local(root)
    for rel, p in _files_under(root).items():
        assert p.read_bytes() == expected[rel], rel
    assert {rel: p.stat().st_ino for rel, p in _files_under(root).items() if rel in untouched} == untouched


def test_existing_files_are_verified_by_md5_without_manifest(tmp_path, s3_server, s3_make_bucket, s3_fake_nsd):
    bucket = s3_make_bucket(s3_fake_nsd.objects)
    root = tmp_path / "nsd"
    _download(root, bucket, s3_server, workers=4)
    (root / dl.MANIFEST_FILE).unlink()  # e.g. files copied from elsewhere
    design = root / "nsddata_timeseries/ppdata/subj01/func1pt8mm/design/design_session21_run03.tsv"
    design.write_bytes(b"x" * design.stat().st_size)  # right size, wrong content, no manifest entry

    summary = _download(root, bucket, s3_server, workers=4)
    assert (summary.downloaded, summary.skipped) == (1, len(s3_fake_nsd.expected_local(root)) - 1)
    assert design.read_bytes() == s3_fake_nsd.objects[design.relative_to(root).as_posix()]


def test_multipart_object_checked_by_size(tmp_path, s3_server, s3_make_bucket, s3_fake_nsd, s3_small_multipart_parts):
    from dynadiff.data.nsd import STIMULI_KEY

    bucket = s3_make_bucket(s3_fake_nsd.objects, multipart=(STIMULI_KEY,))
    root = tmp_path / "nsd"
    _download(root, bucket, s3_server, workers=2)
    assert (root / "nsd_stimuli.hdf5").read_bytes() == s3_fake_nsd.objects[STIMULI_KEY]
    (root / "nsd_stimuli.hdf5").write_bytes(s3_fake_nsd.objects[STIMULI_KEY][:-1])  # one byte short
    assert _download(root, bucket, s3_server, workers=2).downloaded == 1
    assert (root / "nsd_stimuli.hdf5").read_bytes() == s3_fake_nsd.objects[STIMULI_KEY]


def _run_cli(args, env, **kwargs):
    return subprocess.Popen(
        [sys.executable, str(REPO / "prepare_data.py"), *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint,
        **kwargs,
    )


def test_resume_after_sigkill(tmp_path, s3_server, s3_make_bucket, s3_env, s3_fake_nsd):
    """Kill the CLI mid-download (throttled, one worker), rerun: complete files are not fetched again."""
    bucket = s3_make_bucket(s3_fake_nsd.objects)
    root = tmp_path / "nsd"
    expected = s3_fake_nsd.expected_local(root)
    env = {**os.environ, **s3_env}
    args = ["--nsd_bucket", f"s3://{bucket}", "--path", str(root), "--subjects", "1", "--sessions", "21",
            "--aws_args", f"--endpoint-url {s3_server}", "--download-only"]
    # ~0.9 MB at 300 kB/s: about 3 s in all, 0.05-0.3 s per file.
    proc = _run_cli([*args, "--workers", "1", "--max-bandwidth", "300000"], env)
    try:
        deadline = time.monotonic() + 60
        complete: dict[str, Path] = {}
        while len(complete) < 6:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the download made no progress"
            complete = {rel: p for rel, p in _files_under(root).items() if not p.name.endswith(dl.PART_SUFFIX)} \
                if root.exists() else {}
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    finals = {rel: p for rel, p in _files_under(root).items() if not p.name.endswith(dl.PART_SUFFIX)}
    assert 6 <= len(finals) < len(expected)
    for rel, p in finals.items():  # whatever sits under a final name is complete
        assert p.read_bytes() == expected[rel], rel
    stamps = {rel: (p.stat().st_ino, p.stat().st_mtime_ns) for rel, p in finals.items()}

    rerun = _run_cli(args + ["--workers", "3"], env)
    out = rerun.communicate(timeout=120)[0]
    assert rerun.returncode == 0, out
    assert f"downloaded {len(expected) - len(finals)} file(s)" in out
    assert f"skipped {len(finals)} already complete" in out
    files = _files_under(root)
    assert set(files) == set(expected)  # all there, no temporary file left
    for rel, p in files.items():
        assert p.read_bytes() == expected[rel], rel
    # Files complete before the kill were neither fetched nor rewritten (a download renames a new inode in).
    assert {rel: (files[rel].stat().st_ino, files[rel].stat().st_mtime_ns) for rel in finals} == stamps


def test_ctrl_c_stops_promptly_and_cleanly(tmp_path, s3_server, s3_make_bucket, s3_env, s3_fake_nsd):
    bucket = s3_make_bucket(s3_fake_nsd.objects)
    root = tmp_path / "nsd"
    expected = s3_fake_nsd.expected_local(root)
    proc = _run_cli(["--nsd_bucket", f"s3://{bucket}", "--path", str(root), "--subjects", "1", "--sessions", "21",
                     "--aws_args", f"--endpoint-url {s3_server}", "--download-only", "--workers", "3",
                     "--max-bandwidth", "200000"], {**os.environ, **s3_env})
    try:
        deadline = time.monotonic() + 60
        while not root.exists() or sum(not p.name.endswith(dl.PART_SUFFIX) for p in _files_under(root).values()) < 3:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=10)[0]  # workers stop at their next chunk
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "interrupted: run the same command again to resume" in out
    files = _files_under(root)
    assert files and not [rel for rel in files if rel.endswith(dl.PART_SUFFIX)]  # temporary files removed
    assert len(files) < len(expected)
    for rel, p in files.items():
        assert p.read_bytes() == expected[rel], rel
    import json

    assert set(json.loads((root / dl.MANIFEST_FILE).read_text())) == set(files)  # what is complete is recorded


def test_stale_temporary_files_are_overwritten_or_removed(tmp_path, s3_server, s3_make_bucket, s3_fake_nsd):
    bucket = s3_make_bucket(s3_fake_nsd.objects)
    root = tmp_path / "nsd"
    _download(root, bucket, s3_server, workers=2)
    stimuli = root / "nsd_stimuli.hdf5"
    expdesign = root / "nsd_expdesign.mat"
    stimuli.unlink()
    dl.part_path(stimuli).write_bytes(b"stale partial content" * 1000)  # crash while fetching it
    dl.part_path(expdesign).write_bytes(b"stale")  # crash after a complete copy was renamed in
    _download(root, bucket, s3_server, workers=2)
    assert stimuli.read_bytes() == s3_fake_nsd.objects["nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"]
    assert not dl.part_path(stimuli).exists() and not dl.part_path(expdesign).exists()


# ----------------------------------------------------------------------------- refusals and errors


@pytest.mark.parametrize("evil", [
    "nsddata/ppdata/subj01/func1pt8mm/roi/../../../../../evil",
    "nsddata/ppdata/subj01/func1pt8mm/roi/../../../../../../evil",
])
def test_traversal_key_is_refused(tmp_path, s3_server, s3_make_bucket, s3_fake_nsd, evil):
    bucket = s3_make_bucket({**s3_fake_nsd.objects, evil: b"pwned"})
    root = tmp_path / "sub" / "nsd"
    with pytest.raises(DownloadError, match=r"refusing 1 S3 key.*" + evil.replace(".", r"\.")):
        _download(root, bucket, s3_server, workers=2)
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))
    assert not root.exists() or not _files_under(root)  # refused before anything was fetched


@pytest.mark.parametrize("rel", [
    "/etc/passwd", "a/../../b", "a/./b", "..", "C:/x", "a\\..\\b", "", "roi/x\x00y",
])
def test_check_relative_key_refuses(tmp_path, rel):
    with pytest.raises(DownloadError, match="refusing S3 key"):
        dl.check_relative_key(rel, "k", tmp_path)


def test_check_relative_key_accepts_nested_folders(tmp_path):
    dl.check_relative_key("nsddata/ppdata/subj01/func1pt8mm/roi/sub/x..y.nii.gz", "k", tmp_path)


def test_missing_objects_are_all_listed(tmp_path, s3_server, s3_make_bucket, s3_fake_nsd):
    gone = [
        "nsddata_timeseries/ppdata/subj01/func1pt8mm/design/design_session21_run02.tsv",
        "nsddata_timeseries/ppdata/subj01/func1pt8mm/timeseries/timeseries_session21_run13.nii.gz",
        "nsddata/experiments/nsd/nsd_expdesign.mat",
    ]
    bucket = s3_make_bucket({k: v for k, v in s3_fake_nsd.objects.items() if k not in gone})
    root = tmp_path / "nsd"
    with pytest.raises(DownloadError, match="3 object\\(s\\) missing") as info:
        _download(root, bucket, s3_server, workers=2)
    for key in gone:
        assert f"s3://{bucket}/{key}" in str(info.value)
    assert not root.exists() or not _files_under(root)


def test_missing_roi_folder_is_reported(tmp_path, s3_server, s3_make_bucket, s3_fake_nsd):
    bucket = s3_make_bucket({k: v for k, v in s3_fake_nsd.objects.items() if "subj01/func1pt8mm/roi/" not in k})
    with pytest.raises(DownloadError, match=r"subj01/func1pt8mm/roi/\*"):
        _download(tmp_path / "nsd", bucket, s3_server)


def test_unknown_bucket_is_a_clear_error(tmp_path, s3_server, s3_env):
    with pytest.raises(DownloadError, match="NoSuchBucket.*check --nsd_bucket"):
        _download(tmp_path / "nsd", "no-such-bucket-here", s3_server)


def test_anonymous_when_no_credentials(tmp_path, s3_server, s3_make_bucket, s3_fake_nsd, monkeypatch):
    from botocore import UNSIGNED

    private = s3_make_bucket(s3_fake_nsd.objects)
    public = s3_make_bucket(s3_fake_nsd.objects, public=True)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name)
    client = dl.make_s3_client(AwsOptions(endpoint_url=s3_server))
    assert client.meta.config.signature_version is UNSIGNED
    # Unsigned requests: refused on a private bucket (with a hint), accepted on a public one.
    with pytest.raises(DownloadError, match="(AccessDenied|403).*credentials"):
        _download(tmp_path / "a", private, s3_server)
    assert _download(tmp_path / "b", public, s3_server).downloaded == len(s3_fake_nsd.expected_keys)


def test_signed_when_credentials_and_unsigned_on_request(s3_server, s3_env):
    from botocore import UNSIGNED

    assert dl.make_s3_client(AwsOptions(endpoint_url=s3_server)).meta.config.signature_version is not UNSIGNED
    assert dl.make_s3_client(AwsOptions(unsigned=True)).meta.config.signature_version is UNSIGNED


def test_unknown_profile_is_a_clear_error(s3_env):
    with pytest.raises(DownloadError, match="profile 'nope' not found"):
        dl.make_s3_client(AwsOptions(profile="nope"))


# ----------------------------------------------------------------------------- options


def test_parse_aws_args_maps_supported_options():
    assert parse_aws_args("") == AwsOptions()
    assert parse_aws_args(
        "--no-sign-request --profile nsd --endpoint-url=http://127.0.0.1:9 --region 'eu-west-1'"
    ) == AwsOptions(unsigned=True, profile="nsd", endpoint_url="http://127.0.0.1:9", region="eu-west-1")


@pytest.mark.parametrize("text, message", [
    ("--request-payer requester", "unsupported option '--request-payer'.*--no-sign-request, --profile"),
    ("--profile", "--profile in --aws_args needs a value"),
    ("--profile --region x", "--profile in --aws_args needs a value"),
    ("--region=", "needs a non-empty value"),
    ("--no-sign-request=yes", "takes no value"),
    ("--profile 'unclosed", "cannot parse --aws_args"),
    ("us-east-1", "unsupported option 'us-east-1'"),
])
def test_parse_aws_args_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_aws_args(text)


@pytest.mark.parametrize("url, expected", [
    ("s3://natural-scenes-dataset", ("natural-scenes-dataset", "")),
    ("s3://b/", ("b", "")),
    ("s3://b/some/prefix", ("b", "some/prefix/")),
])
def test_parse_bucket_url(url, expected):
    assert dl.parse_bucket_url(url) == expected


@pytest.mark.parametrize("url", ["natural-scenes-dataset", "https://b/x", "s3://", "s3:///x"])
def test_parse_bucket_url_rejects(url):
    with pytest.raises(ValueError, match="s3://bucket"):
        dl.parse_bucket_url(url)


def test_needed_files_skip_rest_runs():
    files, folders = dl.needed_files([1, 2], sessions=[21])
    runs = sorted({k.rsplit("_run", 1)[1][:2] for k in files if "subj01" in k})
    assert runs == [f"{r:02d}" for r in range(2, 14)]  # session 21 of subject 1: rest runs 1 and 14 left out
    assert sum("subj02" in k for k in files) == 2 * 12  # session 21 of subject 2: runs 1..12
    assert folders == ["nsddata/ppdata/subj01/func1pt8mm/roi/", "nsddata/ppdata/subj02/func1pt8mm/roi/"]
    assert files["nsddata/experiments/nsd/nsd_expdesign.mat"] == "nsd_expdesign.mat"
    assert files["nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"] == "nsd_stimuli.hdf5"
    assert len(dl.needed_files([5])[0]) == 2 + 2 * 12 * 40  # all sessions by default


# ----------------------------------------------------------------------------- retries (fake client)


class _Body:
    def __init__(self, data: bytes, fail_after: int | None):
        self.data, self.fail_after = data, fail_after

    def iter_chunks(self, chunk_size):
        from botocore.exceptions import ResponseStreamingError

        for i in range(0, len(self.data), 7):
            if self.fail_after is not None and i >= self.fail_after:
                raise ResponseStreamingError(error="connection reset by peer")
            yield self.data[i : i + 7]


class _FlakyClient:
    """get_object streams ``data`` but breaks the stream ``failures`` times after ``fail_after`` bytes."""

    def __init__(self, data: bytes, failures: int, fail_after: int = 40):
        self.data, self.failures, self.fail_after = data, failures, fail_after
        self.requests: list[dict] = []

    def get_object(self, **request):
        self.requests.append(request)
        start = int(request["Range"].split("=")[1].rstrip("-")) if "Range" in request else 0
        fail = self.fail_after if len(self.requests) <= self.failures else None
        response = {"Body": _Body(self.data[start:], fail)}
        if start:
            response["ContentRange"] = f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"
        return response


def _remote(data: bytes) -> RemoteObject:
    import hashlib

    return RemoteObject("k/x.bin", "k/x.bin", len(data), hashlib.md5(data).hexdigest())


def test_broken_stream_is_resumed_with_a_range_request(tmp_path, caplog):
    data = bytes(range(256)) * 3
    client = _FlakyClient(data, failures=2)
    obj = _remote(data)
    seen = []
    with caplog.at_level(logging.WARNING, logger="dynadiff.data.download"):
        dl.download_object(client, "b", obj, tmp_path / "x.bin", progress=seen.append, backoff=0.001)
    assert (tmp_path / "x.bin").read_bytes() == data
    assert [r.get("Range") for r in client.requests] == [None, "bytes=42-", "bytes=84-"]
    assert all(r["IfMatch"] == f'"{obj.etag}"' for r in client.requests)  # pinned to the listed version
    assert sum(seen) == len(data)
    assert "retry 2/5" in caplog.text
    assert not dl.part_path(tmp_path / "x.bin").exists()


def test_persistent_failure_gives_up_and_leaves_nothing(tmp_path):
    data = b"z" * 500
    client = _FlakyClient(data, failures=100)
    with pytest.raises(DownloadError, match="giving up on s3://b/k/x.bin after 3 attempts"):
        dl.download_object(client, "b", _remote(data), tmp_path / "x.bin", retries=2, backoff=0.001)
    assert list(tmp_path.iterdir()) == []


def test_wrong_md5_restarts_then_fails(tmp_path):
    data = b"abc" * 100
    obj = RemoteObject("k", "k", len(data), "0" * 32)  # the body never matches this ETag
    client = _FlakyClient(data, failures=0)
    with pytest.raises(DownloadError, match="MD5 .* differs from the ETag"):
        dl.download_object(client, "b", obj, tmp_path / "x.bin", retries=1, backoff=0.001)
    assert [r.get("Range") for r in client.requests] == [None, None]  # restarted from scratch, not resumed
    assert list(tmp_path.iterdir()) == []


def test_stop_event_cancels_and_cleans_up(tmp_path):
    data = b"q" * 10_000
    stop = threading.Event()
    client = _FlakyClient(data, failures=0)

    def progress(n):
        stop.set()  # e.g. Ctrl-C in the main thread after the first chunk

    with pytest.raises(dl._Cancelled):
        dl.download_object(client, "b", _remote(data), tmp_path / "x.bin", progress=progress, stop=stop)
    assert list(tmp_path.iterdir()) == []


def test_bandwidth_cap_slows_the_transfer(tmp_path):
    data = b"w" * 20_000
    limiter = dl._RateLimiter(100_000)  # 20 kB at 100 kB/s: >= 0.2 s
    start = time.monotonic()
    dl.download_object(_FlakyClient(data, failures=0), "b", _remote(data), tmp_path / "x.bin", limiter=limiter)
    assert time.monotonic() - start >= 0.15
    assert (tmp_path / "x.bin").read_bytes() == data
