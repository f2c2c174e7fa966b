"""Configuration objects only: cheap to import (pydantic + exca, no torch).

Every config is a ``pydantic.BaseModel`` with ``extra="forbid"``: an unknown
key is an error, never silently ignored. A config builds the object it
describes with ``.build()``.
"""


import hashlib
import typing as tp
from pathlib import Path

import exca
import numpy as np
import pydantic

from dynadiff.cli import setup_job_logging
from dynadiff.device import check_device_name
from dynadiff.data import nsd
from dynadiff.data.nsd import SUBJECTS


class StrictModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)


# auto, cpu, cuda, cuda:N or mps: a typo (``--device tpu``) is a config error before any work
Device = tp.Annotated[str, pydantic.AfterValidator(check_device_name)]


class BidsSource(StrictModel):
    """A BIDS dataset as the data source (docs/bids.md; :mod:`dynadiff.data.bids`).

    - ``root``: the dataset (its ``dataset_description.json``, ``sub-*/``, ``stimuli/``).
    - ``derivatives``: fMRIPrep's output folder: its ``desc-preproc`` BOLD runs (in ``space``) and
      their ``desc-brain_mask`` are read instead of the raw runs.
    - ``task``, ``runs``: the runs used (None: every run with events); sessions are the data config's
      ``sessions``, by the number their label ends with.
    - ``image_column``: the ``events.tsv`` column naming each trial's image, relative to ``stimuli``
      (the dataset's ``stimuli/`` unless given).
    - ``mask``: a NIfTI mask or atlas on the BOLD's grid (``{subject}`` in the path: the participant
      label); ``mask_labels``: the atlas values kept (None: every value > 0). Without it, the
      derivatives' brain masks.
    - ``test_images``: a text file naming the test images, one per line; None: the images shown more
      than once.
    """

    root: Path
    derivatives: Path | None = None
    space: str | None = None
    task: str | None = None
    runs: list[int] | None = None
    image_column: str = "stim_file"
    stimuli: Path | None = None
    mask: str | None = None
    mask_labels: list[int] | None = None
    test_images: Path | None = None

    @pydantic.field_validator("runs", "mask_labels")
    @classmethod
    def _not_empty(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not v:
            raise ValueError("must not be empty (use null for all)")
        return v


class NsdDatasetConfig(StrictModel):
    """fMRI windows and stimuli of one subject of NSD, or of a BIDS dataset with ``bids`` (docs/behaviour.md §2).

    The per-event windows are cached by ``infra`` (an exca ``MapInfra``); the
    cache key leaves out ``averaged``, ``seed`` and ``split``, which only select
    among cached windows, so changing them reuses the cache.

    ``bids``: None reads NSD under ``nsddata_path``; a :class:`BidsSource` reads that BIDS dataset
    instead (``subject``: the participant whose label ends in that number; ``sessions``: likewise).
    """

    nsddata_path: Path = Path("./nsddata")
    bids: BidsSource | None = None  # None: NSD (declared before the fields whose checks depend on it)
    subject: int = 1
    split: tp.Literal["test", "train"] = "test"
    averaged: bool = False
    seed: int = 3
    offset: float = 4.6  # seconds from trial onset to the window start
    duration: float = 8.0  # seconds
    sessions: list[int] | None = None  # None: all 40 sessions
    # the first K of those sessions in chronological order (a new subject's first hours: train.py --first-sessions)
    first_sessions: int | None = pydantic.Field(None, ge=1)
    image_size: int = 512
    infra: exca.MapInfra = exca.MapInfra(folder="./cache", version="1")

    # NSD's subjects and sessions; a BIDS dataset's are checked against its files (dynadiff.data.bids)
    @pydantic.field_validator("subject")
    @classmethod
    def _known_subject(cls, v: int, info: pydantic.ValidationInfo) -> int:
        if info.data.get("bids") is None and v not in SUBJECTS:
            raise ValueError(f"unknown subject {v}: NSD subjects with all 40 sessions are {list(SUBJECTS)}")
        if v < 0:
            raise ValueError(f"subject must be the number a participant label ends with, got {v}")
        return v

    @pydantic.field_validator("sessions")
    @classmethod
    def _valid_sessions(cls, v: list[int] | None, info: pydantic.ValidationInfo) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("sessions must not be empty (use null for all sessions)")
            bad = [s for s in v if not 1 <= s <= 40]
            if bad and info.data.get("bids") is None:
                raise ValueError(f"sessions must be within 1..40, got {bad}")
            v = sorted(set(v))
        return v

    @property
    def data_folder(self) -> Path:
        """The folder the data is read from: the BIDS dataset's, else the NSD folder."""
        return Path(self.bids.root) if self.bids is not None else Path(self.nsddata_path)

    @pydantic.field_validator("image_size")
    @classmethod
    def _positive_size(cls, v: int) -> int:
        if v < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {v}")
        return v

    @infra.apply(
        item_uid=lambda item: item.uid,
        exclude_from_cache_uid=("averaged", "seed", "split", "sessions", "first_sessions", "image_size"),
    )
    def run_windows(self, items: tp.Sequence[nsd.RunEvents]) -> tp.Iterator[np.ndarray]:
        """Per item (one run and some of its event volumes): windows (n_events, voxels, n_trs) float32.

        Each run is loaded and cleaned once for all its events.
        """
        from dynadiff.data.dataset import compute_run_windows

        setup_job_logging()  # in a cluster job: its log files get the log
        yield from compute_run_windows(self, items)

    def build(self, subject_idx: int = 0):
        """The torch ``Dataset`` of this config's windows (computed or read from the cache)."""
        from dynadiff.data.dataset import build_dataset

        return build_dataset(self, subject_idx=subject_idx)


class DataConfig(StrictModel):
    nsd_dataset_config: NsdDatasetConfig = NsdDatasetConfig()


# ---------------------------------------------------------------------------
# Evaluation (eval.py)
# ---------------------------------------------------------------------------

from dynadiff.metrics.config import IdentificationDirection, MetricsWeightsConfig  # noqa: E402
from dynadiff.models.config import FmriMLPConfig, VersatileDiffusionConfig  # noqa: E402


class InfraResources(StrictModel):
    """Where and with what resources an exca map runs (the sections of ``custom_infra.yaml``).

    Unset fields keep exca's defaults; ``folder`` defaults to the run's cache folder.
    """

    cluster: tp.Literal["auto", "local", "slurm", "debug", "threadpool", "processpool"] | None = None
    folder: Path | None = None
    nodes: int | None = pydantic.Field(None, ge=1)  # train only: data-parallel processes = nodes x tasks_per_node
    tasks_per_node: int | None = pydantic.Field(None, ge=1)  # train only: one per GPU
    cpus_per_task: int | None = pydantic.Field(None, ge=1)
    gpus_per_node: int | None = pydantic.Field(None, ge=0)
    mem_gb: float | None = pydantic.Field(None, gt=0)
    max_jobs: int | None = pydantic.Field(None, ge=1)
    min_samples_per_job: int | None = pydantic.Field(None, ge=1)
    timeout_min: int | None = pydantic.Field(None, ge=1)
    slurm_partition: str | None = None
    slurm_constraint: str | None = None
    mode: tp.Literal["cached", "force", "read-only"] | None = None

    def infra_kwargs(self, folder: Path | None = None) -> dict:
        out = self.model_dump(exclude_none=True)
        if folder is not None:
            out.setdefault("folder", folder)
        return out


class ReconstructionConfig(StrictModel):
    """Reconstruct the test images of one subject, cached per test image by exca.

    The cache key holds everything that changes the images: the data
    selection, both model configs, the checkpoint (path *and* a digest of its
    files' sizes and modification times), a digest of the data files (likewise)
    and the sampler settings; it leaves
    out ``device`` and ``batch_size`` (each image has its own random stream; the
    batch size changes it at float rounding level only).
    """

    data: NsdDatasetConfig = NsdDatasetConfig()
    brain_modules_config: FmriMLPConfig = FmriMLPConfig()
    versatilediffusion_config: VersatileDiffusionConfig = VersatileDiffusionConfig()
    checkpoint: Path = Path("./checkpoints/subj01")
    checkpoint_digest: str = ""
    data_digest: str = ""  # of the data files (dynadiff.data.dataset.data_digest): rewritten data, new images
    allow_missing_keys: bool = False
    device: Device = "auto"
    batch_size: int = pydantic.Field(4, ge=1)
    to_uint8: tp.Literal["truncate", "round"] = "truncate"  # 8-bit conversion (the original truncates)
    # version 2: images truncated to 8 bits (version 1 rounded them; a default value is not in exca's uid)
    infra: exca.MapInfra = exca.MapInfra(folder="./cache", version="2")

    @infra.apply(item_uid=str, exclude_from_cache_uid=("device", "batch_size"))
    def generate(self, indices: tp.Sequence[int]) -> tp.Iterator[np.ndarray]:
        """(H, W, 3) uint8 reconstruction of each test index (before face blurring)."""
        from dynadiff.evaluation import generate_images

        setup_job_logging()  # in a cluster job: its log files get the log
        yield from generate_images(self, indices)


class RunSeriesConfig(StrictModel):
    """Whole cleaned runs, cached per run by exca: (voxels, 225) float32, the nsdgeneral voxels detrended and
    z-scored (as for the windows). A time course cuts every offset's windows from them, so no run is loaded and
    cleaned more than once for a whole sweep (``timecourse.py``)."""

    nsddata_path: Path = Path("./nsddata")
    bids: BidsSource | None = None  # as NsdDatasetConfig's: a BIDS dataset's runs instead of NSD's
    infra: exca.MapInfra = exca.MapInfra(folder="./cache", version="1")

    @infra.apply(item_uid=lambda item: item.uid)
    def series(self, items: tp.Sequence[nsd.RunEvents]) -> tp.Iterator[np.ndarray]:
        """Per item (a run; its ``volumes`` are ignored): the cleaned run."""
        from dynadiff.data.dataset import clean_runs

        setup_job_logging()
        if self.bids is not None:
            from dynadiff.data import bids

            yield from bids.clean_runs(self, items)
        else:
            yield from clean_runs(self.nsddata_path, items)


class SweepGenerationConfig(StrictModel):
    """Reconstructions of a time course (``timecourse.py``), cached per (offset, test image) by exca.

    Items are ``"{offset}:{index}"``: the test sample ``index`` (eval.py's order) decoded from the ``n_trs``-TR
    window that starts ``offset`` volumes after its onset. The cache key holds what :class:`ReconstructionConfig`'s
    does (checkpoint and its digest, data selection and digest, model and sampler settings) and ``n_trs``.
    """

    data: NsdDatasetConfig = NsdDatasetConfig()
    brain_modules_config: FmriMLPConfig = FmriMLPConfig()
    versatilediffusion_config: VersatileDiffusionConfig = VersatileDiffusionConfig()
    checkpoint: Path = Path("./checkpoints/subj01")
    checkpoint_digest: str = ""
    data_digest: str = ""
    n_trs: int = pydantic.Field(6, ge=1)
    allow_missing_keys: bool = False
    device: Device = "auto"
    batch_size: int = pydantic.Field(4, ge=1)
    to_uint8: tp.Literal["truncate", "round"] = "truncate"
    infra: exca.MapInfra = exca.MapInfra(folder="./cache", version="1")

    @infra.apply(item_uid=str, exclude_from_cache_uid=("device", "batch_size"))
    def generate(self, items: tp.Sequence[str]) -> tp.Iterator[np.ndarray]:
        """(H, W, 3) uint8 reconstruction of each ``"{offset}:{index}"`` item (before face blurring)."""
        from dynadiff.timecourse import generate_sweep_images

        setup_job_logging()
        yield from generate_sweep_images(self, items)


MiouModel = tp.Literal["vit-adapter", "mask2former"]


class MiouConfig(StrictModel):
    """mIoU (``eval.py --compute-miou``; docs/miou.md): both images of each pair segmented by ``model``.

    - ``model``: ``vit-adapter``, the paper's (ViT-Adapter Mask2Former BEiT-v2-L,
      COCO-Stuff-164k, in the separate environment ``setup_miou.sh`` builds), or
      ``mask2former`` (Mask2Former Swin-L, COCO panoptic, run in this environment
      through transformers; its numbers are not comparable with the paper's, and
      every output says so).
    - ``segmenter``: the command, a list of arguments; ``IN_DIR OUT_DIR`` are
      appended (the contract in miou/README.md). ``None``: the model's own:
      ``miou/env/bin/python miou/segment.py`` (vit-adapter), or this Python with
      ``-m dynadiff.segmenters.mask2former --weights WEIGHTS`` (mask2former); both
      get ``--device`` from eval.py's device.
    - ``weights``: the mask2former folder (Hugging Face layout). ``None``:
      ``{metrics_weights.weights_dir}/mask2former-swin-large-coco-panoptic``.
    - ``n_classes``: label values are ``0 .. n_classes - 1`` (255: no class). ``None``:
      the model's (172 bins for vit-adapter, as the original; 133 for mask2former).
    - ``timeout_s``: the segmenter is stopped after this long (``None``: never).
    """

    model: MiouModel = "vit-adapter"
    segmenter: list[str] | None = None
    weights: Path | None = None
    n_classes: int | None = pydantic.Field(None, ge=1, le=255)
    timeout_s: float | None = pydantic.Field(None, gt=0)

    @pydantic.field_validator("segmenter")
    @classmethod
    def _command(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or not v[0].strip()):
            raise ValueError("miou.segmenter is a command: a non-empty list of arguments, the program first")
        return v


class EvalConfig(StrictModel):
    """``eval.py``: reconstruct a subject's test images, then measure them (docs/behaviour.md §5).

    ``infra`` (an exca ``TaskInfra``) caches the finished run; its ``folder`` is
    where the run's outputs are written, in ``reconstructions_subjXX_{averaged|unaveraged}_{run_id}/``
    (``run_id``: a digest of the run's cache key, so that runs that differ in what
    changes their outputs never share a folder), with
    ``reconstructions_subjXX_{averaged|unaveraged}`` a link to the latest run's folder.
    ``image_generation`` holds the resources of the per-image generation map
    (the original's ``map_infra_image_generation``).
    """

    data: DataConfig = DataConfig()
    brain_modules_config: FmriMLPConfig = FmriMLPConfig()
    versatilediffusion_config: VersatileDiffusionConfig = VersatileDiffusionConfig()
    checkpoint: Path | None = None  # None: ./checkpoints/subjXX
    checkpoint_digest: str = ""  # set by eval.py from the files: a changed checkpoint is a new run
    data_digest: str = ""  # set by eval.py from the data files: rewritten data is a new run
    allow_missing_keys: bool = False
    device: Device = "auto"
    batch_size: int = pydantic.Field(4, ge=1)
    limit: int | None = pydantic.Field(None, ge=1)
    blur_faces: bool = True
    metrics: list[str] | None = None  # None: every metric whose weights are present
    identification: IdentificationDirection = "per_ground_truth"
    metrics_weights: MetricsWeightsConfig = MetricsWeightsConfig()
    overview_images: int = pydantic.Field(8, ge=0)
    compute_miou: bool = False
    miou: MiouConfig = MiouConfig()
    # reconstructions to 8 bits: ``truncate`` as the original, ``(x * 255).astype(uint8)`` (faithful), or ``round``
    to_uint8: tp.Literal["truncate", "round"] = "truncate"
    # version 2: reconstructions truncated to 8 bits (version 1's cached results had rounded ones)
    infra: exca.TaskInfra = exca.TaskInfra(folder="./cache", version="2", mode="retry")
    image_generation: InfraResources = InfraResources()

    @pydantic.field_validator("metrics")
    @classmethod
    def _known_metrics(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            from dynadiff.metrics.config import METRIC_NAMES

            unknown = [m for m in v if m not in METRIC_NAMES]
            if unknown:
                raise ValueError(f"unknown metric(s) {unknown}: choose among {list(METRIC_NAMES)}")
        return v

    @property
    def run_id(self) -> str:
        """8 hex digits naming this run: a digest of its cache key (everything that changes its outputs)."""
        return hashlib.sha1(self.infra.uid().encode()).hexdigest()[:8]

    @property
    def output_dir(self) -> Path:
        """``{infra.folder}/reconstructions_subjXX_{averaged|unaveraged}_{run_id}``: this run's own folder."""
        nsd_cfg = self.data.nsd_dataset_config
        mode = "averaged" if nsd_cfg.averaged else "unaveraged"
        return Path(self.infra.folder or "./cache") / f"reconstructions_subj{nsd_cfg.subject:02d}_{mode}_{self.run_id}"

    @infra.apply(exclude_from_cache_uid=("device", "batch_size", "image_generation", "overview_images"))
    def run(self) -> dict:
        """Generate (or read from the cache) every image, write the outputs, compute the metrics."""
        from dynadiff.evaluation import run_evaluation

        return run_evaluation(self)


# ---------------------------------------------------------------------------
# Training (train.py)
# ---------------------------------------------------------------------------


class TrainDataConfig(StrictModel):
    """Training data: the non-test events of one or more subjects (docs/behaviour.md §2 windows).

    ``nsd_dataset_config`` is the data config of every subject (the same keys as
    ``eval.py``'s); ``split`` must be ``train``. ``subjects``: ``None`` trains on
    the one subject ``nsd_dataset_config.subject``; a list trains one model with
    a subject layer per subject (``subject_idx`` = position in the list; windows
    zero-padded to the largest voxel count), and ``nsd_dataset_config.subject``
    must then be its first entry. Each repetition is a sample unless
    ``nsd_dataset_config.averaged``. A fraction ``val_fraction`` of the images
    (drawn with ``val_seed``, over all subjects together) is held out for
    validation, with every repetition of them. ``shuffle_pairs`` is a control: it
    permutes the fMRI windows of the training samples against their images (seeded
    by the run's ``seed``), so nothing brain-specific can be learnt.
    """

    nsd_dataset_config: NsdDatasetConfig = NsdDatasetConfig(split="train")
    subjects: list[int] | None = None
    val_fraction: float = pydantic.Field(0.05, ge=0.0, lt=1.0)
    val_seed: int = 0
    shuffle_pairs: bool = False
    num_workers: int = pydantic.Field(0, ge=0)  # DataLoader processes loading PNGs (0: in the training process)

    @pydantic.field_validator("nsd_dataset_config")
    @classmethod
    def _train_split(cls, v: NsdDatasetConfig) -> NsdDatasetConfig:
        if v.split != "train":
            raise ValueError(f"training reads the train split (non-test events), got split={v.split!r}")
        return v

    @pydantic.field_validator("subjects")
    @classmethod
    def _known_subjects(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("subjects must not be empty (use null for the one subject of nsd_dataset_config)")
            if len(set(v)) != len(v):
                raise ValueError(f"subjects must not repeat, got {v}")
        return v

    @pydantic.model_validator(mode="after")
    def _first_subject(self) -> "TrainDataConfig":
        bad = [s for s in self.subjects or () if s not in SUBJECTS]
        if bad and self.nsd_dataset_config.bids is None:
            raise ValueError(f"unknown subject(s) {bad}: NSD subjects with all 40 sessions are {list(SUBJECTS)}")
        if self.subjects is not None and self.nsd_dataset_config.subject != self.subjects[0]:
            raise ValueError(
                f"nsd_dataset_config.subject ({self.nsd_dataset_config.subject}) must be the first of subjects "
                f"{self.subjects}: choose the subjects with train.py --subjects (or data.subjects=[...])"
            )
        return self

    @property
    def subject_list(self) -> list[int]:
        return list(self.subjects) if self.subjects is not None else [self.nsd_dataset_config.subject]

    def subject_config(self, subject: int) -> NsdDatasetConfig:
        """The data config of one subject (this config's, with that subject)."""
        if subject not in self.subject_list:
            raise ValueError(f"subject {subject} is not among this run's subjects {self.subject_list}")
        # clone_obj, not model_copy(update=...): a pydantic copy keeps the original's exca cache uid (its infra
        # still belongs to the original), so the copy's windows would be cached and looked up under the first
        # subject's folder (and prepare_data.py's windows of the other subjects, in their own, never found)
        return self.nsd_dataset_config.infra.clone_obj(subject=subject)


class OptimizerConfig(StrictModel):
    """AdamW with a linear warm-up and a cosine decay to ``min_lr_ratio * lr``.

    Weight decay applies to matrices only (not to biases and normalisation
    weights). ``grad_clip``: maximum global gradient norm (``null``: no clipping).
    """

    lr: float = pydantic.Field(1e-4, gt=0.0)
    weight_decay: float = pydantic.Field(0.01, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = pydantic.Field(1e-8, gt=0.0)
    warmup_steps: int = pydantic.Field(500, ge=0)
    min_lr_ratio: float = pydantic.Field(0.0, ge=0.0, le=1.0)
    grad_clip: float | None = pydantic.Field(1.0, gt=0.0)

    @pydantic.field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must be within [0, 1), got {list(v)}")
        return v


class TrainConfig(StrictModel):
    """``train.py``: optimise the brain module and the UNet's LoRA (docs/behaviour.md §4 training step).

    One optimizer step = ``grad_accumulation`` micro-batches of ``batch_size``
    samples. Samples are drawn in a fresh seeded permutation per epoch and every
    random draw of a step (diffusion noise, timesteps, conditioning dropout,
    brain-module dropout) comes from generators seeded by ``(seed, step)``: a run
    resumed from a checkpoint continues exactly as if it had not stopped.

    ``mixed_precision``: autocast dtype of the forward pass (trainable weights stay
    float32); ``auto`` is bf16 on a CUDA device that supports it, else fp16 on
    CUDA (with loss scaling), else none. ``versatilediffusion_config.precision``
    is the storage dtype of the frozen UNet and VAE.

    Outputs under ``output_dir``: ``config.yaml``, ``log.csv`` (train/val loss,
    learning rate, gradient norm, throughput), ``samples/step_XXXXXXX.png``
    (ground truths above reconstructions of validation images),
    ``checkpoints/last/{model,state}.safetensors`` and
    ``checkpoints/best/model.safetensors`` (lowest validation loss);
    ``model.safetensors`` is what ``eval.py --checkpoint`` reads.
    ``infra`` (an exca ``TaskInfra``) runs the training in this process
    (default) or as a SLURM job (``--infra-yaml``, section ``train``).

    Data-parallel (``torchrun --nproc_per_node N``, or ``infra.nodes`` x ``infra.tasks_per_node`` tasks):
    ``batch_size`` is per process, the global batch ``batch_size x processes x grad_accumulation``;
    ``shard_optimizer`` splits the AdamW moments over the processes (ZeRO stage 1,
    ``torch.distributed.optim.ZeroRedundancyOptimizer``); a collective that waits more than
    ``dist_timeout_s`` seconds (a process died or hangs) fails the run.
    """

    data: TrainDataConfig = TrainDataConfig()
    brain_modules_config: FmriMLPConfig = FmriMLPConfig()
    versatilediffusion_config: VersatileDiffusionConfig = VersatileDiffusionConfig()
    optim: OptimizerConfig = OptimizerConfig()
    steps: int = pydantic.Field(20000, ge=1)  # optimizer steps
    batch_size: int = pydantic.Field(8, ge=1)  # samples per micro-batch
    grad_accumulation: int = pydantic.Field(1, ge=1)  # micro-batches per optimizer step
    mixed_precision: tp.Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 0
    device: Device = "auto"
    cpu_threads: int | None = pydantic.Field(None, ge=1)  # torch threads on CPU (None: torch's default)
    log_every: int = pydantic.Field(50, ge=1)  # steps between train-loss rows of log.csv
    val_every: int = pydantic.Field(1000, ge=0)  # steps between validations (0: at the end only)
    val_max_samples: int | None = pydantic.Field(None, ge=1)  # None: the whole validation split
    sample_every: int = pydantic.Field(2000, ge=0)  # steps between sample grids (0: never)
    n_sample_images: int = pydantic.Field(4, ge=1)
    checkpoint_every: int = pydantic.Field(1000, ge=1)  # steps between checkpoints (and at the end)
    output_dir: Path = Path("./runs/train")
    resume: bool = False  # continue from output_dir/checkpoints/last
    # A new subject from a pretrained model (train.py --init-from; docs/training.md): the checkpoint's weights, its
    # subject layers kept (their subjects still decode), a layer added for each subject of this run it lacks
    init_from: Path | None = None
    init_subjects: list[int] | None = None  # the checkpoint's subject layers, in order (train.py reads them)
    init_n_voxels: int | None = pydantic.Field(None, ge=1)  # its input width (likewise)
    init_digest: str = ""  # its files' digest: a rewritten checkpoint is a new run
    init_subject_steps: int = pydantic.Field(0, ge=0)  # the first steps train the new subjects' layers alone
    progress: bool = True  # console progress bar
    shard_optimizer: bool = False  # data-parallel: AdamW moments split over the processes (ZeRO-1)
    # data-parallel: seconds a collective may wait (longer than a checkpoint, a validation or a sample grid)
    dist_timeout_s: float = pydantic.Field(1800.0, gt=0)
    # retry: a failed run (e.g. a preempted job) runs again; it continues from its checkpoint with resume=true
    infra: exca.TaskInfra = exca.TaskInfra(version="1", mode="retry")

    @pydantic.model_validator(mode="after")
    def _coherent(self) -> "TrainConfig":
        data_size = self.data.nsd_dataset_config.image_size
        vd_size = self.versatilediffusion_config.image_size
        if data_size != vd_size:
            raise ValueError(
                f"data.nsd_dataset_config.image_size ({data_size}) and versatilediffusion_config.image_size "
                f"({vd_size}) must be equal: the decoder trains on images of the size it draws"
            )
        if self.data.val_fraction == 0 and self.val_every:
            raise ValueError("val_fraction is 0 (no validation split): set val_every=0 too, or a val_fraction > 0")
        if self.init_from is not None and (self.init_subjects is None or self.init_n_voxels is None):
            raise ValueError("init_from needs init_subjects and init_n_voxels, what the checkpoint records: give it "
                             "with train.py --init-from, which reads them")
        if self.init_from is None and self.init_subject_steps:
            raise ValueError("init_subject_steps is the first steps of a run started from a checkpoint: give "
                             "--init-from, or leave it at 0")
        tasks = (self.infra.nodes or 1) * (self.infra.tasks_per_node or 1)
        if tasks > 1 and self.infra.cluster is None:
            raise ValueError(f"infra: nodes x tasks_per_node = {tasks} processes need a cluster (infra.cluster slurm, "
                             "auto or local); on one machine without one, use torchrun --nproc_per_node")
        return self

    @property
    def subjects(self) -> list[int]:
        """The subjects whose data this run trains on."""
        return self.data.subject_list

    @property
    def model_subjects(self) -> list[int]:
        """The model's subject layers, in order: the pretrained checkpoint's (``init_from``), then this run's
        subjects it lacks; without ``init_from``, this run's subjects."""
        first = list(self.init_subjects or [])
        return first + [s for s in self.subjects if s not in first]

    @infra.apply(exclude_from_cache_uid=("device", "cpu_threads", "progress", "resume", "data.num_workers",
                                         "dist_timeout_s", "shard_optimizer"))
    def run(self) -> dict:
        """Train (or continue with ``resume``); returns a summary (steps, losses, checkpoint paths)."""
        from dynadiff.training import train

        setup_job_logging()  # in a cluster job: its log files get the log
        return train(self)
