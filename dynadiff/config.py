"""Configuration objects only: cheap to import (pydantic + exca, no torch).

Every config is a ``pydantic.BaseModel`` with ``extra="forbid"``: an unknown
key is an error, never silently ignored. A config builds the object it
describes with ``.build()``.
"""


import typing as tp
from pathlib import Path

import exca
import numpy as np
import pydantic

from dynadiff.data import nsd
from dynadiff.data.nsd import SUBJECTS


class StrictModel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)


class NsdDatasetConfig(StrictModel):
    """fMRI windows and stimuli of one NSD subject (SPEC §2).

    The per-event windows are cached by ``infra`` (an exca ``MapInfra``); the
    cache key leaves out ``averaged``, ``seed`` and ``split``, which only select
    among cached windows, so changing them reuses the cache.
    """

    nsddata_path: Path = Path("./nsddata")
    subject: int = 1
    split: tp.Literal["test", "train"] = "test"
    averaged: bool = False
    seed: int = 3
    offset: float = 4.6  # seconds from trial onset to the window start
    duration: float = 8.0  # seconds
    sessions: list[int] | None = None  # None: all 40 sessions
    image_size: int = 512
    infra: exca.MapInfra = exca.MapInfra(folder="./cache", version="1")

    @pydantic.field_validator("subject")
    @classmethod
    def _known_subject(cls, v: int) -> int:
        if v not in SUBJECTS:
            raise ValueError(f"unknown subject {v}: NSD subjects with all 40 sessions are {list(SUBJECTS)}")
        return v

    @pydantic.field_validator("sessions")
    @classmethod
    def _valid_sessions(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v:
                raise ValueError("sessions must not be empty (use null for all 40 sessions)")
            bad = [s for s in v if not 1 <= s <= 40]
            if bad:
                raise ValueError(f"sessions must be within 1..40, got {bad}")
            v = sorted(set(v))
        return v

    @pydantic.field_validator("image_size")
    @classmethod
    def _positive_size(cls, v: int) -> int:
        if v < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {v}")
        return v

    @infra.apply(
        item_uid=lambda item: item.uid,
        exclude_from_cache_uid=("averaged", "seed", "split", "sessions", "image_size"),
    )
    def run_windows(self, items: tp.Sequence[nsd.RunEvents]) -> tp.Iterator[np.ndarray]:
        """Per item (one run and some of its event volumes): windows (n_events, voxels, n_trs) float32.

        Each run is loaded and cleaned once for all its events.
        """
        from dynadiff.data.dataset import compute_run_windows

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
    files' sizes and modification times) and the sampler settings; it leaves
    out ``device`` and ``batch_size`` (sampling is batch-invariant).
    """

    data: NsdDatasetConfig = NsdDatasetConfig()
    brain_modules_config: FmriMLPConfig = FmriMLPConfig()
    versatilediffusion_config: VersatileDiffusionConfig = VersatileDiffusionConfig()
    checkpoint: Path = Path("./checkpoints/subj01")
    checkpoint_digest: str = ""
    allow_missing_keys: bool = False
    device: str = "auto"
    batch_size: int = pydantic.Field(4, ge=1)
    infra: exca.MapInfra = exca.MapInfra(folder="./cache", version="1")

    @infra.apply(item_uid=str, exclude_from_cache_uid=("device", "batch_size"))
    def generate(self, indices: tp.Sequence[int]) -> tp.Iterator[np.ndarray]:
        """(H, W, 3) uint8 reconstruction of each test index (before face blurring)."""
        from dynadiff.evaluation import generate_images

        yield from generate_images(self, indices)


class EvalConfig(StrictModel):
    """``eval.py``: reconstruct a subject's test images, then measure them (SPEC §5).

    ``infra`` (an exca ``TaskInfra``) caches the finished run; its ``folder`` is
    where ``reconstructions_subjXX_{averaged|unaveraged}/`` is written.
    ``image_generation`` holds the resources of the per-image generation map
    (the original's ``map_infra_image_generation``).
    """

    data: DataConfig = DataConfig()
    brain_modules_config: FmriMLPConfig = FmriMLPConfig()
    versatilediffusion_config: VersatileDiffusionConfig = VersatileDiffusionConfig()
    checkpoint: Path | None = None  # None: ./checkpoints/subjXX
    allow_missing_keys: bool = False
    device: str = "auto"
    batch_size: int = pydantic.Field(4, ge=1)
    limit: int | None = pydantic.Field(None, ge=1)
    blur_faces: bool = True
    metrics: list[str] | None = None  # None: every metric whose weights are present
    identification: IdentificationDirection = "per_ground_truth"
    metrics_weights: MetricsWeightsConfig = MetricsWeightsConfig()
    overview_images: int = pydantic.Field(8, ge=0)
    compute_miou: bool = False
    infra: exca.TaskInfra = exca.TaskInfra(folder="./cache", version="1", mode="retry")
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
    def output_dir(self) -> Path:
        nsd_cfg = self.data.nsd_dataset_config
        mode = "averaged" if nsd_cfg.averaged else "unaveraged"
        return Path(self.infra.folder or "./cache") / f"reconstructions_subj{nsd_cfg.subject:02d}_{mode}"

    @infra.apply(exclude_from_cache_uid=("device", "batch_size", "image_generation", "overview_images"))
    def run(self) -> dict:
        """Generate (or read from the cache) every image, write the outputs, compute the metrics."""
        from dynadiff.evaluation import run_evaluation

        return run_evaluation(self)
