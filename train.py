"""Train a Dynadiff decoder (brain module + UNet LoRA) on NSD.

    python train.py --subject 1 [--output runs/subj01] [KEY=VALUE ...]
    python train.py --subjects 1 2 5 7 --output runs/all     # one model, a subject layer each
    python train.py --output runs/subj01 --resume             # continue an interrupted run exactly

Defaults come from config/train.yaml (with --resume: from the run's own
config.yaml); flags override them; KEY=VALUE overrides (any config key,
validated) come last. The checkpoint to evaluate is
{output}/checkpoints/best/model.safetensors (lowest validation loss) or
{output}/checkpoints/last/model.safetensors:

    python eval.py --subject 1 --checkpoint runs/subj01/checkpoints/best/model.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dynadiff.cli import ConfigError, apply_overrides, load_yaml, setup_logging, value_overrides

logger = logging.getLogger("dynadiff.train")
DEFAULT_CONFIG = Path(__file__).parent / "config" / "train.yaml"
# custom_infra.yaml sections -> the config keys they set (dynadiff.infra)
INFRA_TARGETS = {"train": "infra", "task_infra_data": "data.nsd_dataset_config.infra"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    who = p.add_mutually_exclusive_group()
    who.add_argument("--subject", type=int, choices=[1, 2, 5, 7], help="NSD subject (default: from the config, 1)")
    who.add_argument("--subjects", type=int, nargs="+", choices=[1, 2, 5, 7], metavar="S",
                     help="several subjects, one model with a subject layer each (e.g. --subjects 1 2 5 7)")
    p.add_argument("--output", type=Path, help="run folder: checkpoints, log.csv, samples (default runs/train)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--cache", type=Path, help="cache folder of the fMRI windows, and with --infra-yaml of the "
                   "training job (default ./cache)")
    p.add_argument("--vd_cache_dir", type=Path, help="local Versatile Diffusion folder (Hugging Face layout)")
    p.add_argument("--infra-yaml", type=Path, help="cluster resources (custom_infra.yaml, section 'train')")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="samples per micro-batch")
    p.add_argument("--config", type=Path, help="base YAML config (default config/train.yaml; with --resume, the run's)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied last")
    return p.parse_intermixed_args(argv)  # KEY=VALUE overrides may come between flags


# options that set one config key to their value
FLAG_KEYS = {"output": "output_dir", "vd_cache_dir": "versatilediffusion_config.vd_cache_dir", "device": "device",
             "steps": "steps", "batch_size": "batch_size"}


def flag_overrides(args: argparse.Namespace) -> list[str]:
    out = value_overrides(args, FLAG_KEYS)
    if args.subject is not None:
        out += ["data.subjects=null", f"data.nsd_dataset_config.subject={args.subject}"]
    if args.subjects is not None:
        out += [f"data.subjects=[{','.join(map(str, args.subjects))}]", f"data.nsd_dataset_config.subject={args.subjects[0]}"]
    if args.resume:
        out.append("resume=true")
    if args.cache is not None:
        out.append(f"data.nsd_dataset_config.infra.folder={args.cache}")
        if args.infra_yaml is not None:  # the training job's exca folder (submitit logs, cached result)
            out.append(f"infra.folder={args.cache}")
    return out


def base_config(args: argparse.Namespace) -> dict:
    """config/train.yaml, or, with --resume and no --config, the run's saved config.yaml."""
    if args.config is not None:
        return load_yaml(args.config)
    if args.resume and args.output is not None and (args.output / "config.yaml").exists():
        saved = load_yaml(args.output / "config.yaml")
        saved.pop("resume", None)
        return saved
    return load_yaml(DEFAULT_CONFIG)


def build_config(args: argparse.Namespace):
    from dynadiff.config import TrainConfig

    overrides = []  # precedence: config file < --infra-yaml < flags < KEY=VALUE (as eval.py)
    if args.infra_yaml is not None:
        from dynadiff.infra import infra_overrides, load_infra_yaml

        overrides += infra_overrides(args.infra_yaml, INFRA_TARGETS)
        train_section = load_infra_yaml(args.infra_yaml).get("train")
        if train_section is not None and train_section.folder is None:  # null: the cache folder (--cache wins)
            overrides.append("infra.folder=./cache")
    overrides += flag_overrides(args)
    return apply_overrides(TrainConfig, base_config(args), overrides + list(args.overrides))


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    logging.getLogger("exca").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    from dynadiff.checkpoint import CheckpointError
    from dynadiff.data.nsd import NsdDataError
    from dynadiff.training import TrainingError

    from dynadiff import jobs

    try:
        cfg = build_config(args)
        before = jobs.snapshot(cfg.infra)
        result = cfg.run()
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    except (TrainingError, NsdDataError, CheckpointError, FileNotFoundError) as e:
        logger.error("%s", e)
        return 1
    except jobs.JOB_ERRORS as e:  # the training job failed (cluster run)
        logger.error("%s\nTo continue from the last checkpoint, add --resume.",
                     jobs.failure_report(cfg.infra, "training", before, error=e))
        return 1
    print(json.dumps(result, indent=1))
    commands = result["eval_command"].splitlines()  # one per subject
    print("Evaluate with:" + (f" {commands[0]}" if len(commands) == 1 else "".join(f"\n  {c}" for c in commands)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
