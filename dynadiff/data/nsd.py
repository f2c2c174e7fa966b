"""The Natural Scenes Dataset on disk: file layout, runs, designs and events.

Everything here is about *where* things are and *which* runs/events exist;
signal processing is in :mod:`dynadiff.data.preprocess`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

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


def check_files_exist(root: Path, runs: list[Run], subject: int) -> None:
    """Raise one error that lists *every* missing file (not one per try)."""
    needed = [roi_path(root, subject)]
    for run in runs:
        needed += [run.timeseries_path(root), run.design_path(root)]
    missing = [p for p in needed if not p.exists()]
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise NsdDataError(
            f"{len(missing)} NSD file(s) missing under {root}:\n  {shown}{more}\n"
            "Download them with `python prepare_data.py --nsd_bucket s3://natural-scenes-dataset --path "
            f"{root} --subjects {subject}`, or restrict the sessions with "
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


@dataclasses.dataclass(frozen=True)
class RunEvents:
    """The events of one run whose windows are wanted: the unit of caching."""

    run: Run
    volumes: tuple[int, ...]

    @property
    def uid(self) -> str:
        import hashlib

        digest = hashlib.sha1(",".join(map(str, self.volumes)).encode()).hexdigest()[:12]
        return f"{self.run.uid}_{len(self.volumes)}ev_{digest}"
