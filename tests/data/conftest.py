"""Fixtures for the data tests.

Download/stimulus fixtures (prefixed ``s3_`` / ``stim_``): a local S3 server
(moto's server mode on 127.0.0.1, started here) and helpers that fill buckets;
tiny stimulus bricks and experiment designs.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

S3_DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server on 127.0.0.1 (random port), for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(monkeypatch, tmp_path):
    """Dummy credentials in the environment (and no real AWS config files)."""
    for name, value in S3_DUMMY_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return dict(S3_DUMMY_ENV)


@pytest.fixture(scope="session")
def s3_fill(s3_server):
    """``fill(bucket, objects, public=False, multipart=()) -> bucket``: create ``bucket`` holding ``objects``.

    ``objects`` maps key → bytes or a local Path; keys in ``multipart`` are uploaded in 2 parts
    (so their ETag is not an MD5). ``public`` adds a policy allowing anonymous reads. Session-wide (dummy
    credentials of its own), so that a module can fill one bucket for all its tests.
    """
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                          **{name.lower(): value for name, value in S3_DUMMY_ENV.items() if "REGION" not in name})

    def fill(bucket: str, objects: dict, public: bool = False, multipart=()) -> str:
        client.create_bucket(Bucket=bucket)
        for key, body in objects.items():
            data = Path(body).read_bytes() if isinstance(body, Path) else body
            if key in multipart:
                upload = client.create_multipart_upload(Bucket=bucket, Key=key)
                half = len(data) // 2
                parts = []
                for number, piece in enumerate((data[:half], data[half:]), start=1):
                    r = client.upload_part(
                        Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number, Body=piece
                    )
                    parts.append({"ETag": r["ETag"], "PartNumber": number})
                client.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
                )
            else:
                client.put_object(Bucket=bucket, Key=key, Body=data)
        if public:
            policy = {
                "Version": "2012-10-17",
                "Statement": [{
                    "Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:ListBucket"],
                    "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                }],
            }
            client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
        return bucket

    return fill


@pytest.fixture
def s3_make_bucket(s3_fill, s3_env):
    """``make(objects, public=False, multipart=()) -> bucket``: a fresh bucket holding ``objects`` (see
    ``s3_fill``), and dummy credentials in the environment (``s3_env``)."""

    def make(objects: dict, public: bool = False, multipart=()) -> str:
        return s3_fill(f"nsd-{uuid.uuid4().hex[:12]}", objects, public=public, multipart=multipart)

    return make


@pytest.fixture(scope="session")
def s3_small_multipart_parts():
    """Let moto accept multipart parts smaller than 5 MiB (the test objects are small)."""
    import moto.s3.models

    old = moto.s3.models.S3_UPLOAD_PART_MIN_SIZE
    moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = 16
    yield
    moto.s3.models.S3_UPLOAD_PART_MIN_SIZE = old


def s3_fake_nsd_objects(seed: int = 0, size: int = 30_000) -> dict[str, bytes]:
    """Random-content objects in the NSD bucket layout: subject 1, session 21 (14 runs, 1 and 14 rest),
    plus files the download must leave alone (rest runs, session 22, subject 2, other roi-like folders)."""
    from dynadiff.data.nsd import DESIGN_DIR, EXPDESIGN_KEY, ROI_DIR, STIMULI_KEY, TIMESERIES_DIR

    rng = np.random.default_rng(seed)

    def blob(n=None):
        return rng.integers(0, 256, size=n or int(rng.integers(size // 2, size)), dtype=np.uint8).tobytes()

    objects = {EXPDESIGN_KEY: blob(), STIMULI_KEY: blob(3 * size)}
    runs = {(1, 21): range(1, 15), (1, 22): (1, 2), (2, 21): (1, 2)}  # (subject, session): runs
    for (subject, session), numbers in runs.items():
        for run in numbers:
            name = f"session{session:02d}_run{run:02d}"
            objects[f"{TIMESERIES_DIR.format(subject=subject)}/timeseries_{name}.nii.gz"] = blob()
            objects[f"{DESIGN_DIR.format(subject=subject)}/design_{name}.tsv"] = blob(500)
    for subject in (1, 2):
        roi = ROI_DIR.format(subject=subject)
        objects[f"{roi}/nsdgeneral.nii.gz"] = blob()
        objects[f"{roi}/prf-visualrois.nii.gz"] = blob()
        objects[f"{roi}/sub/deeper.nii.gz"] = blob(100)
    objects["nsddata/ppdata/subj01/func1pt8mm/roi_other/x.nii.gz"] = blob(100)
    objects["nsddata/experiments/nsd/nsd_expdesign_extra.mat"] = blob(100)
    return objects


def s3_expected_keys(objects: dict[str, bytes]) -> set[str]:
    """Keys of ``s3_fake_nsd_objects`` that a download of subject 1, session 21 must fetch."""
    from dynadiff.data.nsd import EXPDESIGN_KEY, STIMULI_KEY

    keep = {EXPDESIGN_KEY, STIMULI_KEY}
    for key in objects:
        if key.startswith("nsddata/ppdata/subj01/func1pt8mm/roi/"):
            keep.add(key)
        elif "subj01" in key and "session21_run" in key:
            run = int(key.rsplit("_run", 1)[1].split(".")[0])
            if 2 <= run <= 13:
                keep.add(key)
    return keep


def s3_local_path(root: Path, key: str) -> Path:
    from dynadiff.data.nsd import EXPDESIGN_FILE, EXPDESIGN_KEY, STIMULI_FILE, STIMULI_KEY

    return root / {EXPDESIGN_KEY: EXPDESIGN_FILE, STIMULI_KEY: STIMULI_FILE}.get(key, key)


@dataclasses.dataclass
class S3FakeNsd:
    """Bucket content (``objects``: key → bytes) and what a subject-1, session-21 download must give."""

    objects: dict[str, bytes]

    @property
    def expected_keys(self) -> set[str]:
        return s3_expected_keys(self.objects)

    def expected_local(self, root: Path) -> dict[str, bytes]:
        """Local relative POSIX path → content, after the download into ``root``."""
        return {s3_local_path(root, k).relative_to(root).as_posix(): self.objects[k] for k in self.expected_keys}


@pytest.fixture
def s3_fake_nsd() -> S3FakeNsd:
    return S3FakeNsd(s3_fake_nsd_objects())


# ----------------------------------------------------------------------------- stimuli


def stim_write_brick(path: Path, images: np.ndarray, chunks=None) -> Path:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_dataset("imgBrick", data=images, chunks=chunks)
    return path


def stim_write_expdesign(path: Path, sharedix, subjectim) -> Path:
    from scipy.io import savemat

    savemat(path, {
        "sharedix": np.asarray(sharedix, dtype=np.float64)[None],
        "subjectim": np.asarray(subjectim, dtype=np.float64),
        "masterordering": np.ones((1, 5)),
    })
    return path


@pytest.fixture
def stim_writers():
    """(write_brick(path, images, chunks=None), write_expdesign(path, sharedix, subjectim))."""
    return stim_write_brick, stim_write_expdesign


@pytest.fixture
def stim_root(tmp_path):
    """An NSD root with a small brick (17 images of 23x31, unequal sides) and an expdesign.

    ``sharedix`` is deliberately unsorted; subjects 1 and 2 share the test images and each
    saw 3 more; subject 5 saw a subset of subject 1's images.
    """
    from dynadiff.data.nsd import EXPDESIGN_FILE, STIMULI_FILE

    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(17, 23, 31, 3), dtype=np.uint8)
    sharedix = np.array([9, 2, 14, 5])  # 1-based, file order
    subjectim = np.zeros((8, 7), dtype=np.int64)
    subjectim[0] = [9, 2, 14, 5, 1, 3, 17]
    subjectim[1] = [9, 2, 14, 5, 4, 6, 7]
    subjectim[4] = [9, 2, 14, 5, 1, 3, 3]
    subjectim[6] = [9, 2, 14, 5, 8, 10, 11]
    for s in (2, 3, 5, 7):
        subjectim[s] = [9, 2, 14, 5, 12, 13, 15]
    stim_write_brick(tmp_path / STIMULI_FILE, images)
    stim_write_expdesign(tmp_path / EXPDESIGN_FILE, sharedix, subjectim)
    return {"root": tmp_path, "images": images, "sharedix": sharedix, "subjectim": subjectim}
