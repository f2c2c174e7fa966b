"""NSD fMRI windows and stimuli as a torch ``Dataset`` (docs/behaviour.md §2).

Flow: list the subject's task runs -> read each design -> keep the events of
the split -> per run, load + mask + clean the series once and cut every
event's window (cached per run by the config's exca ``MapInfra``) -> group
repetitions by image in order of first appearance -> average them, pick one
(seeded ``random.choice``) or keep all.
"""

from __future__ import annotations

import functools
import logging
import random
import typing as tp
from pathlib import Path

import numpy as np

from dynadiff.data import nsd
from dynadiff.data.preprocess import N_VOLUMES_USED, detrend_zscore, extract_windows, window_bounds

if tp.TYPE_CHECKING:
    from dynadiff.config import NsdDatasetConfig

logger = logging.getLogger(__name__)

_CHUNK_VOLUMES = 16  # volumes read at once when streaming a 4D series


def load_mask(root: Path, subject: int, sessions=None) -> np.ndarray:
    """Boolean 3D nsdgeneral mask (``> 0``); ``sessions`` only shape the fix an error proposes."""
    path = nsd.roi_path(root, subject)
    fix = nsd.fetch_command(root, [subject], sessions)
    img = _open_nifti(path, fix)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel/gzip/zlib raise several types for a damaged file
        raise _unreadable(path, e, fix) from e
    if data.ndim != 3:
        raise nsd.NsdDataError(f"{path} should be a 3D volume, got shape {data.shape}")
    return data > 0


def _unreadable(path: Path, e: BaseException, fix: str | None) -> nsd.NsdDataError:
    """The one-line error for a NIfTI file that cannot be read, with the command that fetches it again.

    A truncated file (its gzip stream ends early) is downloaded again by the download command, which fetches
    any file whose size differs from the bucket's; a damaged one may have the right size, which that command
    keeps (a multipart object's ETag is no checksum): it must be deleted first.
    """
    truncated = isinstance(e, EOFError)
    with_fix = f" with `{fix}`" if fix else " (the prepare_data.py command that downloaded it)"
    if fix and "--synthetic" in fix:
        todo = f"write the synthetic mini-NSD again{with_fix}"
    elif truncated:
        todo = f"download it again{with_fix}: files whose size differs from the bucket's are fetched again"
    else:
        todo = f"delete it, then download it again{with_fix}"
    state = "truncated" if truncated else "damaged"
    return nsd.NsdDataError(f"cannot read NIfTI file {path}: {state} ({type(e).__name__}: {e}); {todo}")


def _open_nifti(path: Path, fix: str | None):
    import nibabel as nib

    if not Path(path).exists():
        raise nsd.NsdDataError(f"missing NIfTI file {path}" + (f": fetch it with `{fix}`" if fix else ""))
    try:
        return nib.load(str(path), keep_file_open=True)
    except Exception as e:  # noqa: BLE001 - nibabel raises several types for corrupt files
        raise _unreadable(path, e, fix) from e


def load_masked_run(path: Path, mask: np.ndarray, n_volumes: int = N_VOLUMES_USED, fix: str | None = None
                    ) -> np.ndarray:
    """(voxels, n_volumes) float32: the masked first ``n_volumes`` volumes of a 4D series.

    Streams a few volumes at a time and masks them before any conversion to
    float, so memory stays at one chunk of raw volumes plus the masked output
    (never a float64 copy of the 4D run). An unreadable file is an
    :class:`~dynadiff.data.nsd.NsdDataError` that gives ``fix``, the command
    that fetches the file again (``None``: named in general terms).
    """
    img = _open_nifti(path, fix)
    shape = img.shape
    if len(shape) != 4 or tuple(shape[:3]) != mask.shape:
        raise nsd.NsdDataError(
            f"{path} has shape {shape}, expected 4D volumes of shape {mask.shape} (the subject's nsdgeneral mask)"
        )
    if shape[3] < n_volumes:
        raise nsd.NsdDataError(f"{path} has {shape[3]} volumes, expected at least {n_volumes}")
    out = np.empty((int(mask.sum()), n_volumes), dtype=np.float32)
    try:
        for start in range(0, n_volumes, _CHUNK_VOLUMES):
            stop = min(start + _CHUNK_VOLUMES, n_volumes)
            chunk = np.asanyarray(img.dataobj[..., start:stop])  # raw dtype unless the file is scaled
            out[:, start:stop] = chunk[mask]
    except Exception as e:  # noqa: BLE001 - gzip, zlib and nibabel raise several types for a damaged file
        raise _unreadable(path, e, fix) from e
    return out


def clean_runs(root: Path, items: tp.Iterable[nsd.RunEvents], sessions=None) -> tp.Iterator[np.ndarray]:
    """(voxels, 225) float32 per item: its run's nsdgeneral voxels, detrended and z-scored (each run loaded and
    cleaned once per item; ``sessions`` only shape the fix an error proposes)."""
    root = Path(root)
    masks: dict[int, np.ndarray] = {}
    for item in items:
        run = item.run
        if run.subject not in masks:
            masks[run.subject] = load_mask(root, run.subject, sessions)
        fix = nsd.fetch_command(root, [run.subject], [run.session])
        yield detrend_zscore(load_masked_run(run.timeseries_path(root), masks[run.subject], fix=fix))


def compute_run_windows(cfg: "NsdDatasetConfig", items: tp.Iterable[nsd.RunEvents]) -> tp.Iterator[np.ndarray]:
    """Windows (n_events, voxels, n_trs) float32 for each item, each run loaded and cleaned once."""
    if cfg.bids is not None:
        from dynadiff.data import bids

        yield from bids.compute_run_windows(cfg, items)
        return
    items = list(items)
    for item, clean in zip(items, clean_runs(Path(cfg.nsddata_path), items, cfg.sessions)):
        yield extract_windows(clean, item.volumes, cfg.offset, cfg.duration)


class Trial(tp.NamedTuple):
    item: int  # index into the list of RunEvents
    row: int  # row within that item's windows
    nsd_id: int  # 1-based


def list_trials(cfg: "NsdDatasetConfig", check_windows: bool = True) -> tuple[list[nsd.RunEvents], list[Trial]]:
    """The split's events in chronological order (sessions, runs, volumes), grouped per run.

    ``check_windows``: an event whose window (the config's offset and duration) runs past its run is an
    error in the test split (windows are never padded), and left out of the train split (counted in a warning:
    a window far from eval.py's, e.g. for a per-offset model, cannot fit every event); off for a time course,
    which leaves such events out per offset.

    A BIDS source (``cfg.bids``): :func:`dynadiff.data.bids.list_trials` (items hold onsets in seconds).
    """
    if cfg.bids is not None:
        from dynadiff.data import bids

        return bids.list_trials(cfg, check_windows)
    root = Path(cfg.nsddata_path)
    runs = nsd.list_runs(cfg.subject, first_sessions(cfg.sessions or range(1, nsd.N_SESSIONS + 1),
                                                     cfg.first_sessions, f"NSD subject {cfg.subject}"))
    nsd.check_files_exist(root, runs, cfg.subject)
    test_ids = nsd.load_test_ids(root)
    items: list[nsd.RunEvents] = []
    trials: list[Trial] = []
    dropped = 0
    for run in runs:
        design = nsd.load_design(run.design_path(root), N_VOLUMES_USED)
        volumes, ids = nsd.events_of_design(design)
        is_test = np.isin(ids, test_ids)
        keep = is_test if cfg.split == "test" else ~is_test
        volumes, ids = volumes[keep], ids[keep]
        if check_windows and cfg.split == "train":
            bounds = [window_bounds(int(t), cfg.offset, cfg.duration) for t in volumes]
            inside = np.array([start >= 0 and end <= N_VOLUMES_USED for start, end in bounds], dtype=bool)
            dropped += int((~inside).sum())
            volumes, ids = volumes[inside], ids[inside]
        if not len(volumes):
            continue
        for t in volumes if check_windows else ():
            start, end = window_bounds(int(t), cfg.offset, cfg.duration)
            if start < 0 or end > N_VOLUMES_USED:
                raise nsd.NsdDataError(
                    f"the window [{start}, {end}) of the event at volume {t} in {run.design_path(root)} runs "
                    f"past the run's {N_VOLUMES_USED} volumes (offset={cfg.offset} s, duration={cfg.duration} s)"
                )
        for row, nsd_id in enumerate(ids):
            trials.append(Trial(len(items), row, int(nsd_id)))
        stamp = nsd.file_stamp([run.timeseries_path(root), nsd.roi_path(root, cfg.subject)])
        items.append(nsd.RunEvents(run, tuple(int(v) for v in volumes), stamp))
    if dropped:
        start, end = window_bounds(0, cfg.offset, cfg.duration)
        logger.warning("subject %d, train: %d event(s) left out, their window (volumes t%+d .. t%+d) running past the "
                       "start or end of their run", cfg.subject, dropped, start, end - 1)
    return items, trials


def first_sessions(sessions: tp.Iterable[int], k: int | None, whose: str) -> list[int]:
    """The first ``k`` of ``sessions`` in chronological (increasing) order (all of them without ``k``); more than
    there are is an error."""
    sessions = sorted(set(sessions))
    if k is None:
        return sessions
    if k > len(sessions):
        raise nsd.NsdDataError(f"first_sessions={k} (--first-sessions) but {whose} has {len(sessions)} session(s) "
                               f"to choose from ({', '.join(map(str, sessions))}): ask for {len(sessions)} or fewer")
    return sessions[:k]


def data_digest(cfg: "NsdDatasetConfig") -> str:
    """A digest of the data an evaluation reads (its windows' files, designs and test ids): a rewritten data
    folder is a new evaluation (``EvalConfig.data_digest``), never one served from the old data's cache."""
    import hashlib

    root = Path(cfg.nsddata_path)
    items, trials = list_trials(cfg)
    if cfg.bids is not None:
        from dynadiff.data import bids

        designs = nsd.file_stamp(bids.data_digest_files(cfg, items))
    else:
        designs = nsd.file_stamp([item.run.design_path(root) for item in items] + [root / nsd.TEST_IDS_FILE])
    h = hashlib.sha1(designs.encode())
    for item in items:
        h.update(item.uid.encode())
    return h.hexdigest()[:16]


def group_by_image(trials: tp.Sequence[Trial]) -> dict[int, list[Trial]]:
    """Repetitions per image, images in order of first appearance (dicts keep insertion order)."""
    groups: dict[int, list[Trial]] = {}
    for trial in trials:
        groups.setdefault(trial.nsd_id, []).append(trial)
    return groups


def select_samples(trials: tp.Sequence[Trial], split: str, averaged: bool, seed: int) -> list[list[Trial]]:
    """Samples as lists of trials to average.

    - averaged: one sample per image, the mean of all its repetitions;
    - test, unaveraged: one repetition per image, ``random.seed(seed)`` then
      ``random.choice`` per image in order of first appearance (the original's);
    - train, unaveraged: every repetition is its own sample, chronological order.
    """
    if split == "train" and not averaged:
        return [[t] for t in trials]
    groups = group_by_image(trials)
    if averaged:
        return list(groups.values())
    rng = random.Random(seed)  # same sequence as random.seed(seed); random.choice(...)
    return [[rng.choice(reps)] for reps in groups.values()]


class NsdDataset:
    """torch ``Dataset``: ``{"brain": (V, T) float32, "img": (3, S, S) float in [0, 1], "subject_idx": long}``.

    ``nsd_ids[i]`` is the 1-based NSD id of sample ``i`` (a BIDS source's image id); windows are read
    from the exca cache (memory-mapped) when a sample is asked for. ``image_path``: image id -> its file
    (None: NSD's prepared PNG under ``root``).
    """

    def __init__(self, windows: list[np.ndarray], samples: list[list[Trial]], root: Path, image_size: int,
                 subject_idx: int = 0, image_path: tp.Callable[[int], Path] | None = None) -> None:
        self._windows = windows
        self._samples = samples
        self.root = Path(root)
        self.image_path = image_path or functools.partial(nsd.stimulus_png, self.root)
        self.image_size = image_size
        self.subject_idx = subject_idx
        self.nsd_ids = [s[0].nsd_id for s in samples]
        self.n_repetitions = [len(s) for s in samples]
        first = windows[0] if windows else np.zeros((0, 0, 0))
        self.n_voxels, self.n_trs = (first.shape[1], first.shape[2]) if first.ndim == 3 else (0, 0)

    def __len__(self) -> int:
        return len(self._samples)

    def brain(self, index: int) -> np.ndarray:
        """(V, T) float32 window (mean over the sample's repetitions)."""
        trials = self._samples[index]
        if len(trials) == 1:
            t = trials[0]
            return np.array(self._windows[t.item][t.row], dtype=np.float32)
        acc = np.zeros((self.n_voxels, self.n_trs), dtype=np.float64)
        for t in trials:
            acc += self._windows[t.item][t.row]
        return (acc / len(trials)).astype(np.float32)

    def image(self, index: int, size: int | None = None) -> np.ndarray:
        """(S, S, 3) uint8: the stimulus, RGB, resized with bilinear filtering (to ``size``, else the config's)."""
        return load_image(self.image_path(self.nsd_ids[index]), size or self.image_size)

    def __getitem__(self, index: int) -> dict:
        import torch

        img = torch.from_numpy(self.image(index).copy()).permute(2, 0, 1).float().div_(255.0)
        return {
            "brain": torch.from_numpy(self.brain(index)),
            "img": img,
            "subject_idx": torch.tensor(self.subject_idx, dtype=torch.long),
        }


def image_paths(cfg: "NsdDatasetConfig") -> tp.Callable[[int], Path]:
    """Image id -> its file: NSD's prepared PNG, or the BIDS source's stimulus."""
    if cfg.bids is not None:
        from dynadiff.data import bids

        return functools.partial(bids.image_path, cfg.bids)
    return functools.partial(nsd.stimulus_png, Path(cfg.nsddata_path))


def load_stimulus(root: Path, nsd_id: int, size: int = 512) -> np.ndarray:
    return load_image(nsd.stimulus_png(root, nsd_id), size)


def load_image(path: Path, size: int = 512) -> np.ndarray:
    """(size, size, 3) uint8: an image file, RGB, resized with bilinear filtering."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def build_dataset(cfg: "NsdDatasetConfig", subject_idx: int = 0) -> NsdDataset:
    root = Path(cfg.nsddata_path)
    items, trials = list_trials(cfg)
    if not trials:
        raise nsd.NsdDataError(f"no {cfg.split} events for subject {cfg.subject} under {cfg.data_folder}")
    samples = select_samples(trials, cfg.split, cfg.averaged, cfg.seed)
    if cfg.bids is not None:  # every image named by the events was found when the trials were listed
        logger.info("subject %d (BIDS), %s: %d events in %d runs -> %d samples", cfg.subject, cfg.split, len(trials),
                    len(items), len(samples))
        windows = list(cfg.run_windows(items))
        return NsdDataset(windows, samples, cfg.data_folder, cfg.image_size, subject_idx=subject_idx,
                          image_path=image_paths(cfg))
    missing = sorted({s[0].nsd_id for s in samples if not nsd.stimulus_png(root, s[0].nsd_id).exists()})
    if missing:
        raise nsd.NsdDataError(
            f"{len(missing)} stimulus PNG(s) missing under {root / nsd.STIMULI_PNG_DIR} (e.g. "
            f"{nsd.stimulus_png(root, missing[0])}); run `python prepare_data.py --skip-download --path {root}`"
        )
    logger.info("subject %d, %s: %d events in %d runs -> %d samples", cfg.subject, cfg.split, len(trials), len(items),
                len(samples))
    windows = list(cfg.run_windows(items))
    return NsdDataset(windows, samples, root, cfg.image_size, subject_idx=subject_idx)


def split_by_image(nsd_ids: tp.Sequence[int], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Positions of the training and the validation samples, held out by image.

    ``nsd_ids[i]`` is the image of sample ``i`` (several samples may share one:
    repetitions, subjects). ``round(fraction * n_images)`` images (at least one
    when ``fraction > 0``), drawn with ``numpy.random.default_rng(seed)`` among
    the sorted distinct ids, go to validation with all their samples: no image
    is in both parts. Positions keep their order.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the validation fraction must be within [0, 1), got {fraction}")
    images = np.unique(np.asarray(nsd_ids, dtype=np.int64))
    n_val = 0 if fraction == 0 else max(1, int(round(fraction * len(images))))
    if n_val >= len(images):
        raise ValueError(
            f"a validation fraction of {fraction} of {len(images)} image(s) leaves no training image"
        )
    val_images = set(np.random.default_rng(seed).choice(images, size=n_val, replace=False).tolist())
    train, val = [], []
    for i, nsd_id in enumerate(nsd_ids):
        (val if int(nsd_id) in val_images else train).append(i)
    return train, val
