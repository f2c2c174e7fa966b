"""A recorded run played back as a scanner's export would write it: one 3-D NIfTI file per volume, at the pace of
the acquisition (one TR apart, or ``speed`` times faster), into the folder a live session watches.

Each file is written in place in two pieces (header and first half of the data, then the rest), as a writer
that does not rename would: the watcher must wait for the end of each file, which is what replay exercises.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from dynadiff.data.preprocess import TR

logger = logging.getLogger(__name__)

MARKER = ".dynadiff-replay"  # a folder replay wrote, which it may clear


def volume_name(index: int, compressed: bool = False) -> str:
    return f"vol_{index:04d}.nii" + (".gz" if compressed else "")


def volume_bytes(img, index: int, compressed: bool) -> bytes:
    """The NIfTI file of volume ``index`` of the 4-D image ``img``: same header (affine, scaling), 3-D data."""
    import nibabel as nib

    data = np.asanyarray(img.dataobj[..., index])
    header = img.header.copy()
    header.set_data_shape(data.shape)
    raw = nib.Nifti1Image(data, img.affine, header).to_bytes()
    return gzip.compress(raw, compresslevel=1) if compressed else raw


def prepare_folder(folder: Path) -> Path:
    """An empty folder for the replay's volumes: created, or a previous replay's cleared; anything else refused."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).is_file():
            raise FileExistsError(f"{folder} is not empty and was not written by a replay: replay writes its volumes "
                                  "into an empty folder (or one an earlier replay wrote, which it clears)")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("volumes written by live.py --replay; the next replay into this folder clears it\n")
    return folder


class Replay(threading.Thread):
    """Writes the volumes of ``run`` (a 4-D NIfTI path) into ``folder``, volume ``i`` at ``start + i * tr / speed``.

    ``n_volumes``: only the first ones (default all). ``skip``: indices never written (a gap, for tests).
    ``error``: what stopped it, if anything."""

    def __init__(self, run: Path, folder: Path, speed: float = 1.0, tr: float = TR, compressed: bool = False,
                 n_volumes: int | None = None, skip: tuple[int, ...] = ()) -> None:
        super().__init__(name="replay", daemon=True)
        import nibabel as nib

        if speed <= 0:
            raise ValueError(f"--speed must be positive, got {speed}")
        self.img = nib.load(str(run))
        if len(self.img.shape) != 4:
            raise ValueError(f"{run} is not a 4-D run (shape {self.img.shape})")
        self.n_volumes = self.img.shape[3] if n_volumes is None else min(n_volumes, self.img.shape[3])
        self.folder, self.interval, self.compressed, self.skip = Path(folder), tr / speed, compressed, set(skip)
        self._halt = threading.Event()
        self.error: BaseException | None = None
        self.written = 0

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            start = time.monotonic()
            for i in range(self.n_volumes):
                if self._halt.wait(max(0.0, start + (i + 1) * self.interval - time.monotonic())):
                    return
                if i in self.skip:
                    continue
                raw = volume_bytes(self.img, i, self.compressed)
                with open(self.folder / volume_name(i, self.compressed), "wb") as f:
                    half = max(1, len(raw) // 2)
                    f.write(raw[:half])
                    f.flush()
                    time.sleep(min(0.002, self.interval / 10))
                    f.write(raw[half:])
                self.written += 1
        except BaseException as e:  # noqa: BLE001 - reported by the session
            self.error = e
