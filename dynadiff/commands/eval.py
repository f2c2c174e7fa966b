"""Reconstruct a subject's NSD test images with Dynadiff and measure them.

    python eval.py --subject 1 [--averaged-trial] [KEY=VALUE ...]

Defaults come from config/config.yaml (dynadiff/defaults/); flags override them; KEY=VALUE
overrides (any config key, validated) come last. Outputs go to the run's own
folder, {cache}/reconstructions_subjXX_{averaged|unaveraged}_{run id}/ (the run
id is a digest of what changes the outputs: checkpoint, sampler settings, data
selection, --limit, metrics...), and {cache}/reconstructions_subjXX_{averaged|
unaveraged} links to the latest run's folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dynadiff.cli import ConfigError, setup_logging, validate, value_overrides
from dynadiff.commands import default_config

logger = logging.getLogger("dynadiff.eval")
DEFAULT_CONFIG = default_config("config.yaml")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--compute-miou", action="store_true",
                   help="also compute mIoU: miou.model=vit-adapter (default, the paper's; environment from "
                        "./setup_miou.sh) or miou.model=mask2former (this environment; not comparable); docs/miou.md")
    return p.parse_intermixed_args(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """eval.py's options (but --compute-miou), which timecourse.py shares."""
    p.add_argument("--subject", type=int,
                   help="NSD subject: 1, 2, 5 or 7 (default: from the config, 1); with a BIDS source, the "
                   "participant whose label ends with it")
    p.add_argument("--averaged-trial", action="store_true", help="average the repetitions of each test image")
    p.add_argument("--cache", type=Path, help="cache and output folder (default ./cache)")
    p.add_argument("--seed", type=int, help="which repetition of each image, unaveraged (default 3)")
    p.add_argument("--vd_cache_dir", type=Path, help="local Versatile Diffusion folder (Hugging Face layout)")
    p.add_argument("--infra-yaml", type=Path, help="cluster resources (custom_infra.yaml)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder or .safetensors (default checkpoints/subjXX)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=int, help="images generated at once")
    p.add_argument("--limit", type=int, help="only the first N test images")
    p.add_argument("--no-blur-faces", action="store_true", help="do not pixelate faces in reconstructions")
    p.add_argument("--metrics", help="comma-separated metric names (default: all whose weights are present)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base YAML config")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied last")


# options that set one config key to their value
FLAG_KEYS = {"subject": "data.nsd_dataset_config.subject", "seed": "data.nsd_dataset_config.seed",
             "vd_cache_dir": "versatilediffusion_config.vd_cache_dir", "checkpoint": "checkpoint", "device": "device",
             "batch_size": "batch_size", "limit": "limit"}


def flag_overrides(args: argparse.Namespace) -> list[str]:
    out = value_overrides(args, FLAG_KEYS)
    if args.averaged_trial:
        out.append("data.nsd_dataset_config.averaged=true")
    if args.cache is not None:
        out += [f"{k}={args.cache}" for k in ("data.nsd_dataset_config.infra.folder", "infra.folder", "image_generation.folder")]
    if getattr(args, "compute_miou", False):
        out.append("compute_miou=true")
    if args.no_blur_faces:
        out.append("blur_faces=false")
    if args.metrics is not None:
        out.append(f"metrics=[{args.metrics}]")
    return out


def config_tree(args: argparse.Namespace) -> dict:
    """The configuration tree of the options: config file < --infra-yaml < flags < KEY=VALUE."""
    from dynadiff.resolve import eval_tree

    return eval_tree(args.config, flag_overrides(args), args.overrides, args.infra_yaml)


def build_config(args: argparse.Namespace):
    """The configuration of the options alone (no checkpoint read, nothing checked)."""
    from dynadiff.config import EvalConfig

    return validate(EvalConfig, config_tree(args))


def resolve_config(args: argparse.Namespace):
    """The configuration of the run, its inputs checked and the checkpoint's records applied
    (:func:`dynadiff.resolve.resolve_eval`)."""
    from dynadiff.resolve import given_keys, resolve_eval

    return resolve_eval(config_tree(args), given_keys(args.overrides))


def interrupted(cfg) -> str:
    """What an interrupted run kept, and how to continue."""
    from dynadiff.evaluation import reconstruction_config

    try:
        rec = reconstruction_config(cfg)
        folder = rec.infra.uid_folder()
        n = len(rec.infra.cache_dict) if folder is not None and folder.exists() else 0
    except Exception:  # noqa: BLE001 - a report, never a second traceback
        n, folder = None, None
    kept = f"{n} generated image(s) are kept in {folder}" if n is not None else "the generated images are kept"
    where = "" if cfg.image_generation.cluster in (None, "debug") else (
        "; cluster jobs already submitted go on and fill the cache (squeue / scancel)")
    return (f"interrupted: {kept}{where}. Run the same command again to continue: only the missing images are "
            f"generated. {cfg.output_dir} is incomplete until then (no metrics.json).")


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from dynadiff.data.nsd import NsdDataError
    from dynadiff.evaluation import EvaluationError, evaluate

    # exca logs a failed task's traceback as a warning; our errors say what to do instead
    logging.getLogger("exca").setLevel(logging.DEBUG if args.verbose else logging.ERROR)

    cfg = None
    try:
        cfg = resolve_config(args)
        result = evaluate(cfg)
    except (ConfigError, EvaluationError, NsdDataError) as e:  # NsdDataError: a data file unreadable mid-run
        logger.error("%s", e)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        logger.error("%s", interrupted(cfg) if cfg is not None else "interrupted before any work: nothing written")
        return 130
    from dynadiff.evaluation import metrics_table

    print(metrics_table(result))
    out = Path(result["output_dir"])
    print(f"Reconstructions and metrics of run {result['run_id']}: {out}")
    if result.get("latest_link"):
        print(f"  (also {result['latest_link']}: the latest run of subject {result['subject']}, "
              f"{'averaged' if result['averaged'] else 'unaveraged'})")
    if (out / "overview.png").exists():
        print(f"Overview (ground truth above reconstruction): {out / 'overview.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
