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
Everything is deterministic from ``seed``: all of it is drawn by :func:`make_scene`, which
:mod:`dynadiff.data.synthetic_bids` writes too (as a BIDS dataset, at any TR).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import typing as tp
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


def _double_gamma(t: np.ndarray, scale: float) -> np.ndarray:
    """The canonical double gamma (gamma(6) minus gamma(16)/6) stretched in time by ``scale``; 0 for t < 0."""
    from scipy.stats import gamma

    return gamma.pdf(t, 6.0, scale=scale) - gamma.pdf(t, 16.0, scale=scale) / 6.0


def _check_peak(peak_s: float) -> float:
    if not peak_s > 0:
        raise ValueError(f"the response's peak must be after the onset, got peak_s={peak_s}")
    return peak_s / 5.0  # the mode of gamma(6, scale) is 5 * scale


def hrf(tr: float = TR, length_s: float = 24.0, peak_s: float = 5.0) -> np.ndarray:
    """Double-gamma haemodynamic response sampled every ``tr`` s, unit max.

    The canonical shape (gamma(6) minus gamma(16)/6, peak at 5 s) stretched in time by
    ``peak_s / 5``: its peak is at ``peak_s`` (within a TR's sampling) and ``length_s``
    grows with it.
    """
    scale = _check_peak(peak_s)
    t = np.arange(0.0, length_s * max(scale, 1.0), tr)
    h = _double_gamma(t, scale)
    return h / h.max()


def hrf_at(t, peak_s: float = 5.0) -> np.ndarray:
    """The response of :func:`hrf` at any times ``t`` (seconds after the onset; 0 before it), unit max.

    The same double gamma, scaled by its value at its own peak (``peak_s``, to a few ms) rather than by the
    largest of TR-spaced samples, and not cut at a length: a time course sampled at any TR from it has
    the same response in seconds.
    """
    from scipy.optimize import minimize_scalar

    scale = _check_peak(peak_s)
    peak = minimize_scalar(lambda x: -_double_gamma(x, scale), bounds=(0.5 * peak_s, 1.5 * peak_s),
                           method="bounded", options={"xatol": 1e-9 * peak_s}).x
    return _double_gamma(np.asarray(t, dtype=np.float64), scale) / _double_gamma(peak, scale)


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


def save_nifti(data: np.ndarray, path: Path, tr: float | None = None) -> None:
    """``data`` as a NIfTI of its dtype, 1.8 mm voxels (NSD's func1pt8mm), ``tr`` seconds per volume if given."""
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
    scene = make_scene(p)
    _write_expdesign(root / nsd.EXPDESIGN_FILE, scene.test_ids, scene.subjectim, scene.masterordering)
    _write_brick(root / nsd.STIMULI_FILE, scene.images)
    summary = {"subjects": list(p.subjects), "sessions": {}, "n_voxels": {}, "n_images": len(scene.images),
               "test_ids": scene.test_ids.tolist(), "seed": p.seed, "hrf_peak_s": p.hrf_peak_s}
    for subject in scene.subjects:
        save_nifti(subject.roi, nsd.roi_path(root, subject.subject))
        for r in subject.runs:
            save_nifti(r.data, r.run.timeseries_path(root), tr=TR)
            design = np.zeros(N_VOLUMES_USED, dtype=np.int64)  # rest runs: no trials, all zeros
            for onset, nsd_id in r.events:
                design[onset] = nsd_id
            r.run.design_path(root).parent.mkdir(parents=True, exist_ok=True)
            r.run.design_path(root).write_text("".join(f"{v}\n" for v in design))
        summary["sessions"][subject.subject] = list(p.sessions)
        summary["n_voxels"][subject.subject] = subject.n_visual
        logger.info("synthetic subject %d: %d runs, %d visual voxels", subject.subject, subject.n_task_runs,
                    subject.n_visual)
    summary["overrides"] = [f"data.nsd_dataset_config.nsddata_path={root}",
                            f"data.nsd_dataset_config.sessions=[{','.join(map(str, p.sessions))}]"]
    (root / nsd.SYNTHETIC_SUMMARY).write_text(json.dumps(summary, indent=1))
    return summary


@dataclasses.dataclass
class RunScene:
    """One run of a synthetic subject: its trials and its NSD-layout time series."""

    run: nsd.Run
    events: list[tuple[int, int]]  # (onset volume, 1-based NSD id), on the 4/3 s grid; [] for a rest run
    rest: bool  # a resting-state run (runs 1 and 14 of a 14-run session)
    data: np.ndarray  # (X, Y, Z, 226) int16, TR 4/3 s
    slope: np.ndarray  # (n_brain, 1) float32: each brain voxel's linear drift over the run
    phase: np.ndarray  # (n_brain, 1) float32: the phase of its slow sinusoidal drift


@dataclasses.dataclass
class SubjectScene:
    """One synthetic subject: its brain, its encoding model, and its runs (drawn as they are iterated)."""

    subject: int
    roi: np.ndarray  # (X, Y, Z) int16 nsdgeneral labels: -1 outside the brain, 0 brain, 1 visual cortex
    baseline: np.ndarray  # (X, Y, Z) float64 signal level, 0 outside the brain
    responses: np.ndarray  # (n_images, n_visual) each visual voxel's response to each image (row: NSD id - 1)
    n_task_runs: int
    runs: tp.Iterator[RunScene]  # the task runs in list_runs order, then the rest runs, session by session

    @property
    def n_visual(self) -> int:
        return self.responses.shape[1]


@dataclasses.dataclass
class Scene:
    """Everything random in a synthetic mini-NSD, drawn from one generator seeded with ``params.seed``.

    Both layouts write it (:func:`write_synthetic_nsd`, :func:`dynadiff.data.synthetic_bids.write_synthetic_bids`),
    so one seed gives the same data in both. The images and the design are drawn first; the subjects, then each
    subject's runs, are drawn from the same stream as they are iterated: asking for the next subject first draws
    whatever runs of the previous one were not iterated, so every subject is the same however it is consumed.
    """

    params: SyntheticParams
    images: np.ndarray  # (n_images, 425, 425, 3) uint8 (row: NSD id - 1)
    test_ids: np.ndarray  # sorted 1-based NSD ids of the shared test images (sharedix)
    subjectim: np.ndarray  # (8, n_test + n_unique) 1-based NSD ids of each NSD subject's images
    masterordering: np.ndarray  # (n_trials,) 1-based columns of subjectim, one per trial, for every subject
    subjects: tp.Iterator[SubjectScene]


def make_scene(p: SyntheticParams) -> Scene:
    """The :class:`Scene` of ``p`` (its subjects drawn lazily; see the class)."""
    rng = np.random.default_rng(p.seed)
    n_images = p.n_test + p.n_unique * len(p.subjects)
    images = make_images(n_images, rng)
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
    subjects = _subjects(p, rng, image_features(images), subjectim, masterordering)
    return Scene(p, images, test_ids, subjectim, masterordering, subjects)


def _subjects(p: SyntheticParams, rng, feats, subjectim, masterordering) -> tp.Iterator[SubjectScene]:
    shapes = {**DEFAULT_SHAPES, **(p.volume_shapes or {})}
    h = hrf(peak_s=p.hrf_peak_s)
    for subject in p.subjects:
        shape = shapes[subject]
        roi = make_roi(shape, p.visual_fraction, rng)
        n_vis = int((roi > 0).sum())
        weights = rng.standard_normal((n_vis, N_FEATURES)) / np.sqrt(N_FEATURES)
        weights *= rng.uniform(0.3, 1.0, size=(n_vis, 1))  # voxel gains
        responses = feats @ weights.T  # (n_images, n_vis)
        responses /= responses.std()
        baseline = rng.uniform(600, 1400, size=shape) * (roi >= 0)
        runs = nsd.list_runs(subject, p.sessions)
        if p.runs_per_session is not None:
            runs = [r for r in runs if nsd.runs_of_session(subject, r.session).index(r.run) < p.runs_per_session]
        trials = subjectim[subject - 1][masterordering - 1].tolist()
        schedule = _schedule(trials, len(runs), rng)
        scene = SubjectScene(subject, roi, baseline, responses, len(runs),
                             _runs(p, rng, subject, roi, baseline, responses, h, runs, schedule))
        yield scene
        for _ in scene.runs:  # the runs not iterated: the next subject is drawn after them
            pass


def _runs(p: SyntheticParams, rng, subject: int, roi, baseline, responses, h, runs, schedule) -> tp.Iterator[RunScene]:
    n_vis = responses.shape[1]
    for run, events in zip(runs, schedule):
        neural = np.zeros((N_VOLUMES, n_vis))
        for onset, nsd_id in events:
            neural[onset] += responses[nsd_id - 1]
        bold = np.apply_along_axis(lambda x: np.convolve(x, h)[:N_VOLUMES], 0, neural)  # (T, n_vis)
        yield _draw_run(run, events, False, roi, baseline, bold, p, rng)
    for session in p.sessions:  # the rest runs of 14-run sessions exist in NSD too (no trials)
        for rest in sorted(set(range(1, 15)) - set(nsd.runs_of_session(subject, session))) if session in nsd.REST_SESSIONS[subject] else []:
            yield _draw_run(nsd.Run(subject, session, rest), [], True, roi, baseline, np.zeros((N_VOLUMES, n_vis)), p, rng)


def _draw_run(run: nsd.Run, events, rest: bool, roi, baseline, bold, p: SyntheticParams, rng) -> RunScene:
    n_brain = int((roi >= 0).sum())
    slope = rng.uniform(-1.0, 1.0, size=(n_brain, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(n_brain, 1)).astype(np.float32)
    noise = rng.standard_normal((n_brain, N_VOLUMES), dtype=np.float32)
    data = render_run(roi, baseline, bold, slope, phase, noise, p)
    return RunScene(run, events, rest, data, slope, phase)


def render_run(roi, baseline, bold, slope, phase, noise, p: SyntheticParams) -> np.ndarray:
    """(X, Y, Z, T) int16 time series: baseline + drift + noise in the brain, + signal in visual voxels.

    ``bold``: (T, n_visual) responses in units of the peak response; ``slope``, ``phase``: (n_brain, 1)
    each brain voxel's drift; ``noise``: (n_brain, T) standard normal. The drift is a function of the
    fraction of the run elapsed, so it spans the run whatever T.
    """
    brain, mask = roi >= 0, roi > 0
    n_volumes = noise.shape[1]
    t = np.arange(n_volumes, dtype=np.float32) / n_volumes
    base = baseline[brain].astype(np.float32)[:, None]
    drift = 0.01 * base * (slope * (t - 0.5) + 0.5 * np.sin(2 * np.pi * 1.5 * t + phase))
    vals = base + drift + (p.noise_percent / 100) * base * noise
    vis_in_brain = mask[brain]
    vals[vis_in_brain] += (p.signal_percent / 100) * base[vis_in_brain] * bold.T.astype(np.float32)
    # One dead (constant) visual voxel: preprocessing must give zeros, not NaN.
    first_vis = np.flatnonzero(vis_in_brain)[0]
    vals[first_vis] = base[first_vis]
    out = np.zeros(roi.shape + (n_volumes,), dtype=np.int16)
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
