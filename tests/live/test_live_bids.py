"""``live.py`` on a BIDS run: trials from an events.tsv (onsets in seconds, labelled by image name), windows
sampled at the checkpoint's seconds after each onset on the run's own grid, any TR.

No model is built: the decoder is a fake that keeps each window it is given (the windows are what is under test;
that a window becomes the same image live and offline is test_live_session's), and the command's configuration
is eval.py's defaults, resolved without a checkpoint. Runs and masks are tiny (7 x 8 x 9 voxels) and replayed
hundreds of times faster than the scanner.
"""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from dynadiff.data.preprocess import TR, window_times
from dynadiff.live.causal import causal_window
from dynadiff.live.offline import events_trials, load_series, trial_windows
from dynadiff.live.record import LiveRecord
from dynadiff.live.session import LiveSession
from dynadiff.live.watch import Volume, design_onsets, events_onsets

SHAPE = (7, 8, 9)
TIMES = window_times(4.6, 8.0)  # the published window: 4, 5.33, ..., 10.67 s after the onset


def write_run(folder: Path, n_volumes: int, tr: float, seed: int = 0) -> tuple[Path, Path]:
    """A 4-D int16 run whose header says ``tr`` seconds per volume (drifting voxels, as a scanner's), and a mask."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_volumes)
    base = rng.uniform(600, 1400, SHAPE + (1,))
    drift = rng.standard_normal(SHAPE + (1,)) * 0.8 * t
    data = np.round(base + drift + 12 * rng.standard_normal(SHAPE + (n_volumes,))).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_zooms((2.0, 2.0, 2.0, tr))
    run, mask = folder / "sub-01_task-images_bold.nii.gz", folder / "mask.nii.gz"
    nib.save(img, run)
    nib.save(nib.Nifti1Image((rng.random(SHAPE) > 0.4).astype(np.uint8), img.affine), mask)
    return run, mask


def write_events(path: Path, rows: list[tuple[str, str]], image_column: str = "stim_file") -> Path:
    """A BIDS events.tsv: (onset as written, image name or n/a) per row."""
    path.write_text(f"onset\tduration\t{image_column}\n" + "".join(f"{o}\t3\t{name}\n" for o, name in rows))
    return path


@pytest.fixture
def fake_decoder(monkeypatch):
    """live.py without a model: eval.py's default configuration (no checkpoint to read) and a decoder that keeps
    each window and returns a grey image."""
    from dynadiff.cli import validate, value_overrides
    from dynadiff.commands import live
    from dynadiff.config import EvalConfig
    from dynadiff.live import decoder as live_decoder
    from dynadiff.resolve import eval_tree

    windows: list[np.ndarray] = []

    class KeepWindows:
        image_size = 16

        def __init__(self, cfg, n_voxels: int, n_trs: int, steps: int | None = None) -> None:
            self.shape = (n_voxels, n_trs)

        def __call__(self, window: np.ndarray) -> np.ndarray:
            assert window.shape == self.shape and window.dtype == np.float32
            windows.append(window.copy())
            return np.full((16, 16, 3), 128, np.uint8)

    monkeypatch.setattr(live, "resolve_config", lambda args: validate(
        EvalConfig, eval_tree(args.config, value_overrides(args, live.FLAG_KEYS), args.overrides)))
    monkeypatch.setattr(live_decoder, "WindowDecoder", KeepWindows)
    return live, windows


def _replay(live, run: Path, mask: Path, out: Path, *trials: str, capsys) -> dict:
    assert live.main(["--replay", str(run), "--mask", str(mask), "--out", str(out), "--speed", "500", *trials]) == 0
    return json.loads(capsys.readouterr().out)


def test_tr_4_3_events_in_seconds_give_the_design_path_windows_bit_for_bit(tmp_path, fake_decoder, capsys):
    live, windows = fake_decoder
    run, mask = write_run(tmp_path, 50, TR)
    volumes, ids = [0, 4, 9, 17, 26, 33, 42], [11, 5, 11, 2, 7, 3, 9]  # the last: past the run, skipped by both
    design = tmp_path / "design.tsv"
    design.write_text("".join(f"{dict(zip(volumes, ids)).get(v, 0)}\n" for v in range(49)))
    events = write_events(tmp_path / "events.tsv", [(f"{v * 4 / 3:.6f}", f"img_{i:02d}.png")
                                                    for v, i in zip(volumes, ids)])
    by_design = _replay(live, run, mask, tmp_path / "design", "--design", str(design), capsys=capsys)
    design_windows = windows[:]
    windows.clear()
    by_events = _replay(live, run, mask, tmp_path / "events", "--events", str(events), capsys=capsys)

    assert by_events["tr_s"] == pytest.approx(TR, abs=1e-6)  # the header's (float32) TR
    assert by_design["decoded_now"] == by_events["decoded_now"] == len(volumes) - 1
    assert [s["trial"] for s in by_events["skipped"]] == [s["trial"] for s in by_design["skipped"]] == ["0006"]
    assert len(windows) == len(design_windows) == len(volumes) - 1
    for w_events, w_design in zip(windows, design_windows):
        np.testing.assert_array_equal(w_events, w_design)
    # the offline reference (causal preprocessing) gives them too, from either kind of onset
    series = load_series(run, np.asarray(nib.load(str(mask)).dataobj) > 0)
    offline_events = trial_windows(series, events_onsets(events), (3, 9), "causal", times_s=TIMES, tr=TR)
    offline_design = trial_windows(series, design_onsets(design), (3, 9), "causal")
    for w, a, b in zip(windows, offline_events, offline_design):
        np.testing.assert_array_equal(w, a)
        np.testing.assert_array_equal(w, b)
    with open(tmp_path / "events" / "latency.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["stimulus"] for r in rows] == [f"img_{i:02d}.png" for i in ids[:-1]]  # the name labels the trial
    assert all(r["nsd_id"] == "" and r["onset_volume"] == "" for r in rows)


def test_tr_2_window_is_the_causal_window_interpolated_at_the_samples(tmp_path, fake_decoder, capsys):
    live, windows = fake_decoder
    run, mask = write_run(tmp_path, 40, 2.0, seed=1)
    onsets = [1.0, 9.5, 20.2, 33.3, 60.0, 70.0]  # 70 s: its last sample (80.67 s) is past the run's 78 s
    events = write_events(tmp_path / "events.tsv", [("9.5", "b.png"), ("1.0", "a.png"), ("15", "n/a"),
                                                    ("20.2", "c.png"), ("33.3", "a.png"), ("60.0", "d.png"),
                                                    ("70.0", "b.png")])
    stimuli = tmp_path / "stimuli"
    stimuli.mkdir()
    rng = np.random.default_rng(2)
    for name in "abcd":
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(stimuli / f"{name}.png")
    summary = _replay(live, run, mask, tmp_path / "out", "--events", str(events), "--stimuli", str(stimuli),
                      capsys=capsys)  # no --tr: the header's 2 s
    assert summary["tr_s"] == 2.0 and summary["decoded_now"] == 5
    assert [(s["trial"], s["onset_s"]) for s in summary["skipped"]] == [("0005", 70.0)]

    series = load_series(run, np.asarray(nib.load(str(mask)).dataobj) > 0)
    interpolated = 0
    for onset, got in zip(onsets, windows):
        pos = (onset + TIMES) / 2.0  # by hand: sample j lies at volume pos[j] (volume k acquired at 2k s)
        start, stop = int(np.floor(pos[0])), int(np.ceil(pos[-1])) + 1
        causal = causal_window(series, start, stop).astype(np.float64)  # normalised with volumes [0, stop) only
        lo = np.floor(pos).astype(int) - start
        f = pos - np.floor(pos)
        hi = np.minimum(lo + 1, stop - start - 1)
        expected = (1 - f) * causal[:, lo] + f * causal[:, hi]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
        interpolated += int((f > 0.01).sum())
    assert interpolated > 20  # most samples fall between volumes
    state = json.loads((tmp_path / "out" / "trials.json").read_text())
    assert [(t["stimulus"], t["onset_s"]) for t in state["trials"]] == [
        ("a.png", 1.0), ("b.png", 9.5), ("c.png", 20.2), ("a.png", 33.3), ("d.png", 60.0)]
    truth = np.asarray(Image.open(tmp_path / "out" / "0000_truth.png"))
    assert truth.shape == (16, 16, 3)  # a.png, resized to the reconstruction's size


class HandFedWatcher:
    """A watcher whose volumes the test hands in: ``give(i)``, then the session's next poll sees volume ``i``."""

    def __init__(self, series: np.ndarray, folder: Path) -> None:
        self.series, self.folder = series, folder
        self.mask = np.ones(series.shape[0], dtype=bool)
        self._new: list[Volume] = []

    def give(self, index: int) -> None:
        now = time.time()
        self._new.append(Volume(index, self.folder / f"vol_{index:04d}.nii", self.series[:, index], now, now))

    def poll(self) -> list[Volume]:
        new, self._new = self._new, []
        return new


def test_a_trial_waits_for_the_volume_at_or_after_its_last_sample(tmp_path):
    rng = np.random.default_rng(3)
    series = (1000 + 10 * rng.standard_normal((30, 20))).astype(np.float32)
    onsets = events_onsets(write_events(tmp_path / "events.tsv", [("3.0", "x.png"), ("4.0", "y.png")]))
    seen = []  # the volumes so far when each window was decoded
    watcher = HandFedWatcher(series, tmp_path)

    def decode(window):
        seen.append(session.series.length)
        return np.zeros((8, 8, 3), np.uint8)

    session = LiveSession(watcher, onsets, (3, 9), decode, LiveRecord(tmp_path / "out", 2.0), 2.0, times_s=TIMES)
    first, second = session.trials
    # last samples: 3 + 10.67 = 13.67 s, between volumes 6 (12 s) and 7 (14 s); 4 + 10.67 = 14.67 s: volume 8
    assert (first.start, first.stop) == (3, 8) and (second.start, second.stop) == (4, 9)
    for i in range(7):
        watcher.give(i)
        assert session.step() == (first, False)
        assert not session.ready(first) and first.state == "waiting"
    watcher.give(7)
    assert session.step() == (first, True) and seen == [8]
    assert session.step() == (second, False) and second.state == "waiting"
    watcher.give(8)
    assert session.step() == (second, True) and seen == [8, 9]
    assert session.finished()


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def test_bad_events_and_a_tr_against_the_header_are_one_line_errors(tmp_path, caplog):
    from dynadiff.commands import live

    run, mask = write_run(tmp_path, 12, 2.0)
    out = tmp_path / "out"
    base = ["--replay", str(run), "--mask", str(mask), "--out", str(out)]
    good = write_events(tmp_path / "events.tsv", [("1.0", "a.png")])
    other_column = write_events(tmp_path / "other.tsv", [("1.0", "a.png")], image_column="picture")
    cases = [
        (["--events", str(other_column)], (r"other.tsv have no 'stim_file' column \(columns: onset, duration, "
                                           r"picture\): name the column holding the image with --image-column")),
        (["--events", str(good), "--tr", "1.5"], (r"--tr 1.5 s disagrees with the NIfTI header of .*bold.nii.gz "
                                                  r"\(2 s per volume\)")),
        (["--events", str(good), "--stimuli", str(tmp_path)], r"names image 'a.png', absent from --stimuli"),
    ]
    for extra, message in cases:
        caplog.clear()
        assert live.main(base + extra) == 1, extra
        errors = _errors(caplog)
        assert len(errors) == 1 and re.search(message, errors[0]) and "\n" not in errors[0], (extra, errors)
        assert not (out / "latency.csv").exists()
    caplog.clear()
    assert live.main(base + ["--events", str(other_column), "--image-column", "picture", "--tr", "2.0005",
                             "--stimuli", str(tmp_path / "nowhere")]) == 1  # column and TR (< 1 ms off) accepted
    assert "--stimuli" in _errors(caplog)[0] and "is not a folder" in _errors(caplog)[0]
    with pytest.raises(SystemExit) as e:
        live.main(base + ["--events", str(good), "--design", str(good)])
    assert e.value.code == 2


def test_events_trials_reads_the_run_and_its_image_rows(tmp_path):
    run, mask = write_run(tmp_path, 12, 2.0)
    events = write_events(tmp_path / "events.tsv", [("12.5", "b.png"), ("0.5", "stimuli/a.png"), ("2", "n/a")])
    series, onsets = events_trials(run, events, np.asarray(nib.load(str(mask)).dataobj) > 0)
    assert series.shape == (int((np.asarray(nib.load(str(mask)).dataobj) > 0).sum()), 12)
    assert [(o.seconds, o.image, o.volume, o.nsd_id) for o in onsets] == [(0.5, "a.png", None, None),
                                                                         (12.5, "b.png", None, None)]
    offline = trial_windows(series, onsets, (3, 9), "offline", times_s=TIMES, tr=2.0)
    assert offline[0].shape == (series.shape[0], len(TIMES)) and offline[1] is None  # 12.5 + 10.67 s > 22 s
