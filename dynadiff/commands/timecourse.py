"""Decode a subject's NSD test images from fMRI windows that slide over time, and show how the image emerges.

    python timecourse.py --subject 1 [--averaged-trial] [--offsets -3:13] [eval.py's options] [KEY=VALUE ...]

For each offset k (in TRs from the trial's onset volume t; --offsets START:STOP[:STEP], STOP excluded, default
-3:13, or --offsets-s in seconds, snapped to the TR grid), every test image is decoded from the window
[t+k, t+k+n) of the checkpoint's own length n (6 TRs for the published checkpoints, trained on t+3 .. t+8) by
the same checkpoint, and measured as eval.py measures. The options, config keys and checks are eval.py's.

Outputs: {cache}/timecourse_subjXX_{averaged|unaveraged}_{run id}/ (timecourse_subjXX_{mode} links to the latest):
timecourse.json and .csv (per offset: window in volumes and seconds, each metric's mean, 95 % bootstrap interval
over images, chance, images used and left out), timecourse.png, filmstrip.png and strips/{i}.png (ground truth,
then the reconstruction at each offset). Reconstructions are cached per (checkpoint, offset, image): run the same
command again to continue an interrupted sweep.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from dynadiff.cli import ConfigError, join_option_values, setup_logging
from dynadiff.commands import eval as EVAL  # the same options, config precedence and checks

logger = logging.getLogger("dynadiff.timecourse")


def parse_args(argv=None) -> argparse.Namespace:
    from dynadiff.timecourse import DEFAULT_OFFSETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    EVAL.add_arguments(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--offsets", default=None, metavar="START:STOP[:STEP]",
                       help=f"window starts in TRs from the onset volume (STOP excluded; default {DEFAULT_OFFSETS}), "
                       "or a list such as 0,3,6")
    which.add_argument("--offsets-s", default=None, metavar="START:STOP[:STEP]",
                       help="window starts in seconds from the onset, snapped to the nearest volume")
    which.add_argument("--checkpoints", nargs="+", default=None, metavar="PATH",
                       help="one model per offset instead of sliding one: train.py checkpoints (paths or globs), "
                       "each evaluated at the window it was trained on (read from the checkpoint)")
    p.add_argument("--generalization", action="store_true",
                   help="with --checkpoints: also test every model at every other model's offset (train x test time)")
    return p.parse_intermixed_args(join_negative_values(sys.argv[1:] if argv is None else list(argv)))


def join_negative_values(argv: list[str]) -> list[str]:
    """``--offsets -3:13`` -> ``--offsets=-3:13``: argparse would take a value starting with ``-`` for an option."""
    return join_option_values(argv, ("--offsets", "--offsets-s"), accept=lambda v: re.match(r"-\.?\d", v) is not None)


def expand(patterns: list[str]) -> list[Path]:
    """Paths and globs -> checkpoint paths (a glob that matches nothing, or a missing path, is an error)."""
    import glob

    from dynadiff.timecourse import TimecourseError

    out: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise TimecourseError(f"--checkpoints {pattern}: matches no file")
        out += [Path(m) for m in matches if Path(m) not in out]
    return out


def resolve(args: argparse.Namespace):
    """(decoders, offsets or None, seconds asked per offset or None): everything checked before any work."""
    from dynadiff.decoder import default_checkpoint
    from dynadiff.timecourse import (
        DEFAULT_OFFSETS,
        SweepModel,
        TimecourseError,
        check_decoders,
        model_window,
        offsets_from_seconds,
        parse_offsets,
    )

    def decoder(a: argparse.Namespace) -> SweepModel:
        cfg = EVAL.resolve_config(a)
        checkpoint = Path(cfg.checkpoint or default_checkpoint(cfg.data.nsd_dataset_config.subject))
        return SweepModel(cfg, checkpoint, model_window(checkpoint, cfg.data.nsd_dataset_config))

    if args.checkpoints is not None:
        # `--checkpoints a b KEY=VALUE`: argparse gives the overrides to --checkpoints; they are overrides
        overrides = [c for c in args.checkpoints if "=" in c and not Path(c).exists()]
        args = argparse.Namespace(**{**vars(args), "overrides": list(args.overrides) + overrides,
                                     "checkpoints": [c for c in args.checkpoints if c not in overrides]})
        if not args.checkpoints:
            raise TimecourseError("--checkpoints: no checkpoint given")
        if args.checkpoint is not None:
            raise TimecourseError("--checkpoint slides one model, --checkpoints evaluates one model per offset: "
                                  "give one of them")
        decoders = [decoder(argparse.Namespace(**{**vars(args), "checkpoint": path})) for path in expand(args.checkpoints)]
        check_decoders(decoders)
        return decoders, None, None
    if args.generalization:
        raise TimecourseError("--generalization tests models trained at different offsets: give them with "
                              "--checkpoints")
    if args.offsets_s is not None:
        offsets, asked = offsets_from_seconds(args.offsets_s)
    else:
        offsets, asked = parse_offsets(args.offsets or DEFAULT_OFFSETS), None
    return [decoder(args)], offsets, asked


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    from dynadiff.data.nsd import NsdDataError
    from dynadiff.evaluation import EvaluationError
    from dynadiff.timecourse import TimecourseError, run_timecourse

    logging.getLogger("exca").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    try:
        decoders, offsets, asked = resolve(args)
        for d in decoders:
            logger.info("checkpoint %s: %d-TR windows, trained from t%+d (%s)", d.checkpoint, d.window.n_trs,
                        d.window.offset, d.window.source)
        if offsets is not None:
            logger.info("sliding it over offsets %s", ", ".join(f"{k:+d}" for k in offsets))
        summary = run_timecourse(decoders, offsets, asked, generalization=args.generalization)
    except (ConfigError, EvaluationError, NsdDataError, TimecourseError) as e:
        logger.error("%s", e)
        return 2 if isinstance(e, (ConfigError, TimecourseError)) else 1
    except KeyboardInterrupt:
        logger.error("interrupted: the reconstructions made so far are cached; run the same command again to "
                     "continue (only the missing ones are generated)")
        return 130
    out = Path(summary["output_dir"])
    for m in summary["metrics"]:
        k = summary["peak_offset"][m]
        if k is not None:
            row = next(r for r in summary["rows"] if r["offset"] == k)
            print(f"{m}: best at offset {k:+d} (window t{k:+d} .. t{row['end_volume'] - 1:+d}, "
                  f"{row['start_s']:+.1f} s to {row['end_s']:+.1f} s from onset): {row['metrics'][m]['mean']:.4f}")
    print(f"Time course of run {summary['run_id']}: {out / 'timecourse.png'}")
    print(f"Filmstrip (ground truth, then each offset): {out / 'filmstrip.png'}")
    if "generalization" in summary:
        print(f"Temporal generalisation (train x test offset): {out / 'generalization.png'}")
    if summary.get("latest_link"):
        print(f"  (also {summary['latest_link']}: the latest time course of subject {summary['subject']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
