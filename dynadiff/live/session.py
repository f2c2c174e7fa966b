"""The loop of a live session: volumes in, one image per trial out, as soon as the trial's window is complete.

Trials are decoded in onset order, each once: a trial waits for every volume of its window (``[onset + start,
onset + stop)`` in volumes, the checkpoint's window; for an onset in seconds, the volumes covering its samples at
``onset + times_s`` seconds, up to the one at or after the last, :func:`dynadiff.live.causal.covering_volumes`) and
is then normalised with the volumes acquired so far (:mod:`dynadiff.live.causal`; sampled at its times for an onset
in seconds), decoded, and written (:class:`dynadiff.live.record.LiveRecord`). Problems are messages, and the
session goes on:

- a volume of the wrong shape, or unreadable: left out (the trials whose window holds it are skipped);
- a gap in the numbering: once a later volume has been there for ``gap_trs`` TRs, the missing one is declared
  missing (likewise left out; if it comes after all, it is ignored, so that what was decoded stays consistent);
- a file still being written (the watcher's ``incomplete_s``): said, and still waited for;
- no new volume for ``stall_trs`` TRs while trials wait: said (once per stall); after ``give_up_trs`` (0: never)
  the session ends, the trials still waiting listed.

It ends when every trial of a fixed design (or of an onset file that said ``end``) is decoded or skipped, when
the run's last volume (``n_volumes``, when known) has come and no trial can still complete, or at ``stop()``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import typing as tp

import numpy as np

from dynadiff.live.causal import MIN_VOLUMES, GrowingSeries, Prior, covering_volumes
from dynadiff.live.record import LiveRecord, TrialResult, trial_name
from dynadiff.live.watch import Onset, OnsetStream, VolumeWatcher

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Trial:
    index: int
    onset: Onset
    start: int  # the volumes [start, stop) its window needs
    stop: int
    state: str = "waiting"  # waiting, decoded, skipped
    why: str = ""


@dataclasses.dataclass
class Timing:
    poll_s: float = 0.02  # how often the folder is listed
    gap_trs: float = 2.0
    stall_trs: float = 3.0
    give_up_trs: float = 0.0


class LiveSession:
    """``decode``: (voxels, n_trs) float32 window -> (H, W, 3) uint8 image. ``truth``: onset -> (H, W, 3) uint8 image
    or None (the image shown, by its NSD id or name). ``window``: (start, stop) in volumes from an onset at a volume.
    ``times_s``: (n_trs,) seconds after an onset in seconds at which its window is sampled (needed for such onsets).
    ``onsets``: a fixed list, or an :class:`OnsetStream`. ``tr``: seconds per volume, volume ``k`` acquired at
    ``k * tr``."""

    def __init__(self, watcher: VolumeWatcher, onsets: list[Onset] | OnsetStream, window: tuple[int, int],
                 decode: tp.Callable[[np.ndarray], np.ndarray], record: LiveRecord, tr: float,
                 truth: tp.Callable[[Onset], np.ndarray | None] | None = None, prior: Prior | None = None,
                 n_volumes: int | None = None, timing: Timing = Timing(),
                 source_failed: tp.Callable[[], str | None] | None = None, times_s: np.ndarray | None = None) -> None:
        self.watcher, self.window, self.decode, self.record, self.tr = watcher, window, decode, record, tr
        self.times_s = None if times_s is None else np.asarray(times_s, dtype=np.float64)
        self.truth, self.prior, self.n_volumes, self.timing = truth, prior, n_volumes, timing
        self.source_failed = source_failed  # what stopped the volumes' writer (a replay), else None
        self.stream = onsets if isinstance(onsets, OnsetStream) else None
        self.trials: list[Trial] = []
        if self.stream is None:
            self._add_onsets(list(onsets))
        self.series = GrowingSeries(int(watcher.mask.sum()))
        self.volumes: dict[int, tuple[float, float]] = {}  # index -> (written, seen)
        self.missing: set[int] = set()  # declared missing (or unusable)
        self._stop = threading.Event()
        self._last_volume_at = time.monotonic()
        self._stalled = False
        self.results: list[TrialResult] = []

    # ------------------------------------------------------------------ inputs
    def _add_onsets(self, onsets: list[Onset]) -> None:
        a, b = self.window
        for onset in onsets:
            if onset.seconds is not None:
                if self.times_s is None:
                    raise ValueError("an onset in seconds needs the session's times_s")
                trial = Trial(len(self.trials), onset, *covering_volumes(onset.seconds, self.times_s, self.tr))
            else:
                trial = Trial(len(self.trials), onset, onset.volume + a, onset.volume + b)
            if trial.start < 0:
                trial.state, trial.why = "skipped", f"its window starts before the run (volume {trial.start})"
            elif trial.stop < MIN_VOLUMES:
                trial.state, trial.why = "skipped", f"its window ends before volume {MIN_VOLUMES}"
            elif self.record.done(trial.index):
                trial.state, trial.why = "decoded", "already in the output folder"
            self.trials.append(trial)
            if trial.state == "skipped":
                self._say("warning", f"trial {trial_name(trial.index)} ({onset.where}) skipped: {trial.why}")

    def _say(self, level: str, text: str) -> None:
        getattr(logger, level)("%s", text)
        self.record.note(level, text)

    def _ingest(self) -> None:
        for v in self.watcher.poll():
            if v.incomplete:
                self._say("warning", f"volume {v.index} ({v.path.name}) is {v.problem}")
                continue
            if v.index in self.missing:
                self._say("warning", f"volume {v.index} ({v.path.name}) came after it was declared missing: ignored "
                          "(the trials decoded since did without it)")
                continue
            if v.data is None:
                self.missing.add(v.index)
                self._say("warning", f"volume {v.index} ({v.path.name}) {v.problem}: the trials whose window holds it "
                          "are skipped")
                continue
            self.series.put(v.index, v.data)
            self.volumes[v.index] = (v.written, v.seen)
            self._last_volume_at = time.monotonic()
            if self._stalled:
                self._stalled = False
                self._say("info", f"volumes arrive again (volume {v.index})")
        if self.stream is not None:
            self._add_onsets(self.stream.poll())
            for problem in self.stream.problems:
                self._say("warning", problem)
            self.stream.problems.clear()
        self._declare_gaps()

    def _declare_gaps(self) -> None:
        """Volumes below the highest received that are still absent once it has been there ``gap_trs`` TRs."""
        if not self.volumes:
            return
        top = max(self.volumes)
        if time.time() - self.volumes[top][1] < self.timing.gap_trs * self.tr:
            return
        for i in range(top):
            if i not in self.volumes and i not in self.missing:
                self.missing.add(i)
                self._say("warning", f"volume {i} is missing (volume {top} arrived {self.timing.gap_trs:g} TRs ago, "
                          "no complete file for it): the trials whose window holds it are skipped")

    # ------------------------------------------------------------------ decoding
    def _next(self) -> Trial | None:
        """The first waiting trial, skipped first if its window can never complete."""
        for trial in self.trials:
            if trial.state != "waiting":
                continue
            lost = sorted(self.missing.intersection(range(trial.start, trial.stop)))
            if lost:
                trial.state, trial.why = "skipped", f"volume(s) {lost} of its window are missing"
            elif self.n_volumes is not None and trial.stop > self.n_volumes:
                trial.state, trial.why = "skipped", f"its window [{trial.start}, {trial.stop}) runs past the run's " \
                                                    f"{self.n_volumes} volumes"
            if trial.state == "skipped":
                self._say("warning", f"trial {trial_name(trial.index)} ({trial.onset.where}) skipped: {trial.why}")
                continue
            return trial
        return None

    def ready(self, trial: Trial) -> bool:
        """Every volume its window needs has arrived (the last: the one at or after its last sample)."""
        return all(self.series.has(i) for i in range(trial.start, trial.stop))

    def _decode(self, trial: Trial) -> None:
        onset = trial.onset
        if onset.seconds is not None:
            window = self.series.sampled(onset.seconds, self.times_s, self.tr, self.prior)
        else:
            window = self.series.window(trial.start, trial.stop, self.prior)
        image = self.decode(window)
        known = onset.nsd_id or onset.image
        truth = self.truth(onset) if self.truth is not None and known else None
        written, seen = self.volumes[trial.stop - 1]
        result = self.record.add(TrialResult(trial.index, onset.volume, trial.stop - 1, onset.nsd_id, written, seen,
                                             0.0, onset_s=onset.seconds, stimulus=onset.image), image, truth)
        trial.state = "decoded"
        self.results.append(result)
        label = f"image {onset.image}" if onset.image is not None else f"NSD id {onset.nsd_id or '?'}"
        logger.info("trial %s (%s, %s): %.3f s after its last volume", result.name, onset.where, label,
                    result.latency_s)

    # ------------------------------------------------------------------ loop
    def stop(self) -> None:
        self._stop.set()

    def finished(self) -> bool:
        if any(t.state == "waiting" for t in self.trials):
            return False
        return self.stream is None or self.stream.ended

    def step(self) -> tuple[Trial | None, bool]:
        """One turn of the loop: new volumes and onsets in, then the next waiting trial decoded if it is ready.
        Returns that trial (None: none waits) and whether it was decoded."""
        self._ingest()
        trial = self._next()
        if trial is not None and self.ready(trial):
            self._decode(trial)
            return trial, True
        return trial, False

    def run(self) -> dict:
        self.record.set_status("running")
        final_look = False
        try:
            while not self._stop.is_set():
                trial, decoded = self.step()
                if decoded:
                    continue  # look for new volumes before the next trial
                if self.finished():
                    break
                if self.n_volumes is not None and self._all_volumes_in() and trial is None \
                        and self.stream is not None:
                    break  # the run is over: no onset can still get a window
                if self._waited_too_long():
                    break
                failure = self.source_failed() if self.source_failed is not None else None
                if failure:
                    if not final_look:  # the volumes written before the failure: one more look at the folder
                        final_look = True
                        continue
                    self._say("error", failure)
                    break
                self._stop.wait(self.timing.poll_s)
        finally:
            self.record.set_status("done")
        return self.summary()

    def _all_volumes_in(self) -> bool:
        return all(i in self.volumes or i in self.missing for i in range(self.n_volumes))

    def _waited_too_long(self) -> bool:
        idle = time.monotonic() - self._last_volume_at
        if not self._stalled and idle > self.timing.stall_trs * self.tr:
            self._stalled = True
            last = max(self.volumes) if self.volumes else None
            since = f"since volume {last}" if last is not None else "since the start: none yet"
            self._say("warning", f"no new volume for {idle:.1f} s ({self.timing.stall_trs:g} TRs) {since}: is the "
                      f"export running, and writing into {self.watcher.folder}?")
        if self.timing.give_up_trs and idle > self.timing.give_up_trs * self.tr:
            waiting = [trial_name(t.index) for t in self.trials if t.state == "waiting"]
            listed = f": {', '.join(waiting[:10])}{' ...' if len(waiting) > 10 else ''}" if waiting else ""
            self._say("warning" if not waiting else "error",
                      f"no new volume for {idle:.1f} s: giving up ({len(waiting)} trial(s) still waiting{listed})")
            return True
        return False

    def summary(self) -> dict:
        lat = np.array([r.latency_s for r in self.results])
        return {
            "trials": len(self.trials),
            "decoded": sum(t.state == "decoded" for t in self.trials),
            "decoded_now": len(self.results),
            "skipped": [{"trial": trial_name(t.index), "onset_volume": t.onset.volume, "onset_s": t.onset.seconds,
                         "why": t.why} for t in self.trials if t.state == "skipped"],
            "waiting": [trial_name(t.index) for t in self.trials if t.state == "waiting"],
            "volumes": len(self.volumes),
            "missing_volumes": sorted(self.missing),
            "latency_median_s": float(np.median(lat)) if len(lat) else None,
            "latency_p95_s": float(np.percentile(lat, 95)) if len(lat) else None,
            "output_dir": str(self.record.out),
        }
