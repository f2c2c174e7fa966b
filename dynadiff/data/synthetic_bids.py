"""The synthetic mini-NSD of :mod:`dynadiff.data.synthetic` as a BIDS dataset, at any TR.

The same scene as :func:`~dynadiff.data.synthetic.write_synthetic_nsd` with the same seed (one generator,
:func:`~dynadiff.data.synthetic.make_scene`), written as a raw BIDS 1.9 dataset with fMRIPrep-style
derivatives. NSD subject S is ``sub-0S``, session N ``ses-NN``, and NSD's run numbers are kept (1..12, or
2..13 in 14-run sessions, whose runs 1 and 14 are ``task-rest``):

- ``dataset_description.json``, ``README``, ``participants.tsv`` / ``.json``, ``task-nsd_bold.json`` and
  ``task-rest_bold.json`` (``RepetitionTime``, ``TaskName``: inherited by every run);
- ``sub-XX/ses-YY/func/sub-XX_ses-YY_task-nsd_run-ZZ_bold.nii.gz`` (int16, 1.8 mm, the TR in the header)
  and ``..._events.tsv`` (``onset`` in seconds, ``duration`` 3 s, ``trial_type`` ``image``, ``stim_file``);
  ``..._task-rest_run-ZZ_bold.nii.gz`` for the rest runs;
- ``stimuli/nsd-00042.png``: every image (NSD id 42: row 41 of the NSD layout's ``imgBrick``), 425x425 RGB;
- ``code/test_images.txt`` (the shared test images' ``stim_file`` names) and ``code/synthetic.json`` (the
  summary, with the data-config overrides that read this dataset);
- ``derivatives/fmriprep/``: per ``task-nsd`` run ``..._space-T1w_desc-preproc_bold.nii.gz`` (float32, the
  raw run's values) with its sidecar and ``..._space-T1w_desc-brain_mask.nii.gz``, and per subject
  ``sub-XX/anat/sub-XX_space-T1w_desc-nsdgeneral_mask.nii.gz`` (1 in the visual cortex, else 0). All in
  the raw runs' voxel grid: ``SpatialReference`` ``orig`` (the validator requires one for ``space-T1w``), in
  the bold sidecars and in ``space-T1w_mask.json``, inherited by every mask;
- ``.dynadiff-synthetic``: the marker, written first, as for the NSD layout (same refusal rules).

Each run lasts what NSD's loader reads of a run, 225 volumes of 4/3 s (300 s). At TR 4/3 a run's data is
exactly the first 225 volumes of the NSD layout's time series. At another TR a run has floor(300 / TR)
volumes; its trials are at the same seconds (their NSD onset volume x 4/3), and the response at volume k is
the sum over trials of the voxel's response to the image times the haemodynamic response
(:func:`~dynadiff.data.synthetic.hrf_at`) k x TR - onset seconds after the trial: the response in seconds
does not depend on the TR. Baseline and drift are the NSD run's (the drift as a function of the fraction of
the run elapsed), the noise is drawn afresh, from a generator seeded with (seed, subject, session, run).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from dynadiff.data import nsd, synthetic
from dynadiff.data.preprocess import N_VOLUMES_USED, TR
from dynadiff.data.synthetic import RunScene, SubjectScene, SyntheticParams, save_nifti
from dynadiff.files import atomic_path, write_text

logger = logging.getLogger(__name__)

BIDS_VERSION = "1.9.0"
RUN_SECONDS = N_VOLUMES_USED * TR  # 300 s: the part of an NSD run its loader reads
MIN_TR = 0.1  # seconds; shorter than any fMRI TR, and a run would hold thousands of volumes
TRIAL_SECONDS = 3.0  # NSD shows each image for 3 s
DERIVATIVES = "derivatives/fmriprep"
MARKER_TEXT = (
    "A synthetic mini-NSD in BIDS written by dynadiff.data.synthetic_bids.write_synthetic_bids "
    "(prepare_data.py --synthetic --format bids), not real data.\n"
    "Its next run into this folder deletes everything here and writes it again.\n"
)


def subject_label(subject: int) -> str:
    """The BIDS label of NSD subject ``subject``: two digits (``01``, ``07``)."""
    return f"{subject:02d}"


def stim_file(nsd_id: int) -> str:
    """The image file of a 1-based NSD id, relative to ``stimuli/``: ``nsd-00042.png``."""
    return f"nsd-{int(nsd_id):05d}.png"


def n_volumes(tr: float) -> int:
    """Volumes per run at ``tr``: the most that fit in a run's 300 s (225 at TR 4/3)."""
    return math.floor(RUN_SECONDS / tr + 1e-9)


def onset_seconds(volume: int) -> float:
    """Seconds from a run's start to its NSD onset volume: the float nearest ``volume * 4/3`` (its ``repr`` is
    written, so that ``round(onset / (4/3))`` gives the volume back)."""
    return volume * 4 / 3


def write_synthetic_bids(root, subjects=(1,), seed: int = 0, tr: float = TR, **kwargs) -> dict:
    """Write the synthetic mini-NSD as a BIDS dataset under ``root`` (see the module docstring); return a summary.

    Keyword arguments override :class:`~dynadiff.data.synthetic.SyntheticParams` fields; with the same ones,
    the scene is that of :func:`~dynadiff.data.synthetic.write_synthetic_nsd`. The summary (also saved as
    ``root/code/synthetic.json``) lists the subjects, their sessions, voxel counts, the test images, the TR
    and the data-config overrides that read the dataset.

    ``root`` must be new, empty or written by an earlier synthetic write (see
    :func:`~dynadiff.data.synthetic.check_target`), whose content is then deleted first. Raises ``ValueError``
    for a bad argument and :class:`~dynadiff.data.nsd.NsdDataError` for a refused ``root`` or a failed write
    (one line: the path and the reason).
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    tr = float(tr)
    if not MIN_TR <= tr <= RUN_SECONDS:
        raise ValueError(f"tr must be between {MIN_TR} and {RUN_SECONDS:g} seconds (a run lasts {RUN_SECONDS:g} s), "
                         f"got {tr}")
    p = SyntheticParams(subjects=tuple(int(s) for s in subjects), seed=seed, **kwargs)
    for s in p.subjects:
        nsd.check_subject(s)
    root = Path(root)
    rewrite = synthetic.check_target(root)
    try:
        if rewrite:
            n = synthetic._clear(root)
            logger.info("%s: deleted the previous synthetic dataset (%d entries)", root, n)
        root.mkdir(parents=True, exist_ok=True)
        (root / nsd.SYNTHETIC_MARKER).write_text(MARKER_TEXT)
        return _write(root.absolute(), p, tr)
    except OSError as e:
        raise nsd.NsdDataError(f"cannot write the synthetic BIDS dataset into {root}: {e}") from e


def _write(root: Path, p: SyntheticParams, tr: float) -> dict:
    scene = synthetic.make_scene(p)
    has_rest = any(s in nsd.REST_SESSIONS[subject] for subject in p.subjects for s in p.sessions)
    _write_json(root / "dataset_description.json", {
        "Name": "dynadiff synthetic mini-NSD", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw", "License": "CC0",
        "Authors": ["dynadiff (synthetic data generator)"]})
    write_text(root / "README", _readme(p, tr))
    participants = "".join(f"sub-{subject_label(s)}\n" for s in p.subjects)
    write_text(root / "participants.tsv", "participant_id\n" + participants)
    _write_json(root / "participants.json", {"participant_id": {"Description": "sub-0S: NSD subject S (synthetic)"}})
    _write_json(root / "task-nsd_bold.json", {"TaskName": "nsd", "RepetitionTime": tr})
    if has_rest:
        _write_json(root / "task-rest_bold.json", {"TaskName": "rest", "RepetitionTime": tr})
    (root / "stimuli").mkdir(exist_ok=True)
    for row, image in enumerate(scene.images):
        _save_png(image, root / "stimuli" / stim_file(row + 1))
    test_images = [stim_file(i) for i in scene.test_ids]
    (root / "code").mkdir(exist_ok=True)
    write_text(root / "code" / "test_images.txt", "".join(f"{name}\n" for name in test_images))
    deriv = root / DERIVATIVES
    deriv.mkdir(parents=True, exist_ok=True)
    _write_json(deriv / "dataset_description.json", {
        "Name": "dynadiff synthetic mini-NSD, preprocessed", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "dynadiff synthetic"}]})
    write_text(deriv / "README", "fMRIPrep-style derivatives of the synthetic mini-NSD (SYNTHETIC DATA, NOT REAL fMRI): "
               "the raw runs as float32 (no preprocessing is needed), brain masks and the visual-cortex (nsdgeneral) "
               "masks, all in the voxel grid of the raw runs.\n")
    # Every mask is in the grid of the raw runs ("orig"): one sidecar at the top, inherited by all.
    _write_json(deriv / "space-T1w_mask.json", {"SpatialReference": "orig"})

    summary = {"subjects": list(p.subjects), "sessions": {}, "n_voxels": {}, "n_images": len(scene.images),
               "test_images": test_images, "seed": p.seed, "hrf_peak_s": p.hrf_peak_s, "tr": tr}
    for subject in scene.subjects:
        sub = f"sub-{subject_label(subject.subject)}"
        save_nifti((subject.roi > 0).astype(np.uint8),
                   deriv / sub / "anat" / f"{sub}_space-T1w_desc-nsdgeneral_mask.nii.gz")
        brain = (subject.roi >= 0).astype(np.uint8)
        for r in subject.runs:
            _write_run(root, deriv, subject, r, brain, p, tr)
        summary["sessions"][subject.subject] = list(p.sessions)
        summary["n_voxels"][subject.subject] = subject.n_visual
        logger.info("synthetic BIDS subject %s: %d task runs, %d visual voxels, TR %.4g s", sub,
                    subject.n_task_runs, subject.n_visual, tr)
    summary["overrides"] = [
        f"data.nsd_dataset_config.bids.root={root}",
        f"data.nsd_dataset_config.bids.derivatives={deriv}",
        f"data.nsd_dataset_config.bids.mask={deriv}/sub-{{subject}}/anat/sub-{{subject}}_space-T1w_desc-nsdgeneral_mask.nii.gz",
        f"data.nsd_dataset_config.bids.test_images={root}/code/test_images.txt",
        f"data.nsd_dataset_config.sessions=[{','.join(map(str, p.sessions))}]",
    ]
    _write_json(root / "code" / "synthetic.json", summary)
    return summary


def _write_run(root: Path, deriv: Path, subject: SubjectScene, r: RunScene, brain: np.ndarray,
               p: SyntheticParams, tr: float) -> None:
    """The raw run (and its events), and for a task run its preprocessed copy and brain mask."""
    run = r.run
    task = "rest" if r.rest else "nsd"
    func = Path(f"sub-{subject_label(run.subject)}") / f"ses-{run.session:02d}" / "func"
    stem = f"sub-{subject_label(run.subject)}_ses-{run.session:02d}_task-{task}_run-{run.run:02d}"
    data = resample_run(subject, r, p, tr)
    save_nifti(data, root / func / f"{stem}_bold.nii.gz", tr=tr)
    if r.rest:
        return
    rows = "".join(f"{onset_seconds(onset)!r}\t{TRIAL_SECONDS!r}\timage\t{stim_file(nsd_id)}\n"
                   for onset, nsd_id in r.events)
    write_text(root / func / f"{stem}_events.tsv", "onset\tduration\ttrial_type\tstim_file\n" + rows)
    save_nifti(data.astype(np.float32), deriv / func / f"{stem}_space-T1w_desc-preproc_bold.nii.gz", tr=tr)
    _write_json(deriv / func / f"{stem}_space-T1w_desc-preproc_bold.json",
                {"RepetitionTime": tr, "SkullStripped": True, "TaskName": task, "SpatialReference": "orig"})
    save_nifti(brain, deriv / func / f"{stem}_space-T1w_desc-brain_mask.nii.gz")


def resample_run(subject: SubjectScene, r: RunScene, p: SyntheticParams, tr: float) -> np.ndarray:
    """(X, Y, Z, n_volumes(tr)) int16: run ``r`` sampled every ``tr`` seconds (see the module docstring).

    At TR 4/3 the NSD layout's time series, first 225 volumes: what NSD's loader reads.
    """
    if abs(tr - TR) < 1e-9:
        return r.data[..., :N_VOLUMES_USED]
    n = n_volumes(tr)
    times = np.arange(n) * tr  # (n,) seconds
    bold = np.zeros((n, subject.n_visual))
    for onset, nsd_id in r.events:
        h = synthetic.hrf_at(times - onset_seconds(onset), p.hrf_peak_s)  # (n,)
        bold += np.outer(h, subject.responses[nsd_id - 1])
    n_brain = int((subject.roi >= 0).sum())
    noise = np.random.default_rng([p.seed, r.run.subject, r.run.session, r.run.run]).standard_normal(
        (n_brain, n), dtype=np.float32)
    return synthetic.render_run(subject.roi, subject.baseline, bold, r.slope, r.phase, noise, p)


def _readme(p: SyntheticParams, tr: float) -> str:
    return (
        "# dynadiff synthetic mini-NSD (BIDS)\n\n"
        "SYNTHETIC DATA, NOT REAL fMRI. Written by dynadiff.data.synthetic_bids.write_synthetic_bids "
        "(prepare_data.py --synthetic --format bids) to test the BIDS reader and the decoders without the real "
        "Natural Scenes Dataset.\n\n"
        f"Seed {p.seed}, TR {tr!r} s, subjects {', '.join(f'sub-{subject_label(s)}' for s in p.subjects)}, "
        f"sessions {', '.join(f'ses-{s:02d}' for s in p.sessions)}. Each visual voxel responds linearly to "
        f"the shown image's 4x4 RGB thumbnail, with a double-gamma haemodynamic response peaking "
        f"{p.hrf_peak_s:g} s after the onset, over a drifting baseline with Gaussian noise. The images are in "
        "stimuli/, the shared test images are listed in code/test_images.txt, and derivatives/fmriprep holds "
        "fMRIPrep-style preprocessed runs and the visual-cortex (nsdgeneral) masks.\n"
    )


def _save_png(image: np.ndarray, path: Path) -> None:
    """(425, 425, 3) uint8 -> PNG at zlib level 1: 2.5 times faster than PIL's default level 6, files 1.6 times larger."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=1)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(obj, indent=1) + "\n")
