"""What a live session writes in its output folder, each file complete at every moment.

- ``{name}.png``: the reconstruction of a trial (``name``: its number in onset order, 4 digits: ``0007``);
- ``{name}_truth.png``: the image the subject saw, where known (its NSD id, or its name and ``--stimuli``);
- ``latency.csv``: one line per trial, appended and flushed as soon as its image is written;
- ``trials.json``: the session's state (trials, recent messages, status), rewritten (atomically) at each change:
  the page of :mod:`dynadiff.live.server` reads it.

Reopening a folder (``live.py`` started again on it) keeps what is there: the trials it holds are not decoded again.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from dynadiff.files import save_png, write_text

STATE_FILE = "trials.json"
LATENCY_FILE = "latency.csv"
LATENCY_COLUMNS = ("trial", "nsd_id", "onset_volume", "last_volume", "volume_written", "volume_seen",
                   "image_written", "latency_s", "stimulus", "onset_s")
TEXT_COLUMNS = ("stimulus",)  # the others are numbers
MAX_MESSAGES = 50


def trial_name(trial: int) -> str:
    return f"{int(trial):04d}"


@dataclasses.dataclass(frozen=True)
class TrialResult:
    """One decoded trial. Times are Unix seconds: ``volume_written``, the modification time of the window's last
    volume file (when its writer finished it); ``volume_seen``, when the watcher found it complete;
    ``image_written``, when the reconstruction's PNG was in place. An onset is a volume (``onset_volume``: NSD's
    design, onset lines) or seconds (``onset_s``: an events.tsv, its image named by ``stimulus``)."""

    trial: int  # 0-based, in onset order
    onset_volume: int | None
    last_volume: int
    nsd_id: int | None
    volume_written: float
    volume_seen: float
    image_written: float
    onset_s: float | None = None
    stimulus: str | None = None

    @property
    def name(self) -> str:
        return trial_name(self.trial)

    @property
    def latency_s(self) -> float:
        """Last volume of the window written -> image written."""
        return self.image_written - self.volume_written


class LiveRecord:
    """The output folder of a live session (thread-safe: the page's server reads while the loop writes)."""

    def __init__(self, out: Path, tr: float) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tr = tr
        self._lock = threading.Lock()
        self.trials: dict[int, dict] = {}
        self.messages: list[dict] = []
        self.status = "waiting"
        state = self.out / STATE_FILE
        if state.is_file():
            try:
                previous = json.loads(state.read_text())
                self.trials = {int(t["trial"]): t for t in previous.get("trials", [])
                               if (self.out / t["image"]).is_file()}
                self.messages = list(previous.get("messages", []))[-MAX_MESSAGES:]
            except (ValueError, KeyError, TypeError):
                pass  # a state file of another program: rewritten below
        self._write_state()

    def done(self, trial: int) -> bool:
        """True when ``trial``'s reconstruction is already in the folder (from this session or an earlier one)."""
        return trial in self.trials

    def add(self, result: TrialResult, image: np.ndarray, truth: np.ndarray | None = None) -> TrialResult:
        """Write a trial's PNGs, then its ``latency.csv`` line and the state; returns ``result`` with
        ``image_written`` set to when the reconstruction's file was in place."""
        if truth is not None:
            save_png(truth, self.out / f"{result.name}_truth.png")
        save_png(image, self.out / f"{result.name}.png")
        result = dataclasses.replace(result, image_written=time.time())
        with self._lock:
            self._append_latency(result)
            self.trials[result.trial] = {
                "trial": result.trial, "name": result.name, "image": f"{result.name}.png",
                "truth": f"{result.name}_truth.png" if truth is not None else None, "nsd_id": result.nsd_id,
                "stimulus": result.stimulus, "onset_volume": result.onset_volume, "onset_s": result.onset_s,
                "last_volume": result.last_volume,
                "volume_written": result.volume_written, "image_written": result.image_written,
                "latency_s": round(result.latency_s, 4)}
            self._write_state()
        return result

    def note(self, level: str, text: str) -> None:
        """A message for the page (``info``, ``warning`` or ``error``): the last ones are kept in the state."""
        with self._lock:
            self.messages = (self.messages + [{"time": time.time(), "level": level, "text": text}])[-MAX_MESSAGES:]
            self._write_state()

    def set_status(self, status: str) -> None:
        """``waiting`` (no volume yet), ``running`` or ``done``."""
        with self._lock:
            self.status = status
            self._write_state()

    def _append_latency(self, r: TrialResult) -> None:
        path = self.out / LATENCY_FILE
        new = not path.is_file() or path.stat().st_size == 0
        columns = LATENCY_COLUMNS
        if not new:  # a folder reopened: its file's columns (an older session's may lack the last ones)
            with open(path, newline="") as f:
                columns = tuple(next(csv.reader(f), LATENCY_COLUMNS))
        values = {"trial": r.trial, "nsd_id": r.nsd_id, "onset_volume": r.onset_volume, "last_volume": r.last_volume,
                  "volume_written": f"{r.volume_written:.6f}", "volume_seen": f"{r.volume_seen:.6f}",
                  "image_written": f"{r.image_written:.6f}", "latency_s": f"{r.latency_s:.6f}",
                  "stimulus": r.stimulus, "onset_s": None if r.onset_s is None else repr(float(r.onset_s))}
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(columns)
            w.writerow(["" if values.get(c) is None else values[c] for c in columns])
            f.flush()
            os.fsync(f.fileno())

    def _write_state(self) -> None:
        state = {"version": 1, "status": self.status, "updated": time.time(), "tr_s": self.tr,
                 "trials": [self.trials[k] for k in sorted(self.trials)], "messages": self.messages}
        write_text(self.out / STATE_FILE, json.dumps(state, indent=1))


def read_latency(path: Path) -> list[dict]:
    """The rows of a ``latency.csv`` (numbers as floats, ``stimulus`` as text; None where empty: unknown)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        out.append({k: (None if v == "" else v if k in TEXT_COLUMNS else float(v)) for k, v in row.items()})
    return out
