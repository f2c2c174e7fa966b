"""Which objects to fetch, and where each goes under the local root.

Every plan (this NSD one, OpenNeuro's in :mod:`.openneuro`) turns the keys it wants into
:class:`RemoteObject` with :func:`checked_objects`, which refuses keys whose local path would leave the root.

NSD (docs/behaviour.md §1), what is fetched for each chosen subject:

- the time series and design TSV of every *task* run that
  :func:`dynadiff.data.nsd.list_runs` gives (never the resting-state runs);
- the whole ``roi/`` folder of the subject;

and once: ``nsd_expdesign.mat`` and ``nsd_stimuli.hdf5``, saved at the root of
the local folder. Every other key keeps its bucket path under the local root.
:func:`plan_download` lists the bucket and refuses, before anything is fetched,
missing objects and keys whose local path would leave the root.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing as tp
from pathlib import Path

from dynadiff.data.download.errors import DownloadError
from dynadiff.data.download.s3 import _list_prefix
from dynadiff.data.nsd import (
    EXPDESIGN_FILE,
    EXPDESIGN_KEY,
    ROI_DIR,
    STIMULI_FILE,
    STIMULI_KEY,
    check_subject,
    list_runs,
)

_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")


@dataclasses.dataclass(frozen=True)
class RemoteObject:
    key: str  # full key in the bucket
    rel: str  # path relative to the local root, POSIX separators
    size: int  # bytes
    etag: str  # without quotes

    @property
    def has_md5(self) -> bool:
        """True when the ETag is the object's MD5 (single-part upload, no KMS)."""
        return bool(_PLAIN_MD5.fullmatch(self.etag))


def needed_files(
    subjects: tp.Iterable[int], sessions: tp.Iterable[int] | None = None
) -> tuple[dict[str, str], list[str]]:
    """What docs/behaviour.md §1 needs, relative to the bucket prefix.

    Returns ``(files, folders)``: ``files`` maps each exact key to its local
    relative path; ``folders`` lists key prefixes (ending with '/') whose whole
    content is mirrored.
    """
    files = {EXPDESIGN_KEY: EXPDESIGN_FILE, STIMULI_KEY: STIMULI_FILE}
    folders = []
    for subject in subjects:
        check_subject(subject)
        for run in list_runs(subject, sessions):
            for path in (run.timeseries_path(Path("")), run.design_path(Path(""))):
                files[path.as_posix()] = path.as_posix()
        folders.append(ROI_DIR.format(subject=subject) + "/")
    return files, folders


def check_relative_key(rel: str, key: str, root: Path) -> None:
    """Refuse a key whose local path would not stay under ``root`` (``..``, absolute, drive, ...)."""
    parts = rel.split("/")
    bad = (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or "\x00" in rel
        or re.match(r"[A-Za-z]:", rel) is not None
        or any(part in (".", "..") for part in parts)
    )
    if not bad:
        base = os.path.normpath(os.path.abspath(root))
        target = os.path.normpath(os.path.join(base, *parts))
        bad = os.path.commonpath([base, target]) != base or target == base
    if bad:
        raise DownloadError(
            f"refusing S3 key {key!r}: its local path must stay under {root} without '..', '.', "
            "absolute or drive components"
        )


def checked_objects(wanted: dict[str, str], listed: dict[str, tuple[int, str]], root: Path) -> list[RemoteObject]:
    """The objects to fetch, ``wanted`` mapping each listed key to its local path relative to ``root``.

    Raises one :class:`DownloadError` naming every key whose local path could leave ``root``
    (:func:`check_relative_key`), before anything is fetched.
    """
    objects, unsafe = [], []
    for key, rel in wanted.items():
        try:
            check_relative_key(rel, key, root)
        except DownloadError:
            unsafe.append(key)
            continue
        objects.append(RemoteObject(key, rel, *listed[key]))
    if unsafe:
        raise DownloadError(
            f"refusing {len(unsafe)} S3 key(s) whose local path could resolve outside {root} "
            "('..', '.', absolute or drive components): " + ", ".join(repr(k) for k in unsafe)
        )
    return objects


def plan_download(
    client, bucket: str, prefix: str, root: Path, subjects: tp.Iterable[int], sessions: tp.Iterable[int] | None = None
) -> list[RemoteObject]:
    """List the bucket and return every NSD object to fetch; raise listing all missing or unsafe keys."""
    files, folders = needed_files(subjects, sessions)
    listed: dict[str, tuple[int, str]] = {}
    for folder in sorted({k.rsplit("/", 1)[0] + "/" if "/" in k else "" for k in files} | set(folders)):
        listed.update(_list_prefix(client, bucket, prefix + folder))

    wanted, missing = {}, []
    for key, rel in files.items():
        if prefix + key in listed:
            wanted[prefix + key] = rel
        else:
            missing.append(prefix + key)
    for folder in folders:
        content = sorted(k for k in listed if k.startswith(prefix + folder) and not k.endswith("/"))
        if not content:
            missing.append(prefix + folder + "*")
        wanted.update((key, key[len(prefix) :]) for key in content)
    objects = checked_objects(wanted, listed, root)
    if missing:
        shown = "\n  ".join(f"s3://{bucket}/{k}" for k in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise DownloadError(
            f"{len(missing)} object(s) missing from s3://{bucket}/{prefix}:\n  {shown}{more}\n"
            "Check --nsd_bucket, or restrict --subjects/--sessions to what the bucket holds."
        )
    return objects
