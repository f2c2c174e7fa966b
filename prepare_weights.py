"""Download every weight file eval.py and train.py read, into the places they read them from.

The command lives in dynadiff/commands/prepare_weights.py (installed as `dynadiff-prepare-weights`); `python prepare_weights.py --help` lists its
options.
"""

import sys

from dynadiff.commands.prepare_weights import main

if __name__ == "__main__":
    sys.exit(main())
