"""Download every weight file eval.py and train.py read, into the places they read them from.

    python prepare_weights.py                          # checkpoints, Versatile Diffusion, metric networks
    python prepare_weights.py --only vd,metrics        # or --only vd --only metrics
    python prepare_weights.py --only segmenter         # Mask2Former, for eval.py's miou.model=mask2former (not by default)
    python prepare_weights.py --subjects 1 --vd_cache_dir /data/vd
    python prepare_weights.py --list > weights.tsv     # URL, size, destination of each file (fetch elsewhere, copy)
    python prepare_weights.py --verify                 # offline: what is present, missing or damaged (exit 1 if any)

What goes where (defaults in config/weights.yaml; KEY=VALUE overrides any key):

- ``checkpoints``: the Hub repository facebook/dynadiff, folder ``subj0N/`` (or
  ``sub0N/``) of each of ``--subjects`` into ``./checkpoints/subj0N`` (eval.py's
  default ``--checkpoint``);
- ``vd``: shi-labs/versatile-diffusion's ``image_unet/``, ``vae/`` and
  ``scheduler/`` (``text_unet/`` too with ``--dual-attention``), configs and one
  copy of the weights, into ``./versatile_diffusion`` (``--vd_cache_dir``);
- ``metrics``: torchvision's AlexNet, Inception-v3 and EfficientNet-B1 (V1)
  files into ``{TORCH_HOME}/hub/checkpoints`` (their SHA-256 prefix checked),
  SwAV's ResNet-50 beside them, CLIP ViT-L/14 (openai/clip-vit-large-patch14:
  config.json, model.safetensors) into ``{DYNADIFF_WEIGHTS}/clip-vit-large-patch14``,
  DreamSim's release, the DINO repository and DINO's weights into
  ``{DYNADIFF_WEIGHTS}/dreamsim``: where the metric code looks (``python -m
  dynadiff.metrics weights``);
- ``segmenter``, only when asked for (``--only segmenter``: over 800 MB, for an
  optional metric): facebook/mask2former-swin-large-coco-panoptic's
  config.json, preprocessor_config.json and one copy of the weights
  (model.safetensors, else pytorch_model.bin) into
  ``{DYNADIFF_WEIGHTS}/mask2former-swin-large-coco-panoptic``
  (``segmenter.path``), the default ``--weights`` of ``python -m
  dynadiff.segmenters.mask2former``, the in-environment mIoU segmenter
  (not comparable with the paper's ViT-Adapter mIoU).

Each file is written to ``.NAME.part`` and renamed once complete and checked
(size, SHA-256 or git hash where known): an interrupted run never leaves a
partial file under its final name, and the same command resumes it (HTTP
Range). Files present and valid are skipped (the check is recorded in
``.dynadiff-weights.json`` in each folder, so unchanged files are not hashed
again). Hub files honour HF_ENDPOINT, HF_TOKEN and HF_HOME as huggingface_hub
does; the plain URLs can come from mirrors (``mirrors.torchvision=URL``,
``mirrors.fbaipublicfiles=URL``, ``mirrors.github=URL``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dynadiff.cli import ConfigError, apply_overrides, load_yaml, setup_logging, value_overrides
from dynadiff.commands import default_config
from dynadiff.fetch.config import DEFAULT_GROUPS, GROUPS, SUBJECTS

logger = logging.getLogger("prepare_weights")
DEFAULT_CONFIG = default_config("weights.yaml")
# options that set one config key to their value, and the groups they are about (the first named in messages)
FLAG_KEYS = {
    "checkpoints_dir": ("checkpoints.dir", ("checkpoints",)),
    "vd_cache_dir": ("versatilediffusion_config.vd_cache_dir", ("vd",)),
    "torch_home": ("metrics_weights.torch_home", ("metrics",)),
    "weights_dir": ("metrics_weights.weights_dir", ("metrics", "segmenter")),
    "swav_path": ("metrics_weights.swav_path", ("metrics",)),
    "clip_path": ("metrics_weights.clip_path", ("metrics",)),
    "dreamsim_cache": ("metrics_weights.dreamsim_cache", ("metrics",)),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", metavar="GROUP",
                   help=f"fetch only these groups, among {', '.join(GROUPS)} (repeat, or a comma list; default: "
                   f"{', '.join(DEFAULT_GROUPS)}; the segmenter only when asked for)")
    p.add_argument("--subjects", type=int, nargs="+", choices=SUBJECTS, metavar="S",
                   help=f"checkpoints of these subjects, among {list(SUBJECTS)} (default: all four)")
    p.add_argument("--checkpoints-dir", type=Path, metavar="DIR",
                   help="where the checkpoints go, as DIR/subj0N (default ./checkpoints, where eval.py looks)")
    p.add_argument("--vd_cache_dir", type=Path, metavar="DIR",
                   help="Versatile Diffusion folder, as eval.py's --vd_cache_dir (default ./versatile_diffusion)")
    p.add_argument("--dual-attention", action="store_true",
                   help="also fetch Versatile Diffusion's text_unet/ (for versatilediffusion_config.dual_attention=true)")
    p.add_argument("--torch-home", type=Path, metavar="DIR",
                   help="torch cache root of the torchvision and SwAV files (default $TORCH_HOME, else ~/.cache/torch)")
    p.add_argument("--weights-dir", type=Path, metavar="DIR",
                   help="root of the CLIP, DreamSim and segmenter folders (default $DYNADIFF_WEIGHTS, else ./weights)")
    p.add_argument("--swav-path", type=Path, metavar="FILE", help="SwAV ResNet-50 file (default: in the torch cache)")
    p.add_argument("--clip-path", type=Path, metavar="DIR", help="CLIP ViT-L/14 folder")
    p.add_argument("--dreamsim-cache", type=Path, metavar="DIR", help="DreamSim cache folder")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true",
                      help="print each file's size, URL and destination (tab-separated; sizes by HEAD request, "
                      "'unknown' when offline) and download nothing")
    mode.add_argument("--verify", action="store_true",
                      help="check offline what is present (sizes, hashes) and what is missing; exit 1 if anything is")
    p.add_argument("--retries", type=int, default=5, metavar="N",
                   help="retries of a failed request, with exponential backoff (default 5)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="settings file (default config/weights.yaml)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied last")
    return p


def parse_groups(values: list[str] | None) -> list[str]:
    """``--only`` values (repeated and/or comma lists) → groups in fetch order (none given: the default groups,
    :data:`~dynadiff.fetch.config.DEFAULT_GROUPS`); ValueError for an unknown one."""
    if not values:
        return list(DEFAULT_GROUPS)
    asked = [v.strip() for value in values for v in value.split(",") if v.strip()]
    unknown = [v for v in asked if v not in GROUPS]
    if unknown or not asked:
        extra = [g for g in GROUPS if g not in DEFAULT_GROUPS]
        raise ValueError(f"--only takes {', '.join(DEFAULT_GROUPS)} (the default set) or {', '.join(extra)} "
                         f"(repeated or comma-separated), got {', '.join(values)!r}")
    return [g for g in GROUPS if g in asked]


def build_config(args: argparse.Namespace):
    """config file < flags < KEY=VALUE, validated; :class:`ConfigError` naming a bad key or value."""
    from dynadiff.fetch.config import WeightsFetchConfig

    overrides = value_overrides(args, {dest: key for dest, (key, _) in FLAG_KEYS.items()})
    if args.subjects is not None:
        overrides.append(f"checkpoints.subjects=[{','.join(map(str, args.subjects))}]")
    base = load_yaml(args.config)
    cfg = apply_overrides(WeightsFetchConfig, base, overrides + list(args.overrides))
    if args.dual_attention and "text_unet" not in cfg.versatilediffusion_config.subfolders:
        cfg.versatilediffusion_config.subfolders = [*cfg.versatilediffusion_config.subfolders, "text_unet"]
    return cfg


def print_verify(checks) -> int:
    """The --verify report on stdout; the number of files missing or not the expected ones."""
    problems = 0
    for c in checks:
        print(f"{c.group:<11} {c.state:<7} {c.path}" + (f"  ({c.detail})" if c.detail else ""))
        problems += c.state != "ok"
    ok = len(checks) - problems
    print(f"{ok} ok, {sum(c.state == 'MISSING' for c in checks)} missing, {sum(c.state == 'BAD' for c in checks)} not "
          "the expected file" + ("" if not problems else "; fetch them with prepare_weights.py (same options, "
                                 "without --verify)"))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    setup_logging(args.verbose)
    for name in ("httpx", "httpx2", "urllib3"):  # a line per request: only with --verbose
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        groups = parse_groups(args.only)
    except ValueError as e:
        parser.error(str(e))
    if args.retries < 0:
        parser.error(f"--retries must be >= 0, got {args.retries}")
    given = {dest: about for dest, (_, about) in FLAG_KEYS.items() if getattr(args, dest) is not None}
    given.update({"subjects": ("checkpoints",)} if args.subjects is not None else {})
    given.update({"dual_attention": ("vd",)} if args.dual_attention else {})
    for dest, about in given.items():
        if not set(about) & set(groups):
            parser.error(f"--{dest.replace('_', '-') if dest != 'vd_cache_dir' else dest} is about the "
                         f"{' or '.join(about)} group, which --only leaves out: add --only {about[0]}")

    from dynadiff.fetch.http import FetchError
    from dynadiff.fetch.run import fetch, list_lines, make_plans, verify

    try:
        cfg = build_config(args)
    except ConfigError as e:
        logger.error("%s", e)
        return 2
    try:
        if args.verify:
            return 1 if print_verify(verify(make_plans(cfg, groups, online=False))) else 0
        if args.list:
            for line in list_lines(make_plans(cfg, groups, online=True, retries=0)):
                print(line)
            return 0
        summary = fetch(make_plans(cfg, groups, online=True, retries=args.retries), retries=args.retries)
    except FetchError as e:  # a problem before any file (e.g. a path outside its folder)
        logger.error("%s", e)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted: complete files are kept, partial ones as .part files; run the same command "
                     "again to resume")
        return 130
    logger.info("%s", summary)
    if summary.failed:
        logger.error("%d problem(s), each said above; fix them and run the same command again: complete files are "
                     "kept, partial ones resumed", len(summary.failed))
        return 1
    w = cfg.metrics_weights
    metric_folders = dict.fromkeys(str(f) for f in (w.checkpoints_dir(), w.resolved_swav_path().parent,
                                                    w.resolved_clip_path(), w.resolved_dreamsim_cache()))
    places = {"checkpoints": str(cfg.checkpoints.dir), "vd": str(cfg.versatilediffusion_config.vd_cache_dir),
              "metrics": ", ".join(metric_folders), "segmenter": str(cfg.segmenter.resolved_path(w))}
    logger.info("done: %s", "; ".join(f"{g} in {places[g]}" for g in groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
