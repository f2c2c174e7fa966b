"""Stimulus preparation (docs/behaviour.md §1): ``nsd_stimuli/{k}.png`` and ``test_images_ids.npy``.

``nsd_stimuli.hdf5`` holds ``imgBrick`` (73000, 425, 425, 3) uint8, about
40 GB. It is never loaded whole: worker processes each open the file and read
blocks of at most ``chunk_rows`` rows, so peak memory depends on
``chunk_rows`` and the number of workers, not on the size of the brick.

Idempotent: an existing PNG that decodes to an RGB image of the brick's size
is kept; a missing or corrupt one is (re)written, to a temporary name first
and then renamed, so an interrupted run never leaves a half-written PNG under
its final name.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import multiprocessing
import os
import re
import typing as tp
from pathlib import Path

import numpy as np

from dynadiff.data.nsd import (
    EXPDESIGN_FILE,
    STIMULI_FILE,
    STIMULI_PNG_DIR,
    SUBJECTS,
    TEST_IDS_FILE,
    NsdDataError,
    check_data_root,
    check_subject,
)
from dynadiff.files import atomic_path

logger = logging.getLogger(__name__)

IMAGE_CHOICES = ("subjects", "test", "all")
DATASET = "imgBrick"
_PART = re.compile(r"\.\d+\.png\.part")  # temporary name of a PNG being written (dynadiff.files.part_path)


# ----------------------------------------------------------------------------- experiment design


@dataclasses.dataclass(frozen=True)
class ExpDesign:
    """The fields of ``nsd_expdesign.mat`` that preparation needs (1-based NSD ids)."""

    sharedix: np.ndarray  # (n_shared,) ids of the shared test images, file order
    subjectim: np.ndarray  # (n_subjects, n_per_subject) ids each subject saw; row s-1 is subject s


def load_expdesign(path: Path) -> ExpDesign:
    """Read ``sharedix`` and ``subjectim`` from ``nsd_expdesign.mat`` (MATLAB v5 file)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    path = Path(path)
    if not path.exists():
        raise NsdDataError(f"{path} is missing: download it with prepare_data.py (or use --synthetic)")
    try:
        mat = loadmat(path, variable_names=["sharedix", "subjectim"])
    except (OSError, ValueError, NotImplementedError, TypeError, MatReadError) as e:
        raise NsdDataError(f"cannot read {path}: {e}") from e
    missing = [name for name in ("sharedix", "subjectim") if name not in mat]
    if missing:
        raise NsdDataError(f"{path} has no field(s) {missing}")
    sharedix, subjectim = np.asarray(mat["sharedix"]), np.asarray(mat["subjectim"])
    if sharedix.ndim != 2 or 1 not in sharedix.shape:
        raise NsdDataError(f"{path}: `sharedix` should be a (1, n) vector, got shape {sharedix.shape}")
    if subjectim.ndim != 2:
        raise NsdDataError(f"{path}: `subjectim` should be a (subjects, n) matrix, got shape {subjectim.shape}")
    for name, values in (("sharedix", sharedix), ("subjectim", subjectim)):
        if values.size == 0 or np.any(values != np.round(values)) or values.min() < 1:
            raise NsdDataError(f"{path}: `{name}` should hold 1-based integer image ids")
    return ExpDesign(sharedix.ravel().astype(np.int64), subjectim.astype(np.int64))


def write_test_ids(root: Path, expdesign: ExpDesign | None = None) -> Path:
    """Write ``test_images_ids.npy`` = ``sharedix`` (1-based, shape (n,), file order); atomic."""
    root = Path(root)
    if expdesign is None:
        expdesign = load_expdesign(root / EXPDESIGN_FILE)
    path = root / TEST_IDS_FILE
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file, not a path: np.save would add ".npy"
        np.save(f, expdesign.sharedix)
    logger.info("wrote %s (%d test image ids)", path, len(expdesign.sharedix))
    return path


def select_rows(images: str, expdesign: ExpDesign, subjects: tp.Iterable[int], n_images: int) -> np.ndarray:
    """Sorted 0-based rows of ``imgBrick`` to extract.

    ``images``: ``"all"`` every row; ``"subjects"`` the images any of ``subjects``
    saw (their ``subjectim`` rows); ``"test"`` the shared test images (``sharedix``).
    """
    if images == "all":
        return np.arange(n_images)
    if images == "subjects":
        subjects = [check_subject(s) for s in subjects]
        if not subjects:
            raise ValueError("images='subjects' needs at least one subject")
        if max(subjects) > expdesign.subjectim.shape[0]:
            raise NsdDataError(
                f"`subjectim` has {expdesign.subjectim.shape[0]} rows, cannot select subject {max(subjects)}"
            )
        ids = np.unique(expdesign.subjectim[[s - 1 for s in subjects]])
    elif images == "test":
        ids = np.unique(expdesign.sharedix)
    else:
        raise ValueError(f"images should be one of {IMAGE_CHOICES}, got {images!r}")
    if ids.max() > n_images:
        raise NsdDataError(
            f"the experiment design refers to image id {ids.max()} but {STIMULI_FILE} holds only {n_images} images"
        )
    return ids - 1


# ----------------------------------------------------------------------------- PNG extraction


@dataclasses.dataclass
class ExtractSummary:
    written: int = 0  # PNGs that did not exist
    replaced: int = 0  # corrupt or wrong-size PNGs rewritten
    kept: int = 0  # valid PNGs left untouched

    def __iadd__(self, other: "ExtractSummary") -> "ExtractSummary":
        self.written += other.written
        self.replaced += other.replaced
        self.kept += other.kept
        return self

    def __str__(self) -> str:
        return f"{self.written} written, {self.replaced} corrupt replaced, {self.kept} already valid"


def brick_shape(brick_path: Path, dataset: str = DATASET) -> tuple[int, int, int, int]:
    """(n, height, width, 3) of the stimulus brick, checked."""
    import h5py

    brick_path = Path(brick_path)
    if not brick_path.exists():
        raise NsdDataError(f"{brick_path} is missing: download it with prepare_data.py (or use --synthetic)")
    try:
        with h5py.File(brick_path, "r") as f:
            if dataset not in f:
                raise NsdDataError(f"{brick_path} has no dataset {dataset!r} (found {sorted(f.keys())})")
            ds = f[dataset]
            shape, dtype = tuple(ds.shape), ds.dtype
    except OSError as e:
        raise NsdDataError(f"cannot read {brick_path}: {e}") from e
    if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8:
        raise NsdDataError(f"{brick_path}:{dataset} should be (n, height, width, 3) uint8, got {shape} {dtype}")
    return shape  # type: ignore[return-value]


def png_is_valid(path: Path, size: tuple[int, int]) -> bool:
    """True if ``path`` is a PNG that fully decodes to an RGB image of ``size`` = (height, width)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.mode != "RGB" or im.size != (size[1], size[0]):
                return False
            im.load()
    except FileNotFoundError:
        return False
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False
    return True


def _extract_block(brick_path: str, dataset: str, out_dir: str, rows: list[int]) -> ExtractSummary:
    """Worker: write the PNGs of ``rows`` (sorted) that are missing or invalid; one HDF5 read."""
    import h5py
    from PIL import Image

    out = Path(out_dir)
    summary = ExtractSummary()
    todo = []
    with h5py.File(brick_path, "r") as f:
        ds = f[dataset]
        size = ds.shape[1:3]
        for row in rows:
            path = out / f"{row}.png"
            if png_is_valid(path, size):
                summary.kept += 1
            else:
                todo.append(row)
                if path.exists():
                    summary.replaced += 1
                else:
                    summary.written += 1
        if not todo:
            return summary
        contiguous = todo[-1] - todo[0] + 1 == len(todo)
        block = ds[todo[0] : todo[-1] + 1] if contiguous else ds[np.asarray(todo)]  # (len(todo), H, W, 3)
    for row, pixels in zip(todo, block):
        with atomic_path(out / f"{row}.png") as tmp:
            Image.fromarray(pixels, "RGB").save(tmp, format="PNG")
    return summary


def extract_stimuli(
    brick_path: Path,
    out_dir: Path,
    rows: tp.Iterable[int] | None = None,
    workers: int | None = None,
    chunk_rows: int = 32,
    dataset: str = DATASET,
) -> ExtractSummary:
    """Write ``out_dir/{k}.png`` for each 0-based row ``k`` of the brick (all rows if ``rows`` is None).

    Rows are processed in blocks of at most ``chunk_rows`` by ``workers``
    processes (1: in this process); each worker reads only its block.
    """
    from tqdm.auto import tqdm

    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    n = brick_shape(brick_path, dataset)[0]
    rows = np.arange(n) if rows is None else np.unique(np.asarray(list(rows), dtype=np.int64))
    if len(rows) and (rows[0] < 0 or rows[-1] >= n):
        raise NsdDataError(f"rows out of range for {brick_path} ({n} images): {rows[0]}..{rows[-1]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with os.scandir(out_dir) as entries:  # temporary files left by an interrupted run
        for entry in entries:
            if _PART.fullmatch(entry.name):
                os.unlink(entry.path)
    blocks = [rows[i : i + chunk_rows].tolist() for i in range(0, len(rows), chunk_rows)]
    workers = min(workers or os.cpu_count() or 1, max(1, len(blocks)))
    args = (str(brick_path), dataset, str(out_dir))
    summary = ExtractSummary()
    with tqdm(total=len(rows), unit="img", desc="stimulus PNGs") as bar:
        if workers == 1:
            for block in blocks:
                summary += _extract_block(*args, block)
                bar.update(len(block))
        else:
            # spawn: a forked child would inherit the parent's threads and HDF5 state
            context = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = {pool.submit(_extract_block, *args, block): len(block) for block in blocks}
                try:
                    for future in cf.as_completed(futures):
                        summary += future.result()
                        bar.update(futures[future])
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    logger.info("stimulus PNGs in %s: %s", out_dir, summary)
    return summary


def prepare_stimuli(
    root: Path,
    images: str = "subjects",
    subjects: tp.Iterable[int] = SUBJECTS,
    workers: int | None = None,
    chunk_rows: int = 32,
) -> ExtractSummary:
    """The whole preparation step on a downloaded NSD folder: test ids, then stimulus PNGs."""
    if images not in IMAGE_CHOICES:
        raise ValueError(f"images should be one of {IMAGE_CHOICES}, got {images!r}")
    root = check_data_root(root)
    expdesign = load_expdesign(root / EXPDESIGN_FILE)
    write_test_ids(root, expdesign)
    brick = root / STIMULI_FILE
    n = brick_shape(brick)[0]
    rows = select_rows(images, expdesign, subjects, n)
    logger.info("extracting %d of the %d stimulus images (images=%r)", len(rows), n, images)
    return extract_stimuli(brick, root / STIMULI_PNG_DIR, rows, workers=workers, chunk_rows=chunk_rows)
