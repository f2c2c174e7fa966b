"""The Natural Scenes Dataset on disk: file layout, runs, designs and events.

Everything here is about *where* things are and *which* runs/events exist;
signal processing is in :mod:`dynadiff.data.preprocess`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing as tp
from pathlib import Path

import numpy as np

from dynadiff.files import stamp_digest

SUBJECTS = (1, 2, 5, 7)  # the four subjects who completed all 40 sessions
N_SESSIONS = 40
# Sessions with resting-state runs: 14 runs, runs 1 and 14 are rest.
REST_SESSIONS = {
    1: range(21, 39),
    5: range(21, 39),
    2: range(21, 31),
    7: range(21, 31),
}
TIMESERIES_DIR = "nsddata_timeseries/ppdata/subj{subject:02d}/func1pt8mm/timeseries"
DESIGN_DIR = "nsddata_timeseries/ppdata/subj{subject:02d}/func1pt8mm/design"
ROI_DIR = "nsddata/ppdata/subj{subject:02d}/func1pt8mm/roi"
EXPDESIGN_KEY = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIMULI_KEY = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
EXPDESIGN_FILE = "nsd_expdesign.mat"  # saved at the data root
STIMULI_FILE = "nsd_stimuli.hdf5"  # saved at the data root
TEST_IDS_FILE = "test_images_ids.npy"
STIMULI_PNG_DIR = "nsd_stimuli"
SYNTHETIC_MARKER = ".dynadiff-synthetic"  # at the root of a synthetic mini-NSD (dynadiff.data.synthetic)
SYNTHETIC_SUMMARY = "synthetic.json"  # written last by the synthetic writer: its subjects, sessions, seed
NSD_BUCKET_URL = "s3://natural-scenes-dataset"


class NsdDataError(RuntimeError):
    """The NSD files on disk are missing or not what they should be."""


def check_subject(subject: int) -> int:
    if subject not in SUBJECTS:
        raise ValueError(f"unknown subject {subject!r}: NSD subjects with all 40 sessions are {list(SUBJECTS)}")
    return int(subject)


def runs_of_session(subject: int, session: int) -> list[int]:
    """The task runs of a session (1-based): 1..12, or 2..13 in 14-run rest sessions."""
    check_subject(subject)
    if not 1 <= session <= N_SESSIONS:
        raise ValueError(f"session {session} out of range 1..{N_SESSIONS}")
    if session in REST_SESSIONS[subject]:
        return list(range(2, 14))
    return list(range(1, 13))


@dataclasses.dataclass(frozen=True)
class Run:
    subject: int
    session: int
    run: int

    @property
    def uid(self) -> str:
        return f"subj{self.subject:02d}_session{self.session:02d}_run{self.run:02d}"

    def timeseries_path(self, root: Path) -> Path:
        name = f"timeseries_session{self.session:02d}_run{self.run:02d}.nii.gz"
        return Path(root) / TIMESERIES_DIR.format(subject=self.subject) / name

    def design_path(self, root: Path) -> Path:
        name = f"design_session{self.session:02d}_run{self.run:02d}.tsv"
        return Path(root) / DESIGN_DIR.format(subject=self.subject) / name


def list_runs(subject: int, sessions=None) -> list[Run]:
    """All task runs of a subject, sessions then runs in increasing order."""
    check_subject(subject)
    sessions = range(1, N_SESSIONS + 1) if sessions is None else sorted(sessions)
    return [Run(subject, ses, r) for ses in sessions for r in runs_of_session(subject, ses)]


def roi_path(root: Path, subject: int, name: str = "nsdgeneral") -> Path:
    return Path(root) / ROI_DIR.format(subject=subject) / f"{name}.nii.gz"


def is_synthetic(root: Path) -> bool:
    """True when ``root`` holds a synthetic mini-NSD (its marker file)."""
    return (Path(root) / SYNTHETIC_MARKER).is_file()


def fetch_command(root: Path, subjects=None, sessions=None) -> str:
    """The ``prepare_data.py`` command that writes the files of ``subjects`` (``sessions``) under ``root`` again.

    The download (which fetches the missing files and those whose size differs from the bucket's, and keeps
    the complete ones), or for a synthetic mini-NSD its rewrite with the subjects and seed of its summary.
    """
    root = Path(root)
    if is_synthetic(root):
        try:
            summary = json.loads((root / SYNTHETIC_SUMMARY).read_text())
            extra = f" --subjects {' '.join(map(str, summary['subjects']))} --seed {int(summary['seed'])}"
            if summary.get("hrf_peak_s", 5.0) != 5.0:
                extra += f" --hrf-peak-s {summary['hrf_peak_s']}"
        except (OSError, ValueError, KeyError, TypeError):  # an interrupted write has no summary yet
            extra = ""
        return f"python prepare_data.py --synthetic --path {root}{extra}"
    cmd = f"python prepare_data.py --nsd_bucket {NSD_BUCKET_URL} --path {root}"
    if subjects is not None:
        cmd += f" --subjects {' '.join(str(s) for s in subjects)}"
    if sessions is not None:
        cmd += f" --sessions {' '.join(str(s) for s in sessions)}"
    return cmd


def check_data_root(root: Path) -> Path:
    """``root`` if it is an existing folder, else :class:`NsdDataError` saying what it is and what to do."""
    root = Path(root)
    if root.is_dir():
        return root
    if root.exists():
        raise NsdDataError(f"{root} is a file, not a folder: give the NSD folder (the one prepare_data.py "
                           "downloads into)")
    raise NsdDataError(f"the NSD folder {root} does not exist: download the data with `{fetch_command(root)}` "
                       f"(or write a synthetic mini-NSD there with `python prepare_data.py --synthetic --path {root}`)")


def check_writable_folder(root: Path) -> Path:
    """``root`` if files can be written under it (an existing folder, or one that can be created).

    :class:`NsdDataError` when ``root`` or its nearest existing parent is a file or is not writable. Uses
    ``os.access``, which grants everything to root (the super-user) except on a read-only file system: run as
    root, only that case is caught here; other write failures are reported when they happen.
    """
    root = Path(root)
    existing = root
    while not existing.exists() and existing != existing.parent:  # nearest existing parent ('.' or '/' at worst)
        existing = existing.parent
    what = "" if existing == root else f"cannot create {root}: "
    if not existing.is_dir():
        raise NsdDataError(f"{what}{existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NsdDataError(f"{what}cannot write into {existing} (permission denied, or a read-only file system): "
                           "choose a folder you can write to")
    return root


def check_download_target(root: Path) -> Path:
    """``root`` if the real NSD may be downloaded into it: writable (see :func:`check_writable_folder`) and
    not a synthetic mini-NSD (real files would be mixed with synthetic ones)."""
    check_writable_folder(root)
    if is_synthetic(root):
        raise NsdDataError(f"{root} holds a synthetic mini-NSD (written by --synthetic): download the real NSD into "
                           f"another folder, or delete {root} first")
    return Path(root)


def check_files_exist(root: Path, runs: list[Run], subject: int) -> None:
    """Raise one error that lists *every* missing file (not one per try)."""
    check_data_root(root)
    needed = [roi_path(root, subject)]
    for run in runs:
        needed += [run.timeseries_path(root), run.design_path(root)]
    missing = [p for p in needed if not p.exists()]
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise NsdDataError(
            f"{len(missing)} NSD file(s) missing under {root}:\n  {shown}{more}\n"
            f"Download them with `{fetch_command(root, [subject])}`, or restrict the sessions with "
            "data.nsd_dataset_config.sessions=[...]."
        )


def load_design(path: Path, n_volumes: int) -> np.ndarray:
    """The design TSV: one integer per volume, the 1-based NSD id of the trial starting there, else 0."""
    try:
        values = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except (OSError, ValueError) as e:
        raise NsdDataError(f"cannot read design file {path}: {e}") from e
    if values.ndim != 1:
        raise NsdDataError(f"design file {path} should hold one value per line, got shape {values.shape}")
    if len(values) != n_volumes:
        raise NsdDataError(
            f"design file {path} has {len(values)} rows, expected {n_volumes} (one per used volume of the run)"
        )
    if np.any(values < 0) or np.any(values != np.round(values)):
        raise NsdDataError(f"design file {path} should hold non-negative integer image ids")
    return values.astype(np.int64)


def events_of_design(design: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(volume indices, 1-based NSD ids) of the events (non-zero rows) of a design."""
    volumes = np.flatnonzero(design)
    return volumes, design[volumes]


def load_test_ids(root: Path) -> np.ndarray:
    """The 1-based NSD ids of the shared test images (``sharedix``), in file order."""
    path = Path(root) / TEST_IDS_FILE
    if not path.exists():
        raise NsdDataError(
            f"{path} is missing: run `python prepare_data.py --path {root} ...` (it writes it from "
            f"{EXPDESIGN_FILE}'s `sharedix`)"
        )
    return np.load(path).astype(np.int64).ravel()


def stimulus_png(root: Path, nsd_id: int) -> Path:
    """PNG of a 1-based NSD id (row ``id - 1`` of ``imgBrick``)."""
    return Path(root) / STIMULI_PNG_DIR / f"{int(nsd_id) - 1}.png"


def file_stamp(paths: tp.Iterable[Path]) -> str:
    """A digest of the files' names, sizes and modification times: it changes when one is rewritten (a new
    synthetic mini-NSD, a file downloaded again), so that what was computed from the old files is not reused.
    The first 12 digits of :func:`dynadiff.files.stamp_digest` (the window caches' keys)."""
    return stamp_digest(list(paths))[:12]


@dataclasses.dataclass(frozen=True)
class RunEvents:
    """The events of one run whose windows are wanted: the unit of caching.

    ``stamp``: :func:`file_stamp` of the files the windows are computed from (the run's time
    series and the subject's mask), part of the cache key.
    """

    run: Run
    volumes: tuple[int, ...]
    stamp: str = ""

    @property
    def uid(self) -> str:
        import hashlib

        digest = hashlib.sha1((",".join(map(str, self.volumes)) + self.stamp).encode()).hexdigest()[:12]
        return f"{self.run.uid}_{len(self.volumes)}ev_{digest}"
