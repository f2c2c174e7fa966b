"""Decode each trial's image while the scanner is still running, and watch them arrive in a browser.

The command lives in dynadiff/commands/live.py (installed as `dynadiff-live`); `python live.py --help` lists its
options.
"""

import sys

from dynadiff.commands.live import main

if __name__ == "__main__":
    sys.exit(main())
