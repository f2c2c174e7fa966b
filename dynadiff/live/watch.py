"""Volumes arriving as files in a folder, and trial onsets, as a live session reads them.

Volumes: one 3-D NIfTI file per volume (``.nii`` or ``.nii.gz``), numbered: the number is the last group of digits
of the name (``vol_0007.nii``, ``MR.001.0007.nii.gz``), the volume's index that number minus ``first_number``.
A file is read only once it is complete: for ``.nii``, once its size reaches the header's offset plus the data's
bytes; for ``.nii.gz``, once its gzip stream ends (a truncated stream is a file still being written). Files
written elsewhere and renamed into the folder, as many export pipelines do, are complete when they appear.

Onsets: a design fixed up front (NSD's design TSV: one line per volume, the 1-based NSD id of the trial starting
there or 0), or an onset file read as it grows (:class:`OnsetStream`): one line per trial, ``VOLUME [NSD_ID]``,
in onset order; ``#`` starts a comment; a line ``end`` says no trial follows. Or a BIDS ``events.tsv``
(:func:`events_onsets`), fixed up front: onsets in seconds, each trial labelled by its image's name.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import os
import re
import time
import zlib
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

VOLUME_NAME = re.compile(r"^(?!\.).*?(\d+)\.nii(\.gz)?$")  # hidden files (a writer's temporary names) are skipped


class LiveInputError(ValueError):
    """An input of a live session that cannot be used at all (a design that cannot be read, a bad onset file)."""


@dataclasses.dataclass(frozen=True)
class Volume:
    index: int
    path: Path
    data: np.ndarray | None  # the masked volume (voxels,) float32; None: unusable (see ``problem``)
    written: float  # the file's modification time (Unix seconds): when its writer finished it
    seen: float  # when it was found complete
    problem: str = ""
    incomplete: bool = False  # a file still being written (said once; it is still waited for)


class Incomplete(Exception):
    """The file is not complete yet (its writer is still at work)."""


def read_nifti_volume(path: Path) -> np.ndarray:
    """The 3-D array of a complete NIfTI file; :class:`Incomplete` while it is being written; other errors for a
    file that is complete but unusable."""
    import nibabel as nib

    raw = Path(path).read_bytes()
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # BadGzipFile: not even the gzip header yet
            if isinstance(e, EOFError) or len(raw) < 18:
                raise Incomplete(f"its gzip stream has not ended ({len(raw)} bytes so far)") from None
            raise ValueError(f"not a gzip file ({e})") from None
    if len(raw) < 348:
        raise Incomplete(f"{len(raw)} bytes so far, less than a NIfTI header")
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    expected = int(header["vox_offset"]) + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    if len(raw) < expected:
        raise Incomplete(f"{len(raw)} of its {expected} bytes so far")
    img = nib.Nifti1Image.from_bytes(raw)
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    return data


class VolumeWatcher:
    """The new complete volumes of a folder, each returned once, masked (:meth:`poll`).

    Problems are returned as volumes without data and a ``problem`` text: a volume of the wrong shape or that
    cannot be read (at once), a file still incomplete after ``incomplete_s`` (said once, still waited for).
    """

    def __init__(self, folder: Path, mask: np.ndarray, first_number: int = 0, incomplete_s: float = 2.0) -> None:
        self.folder = Path(folder)
        self.mask = mask
        self.first_number = first_number
        self.incomplete_s = incomplete_s
        self._done: set[str] = set()
        self._pending: dict[str, tuple[float, int, bool]] = {}  # name -> (first seen, size, said)
        self._by_index: dict[int, str] = {}

    def _index(self, name: str) -> int | None:
        m = VOLUME_NAME.match(name)
        return None if m is None else int(m.group(1)) - self.first_number

    def poll(self) -> list[Volume]:
        """The volumes found complete since the last call (or unusable), in index order."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        out, now = [], time.time()
        candidates = sorted((i, n) for n in names if n not in self._done and (i := self._index(n)) is not None)
        for index, name in candidates:
            path = self.folder / name
            if index < 0:
                self._done.add(name)
                out.append(Volume(index, path, None, now, now, f"its number is below the first ({self.first_number})"))
                continue
            if index in self._by_index:
                self._done.add(name)
                out.append(Volume(index, path, None, now, now, f"a second file for volume {index} (the first: "
                                  f"{self._by_index[index]}): ignored"))
                continue
            try:
                st = path.stat()
                data = read_nifti_volume(path)
            except Incomplete as e:
                first, size, said = self._pending.get(name, (now, -1, False))
                if st.st_size != size:  # (still) growing: its writer is at work
                    first = now
                if not said and now - first > self.incomplete_s:
                    said = True
                    out.append(Volume(index, path, None, st.st_mtime, now,
                                      f"still incomplete after {now - first:.1f} s ({e}): waiting for its writer",
                                      incomplete=True))
                self._pending[name] = (first, st.st_size, said)
                continue
            except FileNotFoundError:  # renamed or deleted meanwhile
                continue
            except Exception as e:  # noqa: BLE001 - nibabel raises several types for a damaged file
                self._done.add(name)
                out.append(Volume(index, path, None, now, now, f"cannot be read ({type(e).__name__}: {e})"))
                continue
            self._done.add(name)
            self._pending.pop(name, None)
            self._by_index[index] = name
            if data.shape != self.mask.shape:
                out.append(Volume(index, path, None, st.st_mtime, now,
                                  f"has shape {data.shape}, the mask {self.mask.shape}: left out"))
                continue
            out.append(Volume(index, path, data[self.mask].astype(np.float32), st.st_mtime, now))
        return out


@dataclasses.dataclass(frozen=True)
class Onset:
    """A trial's onset: at a volume (NSD's design, onset lines), or in seconds (``seconds``, a BIDS events.tsv,
    whose window is sampled in seconds on the run's grid; ``volume`` is then None)."""

    volume: int | None
    nsd_id: int | None
    seconds: float | None = None
    image: str | None = None  # the image's name (events.tsv), which labels the trial

    @property
    def where(self) -> str:
        return f"onset {self.seconds:g} s" if self.seconds is not None else f"onset volume {self.volume}"


def design_onsets(path: Path) -> list[Onset]:
    """The trials of an NSD design TSV (one line per volume: the trial's 1-based NSD id, or 0)."""
    try:
        values = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except (OSError, ValueError) as e:
        raise LiveInputError(f"cannot read the design {path}: {e}") from None
    if values.ndim != 1 or np.any(values < 0) or np.any(values != np.round(values)):
        raise LiveInputError(f"the design {path} should hold one non-negative integer per line (NSD's design TSV: "
                             "the 1-based NSD id of the trial starting at that volume, else 0)")
    return [Onset(int(v), int(values[v])) for v in np.flatnonzero(values)]


def events_onsets(path: Path, image_column: str = "stim_file") -> list[Onset]:
    """The trials of a BIDS ``events.tsv``: its rows naming an image in ``image_column`` (others, ``n/a``, are not
    trials), in onset order (seconds), labelled by the image's name (:func:`dynadiff.data.bids.read_events`)."""
    from dynadiff.data.bids import BidsDataError, read_events

    try:
        with open(path, newline="") as f:
            header = [h.strip() for h in f.readline().rstrip("\r\n").split("\t")]
    except (OSError, UnicodeDecodeError) as e:
        raise LiveInputError(f"cannot read the events {path}: {e}") from None
    if header != [""] and "onset" in header and image_column not in header:
        raise LiveInputError(f"the events {path} have no '{image_column}' column (columns: {', '.join(header)}): "
                             "name the column holding the image with --image-column")
    try:
        onsets, names = read_events(Path(path), image_column)
    except BidsDataError as e:
        raise LiveInputError(str(e)) from None
    order = np.argsort(onsets, kind="stable")
    return [Onset(None, None, float(onsets[i]), names[i]) for i in order]


class OnsetStream:
    """Onset lines appended to a file as the experiment runs (see the module's docstring), read as they come.

    A partial last line (no newline yet) is left for the next read. A malformed line, or an onset before the
    previous one, is reported (:attr:`problems`) and skipped."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self._rest = b""
        self.ended = False
        self.last_volume = -1
        self.problems: list[str] = []
        self._line = 0

    def poll(self) -> list[Onset]:
        if self.ended:
            return []
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        *lines, self._rest = (self._rest + chunk).split(b"\n")
        out = []
        for raw in lines:
            self._line += 1
            text = raw.decode(errors="replace").split("#", 1)[0].strip()
            if not text:
                continue
            if text.lower() == "end":
                self.ended = True
                break
            parts = text.split()
            try:
                if len(parts) > 2:
                    raise ValueError
                volume = int(parts[0])
                nsd_id = int(parts[1]) if len(parts) == 2 and parts[1] not in ("-", "0") else None
                if volume < 0 or (nsd_id is not None and nsd_id < 0):
                    raise ValueError
            except ValueError:
                self.problems.append(f"{self.path} line {self._line}: {text!r} is not 'VOLUME [NSD_ID]': skipped")
                continue
            if volume <= self.last_volume:
                self.problems.append(f"{self.path} line {self._line}: onset at volume {volume} is not after the "
                                     f"previous one ({self.last_volume}): skipped")
                continue
            self.last_volume = volume
            out.append(Onset(volume, nsd_id))
        return out
