"""Atomic file and folder writes (a crash never leaves a half-written file or folder under its final name), the
digest of files' names, sizes and modification times, and an exclusive lock."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import typing as tp
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def part_path(path: Path, suffix: str = "") -> Path:
    """Where ``path`` is written before it is complete: ``.{name}.part`` beside it (hidden; ``suffix`` appended
    for a writer that picks the format from the name, e.g. ``.nii.gz``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.part{suffix}")


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = "") -> tp.Iterator[Path]:
    """The temporary path (:func:`part_path`) to write ``path`` to, for a writer that needs a path or an open file
    (np.save, h5py, savemat, a download stream): renamed to ``path`` when the block ends, removed when it raises.

    The folder must exist. Whatever is at the temporary path (a crash's leftover) is the writer's to overwrite.
    """
    path = Path(path)
    tmp = part_path(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_png(array: np.ndarray, path: Path) -> None:
    """(H, W, 3) uint8 array -> PNG, written to a temporary name then renamed."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_text(path: Path, text: str) -> None:
    """Text file written to a temporary name then renamed."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_dir_atomically(target: Path, write: tp.Callable[[Path], None]) -> None:
    """``write(tmp_folder)``, then swap it in as ``target`` (``target.old`` kept until the swap is done).

    A crash while writing leaves ``target`` as it was; a crash between the two renames of the swap leaves the
    previous folder complete as ``target.old`` (``dynadiff.training.complete_checkpoint_dir`` finds it)."""
    target = Path(target)
    tmp = target.with_name(target.name + ".tmp")
    old = target.with_name(target.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    tmp.rename(target)
    if old.exists():
        shutil.rmtree(old)


def stamp_digest(paths: Path | tp.Iterable[Path]) -> str:
    """16 hex digits naming the state of files: each one's name, size and modification time (a rewritten file
    changes it; contents are not read). ``paths``: a file (its name), a folder (its files, sorted, by their names
    relative to it), or a sequence of those, in the order given (a list of files: each by its own name). A missing
    path: FileNotFoundError.

    The SHA-1 of ``"{name}:{size}:{mtime_ns};"`` per file: eval.py's checkpoint digest and the window caches' stamp
    (:func:`dynadiff.data.nsd.file_stamp`, its first 12 digits) are this, so caches keyed by them stay valid.
    """
    import hashlib

    h = hashlib.sha1()
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def point_link(link: Path, target: Path, taken: str) -> Path | None:
    """Point the symlink ``link`` at ``target`` (a sibling folder), atomically (a temporary link renamed over it).

    None, with a warning, where it cannot: ``link`` is a real file or folder (``taken`` says what that may be and
    where the outputs are instead; it is left as it is), or the file system refuses links.
    """
    link, target = Path(link), Path(target)
    if link.exists() and not link.is_symlink():
        logger.warning("%s", taken)
        return None
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target.name, target_is_directory=True)
        os.replace(tmp, link)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        logger.warning("could not point %s at %s (%s)", link, target, e.strerror or e)
        return None
    return link


@contextlib.contextmanager
def exclusive(path: Path, what: str) -> tp.Iterator[None]:
    """An exclusive advisory lock (``flock``) on the file ``path`` for the block; ``what`` names what it guards.

    Another process holding it: say who (pid, host, since when, as it wrote in the file) and wait for it. The
    kernel releases the lock when its holder exits or dies, so there is no stale lock to clean. A file system
    without ``flock`` (some network ones): a warning, and the block runs unguarded.
    """
    import fcntl
    import socket
    import time

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                logger.warning("%s is in use by %s: waiting for it to finish (Ctrl-C to stop waiting)", what, holder)
                fcntl.flock(f, fcntl.LOCK_EX)
                logger.info("%s is free: continuing", what)
        except OSError as e:  # ENOLCK, EOPNOTSUPP...: no locks on this file system
            logger.warning("cannot lock %s (%s): a second run on it at the same time would not be noticed", path,
                           e.strerror or e)
            yield
            return
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
