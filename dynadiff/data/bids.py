"""A BIDS dataset as a data source, beside NSD (docs/bids.md).

What is read, through pybids' ``BIDSLayout``:

- the subject's BOLD runs: raw ``*_bold.nii[.gz]``, or with ``derivatives`` fMRIPrep's
  ``*[_space-S]_desc-preproc_bold.nii[.gz]``; ``sessions``, ``task`` and ``runs`` select among them;
  runs without an ``*_events.tsv`` (rest) are not used;
- each run's ``*_events.tsv``: ``onset`` (seconds) and the column naming the image (BIDS's
  ``stim_file``, relative to ``stimuli/``, or the one ``image_column`` names); rows without an image
  (``n/a``, fixation) are not trials;
- ``RepetitionTime`` from the sidecars (checked against the NIfTI header's);
- a mask: the derivatives' ``desc-brain_mask`` of each run, or the NIfTI ``mask`` (``{subject}`` in its
  path is the participant label), keeping ``mask_labels`` (an atlas) or every value > 0;
- the images: every image file under ``stimuli`` (sorted by name: image ``k`` of that list has id
  ``k + 1``, the id trials carry as NSD's trials carry NSD ids).

Test images are those of ``test_images`` (a text file, one image name per line), else the images shown
more than once to the subject (as NSD's shared images); the others train.

The model's window is defined in seconds (:func:`dynadiff.data.preprocess.window_times`); a run is
cleaned as an NSD run (detrended and z-scored over its volumes, same streaming loader) and the window is
sampled on its own grid by linear interpolation (:func:`dynadiff.data.preprocess.sample_windows`).

Every check that can fail on the files runs when the trials are listed (headers and TSVs only), before any
run is loaded: each failure is one :class:`BidsDataError` line naming the file and what to do.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import typing as tp
from pathlib import Path

import numpy as np

from dynadiff.data import nsd

if tp.TYPE_CHECKING:
    from dynadiff.config import BidsSource, NsdDatasetConfig

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
TR_TOLERANCE_S = 1e-3  # seconds: two TRs of a run (sidecar, header, a flag) that differ by more disagree


class BidsDataError(nsd.NsdDataError):
    """A BIDS dataset's files are missing or not what the configuration asks for."""


@dataclasses.dataclass(frozen=True)
class BidsRun:
    """One BOLD run of a BIDS dataset and what its windows need."""

    subject: str  # participant label, without "sub-"
    session: str | None
    task: str
    run: int | None
    bold: Path
    events: Path
    mask: Path
    tr: float
    n_volumes: int

    @property
    def uid(self) -> str:
        parts = [f"sub-{self.subject}"] + ([f"ses-{self.session}"] if self.session else []) + [f"task-{self.task}"]
        parts += [f"run-{self.run:02d}"] if self.run is not None else []
        return "_".join(parts)

    # the names NSD's runs have, so that code reading ``item.run`` (time course, logs) reads either
    def timeseries_path(self, root=None) -> Path:
        return self.bold


def label_number(label: str) -> int | None:
    """The number a label ends with (``01`` -> 1, ``CSI3`` -> 3), or None."""
    m = re.search(r"(\d+)$", label)
    return int(m.group(1)) if m else None


@functools.lru_cache(maxsize=8)
def _layout(root: str, derivatives: str | None, stamp: str):
    from bids import BIDSLayout

    try:
        return BIDSLayout(root, derivatives=[derivatives] if derivatives else False, validate=False)
    except Exception as e:  # noqa: BLE001 - pybids raises several types for a folder that is not BIDS
        raise BidsDataError(f"cannot read the BIDS dataset {root}"
                            + (f" with derivatives {derivatives}" if derivatives else "")
                            + f": {e} (each needs a dataset_description.json; a derivatives folder's names its "
                              "pipeline in GeneratedBy)") from e


def open_layout(src: "BidsSource"):
    """The dataset's ``BIDSLayout`` (indexed once per process, again when a top folder changes)."""
    root = Path(src.root)
    if not (root / "dataset_description.json").is_file():
        what = "does not exist" if not root.exists() else "has no dataset_description.json"
        raise BidsDataError(f"the BIDS dataset {root} {what}: give the folder that holds the dataset "
                            "(data.nsd_dataset_config.bids.root, prepare_data.py --bids DIR)")
    if src.derivatives is not None and not (Path(src.derivatives) / "dataset_description.json").is_file():
        raise BidsDataError(f"the derivatives folder {src.derivatives} has no dataset_description.json: give "
                            "fMRIPrep's output folder (the one holding sub-*/ and dataset_description.json)")
    folders = [root] + ([Path(src.derivatives)] if src.derivatives else [])
    stamp = nsd.file_stamp(p for f in folders for p in [f, *sorted(f.glob("sub-*"))])
    return _layout(str(root), str(src.derivatives) if src.derivatives else None, stamp)


def subject_label(layout, subject: int) -> str:
    """The participant label of subject number ``subject``: the one ending in that number (01, CSI1, ...)."""
    labels = sorted(layout.get_subjects())
    matches = [label for label in labels if label_number(label) == subject]
    if len(matches) == 1:
        return matches[0]
    shown = ", ".join(labels[:12]) + (", ..." if len(labels) > 12 else "")
    if not matches:
        raise BidsDataError(f"no participant of {layout.root} has a label ending in {subject} (labels: "
                            f"{shown or 'none'}): choose the subject by the number its label ends with (sub-01 and "
                            "sub-CSI1 are 1)")
    raise BidsDataError(f"participants {matches} of {layout.root} all end in {subject}: subject numbers must be unique")


def tr_of_header(header) -> float | None:
    """Seconds per volume in a 4-D NIfTI header (its 4th zoom, in its time unit), None where it says none."""
    zooms, unit = header.get_zooms(), header.get_xyzt_units()[1]
    scale = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}.get(unit)
    if len(zooms) < 4 or scale is None or not zooms[3] > 0:
        return None
    return float(zooms[3]) * scale


def _tr_of(layout, bold: Path, header) -> float:
    meta = layout.get_metadata(str(bold))
    tr = meta.get("RepetitionTime")
    sidecar = bold.name.split(".")[0] + ".json"
    if tr is None:
        raise BidsDataError(f"{bold}: no RepetitionTime in its sidecar (e.g. {sidecar}): add it, in seconds")
    try:
        tr = float(tr)
    except (TypeError, ValueError):
        raise BidsDataError(f"{bold}: RepetitionTime {tr!r} in its sidecar is not a number of seconds") from None
    if not tr > 0:
        raise BidsDataError(f"{bold}: RepetitionTime {tr} in its sidecar must be positive")
    header_tr = tr_of_header(header)
    if header_tr is not None:
        if abs(header_tr - tr) > TR_TOLERANCE_S:
            raise BidsDataError(f"{bold}: its sidecar's RepetitionTime is {tr:g} s but its NIfTI header says "
                                f"{header_tr:g} s: fix the wrong one (BIDS takes the sidecar's)")
    return tr


def _check_same_grid(mask: Path, mask_img, bold: Path, bold_img) -> None:
    shape, affine = tuple(mask_img.shape[:3]), mask_img.affine
    if tuple(bold_img.shape[:3]) != shape or not np.allclose(affine, bold_img.affine, atol=1e-3):
        raise BidsDataError(
            f"the mask {mask} (shape {shape}) is not on the grid of {bold} (shape {tuple(bold_img.shape[:3])}"
            f"{', another affine' if tuple(bold_img.shape[:3]) == shape else ''}): resample it to the BOLD's grid "
            "(nilearn.image.resample_to_img(mask, bold, interpolation='nearest')), or choose the derivatives' "
            "space it is in (data.nsd_dataset_config.bids.space)")


def _header(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as e:  # noqa: BLE001 - nibabel raises several types for damaged files
        raise BidsDataError(f"cannot read NIfTI file {path} ({type(e).__name__}: {e}): fetch or write it again") from e


def list_runs(cfg: "NsdDatasetConfig") -> list[BidsRun]:
    """The subject's BOLD runs with events, in session, task, run order; their files checked (headers only)."""
    src = cfg.bids
    layout = open_layout(src)
    label = subject_label(layout, cfg.subject)
    query = {"subject": label, "suffix": "bold", "extension": [".nii.gz", ".nii"]}
    if src.task is not None:
        query["task"] = src.task
    if src.derivatives is not None:
        query.update(scope="derivatives", desc="preproc")
        if src.space is not None:
            query["space"] = src.space
    else:
        query["scope"] = "raw"
    bolds = layout.get(**query)
    where = f"{src.derivatives} (desc-preproc{f', space-{src.space}' if src.space else ''})" if src.derivatives \
        else str(src.root)
    if not bolds:
        raise BidsDataError(f"no BOLD run of sub-{label}{f' task-{src.task}' if src.task else ''} in {where}")
    if src.derivatives is not None and src.space is None:
        spaces = sorted({b.entities.get("space") for b in bolds if b.entities.get("space")})
        if len(spaces) > 1:
            raise BidsDataError(f"{where} has sub-{label}'s preprocessed runs in spaces {spaces}: choose one with "
                                "data.nsd_dataset_config.bids.space")
    # one query for all the events (and the brain masks), matched to the runs by their entities: a query per run
    # costs pybids a database round trip each
    derivatives = Path(src.derivatives) if src.derivatives is not None else None
    events = _by_entities(layout.get(subject=label, suffix="events", extension=".tsv"), _RUN_ENTITIES, derivatives)
    masks = {} if src.mask is not None or derivatives is None else _by_entities(
        layout.get(scope="derivatives", subject=label, suffix="mask", desc="brain", extension=[".nii.gz", ".nii"]),
        _RUN_ENTITIES + ("space",), None)
    sessions = _sessions(cfg, bolds, f"sub-{label} in {where}")  # None: every run, with a session or not
    runs: list[BidsRun] = []
    for bold in bolds:
        ent = bold.entities
        session, run = ent.get("session"), ent.get("run")
        if sessions is not None and (session is None or label_number(str(session)) not in sessions):
            continue
        if src.runs is not None and (run is None or int(run) not in src.runs):
            continue
        events_path = events.get(_key(ent, _RUN_ENTITIES))
        if events_path is None:
            continue  # rest, or a task without images
        bold_path = Path(bold.path)
        img = _header(bold_path)
        if len(img.shape) != 4:
            raise BidsDataError(f"{bold_path} should be a 4D series, got shape {img.shape}")
        mask_path = _mask_path(src, label, masks.get(_key(ent, _RUN_ENTITIES + ("space",))), bold_path)
        mask_img = _header(mask_path)
        _check_same_grid(mask_path, mask_img, bold_path, img)
        runs.append(BidsRun(label, str(session) if session is not None else None, str(ent["task"]),
                            int(run) if run is not None else None, bold_path, events_path, mask_path,
                            _tr_of(layout, bold_path, img.header), int(img.shape[3])))
    if not runs:
        chosen = f" in sessions {cfg.sessions}" if cfg.sessions is not None else ""
        raise BidsDataError(f"no run of sub-{label}{chosen} in {where} has an events.tsv: decoding needs each run's "
                            "events (onset and image)")
    runs.sort(key=lambda r: (r.session or "", r.task, r.run if r.run is not None else -1))
    return runs


_RUN_ENTITIES = ("session", "task", "run", "acquisition")


def _key(entities: dict, names: tuple[str, ...]) -> tuple:
    return tuple(str(entities.get(name)) for name in names)


def _by_entities(files, names: tuple[str, ...], derivatives: Path | None) -> dict[tuple, Path]:
    """Files by their entities ``names``; where two share them, the raw dataset's over a copy under
    ``derivatives`` (which often lies inside the raw dataset's folder)."""
    def raw(f) -> bool:
        return derivatives is None or not Path(f.path).is_relative_to(derivatives)

    out: dict[tuple, Path] = {}
    for f in sorted(files, key=raw):  # the raw ones last: they win
        out[_key(f.entities, names)] = Path(f.path)
    return out


def _sessions(cfg: "NsdDatasetConfig", bolds, whose: str) -> set[int] | None:
    """The session numbers whose runs are read: ``sessions``, then the first ``first_sessions`` of them (of those
    present, in chronological order); None where neither is given."""
    if cfg.sessions is None and cfg.first_sessions is None:
        return None
    present = {label_number(str(b.entities["session"])) for b in bolds if b.entities.get("session") is not None}
    present.discard(None)
    if cfg.sessions is not None:
        present &= set(cfg.sessions)
    if cfg.first_sessions is None:
        return present
    from dynadiff.data.dataset import first_sessions

    try:
        return set(first_sessions(present, cfg.first_sessions, whose))
    except nsd.NsdDataError as e:
        raise BidsDataError(str(e)) from None


def _mask_path(src: "BidsSource", label: str, brain_mask: Path | None, bold: Path) -> Path:
    if src.mask is not None:
        path = Path(str(src.mask).replace("{subject}", label))
        if not path.is_file():
            raise BidsDataError(f"the mask {path} does not exist (data.nsd_dataset_config.bids.mask; {{subject}} is "
                                "the participant label): give a NIfTI mask or atlas on the BOLD's grid")
        return path
    if src.derivatives is None:
        raise BidsDataError("raw BIDS runs need a mask: give a NIfTI mask or atlas (data.nsd_dataset_config.bids.mask, "
                            "prepare_data.py --mask), or fMRIPrep's derivatives (bids.derivatives, --derivatives), "
                            "whose brain masks are used")
    if brain_mask is None:
        raise BidsDataError(f"no desc-brain_mask beside {bold} in the derivatives: give a NIfTI mask "
                            "(data.nsd_dataset_config.bids.mask)")
    return brain_mask


def read_events(path: Path, image_column: str) -> tuple[np.ndarray, list[str]]:
    """(onsets in seconds, image names) of the rows of an ``events.tsv`` that name an image."""
    import csv

    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError) as e:
        raise BidsDataError(f"cannot read {path}: {e}") from e
    if not rows:
        raise BidsDataError(f"{path} is empty: an events.tsv has a header row (onset, duration, ...) then one row "
                            "per event")
    header = [h.strip() for h in rows[0]]
    for column in ("onset", image_column):
        if column not in header:
            hint = (" (name the column holding the image with data.nsd_dataset_config.bids.image_column, "
                    "prepare_data.py --image-column)" if column == image_column else "")
            raise BidsDataError(f"{path} has no '{column}' column (columns: {', '.join(header)}){hint}")
    i_onset, i_image = header.index("onset"), header.index(image_column)
    onsets, names = [], []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise BidsDataError(f"{path}, line {n}: {len(row)} fields, the header has {len(header)} (tab-separated)")
        name = row[i_image].strip()
        if not name or name == "n/a":
            continue
        try:
            onset = float(row[i_onset])
        except ValueError:
            raise BidsDataError(f"{path}, line {n}: onset {row[i_onset]!r} is not a number of seconds") from None
        onsets.append(onset)
        names.append(name[len("stimuli/"):] if name.startswith("stimuli/") else name)
    return np.asarray(onsets, dtype=np.float64), names


def stimuli_folder(src: "BidsSource") -> Path:
    return Path(src.stimuli) if src.stimuli is not None else Path(src.root) / "stimuli"


@functools.lru_cache(maxsize=8)
def _image_list(folder: str, stamp: str) -> tuple[str, ...]:
    root = Path(folder)
    return tuple(sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))


def image_names(src: "BidsSource") -> tuple[str, ...]:
    """Every image under the stimuli folder, sorted: name ``k`` has id ``k + 1``."""
    folder = stimuli_folder(src)
    if not folder.is_dir():
        raise BidsDataError(f"the stimuli folder {folder} does not exist: the images named by the events must be "
                            "there (data.nsd_dataset_config.bids.stimuli names another folder)")
    return _image_list(str(folder), nsd.file_stamp([folder, *sorted(folder.iterdir())]))


def image_path(src: "BidsSource", image_id: int) -> Path:
    return stimuli_folder(src) / image_names(src)[image_id - 1]


def read_test_images(src: "BidsSource", ids: dict[str, int]) -> set[int]:
    path = Path(src.test_images)
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise BidsDataError(f"cannot read the test images list {path}: {e}") from e
    unknown = [n for n in names if n not in ids]
    if unknown:
        raise BidsDataError(f"{path} names {len(unknown)} image(s) not in {stimuli_folder(src)}, e.g. {unknown[0]!r}: "
                            "one image per line, named as in the events' image column")
    return {ids[n] for n in names}


def list_trials(cfg: "NsdDatasetConfig", check_windows: bool = True):
    """As :func:`dynadiff.data.dataset.list_trials`, for a BIDS source: items hold onsets in seconds."""
    from dynadiff.data.dataset import Trial
    from dynadiff.data.preprocess import sample_positions, window_times

    src = cfg.bids
    runs = list_runs(cfg)
    ids = {name: k + 1 for k, name in enumerate(image_names(src))}
    per_run = []
    for run in runs:
        onsets, names = read_events(run.events, src.image_column)
        missing = [n for n in names if n not in ids]
        if missing:
            raise BidsDataError(f"{run.events} names image {missing[0]!r}, absent from {stimuli_folder(src)}"
                                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: put the images "
                                "there, or give their folder (data.nsd_dataset_config.bids.stimuli)")
        per_run.append((run, onsets, np.array([ids[n] for n in names], dtype=np.int64)))
    if src.test_images is not None:
        test_ids = read_test_images(src, ids)
    else:
        all_ids = np.concatenate([i for _, _, i in per_run]) if per_run else np.zeros(0, np.int64)
        values, counts = np.unique(all_ids, return_counts=True)
        test_ids = set(values[counts > 1].tolist())
        if not test_ids:
            raise BidsDataError(f"no image is shown more than once to sub-{runs[0].subject} in {src.root}, and no "
                                "test list is given: name the test images in a text file, one per line "
                                "(data.nsd_dataset_config.bids.test_images, prepare_data.py --test-images)")
    times = window_times(cfg.offset, cfg.duration)
    items, trials, dropped = [], [], 0
    for run, onsets, image_ids in per_run:
        is_test = np.isin(image_ids, list(test_ids))
        keep = is_test if cfg.split == "test" else ~is_test
        onsets, image_ids = onsets[keep], image_ids[keep]
        if check_windows and len(onsets):
            pos = sample_positions(onsets, times, run.tr)
            inside = (pos.min(axis=1) >= 0) & (pos.max(axis=1) <= run.n_volumes - 1)
            if cfg.split == "test" and not inside.all():
                bad = float(onsets[~inside][0])
                raise BidsDataError(
                    f"the window of the event at {bad:g} s in {run.events} ({bad + times[0]:.2f} .. "
                    f"{bad + times[-1]:.2f} s) runs past its run ({run.n_volumes} volumes of {run.tr:g} s: 0 .. "
                    f"{(run.n_volumes - 1) * run.tr:.2f} s): a test window is never padded; move the window "
                    f"(offset={cfg.offset} s, duration={cfg.duration} s) or leave the event out")
            dropped += int((~inside).sum())
            onsets, image_ids = onsets[inside], image_ids[inside]
        if not len(onsets):
            continue
        for row, image_id in enumerate(image_ids):
            trials.append(Trial(len(items), row, int(image_id)))
        stamp = nsd.file_stamp([run.bold, run.mask, run.events])
        items.append(nsd.RunEvents(run, tuple(float(o) for o in onsets), stamp))
    if dropped:
        logger.warning("sub-%s, train: %d event(s) left out, their window (%.2f .. %.2f s after onset) running past "
                       "the start or end of their run", runs[0].subject, dropped, times[0], times[-1])
    return items, trials


def load_mask(path: Path, labels: tp.Sequence[int] | None) -> np.ndarray:
    img = _header(path)
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise BidsDataError(f"the mask {path} should be a 3D volume, got shape {data.shape}")
    mask = np.isin(data, list(labels)) if labels is not None else data > 0
    if not mask.any():
        which = f"has no voxel labelled {list(labels)}" if labels is not None else "has no voxel above 0"
        raise BidsDataError(f"the mask {path} {which}: nothing to decode from")
    return mask


def clean_runs(cfg: "NsdDatasetConfig", items) -> tp.Iterator[np.ndarray]:
    """(voxels, volumes) float32 per item: the run's masked voxels, detrended and z-scored as NSD's runs."""
    from dynadiff.data.dataset import load_masked_run
    from dynadiff.data.preprocess import detrend_zscore

    masks: dict[Path, np.ndarray] = {}
    for item in items:
        run = item.run
        if run.mask not in masks:
            masks[run.mask] = load_mask(run.mask, cfg.bids.mask_labels)
        yield detrend_zscore(load_masked_run(run.bold, masks[run.mask], n_volumes=run.n_volumes))


def compute_run_windows(cfg: "NsdDatasetConfig", items) -> tp.Iterator[np.ndarray]:
    """Windows (n_events, voxels, n_trs) float32 per item, sampled at the window's seconds on the run's grid."""
    from dynadiff.data.preprocess import sample_windows, window_times

    items = list(items)
    times = window_times(cfg.offset, cfg.duration)
    for item, clean in zip(items, clean_runs(cfg, items)):
        yield sample_windows(clean, item.volumes, times, item.run.tr)


def data_digest_files(cfg: "NsdDatasetConfig", items) -> list[Path]:
    """The files besides the runs that decide the trials: the events and the test list."""
    files = [item.run.events for item in items]
    return files + ([Path(cfg.bids.test_images)] if cfg.bids.test_images is not None else [])


def describe(cfg: "NsdDatasetConfig") -> str:
    """What a participant has, in one line: runs and TRs, test images and events, train events, voxels (listing
    both splits checks every file the windows need; no run is loaded)."""
    test_items, test_trials = list_trials(cfg.model_copy(update={"split": "test"}))
    train_items, train_trials = list_trials(cfg.model_copy(update={"split": "train"}))
    runs = {item.run.uid: item.run for item in test_items + train_items}
    trs = sorted({f"{run.tr:g}" for run in runs.values()})
    masks = {run.mask for run in runs.values()}
    voxels = sorted({int(load_mask(m, cfg.bids.mask_labels).sum()) for m in masks})
    label = next(iter(runs.values())).subject if runs else "?"
    return (f"sub-{label}: {len(runs)} runs (TR {', '.join(trs)} s), {len({t.nsd_id for t in test_trials})} test "
            f"images ({len(test_trials)} events), {len(train_trials)} train events "
            f"({len({t.nsd_id for t in train_trials})} images), {'/'.join(map(str, voxels))} voxels in the mask")
