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


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_nsd(tmp_path_factory):
    """A prepared synthetic mini-NSD for subject 1, sessions 1 and 21 (read-only: copy it to modify)."""
    from dynadiff.data.stimuli import prepare_stimuli
    from dynadiff.data.synthetic import write_synthetic_nsd

    root = tmp_path_factory.mktemp("mini_nsd")
    info = write_synthetic_nsd(root, subjects=(1,), seed=0)
    prepare_stimuli(root, images="all", subjects=(1,), workers=1)
    return root, info
