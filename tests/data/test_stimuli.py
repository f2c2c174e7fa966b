"""Stimulus preparation: PNGs from imgBrick (streamed, parallel, idempotent) and test_images_ids.npy."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dynadiff.data import stimuli
from dynadiff.data.nsd import EXPDESIGN_FILE, STIMULI_FILE, STIMULI_PNG_DIR, TEST_IDS_FILE, NsdDataError, load_test_ids


def _pngs(out: Path) -> dict[int, Path]:
    return {int(p.stem): p for p in out.glob("*.png")}


def _stamps(out: Path) -> dict[int, tuple[int, int]]:
    return {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k, p in _pngs(out).items()}


def _assert_pixels(out: Path, images: np.ndarray, rows) -> None:
    for k in rows:
        with Image.open(out / f"{k}.png") as im:
            assert im.mode == "RGB" and im.format == "PNG"
            np.testing.assert_array_equal(np.asarray(im), images[k], err_msg=f"row {k}")


@pytest.mark.parametrize("workers", [1, 2])
def test_pngs_equal_brick_rows(stim_root, workers):
    root, images = stim_root["root"], stim_root["images"]
    out = root / STIMULI_PNG_DIR
    summary = stimuli.extract_stimuli(root / STIMULI_FILE, out, workers=workers, chunk_rows=5)
    assert set(_pngs(out)) == set(range(len(images)))
    _assert_pixels(out, images, range(len(images)))
    assert (summary.written, summary.replaced, summary.kept) == (len(images), 0, 0)
    assert not list(out.glob(".*"))  # no temporary file left


def test_second_run_rewrites_nothing(stim_root):
    root = stim_root["root"]
    out = root / STIMULI_PNG_DIR
    stimuli.extract_stimuli(root / STIMULI_FILE, out, workers=1, chunk_rows=4)
    before = _stamps(out)
    summary = stimuli.extract_stimuli(root / STIMULI_FILE, out, workers=2, chunk_rows=4)
    assert (summary.written, summary.replaced, summary.kept) == (0, 0, len(before))
    assert _stamps(out) == before


def test_corrupt_pngs_are_rewritten(stim_root):
    root, images = stim_root["root"], stim_root["images"]
    out = root / STIMULI_PNG_DIR
    stimuli.extract_stimuli(root / STIMULI_FILE, out, workers=1)
    truncated, wrong_size, not_png, grey = out / "3.png", out / "7.png", out / "11.png", out / "12.png"
    truncated.write_bytes(truncated.read_bytes()[:-40])
    Image.fromarray(images[7][:-1]).save(wrong_size)
    not_png.write_bytes(b"definitely not a png")
    Image.fromarray(images[12][..., 0]).save(grey)  # right size, wrong mode
    (out / ".5.png.part").write_bytes(b"half")  # temporary file of an interrupted run
    untouched = {k: v for k, v in _stamps(out).items() if k not in (3, 7, 11, 12)}

    summary = stimuli.extract_stimuli(root / STIMULI_FILE, out, workers=1)

    assert (summary.written, summary.replaced, summary.kept) == (0, 4, len(images) - 4)
    _assert_pixels(out, images, [3, 7, 11, 12])
    assert {k: v for k, v in _stamps(out).items() if k in untouched} == untouched
    assert not (out / ".5.png.part").exists()


def test_missing_pngs_are_added_to_an_existing_folder(stim_root):
    root, images = stim_root["root"], stim_root["images"]
    out = root / STIMULI_PNG_DIR
    stimuli.extract_stimuli(root / STIMULI_FILE, out, rows=[0, 1, 2], workers=1)
    before = _stamps(out)
    summary = stimuli.extract_stimuli(root / STIMULI_FILE, out, rows=[1, 2, 3, 4], workers=1)
    assert (summary.written, summary.kept) == (2, 2)
    assert set(_pngs(out)) == {0, 1, 2, 3, 4}
    assert {k: _stamps(out)[k] for k in before} == before
    _assert_pixels(out, images, [3, 4])


def test_brick_is_read_in_blocks_never_whole(stim_root, monkeypatch):
    """Every read of imgBrick asks for at most ``chunk_rows`` rows (peak memory independent of the brick)."""
    import h5py

    reads = []
    real_getitem = h5py.Dataset.__getitem__

    def spy(self, key, *args, **kwargs):
        block = real_getitem(self, key, *args, **kwargs)
        reads.append(np.shape(block))
        return block

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    root = stim_root["root"]
    stimuli.extract_stimuli(root / STIMULI_FILE, root / STIMULI_PNG_DIR, workers=1, chunk_rows=3)
    n = len(stim_root["images"])
    assert reads and all(len(shape) == 4 and shape[0] <= 3 for shape in reads)
    assert sum(shape[0] for shape in reads) == n  # each row read once
    reads.clear()
    stimuli.extract_stimuli(root / STIMULI_FILE, root / STIMULI_PNG_DIR, rows=[1, 5, 16], workers=1, chunk_rows=3)
    assert reads == []  # all valid already: the brick's pixels are not even read


def test_sparse_rows_read_only_those_rows(stim_root, monkeypatch):
    import h5py

    reads = []
    real_getitem = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda self, key: reads.append(key) or real_getitem(self, key))
    root, images = stim_root["root"], stim_root["images"]
    out = root / STIMULI_PNG_DIR
    stimuli.extract_stimuli(root / STIMULI_FILE, out, rows=[16, 2, 9, 2], workers=1, chunk_rows=8)
    assert set(_pngs(out)) == {2, 9, 16}
    _assert_pixels(out, images, [2, 9, 16])
    assert len(reads) == 1 and list(reads[0]) == [2, 9, 16]


# ----------------------------------------------------------------------------- selection and test ids


def test_test_ids_equal_sharedix_in_file_order(stim_root):
    root = stim_root["root"]
    path = stimuli.write_test_ids(root)
    assert path == root / TEST_IDS_FILE
    ids = np.load(path)
    assert ids.shape == (4,) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, stim_root["sharedix"])  # 1-based, unsorted as in the file
    np.testing.assert_array_equal(load_test_ids(root), stim_root["sharedix"])


@pytest.mark.parametrize("images, subjects, expected_ids", [
    ("test", [1], [2, 5, 9, 14]),
    ("subjects", [1], [1, 2, 3, 5, 9, 14, 17]),
    ("subjects", [5], [1, 2, 3, 5, 9, 14]),
    ("subjects", [1, 2], [1, 2, 3, 4, 5, 6, 7, 9, 14, 17]),
    ("subjects", [7], [2, 5, 8, 9, 10, 11, 14]),
    ("all", [1], list(range(1, 18))),
])
def test_prepare_extracts_exactly_the_chosen_images(stim_root, images, subjects, expected_ids):
    root = stim_root["root"]
    expdesign = stimuli.load_expdesign(root / EXPDESIGN_FILE)
    rows = stimuli.select_rows(images, expdesign, subjects, n_images=17)
    np.testing.assert_array_equal(rows, np.array(expected_ids) - 1)
    summary = stimuli.prepare_stimuli(root, images=images, subjects=subjects, workers=1)
    assert set(_pngs(root / STIMULI_PNG_DIR)) == {i - 1 for i in expected_ids}  # row = 1-based id - 1
    assert summary.written == len(expected_ids)
    _assert_pixels(root / STIMULI_PNG_DIR, stim_root["images"], [i - 1 for i in expected_ids])
    np.testing.assert_array_equal(np.load(root / TEST_IDS_FILE), stim_root["sharedix"])


def test_ids_beyond_the_brick_are_an_error(stim_root, stim_writers):
    root = stim_root["root"]
    write_brick, _ = stim_writers
    write_brick(root / STIMULI_FILE, stim_root["images"][:12])  # subject 1 saw id 17
    with pytest.raises(NsdDataError, match="image id 17 but nsd_stimuli.hdf5 holds only 12"):
        stimuli.prepare_stimuli(root, images="subjects", subjects=[1], workers=1)


def test_bad_inputs_are_clear_errors(tmp_path, stim_writers):
    write_brick, write_expdesign = stim_writers
    with pytest.raises(NsdDataError, match="nsd_expdesign.mat is missing"):
        stimuli.prepare_stimuli(tmp_path)
    write_expdesign(tmp_path / EXPDESIGN_FILE, [1, 2], np.ones((8, 3)))
    with pytest.raises(NsdDataError, match="nsd_stimuli.hdf5 is missing"):
        stimuli.prepare_stimuli(tmp_path)
    write_brick(tmp_path / STIMULI_FILE, np.zeros((3, 4, 5), dtype=np.uint8))
    with pytest.raises(NsdDataError, match=r"should be \(n, height, width, 3\) uint8"):
        stimuli.prepare_stimuli(tmp_path)
    (tmp_path / EXPDESIGN_FILE).write_bytes(b"garbage")
    with pytest.raises(NsdDataError, match="cannot read"):
        stimuli.load_expdesign(tmp_path / EXPDESIGN_FILE)
    write_expdesign(tmp_path / EXPDESIGN_FILE, [0, 2], np.ones((8, 3)))
    with pytest.raises(NsdDataError, match="`sharedix` should hold 1-based integer"):
        stimuli.load_expdesign(tmp_path / EXPDESIGN_FILE)
    with pytest.raises(ValueError, match="images should be one of"):
        stimuli.prepare_stimuli(tmp_path, images="some")


def test_synthetic_nsd_brick_is_extracted_pixel_exact(synthetic_nsd, tmp_path):
    """Real image size (425x425) on the lead's synthetic mini-NSD; the fixture's own PNGs agree."""
    import h5py

    src, info = synthetic_nsd
    root = tmp_path / "nsd"
    root.mkdir()
    for name in (EXPDESIGN_FILE, STIMULI_FILE):
        os.symlink(src / name, root / name)
    stimuli.prepare_stimuli(root, images="test", subjects=[1], workers=2)
    rows = np.array(info["test_ids"]) - 1
    assert set(_pngs(root / STIMULI_PNG_DIR)) == set(rows.tolist())
    with h5py.File(src / STIMULI_FILE) as f:
        _assert_pixels(root / STIMULI_PNG_DIR, {k: f["imgBrick"][k] for k in rows}, rows)
    for k in rows[:3]:
        assert (root / STIMULI_PNG_DIR / f"{k}.png").read_bytes() != b""
        ours, fixture = (np.asarray(Image.open(r / STIMULI_PNG_DIR / f"{k}.png")) for r in (root, src))
        np.testing.assert_array_equal(ours, fixture)
    np.testing.assert_array_equal(np.load(root / TEST_IDS_FILE), info["test_ids"])
