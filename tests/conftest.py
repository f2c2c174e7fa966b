"""Session-wide test set-up: no network beyond localhost, offline libraries."""

import os
import sys
from pathlib import Path

_GUARD_DIR = Path(__file__).parent / "netguard"
sys.path.insert(0, str(_GUARD_DIR))
import netguard  # noqa: E402

netguard.install()
# Subprocesses started by tests inherit the guard through sitecustomize.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(_GUARD_DIR), str(Path(__file__).parents[1])] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("TQDM_DISABLE", "1")
