"""Decode a subject's NSD test images from fMRI windows that slide over time, and show how the image emerges.

The command lives in dynadiff/commands/timecourse.py (installed as `dynadiff-timecourse`); `python timecourse.py --help` lists its
options.
"""

import sys

from dynadiff.commands.timecourse import main

if __name__ == "__main__":
    sys.exit(main())
