"""timecourse.py: offsets, the sweep's windows (each run cleaned once), what is left out, and the whole command
on the synthetic mini-NSD with a tiny model."""

import csv
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.signal
import scipy.stats
from PIL import Image

from dynadiff.config import NsdDatasetConfig
from dynadiff.data import dataset as dataset_module
from dynadiff.data import nsd
from dynadiff.data.preprocess import TR
from dynadiff.timecourse import (
    SweepData,
    TimecourseError,
    bootstrap_interval,
    offsets_from_seconds,
    parse_offsets,
    plan,
)
from scripts import load_script


def test_offsets_in_trs():
    assert parse_offsets("-3:13") == list(range(-3, 13)) and len(parse_offsets("-3:13")) == 16
    assert parse_offsets("0:10:3") == [0, 3, 6, 9]
    assert parse_offsets("6,0,3") == [0, 3, 6]
    assert parse_offsets("-2") == [-2]
    for bad, said in [("3:3", "no offset"), ("a:b", "expected START:STOP"), ("0:5:0", "positive"),
                      ("1,1", "repeated"), ("1:2:3:4", "expected START:STOP")]:
        with pytest.raises(TimecourseError, match=said):
            parse_offsets(bad)


def test_offsets_in_seconds_snap_to_the_tr_grid():
    # hand values: TR = 4/3 s; 5.0 s = 3.75 TRs -> 4; -1.0 s = -0.75 -> -1; 0.6 s = 0.45 -> 0
    offsets, asked = offsets_from_seconds("5.0,-1.0,0.6")
    assert offsets == [-1, 0, 4] and asked == {-1: -1.0, 0: 0.6, 4: 5.0}
    offsets, _ = offsets_from_seconds("0:8:2")  # 0, 2, 4, 6 s -> 0, 1.5->2 (half to even), 3, 4.5->4
    assert offsets == [0, 2, 3, 4]
    with pytest.raises(TimecourseError, match=r"0\.5 s both become volume \+0"):
        offsets_from_seconds("0,0.5")
    with pytest.raises(TimecourseError, match="expected START:STOP"):
        offsets_from_seconds("zero")


def test_bootstrap_interval_against_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(0.3, 0.1, size=40)
    low, high = bootstrap_interval(x, n_boot=4000, seed=3)
    # the normal approximation of the mean's 95 % interval: mean -/+ 1.96 standard errors
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert low == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert high == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)
    assert bootstrap_interval([0.7]) == (0.7, 0.7)
    assert bootstrap_interval(np.full(5, 0.25)) == (0.25, 0.25)


def _nsd_cfg(root, cache, **kw):
    return NsdDatasetConfig(nsddata_path=root, subject=1, sessions=[1, 21], infra={"folder": str(cache)}, **kw)


def _clean_independently(root: Path, run) -> np.ndarray:
    """(voxels, 225): the run's nsdgeneral voxels, linear trend removed (scipy), z-scored (ddof=1), by hand."""
    mask = nib.load(root / "nsddata/ppdata/subj01/func1pt8mm/roi/nsdgeneral.nii.gz").get_fdata() > 0
    data = nib.load(run.timeseries_path(root)).get_fdata()[..., :225][mask].astype(np.float64)
    data = scipy.signal.detrend(data, axis=1, type="linear")
    std = data.std(axis=1, ddof=1, keepdims=True)
    std[std < np.finfo(np.float64).eps] = 1.0
    return data / std


@pytest.mark.parametrize("averaged", [False, True])
def test_sweep_windows_are_the_runs_cut_at_each_offset(synthetic_nsd, tmp_path, averaged):
    root, _ = synthetic_nsd
    cfg = _nsd_cfg(root, tmp_path / "cache", averaged=averaged)
    data = SweepData(cfg)
    # the same samples, in the same order, as eval.py's dataset; at offset 3 (6 TRs) the same windows
    ds = cfg.build()
    assert data.nsd_ids == ds.nsd_ids
    for i in range(len(ds)):
        np.testing.assert_allclose(data.window(i, 3, 6), ds.brain(i), rtol=0, atol=1e-6)
    # any offset: the mean over repetitions of the independently cleaned run, cut at onset + offset
    test_ids = np.load(root / "test_images_ids.npy")
    runs = {}
    for i in (0, len(ds) // 2, len(ds) - 1):
        for offset, n in ((-3, 6), (0, 1), (7, 2)):
            expected = []
            for trial in data.samples[i]:
                run = data.items[trial.item].run
                if run not in runs:  # the run's test-event onsets, from its design file, and the cleaned run
                    design = np.loadtxt(run.design_path(root)).astype(int)
                    onsets = [t for t in np.flatnonzero(design) if design[t] in test_ids]
                    runs[run] = (design, onsets, _clean_independently(root, run))
                design, onsets, clean = runs[run]
                t = onsets[trial.row]  # the row-th test event of its run
                assert design[t] == data.nsd_ids[i]
                if 0 <= t + offset and t + offset + n <= 225:
                    expected.append(clean[:, t + offset:t + offset + n])
            if expected:
                np.testing.assert_allclose(data.window(i, offset, n), np.mean(expected, axis=0), atol=2e-5)


def test_windows_past_the_run_are_left_out_and_counted(synthetic_nsd, tmp_path):
    root, _ = synthetic_nsd
    data = SweepData(_nsd_cfg(root, tmp_path / "cache", averaged=True))
    n = len(data.samples)
    onsets = {i: [data.onset(t) for t in data.samples[i]] for i in range(n)}
    for offset, n_trs in ((-40, 6), (3, 6), (200, 6), (-1000, 1)):
        p = plan(data, [offset], n_trs, n)[0]
        # independently: an event is kept when its whole window lies within the run's 225 volumes
        kept = {i: [t for t in onsets[i] if 0 <= t + offset and t + offset + n_trs <= 225] for i in range(n)}
        assert p.images == [i for i in range(n) if kept[i]]
        assert p.dropped_images == sum(1 for i in range(n) if not kept[i])
        assert p.dropped_events == sum(len(onsets[i]) - len(kept[i]) for i in range(n))
        for i in p.images[:3]:  # an averaged image averages only its repetitions within the run
            assert len(data.usable(i, offset, n_trs)) == len(kept[i])
    assert plan(data, [3], 6, n)[0].dropped_events == 0  # eval.py's window fits every event here
    assert plan(data, [-1000], 1, n)[0].images == []


def test_each_run_is_loaded_and_cleaned_once_for_the_whole_sweep(synthetic_nsd, tmp_path, monkeypatch):
    root, _ = synthetic_nsd
    calls = []
    real = dataset_module.load_masked_run
    monkeypatch.setattr(dataset_module, "load_masked_run", lambda path, *a, **k: calls.append(path) or real(path, *a, **k))
    cfg = _nsd_cfg(root, tmp_path / "cache")
    data = SweepData(cfg)
    n = len(data.samples)
    for p in plan(data, range(-3, 13), 6, n):
        for i in p.images:
            data.window(i, p.offset, 6)
    assert len(calls) == len(set(calls)) == len(data.items)  # every run with a test event, once
    calls.clear()
    SweepData(cfg).window(0, 5, 6)  # a second sweep reads the cleaned runs from the cache
    assert calls == []


# ----------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def tc_script():
    return load_script("timecourse")


def _args(setup, cache, *extra):
    return [*setup["base"], "--cache", str(cache), "--checkpoint", str(setup["ckpt"]), "--no-blur-faces",
            "--metrics", "pixcorr,ssim", *extra]


def test_timecourse_end_to_end(eval_setup, tc_script, tmp_path, monkeypatch, caplog, capsys, one_torch_thread):
    monkeypatch.setenv("DYNADIFF_WEIGHTS", eval_setup["env"]["DYNADIFF_WEIGHTS"])
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO)
    assert tc_script.main(_args(eval_setup, cache, "--offsets", "2:5", "--limit", "4")) == 0
    out = cache / "timecourse_subj01_unaveraged"
    assert out.is_symlink()
    summary = json.loads((out / "timecourse.json").read_text())
    assert summary["offsets"] == [2, 3, 4] and summary["n_trs"] == 6 and summary["model_offset"] == 3
    assert summary["mode"] == "sliding" and summary["checkpoints"] == [str(eval_setup["ckpt"])]
    assert summary["n_images"] == 4 and summary["metrics"] == ["pixcorr", "ssim"]
    assert "generating 12 image(s)" in caplog.text and "12 reconstructions (0 cached, 12 to generate" in caplog.text
    rows = list(csv.DictReader((out / "timecourse.csv").open()))
    assert [int(r["offset_tr"]) for r in rows] == [2, 3, 4]
    for row, r in zip(rows, summary["rows"]):
        assert float(row["start_s"]) == pytest.approx(r["offset"] * TR, abs=1e-4)
        assert float(row["end_s"]) == pytest.approx((r["offset"] + 6) * TR, abs=1e-4)
        per_image = list(r["metrics"]["pixcorr"]["per_image"].values())
        assert float(row["pixcorr_mean"]) == pytest.approx(np.mean(per_image), abs=1e-6)
        assert float(row["pixcorr_ci95_low"]) <= float(row["pixcorr_mean"]) <= float(row["pixcorr_ci95_high"])
        assert int(row["n_images"]) == 4 and int(row["dropped_events"]) == 0
    # pictures: the plot, and one strip per image (ground truth + 3 offsets, 96 px tiles) and the filmstrip
    assert Image.open(out / "timecourse.png").size[0] > 400
    assert Image.open(out / "strips" / "0.png").size == (96 * 4 + 8, 96)
    assert Image.open(out / "filmstrip.png").size[0] == 96 * 4 + 8
    printed = capsys.readouterr().out
    assert "pixcorr: best at offset" in printed and str(out / "timecourse.png").replace(str(out), "") in printed

    # at the model's own offset, the images are eval.py's: the same per-image PixCorr, computed by eval.py
    eval_script = load_script("eval")
    eval_args = [*eval_setup["base"], "--cache", str(tmp_path / "eval"), "--checkpoint", str(eval_setup["ckpt"]),
                 "--no-blur-faces", "--metrics", "pixcorr", "--limit", "4"]
    result = eval_script.resolve_config(eval_script.parse_args(eval_args)).run()
    at3 = next(r for r in summary["rows"] if r["offset"] == 3)
    assert list(at3["metrics"]["pixcorr"]["per_image"].values()) == pytest.approx(result["per_image"]["pixcorr"],
                                                                                 abs=1e-12)

    # again, and with overlapping offsets: only the missing (offset, image) pairs are generated
    caplog.clear()
    assert tc_script.main(_args(eval_setup, cache, "--offsets", "2:5", "--limit", "4")) == 0
    assert "generating" not in caplog.text and "0 to generate" in caplog.text
    caplog.clear()
    assert tc_script.main(_args(eval_setup, cache, "--offsets", "4:6", "--limit", "4")) == 0
    assert "generating 4 image(s)" in caplog.text
    assert json.loads((out / "timecourse.json").read_text())["offsets"] == [4, 5]  # the link: the latest sweep


def test_bad_offsets_are_one_line_before_any_work(eval_setup, tc_script, tmp_path, caplog):
    cache = tmp_path / "cache"
    assert tc_script.main(_args(eval_setup, cache, "--offsets", "5:2")) == 2
    assert "no offset in that range" in caplog.text and not cache.exists()
    with pytest.raises(SystemExit):  # argparse: the two forms exclude each other
        tc_script.parse_args(["--offsets", "0:3", "--offsets-s", "0:4"])
    # a value starting with "-" is the option's value, not another option
    assert tc_script.parse_args(["--offsets", "-6:12:2", "--subject", "1"]).offsets == "-6:12:2"
    assert tc_script.parse_args(["--offsets-s", "-.5,4"]).offsets_s == "-.5,4"


# ----------------------------------------------------------------------------- where the signal is


def _decodability(data: SweepData, features: np.ndarray, offset: int, images: list[int]) -> float:
    """Representational similarity: Spearman correlation, over image pairs, of the 1-TR windows' correlation
    distances with the images' feature distances (independent of any model)."""
    x = np.stack([data.window(i, offset, 1)[:, 0] for i in images])
    iu = np.triu_indices(len(x), 1)
    brain = 1 - np.corrcoef(x)[iu]
    image = 1 - np.corrcoef(features)[iu]
    return float(scipy.stats.spearmanr(brain, image)[0])


@pytest.mark.parametrize("peak_s", [5.0, 10.0])
def test_the_sweep_finds_the_signal_where_the_synthetic_response_puts_it(tmp_path, peak_s):
    """Single trials of a weak signal (0.3 % of baseline, noise 0.6 %), so that decodability follows the response's
    amplitude instead of saturating; the images whose windows lie within their run at every offset."""
    import h5py

    from dynadiff.data.stimuli import write_test_ids
    from dynadiff.data.synthetic import write_synthetic_nsd

    root = tmp_path / "nsd"
    write_synthetic_nsd(root, subjects=(1,), seed=1, sessions=(1,), n_test=30, n_unique=12, test_repetitions=(3,),
                        train_repetitions=1, hrf_peak_s=peak_s, signal_percent=0.3)
    write_test_ids(root)
    data = SweepData(NsdDatasetConfig(nsddata_path=root, subject=1, sessions=[1],
                                      infra={"folder": str(tmp_path / "cache")}))
    offsets = list(range(-4, 14))
    images = [i for i in range(len(data.samples)) if all(data.usable(i, k, 1) for k in offsets)]
    assert len(images) >= 25
    with h5py.File(root / "nsd_stimuli.hdf5") as f:  # the images, read independently: 5x5 RGB thumbnails
        brick = f["imgBrick"][:]
    thumbs = np.stack([brick[data.nsd_ids[i] - 1].reshape(5, 85, 5, 85, 3).mean(axis=(1, 3)).ravel() for i in images])
    scores = {k: _decodability(data, thumbs, k, images) for k in offsets}
    best = max(scores, key=scores.get)
    # the response peaks peak_s after the onset (3.75 and 7.5 TRs): the best window is within a TR of it
    assert abs(best - peak_s / TR) <= 1, scores
    # windows that end before the onset: at chance, against a permutation null of the same statistic
    rng = np.random.default_rng(0)
    null = [_decodability(data, thumbs[rng.permutation(len(thumbs))], best, images) for _ in range(200)]
    threshold = np.quantile(null, 0.99)
    assert scores[best] > threshold
    assert all(scores[k] < threshold for k in (-4, -3, -2, -1)), scores


def test_train_split_leaves_out_events_whose_window_runs_past_their_run(synthetic_nsd, tmp_path, caplog):
    """A per-offset model's window may not fit every event: training leaves those out and says how many; the test
    split (eval.py) still refuses them (tests/data/test_dataset.py)."""
    from dynadiff.data.dataset import list_trials
    from dynadiff.data.preprocess import window_seconds

    root, _ = synthetic_nsd
    test_ids = np.load(root / "test_images_ids.npy")
    offset, duration = window_seconds(-3, 3)
    cfg = _nsd_cfg(root, tmp_path / "cache", split="train", offset=offset, duration=duration)
    caplog.set_level(logging.WARNING)
    _, trials = list_trials(cfg)
    # independently, from the design files: train events at volumes t with t - 3 < 0 or t + 3 > 225
    total, outside = 0, 0
    for run in nsd.list_runs(1, [1, 21]):
        design = np.loadtxt(run.design_path(root)).astype(int)
        onsets = [t for t in np.flatnonzero(design) if design[t] not in test_ids]
        total += len(onsets)
        outside += sum(1 for t in onsets if t - 3 < 0 or t + 3 > 225)
    assert outside > 0 and len(trials) == total - outside
    assert f"{outside} event(s) left out" in caplog.text and "volumes t-3 .. t+2" in caplog.text
