import random
import shutil

import nibabel as nib
import numpy as np
import pydantic
import pytest
from PIL import Image

from dynadiff.config import NsdDatasetConfig
from dynadiff.data import dataset as dataset_mod
from dynadiff.data import nsd


def _config(root, cache, **kw):
    kw.setdefault("sessions", [1, 21])
    return NsdDatasetConfig(nsddata_path=root, subject=1, infra={"folder": cache}, **kw)


def _scan_test_events(root, test_ids):
    """Independent scan: (session, run, volume, id) of test events, chronological."""
    events = []
    for session in (1, 21):
        runs = range(2, 14) if session == 21 else range(1, 13)
        for r in runs:
            design = np.loadtxt(nsd.Run(1, session, r).design_path(root), dtype=int)
            for t in np.flatnonzero(design):
                if design[t] in test_ids:
                    events.append((session, r, int(t), int(design[t])))
    return events


def _reference_window(root, session, run, t):
    """Independent float64 path: whole 4D file, mask, mean then centred-ramp removal, ddof=1 z-score, TRs t+3..t+8."""
    mask = nib.load(nsd.roi_path(root, 1)).get_fdata() > 0
    x = nib.load(nsd.Run(1, session, run).timeseries_path(root)).get_fdata()[mask][:, :225]
    ramp = np.arange(x.shape[1]) - (x.shape[1] - 1) / 2
    xc = x - x.mean(axis=1, keepdims=True)
    resid = xc - np.outer(xc @ ramp / (ramp @ ramp), ramp)
    std = resid.std(axis=1, ddof=1, keepdims=True)
    std[std < np.finfo(float).eps] = 1
    return (resid / std)[:, t + 3 : t + 9]


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def test_unaveraged_test_set_order_choice_and_windows(synthetic_nsd, cache):
    root, info = synthetic_nsd
    test_ids = set(info["test_ids"])
    events = _scan_test_events(root, test_ids)
    first_order = list(dict.fromkeys(e[3] for e in events))
    ds = _config(root, cache, seed=3).build()
    assert ds.nsd_ids == first_order
    assert len(ds) == len(test_ids) == 20
    # the original's choice: random.seed(seed) then random.choice per image in that order
    random.seed(3)
    chosen = [random.choice([e for e in events if e[3] == i]) for i in first_order]
    for k in (0, 7, len(ds) - 1):
        session, run, t, _ = chosen[k]
        np.testing.assert_allclose(ds.brain(k), _reference_window(root, session, run, t), atol=1e-4)
    # another seed picks other repetitions for some images, the same images in the same order
    other = _config(root, cache, seed=4).build()
    assert other.nsd_ids == ds.nsd_ids
    assert any(not np.array_equal(ds.brain(k), other.brain(k)) for k in range(len(ds)))
    again = _config(root, cache, seed=3).build()
    np.testing.assert_array_equal(again.brain(5), ds.brain(5))


def test_averaged_is_mean_of_all_repetitions(synthetic_nsd, cache):
    root, info = synthetic_nsd
    events = _scan_test_events(root, set(info["test_ids"]))
    ds = _config(root, cache, averaged=True).build()
    counts = [sum(e[3] == i for e in events) for i in ds.nsd_ids]
    assert ds.n_repetitions == counts and max(counts) == 3 and min(counts) == 1
    k = counts.index(3)
    reps = [e for e in events if e[3] == ds.nsd_ids[k]]
    ref = np.mean([_reference_window(root, s, r, t) for s, r, t, _ in reps], axis=0)
    np.testing.assert_allclose(ds.brain(k), ref, atol=1e-4)


def test_item_dict_types_and_image(synthetic_nsd, cache):
    root, _ = synthetic_nsd
    ds = _config(root, cache, image_size=64).build(subject_idx=2)
    item = ds[1]
    assert item["brain"].shape == (ds.n_voxels, 6) and str(item["brain"].dtype) == "torch.float32"
    assert item["img"].shape == (3, 64, 64) and 0.0 <= float(item["img"].min()) and float(item["img"].max()) <= 1.0
    assert int(item["subject_idx"]) == 2 and str(item["subject_idx"].dtype) == "torch.int64"
    png = Image.open(nsd.stimulus_png(root, ds.nsd_ids[1])).convert("RGB").resize((64, 64), Image.BILINEAR)
    np.testing.assert_allclose(item["img"].permute(1, 2, 0).numpy() * 255, np.asarray(png), atol=1e-3)
    mask = nib.load(nsd.roi_path(root, 1)).get_fdata() > 0
    assert ds.n_voxels == int(mask.sum())


def test_train_split_has_every_repetition_and_no_test_image(synthetic_nsd, cache):
    root, info = synthetic_nsd
    ds = _config(root, cache, split="train").build()
    assert not set(ds.nsd_ids) & set(info["test_ids"])
    assert len(ds) == 100 * 3  # 100 training images shown 3 times each
    assert len(_config(root, cache, split="train", averaged=True).build()) == 100


def test_second_build_recomputes_nothing(synthetic_nsd, cache, monkeypatch):
    root, _ = synthetic_nsd
    calls = []
    real = dataset_mod.load_masked_run
    monkeypatch.setattr(dataset_mod, "load_masked_run", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    first = _config(root, cache).build()
    n_runs = len(calls)
    assert n_runs == len(set(calls)) > 0  # each run loaded once, for all of its events
    calls.clear()
    # a new config object (fresh in-memory state), changing only averaged / seed: all from disk
    _config(root, cache, averaged=True).build()
    second = _config(root, cache, seed=11).build()
    assert calls == []
    assert second.n_voxels == first.n_voxels
    # changing the window does recompute
    _config(root, cache, offset=3.0).build()
    assert len(calls) == n_runs


def test_rest_runs_of_14_run_sessions_are_ignored(synthetic_nsd, tmp_path):
    src, info = synthetic_nsd
    root = tmp_path / "nsd"
    shutil.copytree(src, root)
    before = len(_config(root, tmp_path / "c1", averaged=True, split="train").build())
    design = np.zeros(225, dtype=int)
    design[50] = info["test_ids"][0]
    rest = nsd.Run(1, 21, 1)
    assert rest.timeseries_path(root).exists()
    rest.design_path(root).write_text("".join(f"{v}\n" for v in design))
    ds = _config(root, tmp_path / "c2", averaged=True).build()
    assert sum(ds.n_repetitions) == sum(_config(src, tmp_path / "c3", averaged=True).build().n_repetitions)
    assert before == 100


def test_bad_inputs_give_clear_errors(synthetic_nsd, tmp_path):
    src, _ = synthetic_nsd
    root = tmp_path / "nsd"
    shutil.copytree(src, root)
    cache = tmp_path / "cache"
    with pytest.raises(pydantic.ValidationError, match=r"unknown subject 3"):
        NsdDatasetConfig(nsddata_path=root, subject=3)
    # every missing file listed in one error
    a, b = nsd.Run(1, 1, 4).timeseries_path(root), nsd.Run(1, 21, 13).design_path(root)
    a.rename(a.with_suffix(".bak"))
    b.rename(b.with_suffix(".bak"))
    with pytest.raises(nsd.NsdDataError) as err:
        _config(root, cache).build()
    assert "2 NSD file(s) missing" in str(err.value) and a.name in str(err.value) and b.name in str(err.value)
    a.with_suffix(".bak").rename(a)
    b.with_suffix(".bak").rename(b)
    # a design whose length does not match the run
    design = nsd.Run(1, 1, 2).design_path(root)
    good_design = design.read_text()
    design.write_text("0\n" * 226)
    with pytest.raises(nsd.NsdDataError, match=r"design_session01_run02\.tsv has 226 rows, expected 225"):
        _config(root, cache).build()
    # an event too close to the end of the run for its window
    rows = [0] * 225
    rows[220] = int(np.load(root / "test_images_ids.npy")[0])
    design.write_text("".join(f"{v}\n" for v in rows))
    with pytest.raises(nsd.NsdDataError, match=r"window \[223, 229\) of the event at volume 220 .*run02\.tsv runs past"):
        _config(root, cache).build()
    design.write_text(good_design)
    # a corrupt time series
    series = nsd.Run(1, 1, 3).timeseries_path(root)
    series.write_bytes(series.read_bytes()[:5000])
    with pytest.raises(nsd.NsdDataError, match=r"cannot read NIfTI file .*timeseries_session01_run03\.nii\.gz"):
        _config(root, cache).build()
    # a missing stimulus
    series.write_bytes((src / series.relative_to(root)).read_bytes())
    ds = _config(root, cache).build()
    nsd.stimulus_png(root, ds.nsd_ids[4]).unlink()
    with pytest.raises(nsd.NsdDataError, match=r"1 stimulus PNG\(s\) missing .*prepare_data\.py"):
        _config(root, cache).build()


def test_masked_loading_streams_and_matches_nibabel(tmp_path):
    """Masking happens on raw chunks: peak memory far below the 4D run, values equal get_fdata()."""
    import tracemalloc

    rng = np.random.default_rng(0)
    shape = (40, 44, 36, 226)
    data = rng.integers(-2000, 2000, size=shape, dtype=np.int16)
    mask = np.zeros(shape[:3], dtype=bool)
    mask[5:15, 10:20, 3:9] = True
    path = tmp_path / "run.nii.gz"
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_data_dtype(np.int16)
    nib.save(img, path)
    del img
    tracemalloc.start()
    out = dataset_mod.load_masked_run(path, mask)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out.dtype == np.float32 and out.shape == (600, 225)
    np.testing.assert_array_equal(out, data[mask][:, :225].astype(np.float32))
    assert peak < data.nbytes / 4, f"peak {peak / 1e6:.1f} MB for a {data.nbytes / 1e6:.1f} MB int16 run"
    # scaled files come out scaled
    scaled = nib.Nifti1Image(data, np.eye(4))
    scaled.header.set_slope_inter(0.5, 10.0)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    out = dataset_mod.load_masked_run(tmp_path / "scaled.nii.gz", mask)
    np.testing.assert_allclose(out, data[mask][:, :225] * 0.5 + 10.0)
    with pytest.raises(nsd.NsdDataError, match=r"has shape \(40, 44, 36, 226\), expected 4D volumes of shape \(40, 44, 35\)"):
        dataset_mod.load_masked_run(path, mask[:, :, :35])
