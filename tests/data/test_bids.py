"""The BIDS data source (dynadiff.data.bids): windows in seconds on any TR, and its inputs checked.

Windows are checked against hand-computed values and against slices of NSD's grid; each bad input of the
issue gives one line naming the file, before any run is loaded.
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from dynadiff.config import BidsSource, NsdDatasetConfig
from dynadiff.data import bids
from dynadiff.data.dataset import list_trials
from dynadiff.data.preprocess import TR, sample_windows, window_times

SHAPE = (4, 5, 3)


def test_window_times_are_the_published_volumes_in_seconds():
    # eval.py's window (4.6 s, 8.0 s) is volumes t+3 .. t+8 at TR 4/3 s: 4, 16/3, ..., 32/3 s after the onset
    assert np.allclose(window_times(4.6, 8.0), [4.0, 16 / 3, 20 / 3, 8.0, 28 / 3, 32 / 3])
    assert np.allclose(window_times(0.0, 4.0), [0.0, 4 / 3, 8 / 3])  # round(4.0) / TR = 3 volumes


def test_sample_windows_interpolates_linearly_between_volumes():
    run = np.array([[0.0, 10.0, 20.0, 30.0, 40.0],
                    [1.0, -1.0, 3.0, 5.0, 2.0]], dtype=np.float32)
    # TR 2 s; onset 1 s, samples 0 and 2.5 s after: times 1 s (volume 0.5) and 3.5 s (volume 1.75)
    out = sample_windows(run, [1.0], [0.0, 2.5], tr=2.0)
    assert out.shape == (1, 2, 2)
    assert np.allclose(out[0, 0], [5.0, 17.5])  # 0.5 * 0 + 0.5 * 10; 0.25 * 10 + 0.75 * 20
    assert np.allclose(out[0, 1], [0.0, 2.0])  # 0.5 * 1 + 0.5 * -1; 0.25 * -1 + 0.75 * 3
    with pytest.raises(ValueError, match="outside the run's 0 .. 8.00 s"):
        sample_windows(run, [5.0], [0.0, 4.0], tr=2.0)  # 9 s is past the last volume (8 s)


def test_on_nsd_grid_the_samples_are_the_volumes_exactly():
    rng = np.random.default_rng(0)
    run = rng.standard_normal((7, 40)).astype(np.float32)
    volumes = [0, 5, 17, 31]
    onsets = [float(f"{t * TR:.6f}") for t in volumes]  # as written in an events.tsv, rounded to the microsecond
    out = sample_windows(run, onsets, window_times(4.6, 8.0), TR)
    expected = np.stack([run[:, t + 3:t + 9] for t in volumes])
    assert np.array_equal(out, expected)


# --- a tiny BIDS dataset, written by hand ------------------------------------------------------------------


def _nifti(path: Path, data: np.ndarray, tr: float | None = None, affine=None) -> None:
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine)
    if tr is not None:
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_zooms(img.header.get_zooms()[:3] + (tr,))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _events(path: Path, rows: list[tuple[float, str]], columns=("onset", "duration", "stim_file")) -> None:
    lines = ["\t".join(columns)] + [f"{onset!r}\t3.0\t{name}" for onset, name in rows]
    path.write_text("\n".join(lines) + "\n")


def write_tiny_bids(root: Path, tr: float = 2.0, n_volumes: int = 30, header_tr: float | None = None,
                    events: dict | None = None) -> Path:
    """sub-01, ses-01, task-img, runs 1 and 2; images a..e; a and b shown in both runs (the test images)."""
    rng = np.random.default_rng(1)
    (root / "stimuli").mkdir(parents=True)
    for name in "abcde":
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "stimuli" / f"{name}.png")
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    events = events or {1: [(2.0, "a.png"), (10.0, "c.png"), (20.0, "n/a"), (30.0, "b.png")],
                        2: [(4.0, "b.png"), (12.0, "d.png"), (26.0, "a.png"), (34.0, "e.png")]}
    func = root / "sub-01" / "ses-01" / "func"
    for run, rows in events.items():
        stem = f"sub-01_ses-01_task-img_run-{run}"
        _nifti(func / f"{stem}_bold.nii.gz", rng.standard_normal(SHAPE + (n_volumes,)).astype(np.float32),
               tr=header_tr or tr)
        (func / f"{stem}_bold.json").write_text(json.dumps({"RepetitionTime": tr, "TaskName": "img"}))
        _events(func / f"{stem}_events.tsv", rows)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[1:3, 1:4, 1] = 1
    mask[0, 0, 0] = 2
    _nifti(root / "mask.nii.gz", mask)
    return root


def _cfg(root: Path, split: str = "test", **source) -> NsdDatasetConfig:
    source.setdefault("mask", str(root / "mask.nii.gz"))
    return NsdDatasetConfig(subject=1, split=split, bids=BidsSource(root=root, **source),
                            infra={"folder": root.parent / "cache"})


def test_trials_repeated_images_are_the_test_split(tmp_path):
    root = write_tiny_bids(tmp_path / "ds")
    items, trials = list_trials(_cfg(root))
    assert [item.run.uid for item in items] == ["sub-01_ses-01_task-img_run-01", "sub-01_ses-01_task-img_run-02"]
    # images sorted by name: a=1, b=2, c=3, d=4, e=5; a and b are shown twice, the n/a row is no trial
    assert [(t.item, t.row, t.nsd_id) for t in trials] == [(0, 0, 1), (0, 1, 2), (1, 0, 2), (1, 1, 1)]
    assert items[0].volumes == (2.0, 30.0) and items[1].volumes == (4.0, 26.0)
    items, trials = list_trials(_cfg(root, split="train"))
    assert [t.nsd_id for t in trials] == [3, 4, 5]
    # runs (and tasks, sessions) select the runs read; the test list then decides the split
    (root / "test.txt").write_text("a.png\n")
    items, trials = list_trials(_cfg(root, split="train", runs=[1], test_images=root / "test.txt"))
    assert [item.run.run for item in items] == [1] and [t.nsd_id for t in trials] == [3, 2]
    with pytest.raises(bids.BidsDataError, match="no BOLD run of sub-01 task-other"):
        list_trials(_cfg(root, task="other"))


def test_train_events_whose_window_runs_past_the_run_are_left_out(tmp_path):
    # 30 volumes of 2 s: 0 .. 58 s; e at 34 s + 10.67 s fits, an event at 50 s does not (60.67 s)
    root = write_tiny_bids(tmp_path / "ds", events={1: [(2.0, "a.png"), (50.0, "c.png")],
                                                   2: [(4.0, "a.png"), (12.0, "d.png")]})
    _, trials = list_trials(_cfg(root, split="train"))
    assert [t.nsd_id for t in trials] == [4]


def test_the_windows_of_a_bids_run_are_its_cleaned_volumes_interpolated(tmp_path):
    from dynadiff.data.dataset import build_dataset
    from dynadiff.data.preprocess import detrend_zscore

    root = write_tiny_bids(tmp_path / "ds")
    ds = build_dataset(_cfg(root))
    mask = nib.load(str(root / "mask.nii.gz")).get_fdata() > 0
    bold = nib.load(str(root / "sub-01/ses-01/func/sub-01_ses-01_task-img_run-1_bold.nii.gz")).get_fdata()
    clean = detrend_zscore(bold[mask].astype(np.float32))
    # sample 0 is image a: its first showing at 2 s in run 1 (unaveraged, seed 3 may pick either; averaged below)
    t = 2.0 + window_times()
    pos = t / 2.0
    lo = np.floor(pos).astype(int)
    f = pos - lo
    by_hand = clean[:, lo] * (1 - f) + clean[:, lo + 1] * f
    bold2 = nib.load(str(root / "sub-01/ses-01/func/sub-01_ses-01_task-img_run-2_bold.nii.gz")).get_fdata()
    clean2 = detrend_zscore(bold2[mask].astype(np.float32))
    pos2 = (26.0 + window_times()) / 2.0
    lo2 = np.floor(pos2).astype(int)
    f2 = pos2 - lo2
    by_hand2 = clean2[:, lo2] * (1 - f2) + clean2[:, lo2 + 1] * f2
    assert ds.nsd_ids[0] == 1 and ds.n_voxels == int(mask.sum()) == 7
    assert any(np.allclose(ds.brain(0), x, atol=1e-5) for x in (by_hand, by_hand2))
    averaged = build_dataset(_cfg(root).model_copy(update={"averaged": True}))
    assert np.allclose(averaged.brain(0), (by_hand + by_hand2) / 2, atol=1e-5)
    assert averaged.image(0, 8).shape == (8, 8, 3)
    assert np.array_equal(averaged.image(0, 8), np.asarray(Image.open(root / "stimuli/a.png").convert("RGB")))


def test_mask_labels_pick_atlas_values(tmp_path):
    root = write_tiny_bids(tmp_path / "ds")
    assert bids.load_mask(root / "mask.nii.gz", [2]).sum() == 1
    assert bids.load_mask(root / "mask.nii.gz", None).sum() == 7
    with pytest.raises(bids.BidsDataError, match="has no voxel labelled \\[9\\]"):
        bids.load_mask(root / "mask.nii.gz", [9])


# --- bad input: one line each, naming the file and what to do ----------------------------------------------


def _one_line_error(cfg, *match: str) -> str:
    with pytest.raises(bids.BidsDataError) as info:
        list_trials(cfg)
    text = str(info.value)
    assert "\n" not in text
    for m in match:
        assert m in text, text
    return text


def test_a_missing_image_column_is_named_with_the_option_that_names_another(tmp_path):
    root = write_tiny_bids(tmp_path / "ds")
    path = root / "sub-01/ses-01/func/sub-01_ses-01_task-img_run-2_events.tsv"
    _events(path, [(4.0, "b.png")], columns=("onset", "duration", "picture"))
    _one_line_error(_cfg(root), str(path), "no 'stim_file' column", "columns: onset, duration, picture",
                    "bids.image_column")


def test_an_image_absent_from_stimuli_is_named(tmp_path):
    root = write_tiny_bids(tmp_path / "ds")
    (root / "stimuli" / "d.png").unlink()
    _one_line_error(_cfg(root), "sub-01_ses-01_task-img_run-2_events.tsv", "'d.png'", str(root / "stimuli"))


def test_a_sidecar_tr_that_disagrees_with_the_header_is_named(tmp_path):
    root = write_tiny_bids(tmp_path / "ds", tr=2.0, header_tr=1.5)
    _one_line_error(_cfg(root), "sub-01_ses-01_task-img_run-1_bold.nii.gz", "RepetitionTime is 2 s",
                    "header says 1.5 s")


def test_a_test_window_past_the_run_is_named(tmp_path):
    root = write_tiny_bids(tmp_path / "ds", events={1: [(2.0, "a.png"), (50.0, "a.png")],
                                                   2: [(4.0, "b.png"), (12.0, "d.png")]})
    _one_line_error(_cfg(root), "event at 50 s", "sub-01_ses-01_task-img_run-1_events.tsv", "runs past its run",
                    "30 volumes of 2 s")


def test_a_mask_on_another_grid_is_named(tmp_path):
    root = write_tiny_bids(tmp_path / "ds")
    _nifti(root / "other.nii.gz", np.ones((4, 5, 4), dtype=np.uint8))
    _one_line_error(_cfg(root, mask=str(root / "other.nii.gz")), str(root / "other.nii.gz"), "(4, 5, 4)",
                    "resample_to_img")
    _nifti(root / "shifted.nii.gz", np.ones(SHAPE, dtype=np.uint8), affine=np.diag([3.0, 2.0, 2.0, 1.0]))
    _one_line_error(_cfg(root, mask=str(root / "shifted.nii.gz")), "another affine")


def test_no_repeated_image_and_no_test_list_is_said(tmp_path):
    root = write_tiny_bids(tmp_path / "ds", events={1: [(2.0, "a.png"), (10.0, "b.png")],
                                                   2: [(4.0, "c.png"), (12.0, "d.png")]})
    _one_line_error(_cfg(root), "no image is shown more than once", "bids.test_images")
    (root / "test.txt").write_text("c.png\n\nd.png\n")
    _, trials = list_trials(_cfg(root, test_images=root / "test.txt"))
    assert [t.nsd_id for t in trials] == [3, 4]
    (root / "test.txt").write_text("z.png\n")
    _one_line_error(_cfg(root, test_images=root / "test.txt"), "'z.png'", "test.txt")


def test_raw_runs_without_a_mask_and_unknown_subjects_are_said(tmp_path):
    root = write_tiny_bids(tmp_path / "ds")
    _one_line_error(_cfg(root, mask=None), "need a mask", "bids.mask")
    cfg = NsdDatasetConfig(subject=3, bids=BidsSource(root=root, mask=str(root / "mask.nii.gz")))
    _one_line_error(cfg, "no participant", "ending in 3", "labels: 01")
    _one_line_error(_cfg(tmp_path / "nothing"), "does not exist")


# --- prepare_data.py --bids ----------------------------------------------------------------------------------


def test_prepare_data_bids_checks_then_caches_the_windows_eval_reads(tmp_path, caplog):
    import logging

    from dynadiff.data.dataset import build_dataset
    from scripts import load_script

    prepare_data = load_script("prepare_data")
    root = write_tiny_bids(tmp_path / "ds")
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO):
        code = prepare_data.main(["--bids", str(root), "--mask", str(root / "mask.nii.gz"), "--windows", "all",
                                  "--cache", str(cache)])
    assert code == 0
    assert ("sub-01: 2 runs (TR 2 s), 2 test images (4 events), 3 train events (3 images), 7 voxels in the mask"
            in caplog.text)
    # the windows are in the cache a data config with the same source finds: read back without computing
    cfg = prepare_data.windows_config(prepare_data.build_parser().parse_args(
        ["--bids", str(root), "--mask", str(root / "mask.nii.gz"), "--cache", str(cache)]), 1, "test", None)
    assert Path(cfg.infra.folder) == cache
    items, _ = list_trials(cfg)
    from dynadiff import jobs

    assert jobs.missing_items(cfg.infra, items) == []
    assert len(build_dataset(cfg)) == 2


def test_prepare_data_bids_bad_input_exits_1_with_its_line(tmp_path, caplog):
    from scripts import load_script

    prepare_data = load_script("prepare_data")
    root = write_tiny_bids(tmp_path / "ds", tr=2.0, header_tr=1.5)
    code = prepare_data.main(["--bids", str(root), "--mask", str(root / "mask.nii.gz")])
    assert code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "header says 1.5 s" in errors[0]
    with pytest.raises(SystemExit) as info:
        prepare_data.main(["--bids", str(root), "--nsd_bucket", "s3://x"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        prepare_data.main(["--skip-download", "--path", str(root), "--mask", "m.nii.gz"])  # a BIDS flag, no --bids


# --- the synthetic data as BIDS: the same windows as NSD's layout --------------------------------------------


def test_bids_copy_at_nsd_tr_gives_the_nsd_layout_windows(tmp_path):
    """Same scene, two layouts, two readers: the same events (in the same order, the same images) and the same
    windows, raw BIDS with the nsdgeneral mask and fMRIPrep-style derivatives alike."""
    from dynadiff.data.dataset import compute_run_windows
    from dynadiff.data.stimuli import write_test_ids
    from dynadiff.data.synthetic import write_synthetic_nsd
    from dynadiff.data.synthetic_bids import write_synthetic_bids

    params = dict(sessions=(1,), n_unique=10, n_test=4, volume_shapes={2: (6, 8, 5)})
    write_synthetic_nsd(tmp_path / "nsd", subjects=(2,), seed=5, **params)
    write_test_ids(tmp_path / "nsd")  # test_images_ids.npy, from nsd_expdesign.mat's sharedix (prepare_data.py's step)
    info = write_synthetic_bids(tmp_path / "bids", subjects=(2,), seed=5, **params)
    root, deriv = tmp_path / "bids", tmp_path / "bids" / "derivatives" / "fmriprep"
    mask = str(deriv / "sub-{subject}/anat/sub-{subject}_space-T1w_desc-nsdgeneral_mask.nii.gz")
    names = bids.image_names(BidsSource(root=root))
    for split in ("test", "train"):
        nsd_cfg = NsdDatasetConfig(nsddata_path=tmp_path / "nsd", subject=2, split=split, sessions=[1])
        nsd_items, nsd_trials = list_trials(nsd_cfg)
        nsd_windows = list(compute_run_windows(nsd_cfg, nsd_items))
        for source in (dict(mask=mask), dict(derivatives=deriv, mask=mask)):
            cfg = NsdDatasetConfig(subject=2, split=split, sessions=[1], bids=BidsSource(
                root=root, test_images=root / "code" / "test_images.txt", **source))
            items, trials = list_trials(cfg)
            assert [(t.item, t.row) for t in trials] == [(t.item, t.row) for t in nsd_trials]
            # the same images: BIDS ids index the sorted stimuli/, whose names carry the NSD id
            assert [names[t.nsd_id - 1] for t in trials] == [f"nsd-{t.nsd_id:05d}.png" for t in nsd_trials]
            windows = list(compute_run_windows(cfg, items))
            assert len(windows) == len(nsd_windows) > 1
            for a, b in zip(windows, nsd_windows):
                assert a.shape == b.shape and a.shape[1] == info["n_voxels"][2]
                np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_prepare_data_synthetic_bids_writes_then_checks_and_caches_it(tmp_path, monkeypatch, caplog):
    import functools
    import logging

    from dynadiff.data import synthetic_bids
    from scripts import load_script

    # the command's writer, on a small scene (the default one takes a minute)
    small = functools.partial(synthetic_bids.write_synthetic_bids, sessions=(1,), runs_per_session=2, n_unique=8,
                              n_test=4, volume_shapes={1: (6, 8, 5)})
    monkeypatch.setattr(synthetic_bids, "write_synthetic_bids", small)
    prepare_data = load_script("prepare_data")
    root = tmp_path / "mini_bids"
    with caplog.at_level(logging.INFO):
        code = prepare_data.main(["--synthetic", "--format", "bids", "--tr", "2", "--path", str(root),
                                  "--subjects", "1", "--windows", "test", "--cache", str(tmp_path / "cache")])
    assert code == 0
    assert json.loads((root / "task-nsd_bold.json").read_text())["RepetitionTime"] == 2.0
    assert "TR 2 s" in caplog.text and "data.nsd_dataset_config.bids.root=" in caplog.text
    # 4 test images shown 3, 2, 1 and 3 times, 8 training images 3 times each: 33 trials over 2 runs at TR 2 s
    assert "sub-01: 2 runs (TR 2 s), 4 test images (9 events), 24 train events (8 images)" in caplog.text
    assert "windows cached (test)" in caplog.text
    with pytest.raises(SystemExit):
        prepare_data.main(["--format", "bids", "--path", str(root)])  # --format without --synthetic
    with pytest.raises(SystemExit):
        prepare_data.main(["--synthetic", "--format", "bids", "--tr", "0", "--path", str(tmp_path / "x")])


# --- the first K sessions (a new subject's first hours) ------------------------------------------------------


def test_first_sessions_keeps_the_first_k_in_chronological_order(tmp_path, synthetic_nsd):
    root, _ = synthetic_nsd  # NSD layout: sessions 1 and 21 of subject 1
    base = dict(nsddata_path=root, subject=1, split="train", sessions=[21, 1], infra={"folder": tmp_path / "c"})
    items, _ = list_trials(NsdDatasetConfig(**base, first_sessions=1))
    assert {item.run.session for item in items} == {1}
    items, _ = list_trials(NsdDatasetConfig(**base, first_sessions=2))
    assert {item.run.session for item in items} == {1, 21}
    with pytest.raises(Exception, match=r"first_sessions=3 \(--first-sessions\) but NSD subject 1 has 2 session"):
        list_trials(NsdDatasetConfig(**base, first_sessions=3))
    # BIDS: the ses- labels by their number (the tiny dataset has ses-01 only)
    bids_root = write_tiny_bids(tmp_path / "ds")
    items, _ = list_trials(_cfg(bids_root).model_copy(update={"first_sessions": 1}))
    assert len(items) == 2
    _one_line_error(_cfg(bids_root).model_copy(update={"first_sessions": 2}), "first_sessions=2", "sub-01",
                    "has 1 session(s)")
    from scripts import load_script

    train = load_script("train")
    cfg = train.build_config(train.parse_args(["--subject", "1", "--first-sessions", "1"]))
    assert cfg.data.nsd_dataset_config.first_sessions == 1


def test_the_raw_events_win_over_a_copy_in_the_derivatives(tmp_path):
    """A derivatives folder inside the dataset, whose name sorts after sub-*, with an events.tsv of its own for run
    1: the raw dataset's events are the ones read (a derivative's copy was picked when it came last)."""
    root = write_tiny_bids(tmp_path / "ds")
    deriv = root / "zz_prep"
    (deriv / "sub-01/ses-01/func").mkdir(parents=True)
    (deriv / "dataset_description.json").write_text(json.dumps(
        {"Name": "prep", "BIDSVersion": "1.9.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "test"}]}))
    rng = np.random.default_rng(0)
    for run in (1, 2):
        stem = deriv / f"sub-01/ses-01/func/sub-01_ses-01_task-img_run-{run}"
        _nifti(Path(f"{stem}_desc-preproc_bold.nii.gz"), rng.standard_normal(SHAPE + (30,)).astype(np.float32), tr=2.0)
        Path(f"{stem}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": 2.0}))
    _events(deriv / "sub-01/ses-01/func/sub-01_ses-01_task-img_run-1_events.tsv", [(6.0, "e.png")])
    items, _ = list_trials(_cfg(root, derivatives=deriv))
    assert [item.run.events for item in items] == [
        root / f"sub-01/ses-01/func/sub-01_ses-01_task-img_run-{run}_events.tsv" for run in (1, 2)]
    assert [item.volumes for item in items] == [(2.0, 30.0), (4.0, 26.0)]
    assert all(item.run.bold.is_relative_to(deriv) for item in items)  # the preprocessed runs, with the raw events
