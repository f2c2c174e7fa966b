"""Train a Dynadiff decoder (brain module + UNet LoRA) on NSD.

The command lives in dynadiff/commands/train.py (installed as `dynadiff-train`); `python train.py --help` lists its
options.
"""

import sys

from dynadiff.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
