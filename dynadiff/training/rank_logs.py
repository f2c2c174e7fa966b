"""Per-process logs of a data-parallel run: ``output_dir/logs/rank<r>.log``."""

from __future__ import annotations

import logging
from pathlib import Path

from dynadiff.config import TrainConfig

_RANK_HANDLER: list[logging.Handler] = []


def rank_log(cfg: TrainConfig, world) -> Path:
    """Each process of a data-parallel run also logs to ``output_dir/logs/rank<r>.log`` (appended); the
    console keeps rank 0's messages and the others' warnings and errors."""
    path = Path(cfg.output_dir) / "logs" / f"rank{world.rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{world.rank} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if not world.is_main:
        for h in root.handlers:
            if h is not handler and not isinstance(h, logging.FileHandler):
                h.setLevel(max(h.level, logging.WARNING))
    _RANK_HANDLER.append(handler)
    return path


def drop_rank_log() -> None:
    while _RANK_HANDLER:
        handler = _RANK_HANDLER.pop()
        logging.getLogger().removeHandler(handler)
        handler.close()
