"""Reconstruct a subject's NSD test images with Dynadiff and measure them.

    python eval.py --subject 1 [--averaged-trial] [KEY=VALUE ...]

Defaults come from config/config.yaml; flags override them; KEY=VALUE
overrides (any config key, validated) come last. Outputs go to the run's own
folder, {cache}/reconstructions_subjXX_{averaged|unaveraged}_{run id}/ (the run
id is a digest of what changes the outputs: checkpoint, sampler settings, data
selection, --limit, metrics...), and {cache}/reconstructions_subjXX_{averaged|
unaveraged} links to the latest run's folder.
"""

from __future__ import annotations

import argparse
import json
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
    add_arguments(p)
    p.add_argument("--compute-miou", action="store_true",
                   help="also compute mIoU: miou.model=vit-adapter (default, the paper's; environment from "
                        "./setup_miou.sh) or miou.model=mask2former (this environment; not comparable); docs/miou.md")
    return p.parse_intermixed_args(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """eval.py's options (but --compute-miou), which timecourse.py shares."""
    p.add_argument("--subject", type=int, choices=[1, 2, 5, 7], help="NSD subject (default: from the config, 1)")
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


def build_config(args: argparse.Namespace, extra: tuple[str, ...] = ()):
    from dynadiff.config import EvalConfig

    base = load_yaml(args.config)
    overrides = []  # precedence: config file < --infra-yaml < flags < KEY=VALUE
    if args.infra_yaml is not None:
        from dynadiff.infra import infra_overrides

        overrides += infra_overrides(args.infra_yaml, INFRA_TARGETS)
    overrides += flag_overrides(args)
    return apply_overrides(EvalConfig, base, overrides + list(args.overrides) + list(extra))


def brain_overrides(args: argparse.Namespace, cfg, checkpoint: Path, recorded: dict) -> list[str]:
    """``brain_modules_config.KEY=VALUE`` for each key of the configuration a train.py checkpoint records.

    The checkpoint's values replace the config file's (logged); a ``KEY=VALUE`` given on the command line that
    disagrees with them is a :class:`ConfigError` (the weights only fit the configuration they were trained with).
    """
    given = cfg.brain_modules_config.model_dump(mode="json")
    on_command_line = {o.split("=", 1)[0].strip() for o in args.overrides if "=" in o}
    conflicts = [f"{k}={given[k]!r} (checkpoint: {v!r})" for k, v in recorded.items()
                 if given.get(k) != v and ({f"brain_modules_config.{k}", "brain_modules_config"} & on_command_line)]
    if conflicts:
        raise ConfigError(
            f"brain_modules_config given on the command line disagrees with checkpoint {checkpoint}, which records the "
            f"configuration it was trained with: {', '.join(conflicts)}. Drop those overrides: eval.py takes the brain "
            "module's configuration from the checkpoint")
    changed = {k: v for k, v in recorded.items() if given.get(k) != v}
    if changed:
        logger.info("brain module configuration from the checkpoint's metadata: %s (the config file has %s)",
                    ", ".join(f"{k}={v}" for k, v in changed.items()),
                    ", ".join(f"{k}={given.get(k)}" for k in changed))
    return [f"brain_modules_config.{k}={json.dumps(v)}" for k, v in recorded.items()]


def window_overrides(args: argparse.Namespace, cfg, checkpoint: Path, recorded: dict) -> list[str]:
    """``data.nsd_dataset_config.{offset,duration}`` of the window a train.py checkpoint was trained on, where its
    volumes differ from the config's: they replace the config file's (logged); given on the command line, that is a
    :class:`ConfigError`. Seconds that give the same volumes (4.6 s and 4.0 s both start at t+3) are left as given."""
    from dynadiff.data.preprocess import window_bounds

    given = cfg.data.nsd_dataset_config
    ours, theirs = (window_bounds(0, w["offset"], w["duration"]) for w in (
        {"offset": given.offset, "duration": given.duration}, recorded))
    if ours == theirs:
        return []
    on_command_line = {o.split("=", 1)[0].strip() for o in args.overrides if "=" in o}
    keys = {k: f"data.nsd_dataset_config.{k}" for k in ("offset", "duration")}
    volumes = "volumes t{:+d} .. t{:+d}".format
    if set(keys.values()) & on_command_line:
        raise ConfigError(
            f"the window given on the command line ({volumes(ours[0], ours[1] - 1)}) is not the one checkpoint "
            f"{checkpoint} was trained on ({volumes(theirs[0], theirs[1] - 1)}: offset={recorded['offset']:g}, "
            f"duration={recorded['duration']:g}). Drop those overrides: the window is taken from the checkpoint")
    logger.info("fMRI window from the checkpoint's training config: %s (offset=%g s, duration=%g s; the config file "
                "has %s)", volumes(theirs[0], theirs[1] - 1), recorded["offset"], recorded["duration"],
                volumes(ours[0], ours[1] - 1))
    return [f"{keys[k]}={recorded[k]!r}" for k in ("offset", "duration")]


def resolve_config(args: argparse.Namespace):
    """The configuration of the run, its inputs checked: the checkpoint resolved (a folder holding one
    model.safetensors: that file) and digested, the brain module's configuration from its metadata, the data
    files digested (rewritten data or checkpoint: a new run, never an old run's cached images or metrics)."""
    from dynadiff.evaluation import preflight

    cfg = build_config(args)
    checked = preflight(cfg)
    # quoted: a hex digest made only of digits (or like 12e34) would otherwise be read as a number
    extra = [f"checkpoint={json.dumps(str(checked.checkpoint))}", f"checkpoint_digest={json.dumps(checked.digest)}",
             f"data_digest={json.dumps(checked.data_digest)}"]
    if checked.brain_config is not None:
        extra += brain_overrides(args, cfg, checked.checkpoint, checked.brain_config)
    from dynadiff.evaluation import checkpoint_window

    window = checkpoint_window(checked.checkpoint)
    if window is not None:
        extra += window_overrides(args, cfg, checked.checkpoint, window)
    return build_config(args, extra=tuple(extra))


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
