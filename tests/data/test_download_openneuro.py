"""The OpenNeuro download (BIDS), run for real against the local moto S3 server (tests/data/conftest.py).

One public ``openneuro.org`` bucket for the module: ``ds000001/`` holds top-level files, 2 subjects, stimuli,
sourcedata, code and two derivative pipelines; ``ds000002/`` a key that climbs out of its subject's folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dynadiff.data import download as dl
from dynadiff.data.download import DownloadError, download_openneuro
from dynadiff.data.nsd import SYNTHETIC_MARKER, NsdDataError

BUCKET = "openneuro.org"
DS = "ds000001/"


def _dataset() -> dict[str, bytes]:
    """Key → content of the fake bucket (random bytes, sizes 50-3000)."""
    rng = np.random.default_rng(3)
    keys = [
        "dataset_description.json", "participants.tsv", "participants.json", "README", "CHANGES",
        "task-view_bold.json", "task-view_events.json",
        *(f"sub-{s}/{path}" for s in ("01", "02") for path in (
            f"anat/sub-{s}_T1w.nii.gz",
            f"ses-1/func/sub-{s}_ses-1_task-view_run-1_bold.nii.gz",
            f"ses-1/func/sub-{s}_ses-1_task-view_run-1_events.tsv",
            f"ses-2/func/sub-{s}_ses-2_task-view_run-1_bold.nii.gz",
        )),
        "stimuli/img001.png", "stimuli/set2/img002.jpg",
        "sourcedata/sub-01/dicom.tgz", "code/convert.py",
        "derivatives/fmriprep/dataset_description.json", "derivatives/fmriprep/sub-01.html",
        "derivatives/fmriprep/logs/run.log",
        "derivatives/fmriprep/sub-01/func/sub-01_task-view_desc-preproc_bold.nii.gz",
        "derivatives/fmriprep/sub-02/func/sub-02_task-view_desc-preproc_bold.nii.gz",
        "derivatives/freesurfer/sub-01/mri/T1.mgz",
    ]
    objects = {DS + key: rng.integers(0, 256, int(rng.integers(50, 3000)), dtype=np.uint8).tobytes() for key in keys}
    objects["ds000002/dataset_description.json"] = b"{}"
    objects["ds000002/sub-01/../../../evil"] = b"pwned"
    return objects


OBJECTS = _dataset()


def _expected(subjects=("01", "02"), fmriprep=None, stimuli=True) -> dict[str, bytes]:
    """Local relative path → content after a download of ds000001 (``fmriprep``: its subjects, None: not asked)."""
    out = {}
    for key, data in OBJECTS.items():
        if not key.startswith(DS):
            continue
        rel = key[len(DS) :]
        parts = rel.split("/")
        keep = (
            len(parts) == 1
            or parts[0] in {f"sub-{s}" for s in subjects}
            or (stimuli and parts[0] == "stimuli")
            or (fmriprep is not None and parts[:2] == ["derivatives", "fmriprep"]
                and (len(parts) == 3 or parts[2] in {f"sub-{s}" for s in fmriprep}))
        )
        if keep:
            out[rel] = data
    return out


def _files_under(root: Path) -> dict[str, Path]:
    """Relative POSIX path → path, of every regular file under ``root`` (manifest excluded)."""
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file() and p.name != dl.MANIFEST_FILE}


@pytest.fixture(scope="module")
def openneuro(s3_server, s3_fill):
    """``get(dataset, root, **kwargs)``: download_openneuro from the fake public bucket, anonymously."""
    s3_fill(BUCKET, OBJECTS, public=True)

    def get(dataset, root, **kwargs):
        kwargs.setdefault("workers", 4)
        return download_openneuro(dataset, root, aws_args=f"--no-sign-request --endpoint-url {s3_server}",
                                  bucket_url=f"s3://{BUCKET}", **kwargs)

    return get


class _NoRequests:
    def __getattr__(self, name):
        raise AssertionError(f"a request ({name}) was made")


def test_one_subject_with_fmriprep(tmp_path, s3_env, openneuro):
    root = tmp_path / "ds"
    summary = openneuro("ds000001", root, subjects=["01"], derivatives=["fmriprep"])

    expected = _expected(subjects=["01"], fmriprep=["01"])
    assert sorted(_files_under(root)) == sorted(expected) == [  # exactly these: no sourcedata, code, sub-02, ...
        "CHANGES", "README", "dataset_description.json",
        "derivatives/fmriprep/dataset_description.json",
        "derivatives/fmriprep/sub-01.html",
        "derivatives/fmriprep/sub-01/func/sub-01_task-view_desc-preproc_bold.nii.gz",
        "participants.json", "participants.tsv",
        "stimuli/img001.png", "stimuli/set2/img002.jpg",
        "sub-01/anat/sub-01_T1w.nii.gz",
        "sub-01/ses-1/func/sub-01_ses-1_task-view_run-1_bold.nii.gz",
        "sub-01/ses-1/func/sub-01_ses-1_task-view_run-1_events.tsv",
        "sub-01/ses-2/func/sub-01_ses-2_task-view_run-1_bold.nii.gz",
        "task-view_bold.json", "task-view_events.json",
    ]
    assert {rel: p.read_bytes() for rel, p in _files_under(root).items()} == expected
    assert (summary.downloaded, summary.skipped) == (len(expected), 0)
    assert summary.bytes_downloaded == sum(map(len, expected.values()))


def test_all_subjects_without_derivatives(tmp_path, s3_env, openneuro):
    root = tmp_path / "ds"
    openneuro("ds000001", root)
    expected = _expected()
    assert {rel: p.read_bytes() for rel, p in _files_under(root).items()} == expected
    assert {rel.split("/")[0] for rel in expected if "/" in rel} == {"sub-01", "sub-02", "stimuli"}


def test_second_run_keeps_every_file(tmp_path, s3_env, openneuro):
    root = tmp_path / "ds"
    openneuro("ds000001", root, subjects=["sub-02"], include_stimuli=False, workers=2)
    expected = _expected(subjects=["02"], stimuli=False)
    files = _files_under(root)
    assert {rel: p.read_bytes() for rel, p in files.items()} == expected
    before = {rel: (p.stat().st_ino, p.stat().st_mtime_ns) for rel, p in files.items()}

    again = openneuro("ds000001", root, subjects=["02"], include_stimuli=False, workers=2)
    assert (again.downloaded, again.skipped, again.bytes_downloaded) == (0, len(expected), 0)
    assert {rel: (p.stat().st_ino, p.stat().st_mtime_ns) for rel, p in _files_under(root).items()} == before


# ----------------------------------------------------------------------------- refusals and errors


@pytest.mark.parametrize("dataset", ["ds1", "DS000001", "000001", "ds0000001", "ds000001/", "ds00000a"])
def test_malformed_dataset_id_is_refused_before_any_request(tmp_path, dataset):
    message = f"--openneuro: expected a dataset id such as ds004496, got {dataset!r}"
    with pytest.raises(ValueError) as info:
        download_openneuro(dataset, tmp_path / "ds", client=_NoRequests())
    assert str(info.value) == message
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"subjects": ["01", "../02"]}, "--subjects: expected a BIDS subject label such as 01 or sub-01, got '../02'"),
    ({"subjects": ["sub-"]}, "--subjects: expected a BIDS subject label such as 01 or sub-01, got 'sub-'"),
    ({"derivatives": ["../sourcedata"]},
     "--derivatives: expected a pipeline folder name such as fmriprep, got '../sourcedata'"),
], ids=["path-in-label", "empty-label", "path-in-pipeline"])
def test_malformed_labels_are_refused_before_any_request(tmp_path, kwargs, message):
    with pytest.raises(ValueError) as info:
        download_openneuro("ds000001", tmp_path / "ds", client=_NoRequests(), **kwargs)
    assert str(info.value) == message


def test_synthetic_folder_is_refused_before_any_request(tmp_path):
    (tmp_path / SYNTHETIC_MARKER).write_text("{}")
    with pytest.raises(NsdDataError, match="holds a synthetic mini-NSD .*download ds000001 into another folder"):
        download_openneuro("ds000001", tmp_path, client=_NoRequests())


@pytest.mark.parametrize("dataset, kwargs, message", [
    ("ds000001", {"subjects": ["01", "sub-03", "04"]},
     "--subjects: sub-03, sub-04 not in s3://openneuro.org/ds000001/; it has sub-01, sub-02"),
    ("ds999999", {},
     "--openneuro: dataset ds999999 not found at s3://openneuro.org/ (nothing under s3://openneuro.org/ds999999/)"),
    ("ds000001", {"derivatives": ["fmriprep", "mriqc"]},
     "--derivatives: no derivatives/mriqc/ in s3://openneuro.org/ds000001/; it has fmriprep, freesurfer"),
    ("ds000001", {"subjects": ["02"], "derivatives": ["freesurfer"]},
     "--derivatives: sub-02 not in s3://openneuro.org/ds000001/derivatives/freesurfer/; it has sub-01"),
], ids=["unknown-subjects", "unknown-dataset", "unknown-pipeline", "subject-not-in-pipeline"])
def test_unknown_dataset_subject_or_pipeline_is_a_one_line_error(tmp_path, s3_env, openneuro, dataset, kwargs,
                                                                 message):
    root = tmp_path / "ds"
    with pytest.raises(DownloadError) as info:
        openneuro(dataset, root, **kwargs)
    assert str(info.value) == message
    assert not root.exists() or not _files_under(root)  # refused before anything was fetched


def test_traversal_key_is_refused(tmp_path, s3_env, openneuro):
    root = tmp_path / "sub" / "ds"
    with pytest.raises(DownloadError, match=r"refusing 1 S3 key.*'ds000002/sub-01/\.\./\.\./\.\./evil'"):
        openneuro("ds000002", root)
    assert not any(p.name == "evil" for p in tmp_path.rglob("*"))
    assert not root.exists() or not _files_under(root)
