"""The entry-point scripts (eval.py, train.py, prepare_data.py, demo.py) imported as modules, for the tests.

``tests/`` is on ``sys.path`` (pytest puts the folder of the root conftest.py there): ``from scripts import
load_script`` works from every test folder.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str) -> types.ModuleType:
    """``{REPO}/{name}.py``, freshly executed as the module ``{name}_script`` (in ``sys.modules``, which the
    scripts' dataclasses need)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
