"""The synthetic mini-NSD as BIDS: the NSD layout's scene, at any TR, valid for the official validator."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy.io import loadmat

from dynadiff.data import nsd
from dynadiff.data.synthetic import write_synthetic_nsd
from dynadiff.data.synthetic_bids import write_synthetic_bids

# Session 21 (14 runs, 1 and 14 rest), one task run: both kinds of run, few files.
SMALL = {"sessions": (21,), "runs_per_session": 1, "n_unique": 10, "n_test": 4}
# Two trials per run, at volumes 2 and 215 (the first response alone); no noise, a large response.
CLEAN = {"sessions": (1, 21), "runs_per_session": 1, "n_unique": 2, "n_test": 2, "test_repetitions": (1,),
         "train_repetitions": 1, "noise_percent": 0.0, "signal_percent": 40.0, "hrf_peak_s": 7.0}


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def _func(root: Path, subject: int, session: int) -> Path:
    return root / f"sub-{subject:02d}" / f"ses-{session:02d}" / "func"


def _events(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    return [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]


def _design_events(root: Path, run: nsd.Run) -> list[tuple[int, int]]:
    design = np.loadtxt(run.design_path(root), dtype=np.int64)
    return [(int(v), int(design[v])) for v in np.flatnonzero(design)]


@pytest.fixture(scope="module")
def at_tr_2(tmp_path_factory):
    """(NSD layout, BIDS at TR 2 s) of CLEAN, subject 1."""
    base = tmp_path_factory.mktemp("tr2")
    write_synthetic_nsd(base / "nsd", subjects=(1,), seed=3, **CLEAN)
    summary = write_synthetic_bids(base / "bids", subjects=(1,), seed=3, tr=2.0, **CLEAN)
    return base / "nsd", base / "bids", summary


def test_at_tr_4_3_the_runs_are_the_nsd_layouts(tmp_path):
    """TR 4/3: every run (task and rest, the second subject too: one random stream) is the NSD layout's time series,
    first 225 volumes; events, images, test images and masks are the NSD layout's."""
    write_synthetic_nsd(tmp_path / "nsd", subjects=(1, 2), seed=0, **SMALL)
    summary = write_synthetic_bids(tmp_path / "bids", subjects=(1, 2), seed=0, tr=4 / 3, **SMALL)
    nsd_root, bids = tmp_path / "nsd", tmp_path / "bids"
    deriv = bids / "derivatives" / "fmriprep"
    for subject in (1, 2):
        roi = _array(nsd.roi_path(nsd_root, subject))
        mask = _array(deriv / f"sub-{subject:02d}" / "anat" / f"sub-{subject:02d}_space-T1w_desc-nsdgeneral_mask.nii.gz")
        assert mask.dtype == np.uint8 and np.array_equal(mask, (roi > 0).astype(np.uint8))
        # runs_per_session=1: run 2 of session 21, whose runs 1 and 14 are rest.
        for session, run, task in [(21, 2, "nsd"), (21, 1, "rest"), (21, 14, "rest")]:
            stem = f"sub-{subject:02d}_ses-{session:02d}_task-{task}_run-{run:02d}"
            img = nib.load(_func(bids, subject, session) / f"{stem}_bold.nii.gz")
            data = np.asarray(img.dataobj)
            expected = _array(nsd.Run(subject, session, run).timeseries_path(nsd_root))[..., :225]
            assert data.dtype == np.int16 and np.array_equal(data, expected), stem
            assert img.header.get_zooms()[3] == np.float32(4 / 3)
            assert img.header.get_xyzt_units() == ("mm", "sec")
            if task == "rest":
                assert not (_func(bids, subject, session) / f"{stem}_events.tsv").exists()
                continue
            events = _events(_func(bids, subject, session) / f"{stem}_events.tsv")
            design = _design_events(nsd_root, nsd.Run(subject, session, run))
            assert [(float(e["onset"]), e["stim_file"]) for e in events] == [(v * 4 / 3, f"nsd-{i:05d}.png")
                                                                              for v, i in design]
            assert {(e["duration"], e["trial_type"]) for e in events} == {("3.0", "image")}
            preproc = _array(_func(deriv, subject, session) / f"{stem}_space-T1w_desc-preproc_bold.nii.gz")
            assert preproc.dtype == np.float32 and np.array_equal(preproc, expected)
            brain = _array(_func(deriv, subject, session) / f"{stem}_space-T1w_desc-brain_mask.nii.gz")
            assert brain.dtype == np.uint8 and np.array_equal(brain, (roi >= 0).astype(np.uint8))
    with h5py.File(nsd_root / nsd.STIMULI_FILE) as f:
        brick = f["imgBrick"][:]
    assert sorted(p.name for p in (bids / "stimuli").iterdir()) == [f"nsd-{i:05d}.png" for i in range(1, 25)]
    for row in (0, 23):
        assert np.array_equal(np.asarray(Image.open(bids / "stimuli" / f"nsd-{row + 1:05d}.png")), brick[row])
    sharedix = loadmat(nsd_root / nsd.EXPDESIGN_FILE)["sharedix"].ravel().astype(int)
    test_images = [f"nsd-{i:05d}.png" for i in sharedix]
    assert (bids / "code" / "test_images.txt").read_text().split() == test_images == summary["test_images"]
    assert json.loads((bids / "code" / "synthetic.json").read_text())["overrides"] == [
        f"data.nsd_dataset_config.bids.root={bids}",
        f"data.nsd_dataset_config.bids.derivatives={deriv}",
        f"data.nsd_dataset_config.bids.mask={deriv}/sub-{{subject}}/anat/sub-{{subject}}_space-T1w_desc-nsdgeneral_mask.nii.gz",
        f"data.nsd_dataset_config.bids.test_images={bids}/code/test_images.txt",
        "data.nsd_dataset_config.sessions=[21]",
    ]
    assert (bids / nsd.SYNTHETIC_MARKER).is_file()


def test_at_tr_2_the_events_keep_their_seconds(at_tr_2):
    """TR 2 s: a run lasts 300 s (150 volumes, TR 2 in the header and the sidecar); events at NSD's onset volumes x 4/3 s."""
    nsd_root, bids, summary = at_tr_2
    assert summary["tr"] == 2.0
    assert json.loads((bids / "task-nsd_bold.json").read_text()) == {"TaskName": "nsd", "RepetitionTime": 2.0}
    for session, run in [(1, 1), (21, 2)]:
        stem = f"sub-01_ses-{session:02d}_task-nsd_run-{run:02d}"
        img = nib.load(_func(bids, 1, session) / f"{stem}_bold.nii.gz")
        assert img.shape[3] == 150 and img.header.get_zooms()[3] == 2.0 and img.get_data_dtype() == np.int16
        events = _events(_func(bids, 1, session) / f"{stem}_events.tsv")
        design = _design_events(nsd_root, nsd.Run(1, session, run))
        assert [v for v, _ in design] == [2, 215]  # CLEAN: two trials per run, the first and the last onset
        assert [float(e["onset"]) for e in events] == [2 * 4 / 3, 215 * 4 / 3]
        assert [e["stim_file"] for e in events] == [f"nsd-{i:05d}.png" for _, i in design]
    assert nib.load(_func(bids, 1, 21) / "sub-01_ses-21_task-rest_run-14_bold.nii.gz").shape[3] == 150


def _double_gamma(t: np.ndarray, peak_s: float) -> np.ndarray:
    """gamma(6) - gamma(16) / 6 densities stretched by peak_s / 5 (the canonical response), 0 before the onset."""
    s = peak_s / 5
    t = np.asarray(t, dtype=np.float64)
    tp = np.where(t > 0, t, 0.0)
    g6 = tp**5 * np.exp(-tp / s) / (math.gamma(6) * s**6)
    g16 = tp**15 * np.exp(-tp / s) / (math.gamma(16) * s**16)
    return np.where(t > 0, g6 - g16 / 6, 0.0)


def test_at_tr_2_the_response_peaks_hrf_peak_s_after_the_onset(at_tr_2):
    """Noise-free, a visual voxel is its drift plus the double gamma at k x 2 s - onset: it peaks near 7 s (hrf_peak_s)."""
    nsd_root, bids, _ = at_tr_2
    visual = _array(nsd.roi_path(nsd_root, 1)) > 0
    data = _array(_func(bids, 1, 1) / "sub-01_ses-01_task-nsd_run-01_bold.nii.gz")[visual].astype(float)  # (V, 150)
    onsets = np.array([2 * 4 / 3, 215 * 4 / 3])
    times = np.arange(150) * 2.0
    voxel = data[np.argmax(np.ptp(data[:, :40], axis=1))]  # the voxel responding most to the first image
    after = (times > onsets[0]) & (times < onsets[0] + 20)
    peak = times[after][np.argmax(np.abs(voxel[after] - voxel[1]))] - onsets[0]
    assert abs(peak - 7.0) <= 1.0  # the sample nearest 7 s after the onset (2 s apart)

    def worst_residual(peak_s: float) -> float:
        """Largest residual of a least-squares fit: baseline, drift (linear, sinusoid of 1.5 cycles per run), responses."""
        frac = np.arange(150) / 150
        design = np.column_stack([np.ones(150), frac - 0.5, np.sin(3 * np.pi * frac), np.cos(3 * np.pi * frac)]
                                 + [_double_gamma(times - o, peak_s) for o in onsets])
        coef, *_ = np.linalg.lstsq(design, voxel, rcond=None)
        return float(np.abs(voxel - design @ coef).max())

    assert worst_residual(7.0) < 1.0  # the int16 rounding
    assert worst_residual(6.5) > 10.0 and worst_residual(7.5) > 10.0  # half a second off: hundreds


def _validator() -> str:
    found = shutil.which("bids-validator-deno") or str(Path(sys.executable).parent / "bids-validator-deno")
    if not Path(found).is_file():
        pytest.fail("bids-validator-deno is not installed: it is a pinned test tool (./setup.sh installs "
                    "requirements-dev.txt)")
    return found


def test_the_bids_validator_finds_no_error(at_tr_2):
    """The official validator, on the raw dataset and (-r) on derivatives/fmriprep: no error (warnings allowed)."""
    _, bids, _ = at_tr_2
    out = subprocess.run([_validator(), str(bids), "-r", "--format", "json"], capture_output=True, text=True,
                         timeout=60, check=False)  # exit status 16 when there are errors: read from the report
    report = json.loads(out.stdout)
    assert list(report["derivativesSummary"]) == ["/derivatives/fmriprep/"]
    for name, result in [("raw", report), *report["derivativesSummary"].items()]:
        errors = [(i["code"], i.get("subCode"), i.get("location")) for i in result["issues"]["issues"]
                  if i["severity"] == "error"]
        assert errors == [], name


def test_refuses_other_data_and_bad_trs(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(nsd.NsdDataError, match=r"holds 1 entry such as notes.txt, not written by --synthetic"):
        write_synthetic_bids(tmp_path)
    for tr in (0.0, 0.05, 301.0, float("nan")):
        with pytest.raises(ValueError, match=r"^tr must be between 0.1 and 300 seconds"):
            write_synthetic_bids(tmp_path / "new", tr=tr)
    assert not (tmp_path / "new").exists()
