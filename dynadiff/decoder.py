"""``Decoder``: a Dynadiff checkpoint, built once, that turns fMRI windows into images.

The one place where a checkpoint becomes a model. ``eval.py``, ``timecourse.py``, ``live.py``, ``demo.py`` and
the sample grids of ``train.py`` all decode through it::

    from dynadiff import Decoder

    decoder = Decoder.from_checkpoint("runs/subj01/checkpoints/best/model.safetensors",
                                      vd_dir="versatile_diffusion", device="cpu")
    images = decoder(windows, subject=1)   # windows: (n, voxels, TRs) float32 -> n (H, W, 3) uint8 images

:class:`CheckpointInfo` is what a checkpoint records, read once (its metadata; the published DeepSpeed folders
record nothing and use the published configuration).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import typing as tp
from pathlib import Path

import numpy as np

if tp.TYPE_CHECKING:
    import torch

    from dynadiff.models.config import FmriMLPConfig, VersatileDiffusionConfig

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = Path("checkpoints")


class DecoderError(RuntimeError):
    """A checkpoint cannot be decoded with as asked (missing, unreadable, or not fitting the data): one line that
    says what to do. ``dynadiff.evaluation.EvaluationError`` is this class."""


# ----------------------------------------------------------------------------- where checkpoints are


def checkpoint_candidates(subject: int, root: Path = CHECKPOINTS_DIR) -> list[Path]:
    """Where a subject's published checkpoint may be: ``subjXX`` (the original's README) or ``subXX`` (the
    folder its code reads)."""
    return [Path(root) / f"subj{subject:02d}", Path(root) / f"sub{subject:02d}"]


def default_checkpoint(subject: int, root: Path = CHECKPOINTS_DIR) -> Path:
    """The first of :func:`checkpoint_candidates` that exists (logged when it is ``subXX``); the first if none."""
    candidates = checkpoint_candidates(subject, root)
    for path in candidates:
        if path.exists():
            if path != candidates[0]:
                logger.info("checkpoint of subject %d: %s (no %s)", subject, path, candidates[0])
            return path
    return candidates[0]


def checkpoint_digest(path: Path) -> str:
    """Digest of a checkpoint file or folder: relative names, sizes and modification times."""
    from dynadiff.files import stamp_digest

    return stamp_digest(path)


# ----------------------------------------------------------------------------- what a checkpoint records


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint records, read once from its metadata.

    A ``train.py`` checkpoint (``.safetensors``) records its brain module's configuration, the subjects of its
    layers (in order), its input width (the largest voxel count of those subjects), its number of TRs, the
    window it was trained on and its whole training configuration. The published DeepSpeed folders, and files
    converted from them, record none of it (``None``): the published configuration applies.
    """

    path: Path  # the file or DeepSpeed folder read
    kind: tp.Literal["safetensors", "deepspeed"]
    digest: str  # names, sizes and modification times: a rewritten checkpoint has a new digest
    brain_config: dict | None = None
    subjects: list[int] | None = None
    n_voxels: int | None = None
    n_timepoints: int | None = None
    window: dict | None = None  # {"offset": s, "duration": s}
    vd_config: dict | None = None  # the training's versatilediffusion_config
    data_config: dict | None = None  # the training's data.nsd_dataset_config (its folder, sessions, window...)

    @classmethod
    def read(cls, path: str | Path) -> "CheckpointInfo":
        """The checkpoint that ``path`` names (a folder holding one ``model.safetensors``: that file; a DeepSpeed
        folder), its metadata read; :class:`DecoderError` if it is missing or unreadable."""
        from dynadiff.checkpoint import CheckpointError, read_metadata, resolve_checkpoint

        path = Path(path)
        if not path.exists():
            raise DecoderError(f"checkpoint {path} not found: put the published folder there (see "
                               "checkpoints/README.md), or pass --checkpoint PATH (a train.py output or a converted "
                               ".safetensors)")
        try:
            resolved = resolve_checkpoint(path)
        except CheckpointError as e:
            raise DecoderError(f"--checkpoint: {e}") from None
        if not (resolved.is_file() and resolved.suffix == ".safetensors"):
            return cls(resolved, "deepspeed", checkpoint_digest(resolved))
        try:
            meta = read_metadata(resolved)
        except (CheckpointError, OSError, ValueError):  # not readable as safetensors: the loader says why
            meta = {}
        return cls(resolved, "safetensors", checkpoint_digest(resolved), brain_config=_brain_config(resolved, meta),
                   subjects=_json_list(meta.get("subjects")), n_voxels=_int(meta.get("n_voxels")),
                   n_timepoints=_int(meta.get("n_timepoints")), window=_window(meta),
                   vd_config=_train_section(meta, "versatilediffusion_config"),
                   data_config=(_train_section(meta, "data") or {}).get("nsd_dataset_config"))

    def layout(self, subject: int, n_voxels: int | None = None) -> tuple[int | None, int, int]:
        """(input width of the brain module, number of subject layers, ``subject``'s layer).

        A checkpoint that names its subjects: ``subject`` must be one of them; with several, windows are
        zero-padded to its width. Any other checkpoint has one layer, for its own subject, of the subject's width
        ``n_voxels``. Without ``n_voxels``, only the subject is checked.
        """
        subjects = self.subjects
        if subjects is None:
            return n_voxels, 1, 0
        if subject not in subjects:
            raise DecoderError(
                f"checkpoint {self.path} was trained on subject(s) {subjects}, not on subject {subject}: evaluate one "
                f"of those (--subject), or pass the checkpoint of subject {subject}")
        if len(subjects) == 1 or n_voxels is None:
            return n_voxels, len(subjects), subjects.index(subject)
        width = int(self.n_voxels)
        if n_voxels > width:
            raise DecoderError(f"this subject has {n_voxels} nsdgeneral voxels, more than the {width} inputs of "
                               f"checkpoint {self.path}: is the data the one it was trained on?")
        return width, len(subjects), subjects.index(subject)


def _json_list(text: str | None) -> list[int] | None:
    try:
        value = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return [int(s) for s in value] if isinstance(value, list) else None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _brain_config(path: Path, meta: dict) -> dict | None:
    from dynadiff.models.config import FmriMLPConfig

    text = meta.get("brain_modules_config")
    if text is None:
        return None
    try:
        return FmriMLPConfig.model_validate_json(text).model_dump(mode="json")
    except ValueError as e:  # written by another version: say so, use the configuration given
        logger.warning("checkpoint %s: its brain_modules_config metadata is not readable by this version (%s); "
                       "using the configuration given", path, str(e).splitlines()[0])
        return None


def _train_section(meta: dict, key: str) -> dict | None:
    try:
        value = json.loads(meta.get("train_config", "null"))[key]
    except (TypeError, KeyError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _window(meta: dict) -> dict | None:
    data = (_train_section(meta, "data") or {}).get("nsd_dataset_config")
    try:
        return {"offset": float(data["offset"]), "duration": float(data["duration"])}
    except (TypeError, KeyError, ValueError):
        return None


def mismatch_cause(error: Exception, n_voxels: int, subject: int, n_timepoints: int | None = None) -> str:
    """What a checkpoint that does not fit the model most likely is, from the shapes in the loader's error.

    Only the voxel axis differing (the subject layer's input size): the checkpoint of another subject (or of
    other data). LoRA tensors only: another lora_rank. Otherwise: another brain module configuration.
    """
    differing = []  # (tensor name, checkpoint's size, model's size) of each differing axis
    for name, theirs, ours in re.findall(r"(\S+): file \(([\d, ]*)\) vs model \(([\d, ]*)\)", str(error)):
        a, b = [[int(x) for x in dims.split(",") if x.strip()] for dims in (theirs, ours)]
        if len(a) != len(b):
            differing.append((name, None, None))
        differing += [(name, x, y) for x, y in zip(a, b) if x != y]
    if not differing:
        return "the checkpoint does not fit this model"
    if all(ours == n_voxels and theirs is not None for _, theirs, ours in differing):
        return (f"the checkpoint expects {differing[0][1]} voxels per window, and subject {subject} has {n_voxels} "
                "nsdgeneral voxels in this data: is it the checkpoint of another subject?")
    if n_timepoints is not None and all(re.search(r"(^|\.)(lin0|in_time_agg|out_time_agg)\.", name)
                                        for name, _, _ in differing):
        return (f"the checkpoint was trained on windows of another number of TRs than these {n_timepoints}: set "
                "data.nsd_dataset_config.offset and duration to the ones it was trained with")
    if all(".lora_" in name for name, _, _ in differing):
        return "the checkpoint's LoRA sizes differ from this model's: check versatilediffusion_config.lora_rank"
    return ("the checkpoint's brain module has other sizes than brain_modules_config (hidden, n_tokens, "
            "token_dim, n_blocks...): set them to the checkpoint's")


# ----------------------------------------------------------------------------- images


def to_uint8(image: "torch.Tensor", mode: str = "truncate") -> np.ndarray:
    """(3, H, W) float image -> (H, W, 3) uint8, clamped to [0, 1] first.

    ``truncate`` (the original's ``(x * 255).astype(uint8)``, faithful: the published numbers were measured
    on such images) or ``round`` (the nearest level: on average half a level brighter, every metric moves a
    little).
    """
    x = image.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255
    if mode == "round":
        x = x.round()
    elif mode != "truncate":
        raise ValueError(f"to_uint8 is 'truncate' or 'round', got {mode!r}")
    return x.astype(np.uint8)  # float -> uint8 drops the fraction: truncation


_DTYPES = {"float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16", "bfloat16": "bf16", "bf16": "bf16"}


class Decoder:
    """A Dynadiff model with its weights, on its device, in eval mode: ``decoder(windows)`` -> 8-bit images.

    Build it with :meth:`from_checkpoint` (a checkpoint file or folder), or wrap a model in hand (``train.py``'s
    sample grids). Windows are ``(voxels, TRs)`` float32, a subject's own voxel count; they are zero-padded to the
    model's input width (as in training) for a model of several subjects. Each image has its own random stream,
    seeded by ``seed``: an image does not depend on the other windows of its batch, and windows are sampled in
    batches of exactly ``batch_size`` (a short last batch padded by repeating its last window, whose images are
    dropped), so an image does not depend on how the windows were split either.
    """

    def __init__(self, model, *, device: str, subjects: tp.Sequence[int] | None = None, width: int | None = None,
                 checkpoint: CheckpointInfo | None = None, batch_size: int = 4, to_uint8: str = "truncate",
                 subject: int | None = None) -> None:
        self.model = model
        self.device = device
        self.subjects = list(subjects) if subjects is not None else None
        self.width = int(width if width is not None else model.brain_modules["clip_image"].n_voxels)
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.to_uint8 = to_uint8
        self.default_subject = subject  # whose layer decodes when a call names no subject

    @classmethod
    def from_checkpoint(cls, path: str | Path, vd_dir: str | Path | None = None, *, device: str = "auto",
                        dtype: "str | torch.dtype | None" = None, subject: int | None = None,
                        n_voxels: int | None = None, n_timepoints: int | None = None,
                        brain_config: "FmriMLPConfig | dict | None" = None,
                        vd_config: "VersatileDiffusionConfig | dict | None" = None,
                        allow_missing_keys: bool = False, batch_size: int = 4,
                        to_uint8: str = "truncate") -> "Decoder":
        """The decoder of a checkpoint: a ``train.py`` ``model.safetensors`` (or its folder), a converted
        ``.safetensors`` or a published DeepSpeed folder.

        What the checkpoint records is used where not given: its brain module's configuration, its subjects and
        input width, its number of TRs, its training's Versatile Diffusion settings (image size, LoRA, sampler).
        ``vd_dir``: the Versatile Diffusion folder (Hugging Face layout); ``dtype``: of the frozen UNet and VAE
        (``float32``, ``float16``, ``bfloat16``). A checkpoint that records none of it (the published ones) needs
        ``n_voxels``, the subject's voxel count, and uses the published configuration (6 TRs).
        ``subject``: the subject whose layer decodes by default (required with several; the only one otherwise).
        """
        from dynadiff.checkpoint import CheckpointError, load_checkpoint
        from dynadiff.device import resolve_device
        from dynadiff.models.config import FmriMLPConfig, VersatileDiffusionConfig

        info = path if isinstance(path, CheckpointInfo) else CheckpointInfo.read(path)
        if subject is None:
            if info.subjects is not None and len(info.subjects) > 1:
                raise DecoderError(f"checkpoint {info.path} holds subjects {info.subjects}: say which one to decode "
                                   "(subject=...)")
            subject = info.subjects[0] if info.subjects else 1
        if n_voxels is None:
            n_voxels = info.n_voxels
            if n_voxels is None:
                raise DecoderError(f"checkpoint {info.path} does not record its number of voxels (a published "
                                   "checkpoint): pass n_voxels=, the subject's nsdgeneral voxel count")
        n_timepoints = n_timepoints or info.n_timepoints or 6
        width, n_subjects, _ = info.layout(subject, n_voxels)
        brain = FmriMLPConfig.model_validate(_as_dict(brain_config) or info.brain_config or {})
        vd = _as_dict(vd_config)
        if vd is None:
            vd = dict(info.vd_config or {})
            vd.pop("vd_cache_dir", None)  # the training machine's folder: vd_dir, or the default, instead
        if vd_dir is not None:
            vd["vd_cache_dir"] = Path(vd_dir)
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            if name not in _DTYPES:
                raise ValueError(f"dtype {dtype!r}: use float32, float16 or bfloat16")
            vd["precision"] = _DTYPES[name]
        vd = VersatileDiffusionConfig.model_validate(vd)
        try:
            device = resolve_device(device)
        except ValueError as e:
            raise DecoderError(str(e)) from None
        model = vd.build(brain, n_voxels=width, n_subjects=n_subjects, n_timepoints=n_timepoints, device=device)
        try:
            load_checkpoint(model, info.path, allow_missing=allow_missing_keys)
        except CheckpointError as e:
            raise DecoderError(f"{mismatch_cause(e, width, subject, n_timepoints)}\n{e}") from e
        except (OSError, ValueError) as e:  # contents the up-front checks could not see (e.g. a damaged shard)
            raise DecoderError(f"checkpoint {info.path} cannot be read: {e}") from e
        model.eval()
        subjects = info.subjects if info.subjects is not None else [subject]
        return cls(model, device=device, subjects=subjects, width=width, checkpoint=info, batch_size=batch_size,
                   to_uint8=to_uint8, subject=subject)

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @property
    def n_timepoints(self) -> int:
        return self.model.brain_modules["clip_image"].n_timepoints

    def test_data(self, nsddata_path: str | Path | None = None, *, subject: int | None = None,
                  averaged: bool = False):
        """The test windows of ``subject`` (default: the decoder's), as ``eval.py`` reads them: a dataset with
        ``brain(i)`` (a window), ``nsd_ids[i]`` and ``len()``. From the data the checkpoint was trained on (its
        folder, sessions, window and cache, as its training recorded them), or from ``nsddata_path``."""
        from dynadiff.config import NsdDatasetConfig

        recorded = dict((self.checkpoint.data_config if self.checkpoint is not None else None) or {})
        fields = {k: recorded[k] for k in ("nsddata_path", "bids", "sessions", "offset", "duration", "image_size",
                                           "infra") if k in recorded}
        if nsddata_path is not None:
            fields["nsddata_path"] = Path(nsddata_path)
        subject = self.default_subject if subject is None else subject
        return NsdDatasetConfig(**fields, subject=subject or 1, split="test", averaged=averaged).build()

    def subject_index(self, subject: int | None) -> int:
        """The layer of ``subject`` (None: the default subject)."""
        subject = self.default_subject if subject is None else subject
        if self.subjects is None:
            return 0
        if subject not in self.subjects:
            raise DecoderError(f"this decoder was trained on subject(s) {self.subjects}, not on subject {subject}")
        return self.subjects.index(subject)

    def __call__(self, windows: "np.ndarray | tp.Iterable[np.ndarray]", subject: int | None = None, *,
                 seed: int | None = None, steps: int | None = None, guidance: float | None = None) -> list[np.ndarray]:
        """(H, W, 3) uint8 images of ``windows`` (an ``(n, voxels, TRs)`` array, or an iterable of
        ``(voxels, TRs)`` windows), in order; ``seed``, ``steps`` and ``guidance`` default to the model's
        configuration (the sampler's seed, number of steps and classifier-free guidance scale)."""
        if isinstance(windows, np.ndarray) and windows.ndim == 2:
            windows = windows[None]
        return list(self.images(windows, subject, seed=seed, steps=steps, guidance=guidance))

    def images(self, windows: tp.Iterable[np.ndarray], subject: int | None = None, *, seed: int | None = None,
               steps: int | None = None, guidance: float | None = None) -> tp.Iterator[np.ndarray]:
        """The images of ``windows`` one by one, read lazily (a job's windows need not all be in memory)."""
        index = self.subject_index(subject)
        padded = (self._pad(w) for w in windows)
        for image in self.reconstruct_in_batches(padded, index, seed=seed, steps=steps, guidance=guidance):
            yield to_uint8(image, self.to_uint8)

    def _pad(self, window: np.ndarray) -> np.ndarray:
        window = np.asarray(window, dtype=np.float32)
        if window.ndim != 2 or window.shape[0] > self.width or window.shape[1] != self.n_timepoints:
            raise ValueError(f"expected a (voxels <= {self.width}, {self.n_timepoints}) window, got {window.shape}")
        return np.pad(window, ((0, self.width - window.shape[0]), (0, 0)))  # zeros: as in training

    def reconstruct_in_batches(self, windows: tp.Iterable[np.ndarray], subject_idx: int = 0, *,
                               seed: int | None = None, steps: int | None = None,
                               guidance: float | None = None) -> tp.Iterator["torch.Tensor"]:
        """(3, S, S) float images in [0, 1] of windows already of the model's width, in batches of exactly
        ``batch_size`` (see the class)."""
        import torch

        windows = iter(windows)
        while batch := list(itertools.islice(windows, self.batch_size)):
            n = len(batch)
            batch += [batch[-1]] * (self.batch_size - n)
            brain = torch.from_numpy(np.stack(batch)).to(self.device)
            subjects = torch.full((self.batch_size,), subject_idx, dtype=torch.long, device=self.device)
            yield from self.reconstruct(brain, subjects, seed=seed, steps=steps, guidance=guidance)[:n]

    def reconstruct(self, brain: "torch.Tensor", subject_idx: "torch.Tensor", *, seed: int | None = None,
                    steps: int | None = None, guidance: float | None = None) -> "torch.Tensor":
        """(B, 3, S, S) float images in [0, 1] of a batch already on the device (no gradient)."""
        import torch

        with torch.no_grad():
            return self.model.reconstruct(brain, subject_idx, seed=seed, num_inference_steps=steps,
                                          guidance_scale=guidance)


def _as_dict(config) -> dict | None:
    if config is None:
        return None
    return config.model_dump() if hasattr(config, "model_dump") else dict(config)
