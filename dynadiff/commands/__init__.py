"""The commands, one module each, with a ``main(argv=None) -> int`` (exit status).

Installed as ``dynadiff-eval``, ``dynadiff-train``, ... (``[project.scripts]`` in pyproject.toml); the scripts at
the repository's root (``python eval.py --subject 1``, the original's commands) call the same ``main``.
"""

from importlib import resources
from pathlib import Path


def default_config(name: str) -> Path:
    """The path of a packaged default configuration (``config.yaml``, ``train.yaml``, ``weights.yaml``)."""
    return Path(str(resources.files("dynadiff") / "defaults" / name))
