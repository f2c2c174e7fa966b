"""The ``eval.py`` command that evaluates a checkpoint of a run, printed when the training ends."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from dynadiff.config import TrainConfig


EVAL_KEYS = ("data.nsd_dataset_config.nsddata_path", "data.nsd_dataset_config.bids", "data.nsd_dataset_config.offset",
             "data.nsd_dataset_config.duration", "data.nsd_dataset_config.sessions", "brain_modules_config",
             "versatilediffusion_config.vd_cache_dir", "versatilediffusion_config.dual_attention",
             "versatilediffusion_config.image_size", "versatilediffusion_config.lora_rank",
             "versatilediffusion_config.lora_alpha", "versatilediffusion_config.lora_target_modules")


def eval_command(cfg: TrainConfig, checkpoint: str | Path) -> str:
    """The ``eval.py`` command line(s) for a checkpoint of this run, one per subject: the keys that differ from
    eval's defaults."""
    from dynadiff.config import EvalConfig

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    mine = flat(json.loads(cfg.model_dump_json()))
    default = flat(json.loads(EvalConfig().model_dump_json()))
    args = []
    for key, value in mine.items():
        if any(key == k or key.startswith(k + ".") for k in EVAL_KEYS) and default.get(key) != value:
            text = "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)
            args.append(f"{key}={text}")
    # one line per subject (a model of several subjects is evaluated one subject at a time)
    return "\n".join(shlex.join(["python", "eval.py", "--subject", str(s), "--checkpoint", str(checkpoint), *args])
                     for s in cfg.subjects)
