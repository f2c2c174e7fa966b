"""Fetching the weights eval.py and train.py read (``prepare_weights.py``): what, from where, to where.

- :mod:`~dynadiff.fetch.config`: the settings (``config/weights.yaml``), cheap to import;
- :mod:`~dynadiff.fetch.http`: one URL to one file, resumable (HTTP Range), atomic (``.part`` then rename),
  retried, checked (size, SHA-256, git blob hash);
- :mod:`~dynadiff.fetch.hub`: a Hugging Face repository's files at a revision, through huggingface_hub
  (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME`` apply);
- :mod:`~dynadiff.fetch.plan`: every file of a group (checkpoints, Versatile Diffusion, metric networks, the mIoU
  segmenter) as a URL, a destination and what it must be; the manifest of what was fetched;
- :mod:`~dynadiff.fetch.archive`: unpacking DreamSim's and DINO's zip archives;
- :mod:`~dynadiff.fetch.run`: fetch, verify (offline), list (to fetch on another machine).

A package rather than one module: the downloader knows nothing of weights, the planner nothing of HTTP,
and each is tested on its own.
"""

from dynadiff.fetch.config import DEFAULT_GROUPS, GROUPS, WeightsFetchConfig
from dynadiff.fetch.http import FetchError

__all__ = ["DEFAULT_GROUPS", "GROUPS", "FetchError", "WeightsFetchConfig"]
