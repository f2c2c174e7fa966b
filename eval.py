"""Reconstruct a subject's NSD test images with Dynadiff and measure them.

    python eval.py --subject 1 [--averaged-trial] [KEY=VALUE ...]

Defaults come from config/config.yaml; flags override them; KEY=VALUE
overrides (any config key, validated) come last. Outputs go to
{cache}/reconstructions_subjXX_{averaged|unaveraged}/.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dynadiff.cli import ConfigError, apply_overrides, load_yaml, setup_logging, value_overrides

logger = logging.getLogger("dynadiff.eval")
DEFAULT_CONFIG = Path(__file__).parent / "config" / "config.yaml"
# custom_infra.yaml sections -> the config keys they set (dynadiff.infra)
INFRA_TARGETS = {"task_infra_data": "data.nsd_dataset_config.infra", "map_infra_image_generation": "image_generation"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subject", type=int, choices=[1, 2, 5, 7], help="NSD subject (default: from the config, 1)")
    p.add_argument("--averaged-trial", action="store_true", help="average the repetitions of each test image")
    p.add_argument("--cache", type=Path, help="cache and output folder (default ./cache)")
    p.add_argument("--seed", type=int, help="which repetition of each image, unaveraged (default 3)")
    p.add_argument("--vd_cache_dir", type=Path, help="local Versatile Diffusion folder (Hugging Face layout)")
    p.add_argument("--infra-yaml", type=Path, help="cluster resources (custom_infra.yaml)")
    p.add_argument("--compute-miou", action="store_true", help="also compute mIoU (separate environment)")
    p.add_argument("--checkpoint", type=Path, help="checkpoint folder or .safetensors (default checkpoints/subjXX)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=int, help="images generated at once")
    p.add_argument("--limit", type=int, help="only the first N test images")
    p.add_argument("--no-blur-faces", action="store_true", help="do not pixelate faces in reconstructions")
    p.add_argument("--metrics", help="comma-separated metric names (default: all whose weights are present)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="base YAML config")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied last")
    return p.parse_intermixed_args(argv)


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
    if args.compute_miou:
        out.append("compute_miou=true")
    if args.no_blur_faces:
        out.append("blur_faces=false")
    if args.metrics is not None:
        out.append(f"metrics=[{args.metrics}]")
    return out


def build_config(args: argparse.Namespace, extra: tuple[str, ...] = ()):
    from dynadiff.config import EvalConfig

    base = load_yaml(args.config)
    overrides = []  # precedence: config file < --infra-yaml < flags < KEY=VALUE
    if args.infra_yaml is not None:
        from dynadiff.infra import infra_overrides

        overrides += infra_overrides(args.infra_yaml, INFRA_TARGETS)
    overrides += flag_overrides(args)
    return apply_overrides(EvalConfig, base, overrides + list(args.overrides) + list(extra))


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from dynadiff.evaluation import EvaluationError, preflight

    # exca logs a failed task's traceback as a warning; our errors say what to do instead
    logging.getLogger("exca").setLevel(logging.DEBUG if args.verbose else logging.ERROR)

    try:
        digest = preflight(build_config(args))
        cfg = build_config(args, extra=(f"checkpoint_digest={digest}",))
        result = cfg.run()
    except (ConfigError, EvaluationError) as e:
        logger.error("%s", e)
        return 2 if isinstance(e, ConfigError) else 1
    from dynadiff.evaluation import metrics_table

    print(metrics_table(result))
    out = Path(result["output_dir"])
    print(f"Reconstructions and metrics: {out}")
    if (out / "overview.png").exists():
        print(f"Overview (ground truth above reconstruction): {out / 'overview.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
