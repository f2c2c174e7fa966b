"""A throwaway exca map for tests/test_jobs.py, in a module of its own: submitit's local
jobs unpickle it in fresh processes, which import it by name (tests/ on PYTHONPATH)."""

import typing as tp  # (no "from __future__ import annotations": exca checks the real annotation)
from pathlib import Path

import exca
import pydantic


class FlakyMap(pydantic.BaseModel):
    """Squares its items; raises on ``fail_on``; appends each computed item to ``record``."""

    model_config = pydantic.ConfigDict(extra="forbid")
    fail_on: int = -1
    record: Path | None = None
    infra: exca.MapInfra = exca.MapInfra(version="1")

    @infra.apply(item_uid=str, exclude_from_cache_uid=("fail_on", "record"))
    def square(self, items: tp.Sequence[int]) -> tp.Iterator[int]:
        for x in items:
            if x == self.fail_on:
                raise ValueError(f"item {x} is cursed")
            if self.record is not None:
                with open(self.record, "a") as f:
                    f.write(f"{x}\n")
            yield x * x


class FlakyTask(pydantic.BaseModel):
    """One job (an exca TaskInfra, whose logs sit beside its uid folders, not in them): raises if ``fail``."""

    model_config = pydantic.ConfigDict(extra="forbid")
    fail: bool = False
    infra: exca.TaskInfra = exca.TaskInfra(version="1")

    @infra.apply
    def run(self) -> int:
        if self.fail:
            raise ValueError("the task is cursed")
        return 1
