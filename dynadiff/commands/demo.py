"""The demo: train and evaluate a tiny Dynadiff on a synthetic mini-NSD, on a CPU, in minutes.

    python demo.py [--output demo_output] [--fast] [--generalization] [--bids [--tr SECONDS]]

No data and no weights needed. It writes a synthetic mini-NSD (real file
formats; BOLD from a known encoding model of each image's colour layout),
pre-trains a tiny Versatile Diffusion stand-in on other synthetic images,
trains the decoder with the training loop of train.py, then runs the
evaluation of eval.py on the held-out test images, before and after training.
Prints the metrics and the path of overview.png (ground truths above
reconstructions), then the trained decoder's time course. --generalization:
then one decoder per offset (1-TR windows) and the temporal generalisation
matrix (about 10 more minutes). --bids: the same synthetic data written as a BIDS
dataset (raw and fMRIPrep-style derivatives) at --tr seconds per volume (default 2),
read through the BIDS data source. --fast: a seconds-long smoke run (meaningless
numbers).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dynadiff.cli import setup_logging

logger = logging.getLogger("dynadiff.demo")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("demo_output"),
                   help="work folder (default ./demo_output; rewritten at each run)")
    p.add_argument("--fast", action="store_true", help="tiny sizes and a few steps: checks the pipeline only")
    p.add_argument("--generalization", action="store_true",
                   help="also train one decoder per offset (1-TR windows) and test each at every offset (~10 min)")
    p.add_argument("--bids", action="store_true",
                   help="the synthetic data as a BIDS dataset, read through the BIDS data source (docs/bids.md)")
    p.add_argument("--tr", type=float, default=None, metavar="SECONDS",
                   help="--bids: seconds per volume (default 2; 1.3333 is NSD's)")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.tr is not None and not args.bids:
        p.error("--tr is the TR of the BIDS copy: add --bids")
    if args.tr is not None and not 0.5 <= args.tr <= 4:  # also refuses nan
        p.error(f"--tr must be within [0.5, 4] seconds (the synthetic response lasts about 30 s), got {args.tr}")
    setup_logging(args.verbose)
    logging.getLogger("exca").setLevel(logging.ERROR)
    from dynadiff.demo import FAST, DemoSettings, comparison_table, generalization_lines, run_demo, timecourse_lines

    try:
        report = run_demo(args.output, FAST if args.fast else DemoSettings(), generalization=args.generalization,
                          bids_tr=(args.tr or 2.0) if args.bids else None)
    except FileExistsError as e:
        logger.error("%s", e)
        return 1
    except KeyboardInterrupt:
        logger.error("interrupted: %s is incomplete; run the same command again (the demo starts over in it)",
                     args.output)
        return 130
    print()
    print(comparison_table(report))
    times = report["times_s"]
    print("Time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"Training run (log.csv, samples/, checkpoints/): {report['train_summary']['output_dir']}")
    print(f"Overview (ground truth above reconstruction): {report['overview']}")
    print(timecourse_lines(report))
    if "generalization" in report:
        print(generalization_lines(report))
    print(f"Re-evaluate the trained decoder (e.g. with other --metrics or KEY=VALUE settings):\n  {report['eval_command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
