"""``python -m dynadiff.metrics weights``: which weight file each metric looks for, present or missing, how to get it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynadiff.metrics.config import METRIC_NAMES, MetricsWeightsConfig
from dynadiff.metrics.weights import metric_status


def weights_report(config: MetricsWeightsConfig) -> tuple[str, int]:
    """(the report's text, number of metrics with missing weights)."""
    lines = []
    missing = 0
    width = max(map(len, METRIC_NAMES))
    for name in METRIC_NAMES:
        status = metric_status(name, config)
        if status is None:
            lines.append(f"{name:<{width}}  present  (no weights needed)")
        elif status.present:
            lines.append(f"{name:<{width}}  present  {status.path}")
        else:
            missing += 1
            lines.append(f"{name:<{width}}  MISSING  {status.path}")
            if status.problem != f"no file {status.path}":
                lines.append(f"{'':<{width}}           {status.problem}")
            lines.append(f"{'':<{width}}           to get it: {status.how_to_get}")
    lines.append(f"{len(METRIC_NAMES) - missing} of {len(METRIC_NAMES)} metrics can run; missing ones are skipped unless asked for.")
    return "\n".join(lines), missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynadiff.metrics", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("weights", help="list the weight files each metric looks for")
    w.add_argument("--torch-home", type=Path, help="torch cache root (default: $TORCH_HOME, else ~/.cache/torch)")
    w.add_argument("--weights-dir", type=Path, help="root of the other weights (default: $DYNADIFF_WEIGHTS, else ./weights)")
    w.add_argument("--swav-path", type=Path, help="SwAV ResNet-50 state dict")
    w.add_argument("--clip-path", type=Path, help="CLIP ViT-L/14 folder in Hugging Face layout")
    w.add_argument("--dreamsim-cache", type=Path, help="DreamSim cache folder")
    args = parser.parse_args(argv)
    config = MetricsWeightsConfig(
        torch_home=args.torch_home,
        weights_dir=args.weights_dir,
        swav_path=args.swav_path,
        clip_path=args.clip_path,
        dreamsim_cache=args.dreamsim_cache,
    )
    text, _ = weights_report(config)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
