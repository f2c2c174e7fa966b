"""An OpenNeuro dataset (BIDS) from its public bucket, ``s3://openneuro.org/dsNNNNNN/``: :func:`download_openneuro`.

What is fetched, into the local root as in the bucket (``root/dataset_description.json``, ``root/sub-01/...``):

- every top-level file of the dataset (not its folders);
- ``sub-<label>/`` of each chosen subject, whole (sessions, anat, func, ...);
- ``stimuli/``, whole, when asked and when the dataset has one;
- for each derivative pipeline named (``derivatives/<pipeline>/``), its top-level files and the ``sub-<label>/``
  folders of the chosen subjects (subjects named but absent from the pipeline are an error; with every subject,
  those the pipeline has).

Never ``sourcedata/``, ``code/`` or any other folder. The bucket is listed one level at a time (``ls``-like), so
that the folders left out are never listed: an fMRIPrep tree holds tens of thousands of keys. The transfer is
:func:`.run.run_download`'s, the NSD download's loop: resumable, verified, atomic, Ctrl-C safe.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from dynadiff.data.download.errors import DownloadError
from dynadiff.data.download.plan import RemoteObject, checked_objects
from dynadiff.data.download.progress import DownloadSummary
from dynadiff.data.download.run import run_download
from dynadiff.data.download.s3 import AwsOptions, _list_level, _list_prefix, parse_bucket_url
from dynadiff.data.nsd import NsdDataError, check_writable_folder, is_synthetic

# The package's name, as the other download modules: log lines read 'dynadiff.data.download: ...'.
logger = logging.getLogger(__package__)

OPENNEURO_BUCKET_URL = "s3://openneuro.org"
_DATASET = re.compile(r"ds\d{6}")
_LABEL = re.compile(r"[A-Za-z0-9]+")  # BIDS: a label is alphanumeric


def download_openneuro(
    dataset: str,
    root: Path,
    subjects: list[str] | None = None,
    derivatives: list[str] | None = None,
    include_stimuli: bool = True,
    aws_args: str | AwsOptions = "--no-sign-request",
    workers: int = 16,
    max_bandwidth: float | None = None,
    retries: int = 5,
    client=None,
    bucket_url: str = OPENNEURO_BUCKET_URL,
) -> DownloadSummary:
    """Download the OpenNeuro dataset ``dataset`` (e.g. ``ds004496``) into ``root`` (see the module's docstring).

    ``subjects``: labels, ``01`` or ``sub-01`` (None: every subject of the dataset); ``derivatives``: pipeline
    names such as ``fmriprep`` (None: no derivatives); ``max_bandwidth`` caps the total throughput in bytes per
    second (None: no cap). Raises ``ValueError`` for a malformed id, label or pipeline name; :class:`DownloadError`
    for an unknown dataset, subject or pipeline (naming those that exist), unsafe keys, access problems and
    failed transfers; :class:`~dynadiff.data.nsd.NsdDataError`, before any request, when ``root`` cannot be
    written to or holds a synthetic mini-NSD.
    """
    if not isinstance(dataset, str) or not _DATASET.fullmatch(dataset):
        raise ValueError(f"--openneuro: expected a dataset id such as ds004496, got {dataset!r}")
    labels = None if subjects is None else list(dict.fromkeys(_subject_label(s) for s in subjects))
    pipelines = list(dict.fromkeys(_pipeline(p) for p in derivatives or ()))
    bucket, prefix = parse_bucket_url(bucket_url, option="bucket_url")
    root = Path(root)

    def check_target(root: Path) -> None:
        check_writable_folder(root)
        if is_synthetic(root):
            raise NsdDataError(f"{root} holds a synthetic mini-NSD (written by --synthetic): download {dataset} "
                               f"into another folder, or delete {root} first")

    def plan(client) -> list[RemoteObject]:
        logger.info("listing s3://%s/%s%s/ for subject(s) %s, derivatives %s", bucket, prefix, dataset,
                    "all" if labels is None else labels, pipelines or "none")
        return plan_openneuro(client, bucket, prefix, dataset, root, labels, pipelines, include_stimuli)

    return run_download(
        bucket, root, plan, check_target=check_target, aws_args=aws_args, workers=workers,
        max_bandwidth=max_bandwidth, retries=retries, client=client, label=f"OpenNeuro {dataset}",
    )


def plan_openneuro(
    client,
    bucket: str,
    prefix: str,
    dataset: str,
    root: Path,
    subjects: list[str] | None,
    derivatives: list[str],
    include_stimuli: bool,
) -> list[RemoteObject]:
    """List ``dataset`` under ``s3://bucket/prefix`` and return every object to fetch.

    ``subjects``: bare labels (``01``), None for all; ``derivatives``: pipeline names. Local paths are the keys
    relative to the dataset's folder.
    """
    base = f"{prefix}{dataset}/"
    url = f"s3://{bucket}/{base}"
    files, folders = _list_level(client, bucket, base)
    if not files and not folders:
        raise DownloadError(f"--openneuro: dataset {dataset} not found at s3://{bucket}/{prefix} "
                            f"(nothing under {url})")
    available = _subjects_in(folders)
    chosen = available if subjects is None else _check_subjects(subjects, available, url)
    listed = dict(files)
    for label in chosen:
        listed.update(_list_prefix(client, bucket, f"{base}sub-{label}/"))
    if include_stimuli and "stimuli" in folders:
        listed.update(_list_prefix(client, bucket, f"{base}stimuli/"))
    elif include_stimuli:
        logger.info("%s has no stimuli/ folder", url)
    for pipeline in derivatives:
        where = f"{base}derivatives/{pipeline}/"
        top, sub = _list_level(client, bucket, where)
        if not top and not sub:
            known = _list_level(client, bucket, f"{base}derivatives/")[1]
            raise DownloadError(f"--derivatives: no derivatives/{pipeline}/ in {url}; it has "
                                + (", ".join(known) if known else "no derivatives/ folder"))
        done = _subjects_in(sub)
        if subjects is None:  # all: those the pipeline has (it may have failed for some)
            pipeline_subjects = [s for s in done if s in chosen]
        else:
            pipeline_subjects = _check_subjects(chosen, done, f"s3://{bucket}/{where}", option="--derivatives")
        listed.update(top)
        for label in pipeline_subjects:
            listed.update(_list_prefix(client, bucket, f"{where}sub-{label}/"))
    wanted = {key: key[len(base) :] for key in sorted(listed) if not key.endswith("/")}
    return checked_objects(wanted, listed, root)


def _subject_label(subject) -> str:
    """``01`` or ``sub-01`` → ``01``; ValueError for what is not a BIDS label."""
    text = str(subject)
    label = text.removeprefix("sub-")
    if not _LABEL.fullmatch(label):
        raise ValueError(f"--subjects: expected a BIDS subject label such as 01 or sub-01, got {text!r}")
    return label


def _pipeline(name) -> str:
    """A derivative pipeline's folder name (``fmriprep``); ValueError for what is not one folder name."""
    text = str(name).strip("/")
    if not text or text in (".", "..") or any(c in text for c in "/\\\x00"):
        raise ValueError(f"--derivatives: expected a pipeline folder name such as fmriprep, got {name!r}")
    return text


def _subjects_in(folders: list[str]) -> list[str]:
    """Labels of the ``sub-<label>`` folders among ``folders``."""
    return [f[len("sub-") :] for f in folders if f.startswith("sub-") and _LABEL.fullmatch(f[len("sub-") :])]


def _check_subjects(wanted: list[str], available: list[str], url: str, option: str = "--subjects") -> list[str]:
    missing = [s for s in wanted if s not in available]
    if missing:
        has = ", ".join(f"sub-{s}" for s in available) if available else "no sub-* folder"
        raise DownloadError(f"{option}: {', '.join(f'sub-{s}' for s in missing)} not in {url}; it has {has}")
    return wanted
