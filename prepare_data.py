"""Download and prepare the NSD data Dynadiff needs (docs/behaviour.md §1).

The command lives in dynadiff/commands/prepare_data.py (installed as `dynadiff-prepare-data`); `python prepare_data.py --help` lists its
options.
"""

import sys

from dynadiff.commands.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
