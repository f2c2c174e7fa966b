"""Reconstruct a subject's NSD test images with Dynadiff and measure them.

The command lives in dynadiff/commands/eval.py (installed as `dynadiff-eval`); `python eval.py --help` lists its
options.
"""

import sys

from dynadiff.commands.eval import main

if __name__ == "__main__":
    sys.exit(main())
