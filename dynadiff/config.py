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
