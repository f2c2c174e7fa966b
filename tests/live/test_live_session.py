"""``live.py`` end to end on a synthetic run, faster than real time, with a tiny random decoder.

Replay: every trial of the run gets exactly one image, in onset order; no trial is decoded before its window's
last volume file exists; the images equal offline decoding of the same windows with the same causal
preprocessing. Watch: a gap, a volume of the wrong shape and a stalled stream are each said, the other trials
are decoded, and a second run on the same folder keeps what is there.
"""

from __future__ import annotations

import csv
import re
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scripts import load_script

from dynadiff.data import nsd
from dynadiff.data.dataset import load_mask
from dynadiff.live.offline import run_trials, trial_windows
from dynadiff.live.replay import volume_bytes, volume_name

RUN = nsd.Run(1, 1, 1)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def _args(eval_setup, out: Path, *extra: str) -> list[str]:
    return ["--out", str(out), "--subject", "1", "--checkpoint", str(eval_setup["ckpt"]),
            "--vd_cache_dir", str(eval_setup["vd"]), "--nsddata_path", str(eval_setup["nsd"]), "--device", "cpu",
            "--steps", "2", *extra, "versatilediffusion_config.image_size=64", "brain_modules_config.hidden=32"]


def _latency(out: Path) -> list[dict]:
    with open(out / "latency.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_replay_decodes_each_trial_once_in_order_after_its_window_as_offline_does(eval_setup, tmp_path, monkeypatch,
                                                                                capsys):
    from dynadiff.live import decoder as live_decoder

    live = load_script("live")
    root, out = eval_setup["nsd"], tmp_path / "live"
    calls = []  # (volume files present when the decoder was called)
    original = live_decoder.WindowDecoder.__call__

    def spy(self, window):
        calls.append({p.name for p in (out / "replay_volumes").iterdir()})
        return original(self, window)

    monkeypatch.setattr(live_decoder.WindowDecoder, "__call__", spy)
    argv = _args(eval_setup, out, "--replay", str(RUN.timeseries_path(root)), "--design", str(RUN.design_path(root)),
                 "--speed", "40")
    assert live.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    series, onsets = run_trials(root, RUN, load_mask(root, 1))
    assert len(onsets) >= 10 and summary["decoded_now"] == len(onsets) and not summary["skipped"]

    rows = _latency(out)
    assert [int(r["trial"]) for r in rows] == list(range(len(onsets)))  # each once, in onset order
    assert [int(r["onset_volume"]) for r in rows] == [o.volume for o in onsets]
    assert [int(r["nsd_id"]) for r in rows] == [o.nsd_id for o in onsets]
    written = [float(r["image_written"]) for r in rows]
    assert written == sorted(written)
    window = summary["window"]
    for row, onset, present in zip(rows, onsets, calls):
        last = onset.volume + window[1] - 1
        assert int(row["last_volume"]) == last
        assert volume_name(last) in present  # its window's last volume existed when it was decoded
        assert float(row["volume_written"]) <= float(row["volume_seen"]) <= float(row["image_written"])
        assert np.isclose(float(row["latency_s"]), float(row["image_written"]) - float(row["volume_written"]))

    # offline, with the same causal preprocessing: the same images, bit for bit
    cfg = live.resolve_config(live.parse_args(argv))
    decode = live_decoder.WindowDecoder(cfg, series.shape[0], window[1] - window[0], steps=2)
    for i, w in enumerate(trial_windows(series, onsets, tuple(window), "causal")):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{i:04d}.png")), original(decode, w))
    truth = np.asarray(Image.open(out / "0000_truth.png"))
    assert truth.shape == (64, 64, 3)
    state = json.loads((out / "trials.json").read_text())
    assert state["status"] == "done" and len(state["trials"]) == len(onsets)


def _writer(run_path: Path, folder: Path, onsets_file: Path, onsets, n: int, interval: float, skip=(), bad=()):
    """Volumes ``0 .. n-1`` into ``folder`` (not those in ``skip``; those in ``bad`` with a wrong shape), each
    onset's line appended once its volume is written; then nothing (a stalled stream)."""
    import nibabel as nib

    img = nib.load(str(run_path))
    by_volume = {o.volume: o for o in onsets}
    for i in range(n):
        time.sleep(interval)
        if i in bad:
            raw = nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), np.eye(4)).to_bytes()
        elif i not in skip:
            raw = volume_bytes(img, i, compressed=False)
        if i not in skip:
            (folder / volume_name(i)).write_bytes(raw)
        if i in by_volume:
            with open(onsets_file, "a") as f:
                f.write(f"{i} {by_volume[i].nsd_id}\n")


def test_watch_reports_gaps_bad_volumes_and_stalls_and_keeps_going(eval_setup, tmp_path, capsys, caplog):
    live = load_script("live")
    root, out, folder = eval_setup["nsd"], tmp_path / "live", tmp_path / "scanner"
    folder.mkdir()
    onsets_file = tmp_path / "onsets.txt"
    _, onsets = run_trials(root, RUN, load_mask(root, 1))
    onsets = onsets[:6]
    n = onsets[-1].volume + 9  # the sixth trial's window is the last to complete
    gap, bad = onsets[1].volume + 4, onsets[3].volume + 5  # in the windows of trials 1 and 3 only
    writer = threading.Thread(target=_writer, args=(RUN.timeseries_path(root), folder, onsets_file, onsets, n, 0.02),
                              kwargs={"skip": (gap,), "bad": (bad,)})
    writer.start()
    argv = _args(eval_setup, out, "--watch", str(folder), "--onsets", str(onsets_file), "--tr", "0.05",
                 "--give-up-trs", "20")
    try:
        assert live.main(argv) == 0
    finally:
        writer.join()
    summary = json.loads(capsys.readouterr().out)
    assert summary["decoded_now"] == 4 and [s["trial"] for s in summary["skipped"]] == ["0001", "0003"]
    assert summary["missing_volumes"] == sorted([gap, bad])
    messages = [m["text"] for m in json.loads((out / "trials.json").read_text())["messages"]]
    text = "\n".join(messages)
    assert f"volume {gap} is missing" in text and f"volume {bad} (vol_{bad:04d}.nii) has shape (3, 3, 3)" in text
    assert "no new volume for" in text and "giving up (0 trial(s) still waiting)" in text
    assert [int(r["trial"]) for r in _latency(out)] == [0, 2, 4, 5]
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    # the same command again: what is there is kept, nothing decoded again
    argv_again = argv[:]
    assert live.main(argv_again) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["decoded_now"] == 0 and again["decoded"] == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before


def test_serve_shows_the_session_as_it_runs_and_ctrl_c_ends_the_page(eval_setup, tmp_path):
    import os
    import signal
    import sys
    import urllib.request

    from scripts import REPO, started

    root, out = eval_setup["nsd"], tmp_path / "live"
    cmd = [sys.executable, str(REPO / "live.py"), *_args(eval_setup, out, "--replay", str(RUN.timeseries_path(root)),
                                                         "--design", str(RUN.design_path(root)), "--speed", "60",
                                                         "--serve", "--port", "0")]
    with started(cmd, dict(os.environ, OMP_NUM_THREADS="1")) as proc:
        line = proc.stdout.readline()
        assert line.startswith("Live page: http://127.0.0.1:"), line + proc.stderr.read()[-2000:]
        url = line.split(": ", 1)[1].strip()
        counts, deadline = [], time.monotonic() + 120
        while True:  # the page's state, read over HTTP while the session runs
            state = json.loads(urllib.request.urlopen(url + "trials.json", timeout=5).read())
            counts.append(len(state["trials"]))
            if state["status"] == "done" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert state["status"] == "done", proc.stderr.read()[-2000:] if proc.poll() is not None else state
        assert len(set(counts)) > 2  # seen growing, trial by trial
        last = state["trials"][-1]["image"]
        assert urllib.request.urlopen(url + last, timeout=5).read() == (out / last).read_bytes()
        while not (line := proc.stdout.readline()).startswith("The page stays at"):  # after the summary
            assert line, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGINT)  # the page's end, as its line says
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    assert len(_latency(out)) == len(state["trials"]) == len(json.loads((out / "trials.json").read_text())["trials"])


def test_bad_inputs_are_one_line_errors_before_any_work(eval_setup, tmp_path, caplog):
    import nibabel as nib

    live = load_script("live")
    root, out = eval_setup["nsd"], tmp_path / "live"
    design, run = str(RUN.design_path(root)), str(RUN.timeseries_path(root))
    with pytest.raises(SystemExit) as e:  # usage: the trials are needed
        live.main(_args(eval_setup, out, "--watch", str(tmp_path)))
    assert e.value.code == 2
    three_d = tmp_path / "one_volume.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), three_d)
    bad_design = tmp_path / "design.tsv"
    bad_design.write_text("0\nfoo\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (["--replay", str(tmp_path / "nope.nii.gz"), "--design", design], "--replay .*nope.nii.gz does not exist"),
        (["--replay", str(three_d), "--design", design], r"has shape \(4, 4, 4\): expected a 4-D run of volumes"),
        (["--replay", run, "--design", str(bad_design)], "cannot read the design"),
        (["--replay", run, "--design", design, "--mask", str(tmp_path / "nomask.nii.gz")], "cannot read the mask"),
        (["--replay", run, "--design", design, "--prior-run", str(three_d)], "--prior-run .* has shape"),
        (["--watch", str(a_file), "--design", design], "--watch .*a_file is a file, not a folder"),
    ]
    for extra, message in cases:
        caplog.clear()
        assert live.main(_args(eval_setup, out, *extra)) == 1, extra
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and re.search(message, errors[0]) and "\n" not in errors[0], (extra, errors)
        assert not (out / "latency.csv").exists()  # nothing decoded
    foreign = out / "replay_volumes"
    foreign.mkdir(parents=True)
    (foreign / "keep.txt").write_text("mine")
    caplog.clear()
    assert live.main(_args(eval_setup, out, "--replay", run, "--design", design)) == 1
    assert "was not written by a replay" in caplog.text and (foreign / "keep.txt").read_text() == "mine"


def test_a_replay_that_fails_mid_run_ends_the_session_with_what_was_decoded_kept(eval_setup, tmp_path, monkeypatch,
                                                                                 caplog):
    from dynadiff.live import replay as live_replay

    live = load_script("live")
    root, out = eval_setup["nsd"], tmp_path / "live"
    real = live_replay.volume_bytes

    def full_disk(img, index, compressed):
        if index == 40:
            raise OSError(28, "No space left on device")
        return real(img, index, compressed)

    monkeypatch.setattr(live_replay, "volume_bytes", full_disk)
    argv = _args(eval_setup, out, "--replay", str(RUN.timeseries_path(root)), "--design", str(RUN.design_path(root)),
                 "--speed", "40")
    assert live.main(argv) == 1  # no hang waiting for volumes that will never come
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("No space left on device" in e and "replay of" in e for e in errors), errors
    _, onsets = run_trials(root, RUN, load_mask(root, 1))
    decoded = [int(r["trial"]) for r in _latency(out)]
    expected = [i for i, o in enumerate(onsets) if o.volume + 9 <= 40]  # windows complete before volume 40
    assert decoded == expected and len(expected) >= 2
    assert json.loads((out / "trials.json").read_text())["status"] == "done"
