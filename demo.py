"""The demo: train and evaluate a tiny Dynadiff on a synthetic mini-NSD, on a CPU, in minutes.

The command lives in dynadiff/commands/demo.py (installed as `dynadiff-demo`); `python demo.py --help` lists its
options.
"""

import sys

from dynadiff.commands.demo import main

if __name__ == "__main__":
    sys.exit(main())
