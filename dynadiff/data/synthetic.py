"""A synthetic mini-NSD in the real file formats and layout.

Written where ``prepare_data.py`` would download the real one:

- ``nsddata_timeseries/ppdata/subjAA/func1pt8mm/timeseries/timeseries_sessionBB_runCC.nii.gz``
  (int16 NIfTI, 226 volumes, TR 4/3 s) and ``.../design/design_sessionBB_runCC.tsv``;
- ``nsddata/ppdata/subjAA/func1pt8mm/roi/nsdgeneral.nii.gz`` (-1 outside the brain,
  0 brain, 1 visual cortex);
- ``nsd_expdesign.mat`` (``sharedix``, ``subjectim``, ``masterordering``) and
  ``nsd_stimuli.hdf5`` (``imgBrick``, (N, 425, 425, 3) uint8) at the root;
- ``.dynadiff-synthetic`` (written first: says what wrote the folder) and
  ``synthetic.json`` (written last: the summary) at the root.

It is written only into an empty or new folder, or one it wrote before (its
marker file), whose whole content it then deletes first: never over other
data, and never a mix of two synthetic datasets.

The BOLD signal comes from a known encoding model, so decoders can learn:
each image has features (its 4x4 RGB thumbnail, standardised); each visual
voxel responds linearly to them; responses are placed at trial onsets,
convolved with a haemodynamic response peaking ``hrf_peak_s`` (5 s) after onset, and added to
a per-voxel baseline with linear + slow sinusoidal drift and Gaussian noise.
Everything is deterministic from ``seed``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from dynadiff.data import nsd
from dynadiff.data.preprocess import N_VOLUMES_USED, TR
from dynadiff.files import atomic_path

logger = logging.getLogger(__name__)

N_VOLUMES = N_VOLUMES_USED + 1  # the real runs have 226 volumes
IMAGE_SIZE = 425  # imgBrick rows are 425x425 RGB
# Small, deliberately unequal volume shapes so an axis mix-up fails.
DEFAULT_SHAPES = {1: (14, 17, 11), 2: (13, 16, 12), 5: (15, 14, 11), 7: (12, 18, 10)}
N_FEATURES = 48  # 4x4 RGB thumbnail
MARKER_TEXT = (
    "A synthetic mini-NSD written by dynadiff.data.synthetic.write_synthetic_nsd (prepare_data.py --synthetic), "
    "not real data.\nIts next run into this folder deletes everything here and writes it again.\n"
)


@dataclasses.dataclass
class SyntheticParams:
    subjects: tuple[int, ...] = (1,)
    sessions: tuple[int, ...] = (1, 21)  # session 21 of subjects 1/5 has 14 runs (1 and 14 rest)
    runs_per_session: int | None = None  # None: all task runs (12); fewer only for benchmarks
    n_test: int = 20  # shared test images (sharedix)
    n_unique: int = 100  # images seen by one subject only
    test_repetitions: tuple[int, ...] = (3, 2, 1)  # cycled over test images
    train_repetitions: int = 3
    volume_shapes: dict[int, tuple[int, int, int]] | None = None
    visual_fraction: float = 0.35  # fraction of the brain labelled nsdgeneral > 0
    signal_percent: float = 2.0  # peak response, % of baseline
    noise_percent: float = 0.6  # noise std, % of baseline
    hrf_peak_s: float = 5.0  # seconds from a trial's onset to the peak of its BOLD response
    seed: int = 0


def hrf(tr: float = TR, length_s: float = 24.0, peak_s: float = 5.0) -> np.ndarray:
    """Double-gamma haemodynamic response sampled every ``tr`` s, unit max.

    The canonical shape (gamma(6) minus gamma(16)/6, peak at 5 s) stretched in time by
    ``peak_s / 5``: its peak is at ``peak_s`` (within a TR's sampling) and ``length_s``
    grows with it.
    """
    from scipy.stats import gamma

    if not peak_s > 0:
        raise ValueError(f"the response's peak must be after the onset, got peak_s={peak_s}")
    scale = peak_s / 5.0  # the mode of gamma(6, scale) is 5 * scale
    t = np.arange(0.0, length_s * max(scale, 1.0), tr)
    h = gamma.pdf(t, 6.0, scale=scale) - gamma.pdf(t, 16.0, scale=scale) / 6.0
    return h / h.max()


def make_images(n: int, rng: np.random.Generator, size: int = IMAGE_SIZE, n_latent: int = 8) -> np.ndarray:
    """(n, size, size, 3) uint8 smooth colour images: sigmoid of random mixtures of smooth fields."""
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    base = rng.standard_normal((n_latent, 32, 32, 3))
    base = np.stack([gaussian_filter(b, sigma=(6, 6, 0), mode="wrap") for b in base])
    base /= base.std(axis=(1, 2, 3), keepdims=True)
    z = rng.standard_normal((n, n_latent))
    small = np.tensordot(z, base, axes=1) / np.sqrt(n_latent)  # (n, 32, 32, 3)
    small = (255.0 / (1.0 + np.exp(-2.0 * small))).round().astype(np.uint8)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        out[i] = np.asarray(Image.fromarray(small[i]).resize((size, size), Image.Resampling.BILINEAR))
    return out


def image_features(images: np.ndarray) -> np.ndarray:
    """(n, 48) standardised 4x4 RGB thumbnails: the encoding model's image features."""
    n, h, w, c = images.shape
    hb, wb = h // 4, w // 4
    thumb = images[:, : hb * 4, : wb * 4].reshape(n, 4, hb, 4, wb, c).mean(axis=(2, 4)).reshape(n, -1)
    thumb = thumb - thumb.mean(axis=0)
    return thumb / (thumb.std(axis=0) + 1e-6)


def make_roi(shape: tuple[int, int, int], visual_fraction: float, rng: np.random.Generator) -> np.ndarray:
    """int16 nsdgeneral-like labels: -1 outside an ellipsoidal brain, 1 in a posterior part of it, else 0."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    brain = (grid**2).sum(0) < 0.9
    roi = np.where(brain, 0, -1).astype(np.int16)
    # Visual cortex: the brain voxels with the lowest y + a little noise (posterior).
    score = grid[1] + 0.15 * rng.standard_normal(shape)
    cut = np.quantile(score[brain], visual_fraction)
    roi[brain & (score <= cut)] = 1
    return roi


def _save_nifti(data: np.ndarray, path: Path, tr: float | None = None) -> None:
    import nibabel as nib

    affine = np.diag([1.8, 1.8, 1.8, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    if tr is not None:
        img.header.set_xyzt_units("mm", "sec")
        zooms = img.header.get_zooms()
        img.header.set_zooms(zooms[:3] + (tr,))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".nii.gz") as tmp:  # nibabel picks the format from the name
        nib.save(img, tmp)


def _schedule(trials: list[int], n_runs: int, rng: np.random.Generator) -> list[list[tuple[int, int]]]:
    """Spread trial ids over runs: per run a list of (onset volume, id), onsets evenly spaced."""
    per_run = -(-len(trials) // n_runs)
    last_onset = N_VOLUMES_USED - 9 - 1  # the default window [t+3, t+9) must fit in 225 volumes
    out = []
    for r in range(n_runs):
        chunk = trials[r * per_run : (r + 1) * per_run]
        onsets = np.linspace(2, last_onset, per_run).round().astype(int) if per_run > 1 else np.array([2])
        out.append([(int(onsets[i]), nsd_id) for i, nsd_id in enumerate(chunk)])
    return out


def check_target(root) -> bool:
    """Raise :class:`~dynadiff.data.nsd.NsdDataError` unless a synthetic mini-NSD may be written into ``root``.

    Allowed: a folder that does not exist yet (and can be created), an empty one, or one a previous call
    wrote (its marker file). True in that last case: writing deletes its old content first.
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise nsd.NsdDataError(f"{root} is a file, not a folder: write the synthetic mini-NSD into an empty or new "
                               "folder")
    marked = nsd.is_synthetic(root)
    if root.is_dir():
        try:
            names = sorted(p.name for p in root.iterdir())
        except OSError as e:
            raise nsd.NsdDataError(f"cannot list {root}: {e.strerror}; choose a folder you can write to") from e
        if names and not marked:
            such = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise nsd.NsdDataError(
                f"{root} holds {len(names)} {'entry' if len(names) == 1 else 'entries'} such as {such}, not "
                f"written by --synthetic (no {nsd.SYNTHETIC_MARKER} file): refusing to write the synthetic "
                "mini-NSD over them; choose an empty or new folder"
            )
    nsd.check_writable_folder(root)
    return marked


def _clear(root: Path) -> int:
    """Delete the content of a folder written by :func:`write_synthetic_nsd`, its marker last; the count."""
    entries = sorted(root.iterdir(), key=lambda p: p.name == nsd.SYNTHETIC_MARKER)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    return len(entries)


def write_synthetic_nsd(root, subjects=(1,), seed: int = 0, **kwargs) -> dict:
    """Write a synthetic mini-NSD under ``root`` (see the module docstring); return a summary.

    Keyword arguments override :class:`SyntheticParams` fields. The summary
    (also saved as ``root/synthetic.json``) lists the subjects, their sessions,
    voxel counts, the test ids and the data-config overrides to use.

    ``root`` must be new, empty or written by an earlier call (see :func:`check_target`); in that last
    case everything in it is deleted first, so nothing of the previous data (other subjects, seed, prepared
    PNGs) is left. The marker file is written first and the summary last: an interrupted write leaves a
    folder the next call rewrites. Raises :class:`~dynadiff.data.nsd.NsdDataError` for a refused ``root`` or
    a failed write (one line: the path and the reason).
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    p = SyntheticParams(subjects=tuple(int(s) for s in subjects), seed=seed, **kwargs)
    for s in p.subjects:
        nsd.check_subject(s)
    root = Path(root)
    rewrite = check_target(root)
    try:
        if rewrite:
            n = _clear(root)
            logger.info("%s: deleted the previous synthetic mini-NSD (%d entries)", root, n)
        root.mkdir(parents=True, exist_ok=True)
        (root / nsd.SYNTHETIC_MARKER).write_text(MARKER_TEXT)
        return _write(root, p)
    except OSError as e:
        raise nsd.NsdDataError(f"cannot write the synthetic mini-NSD into {root}: {e}") from e


def _write(root: Path, p: SyntheticParams) -> dict:
    rng = np.random.default_rng(p.seed)
    shapes = {**DEFAULT_SHAPES, **(p.volume_shapes or {})}

    n_images = p.n_test + p.n_unique * len(p.subjects)
    images = make_images(n_images, rng)
    feats = image_features(images)
    ids = rng.permutation(n_images) + 1  # 1-based NSD ids, scattered over the brick
    test_ids = np.sort(ids[: p.n_test])
    subjectim = np.zeros((8, p.n_test + p.n_unique), dtype=np.int64)
    for s in range(8):
        k = p.subjects.index(s + 1) if (s + 1) in p.subjects else 0
        subjectim[s] = np.concatenate([test_ids, ids[p.n_test + k * p.n_unique : p.n_test + (k + 1) * p.n_unique]])
    n_trials_shared = sum(p.test_repetitions[i % len(p.test_repetitions)] for i in range(p.n_test))
    n_trials_shared += p.train_repetitions * p.n_unique
    # masterordering: 1-based columns of subjectim, one per trial (shared by all subjects, as in NSD).
    columns = [i + 1 for i in range(p.n_test) for _ in range(p.test_repetitions[i % len(p.test_repetitions)])]
    columns += [p.n_test + i + 1 for i in range(p.n_unique) for _ in range(p.train_repetitions)]
    masterordering = rng.permutation(np.array(columns))
    assert len(masterordering) == n_trials_shared

    _write_expdesign(root / nsd.EXPDESIGN_FILE, test_ids, subjectim, masterordering)
    _write_brick(root / nsd.STIMULI_FILE, images)

    h = hrf(peak_s=p.hrf_peak_s)
    summary = {"subjects": list(p.subjects), "sessions": {}, "n_voxels": {}, "n_images": n_images,
               "test_ids": test_ids.tolist(), "seed": p.seed, "hrf_peak_s": p.hrf_peak_s}
    for subject in p.subjects:
        shape = shapes[subject]
        roi = make_roi(shape, p.visual_fraction, rng)
        _save_nifti(roi, nsd.roi_path(root, subject))
        mask = roi > 0
        brain = roi >= 0
        n_vis = int(mask.sum())
        weights = rng.standard_normal((n_vis, N_FEATURES)) / np.sqrt(N_FEATURES)
        weights *= rng.uniform(0.3, 1.0, size=(n_vis, 1))  # voxel gains
        responses = feats @ weights.T  # (n_images, n_vis)
        responses /= responses.std()
        baseline = rng.uniform(600, 1400, size=shape) * brain
        runs = nsd.list_runs(subject, p.sessions)
        if p.runs_per_session is not None:
            runs = [r for r in runs if nsd.runs_of_session(subject, r.session).index(r.run) < p.runs_per_session]
        trials = subjectim[subject - 1][masterordering - 1].tolist()
        schedule = _schedule(trials, len(runs), rng)
        for run, events in zip(runs, schedule):
            design = np.zeros(N_VOLUMES_USED, dtype=np.int64)
            neural = np.zeros((N_VOLUMES, n_vis))
            for onset, nsd_id in events:
                design[onset] = nsd_id
                neural[onset] += responses[nsd_id - 1]
            bold = np.apply_along_axis(lambda x: np.convolve(x, h)[:N_VOLUMES], 0, neural)  # (T, n_vis)
            data = _run_volume(shape, brain, mask, baseline, bold, p, rng)
            _save_nifti(data, run.timeseries_path(root), tr=TR)
            run.design_path(root).parent.mkdir(parents=True, exist_ok=True)
            run.design_path(root).write_text("".join(f"{v}\n" for v in design))
        for session in p.sessions:  # the rest runs of 14-run sessions exist in NSD too (no trials)
            for rest in sorted(set(range(1, 15)) - set(nsd.runs_of_session(subject, session))) if session in nsd.REST_SESSIONS[subject] else []:
                rrun = nsd.Run(subject, session, rest)
                data = _run_volume(shape, brain, mask, baseline, np.zeros((N_VOLUMES, n_vis)), p, rng)
                _save_nifti(data, rrun.timeseries_path(root), tr=TR)
                rrun.design_path(root).write_text("0\n" * N_VOLUMES_USED)
        summary["sessions"][subject] = list(p.sessions)
        summary["n_voxels"][subject] = n_vis
        logger.info("synthetic subject %d: %d runs, %d visual voxels", subject, len(runs), n_vis)
    summary["overrides"] = [f"data.nsd_dataset_config.nsddata_path={root}",
                            f"data.nsd_dataset_config.sessions=[{','.join(map(str, p.sessions))}]"]
    (root / nsd.SYNTHETIC_SUMMARY).write_text(json.dumps(summary, indent=1))
    return summary


def _run_volume(shape, brain, mask, baseline, bold, p: SyntheticParams, rng) -> np.ndarray:
    """(X, Y, Z, 226) int16: baseline + drift + noise in the brain, + signal in visual voxels."""
    t = np.arange(N_VOLUMES, dtype=np.float32) / N_VOLUMES
    n_brain = int(brain.sum())
    base = baseline[brain].astype(np.float32)[:, None]
    slope = rng.uniform(-1.0, 1.0, size=(n_brain, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(n_brain, 1)).astype(np.float32)
    drift = 0.01 * base * (slope * (t - 0.5) + 0.5 * np.sin(2 * np.pi * 1.5 * t + phase))
    vals = base + drift + (p.noise_percent / 100) * base * rng.standard_normal((n_brain, N_VOLUMES), dtype=np.float32)
    vis_in_brain = mask[brain]
    vals[vis_in_brain] += (p.signal_percent / 100) * base[vis_in_brain] * bold.T.astype(np.float32)
    # One dead (constant) visual voxel: preprocessing must give zeros, not NaN.
    first_vis = np.flatnonzero(vis_in_brain)[0]
    vals[first_vis] = base[first_vis]
    out = np.zeros(shape + (N_VOLUMES,), dtype=np.int16)
    out[brain] = np.clip(np.round(vals), -32768, 32767).astype(np.int16)
    return out


def _write_expdesign(path: Path, sharedix, subjectim, masterordering) -> None:
    from scipy.io import savemat

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        savemat(f, {"sharedix": np.asarray(sharedix, dtype=np.float64)[None],
                    "subjectim": np.asarray(subjectim, dtype=np.float64),
                    "masterordering": np.asarray(masterordering, dtype=np.float64)[None]})


def _write_brick(path: Path, images: np.ndarray) -> None:
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("imgBrick", data=images, chunks=(1,) + images.shape[1:], compression="gzip", compression_opts=1)
