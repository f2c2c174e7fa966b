"""What ``prepare_weights.py`` fetches and where it puts it (pydantic only: cheap to import).

Defaults live in ``config/weights.yaml``; its keys reuse eval.py's where they
name the same place (``versatilediffusion_config.vd_cache_dir``,
``metrics_weights.*``), so one ``KEY=VALUE`` works for both commands.
The Hub's endpoint, token and cache come from huggingface_hub's own
environment variables (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``), never from
here.
"""

from __future__ import annotations

import typing as tp
from pathlib import Path

import pydantic

from dynadiff.metrics.config import MetricsWeightsConfig
from dynadiff.segmenters import mask2former

GROUPS = ("checkpoints", "vd", "metrics", "segmenter")  # --only choices, in fetch order
# what a run without --only fetches: what eval.py and train.py need; the segmenter (over 800 MB) serves only the
# optional in-environment mIoU (eval.py's miou.model=mask2former), so it is fetched when asked for (--only segmenter)
DEFAULT_GROUPS = ("checkpoints", "vd", "metrics")
SUBJECTS = (1, 2, 5, 7)  # published checkpoints (dynadiff.data.nsd.SUBJECTS, without importing numpy)
VdSubfolder = tp.Literal["image_unet", "vae", "scheduler", "text_unet"]


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True)


def _check_revision(value: str) -> str:
    if not value or value != value.strip() or any(c in value for c in " \t\n"):
        raise ValueError("a revision is a branch, tag or commit hash, without spaces")
    return value


Revision = tp.Annotated[str, pydantic.AfterValidator(_check_revision)]  # of a Hub repository


class CheckpointsSource(_Strict):
    """The published Dynadiff checkpoints: Hub folders ``subj0N/`` (or ``sub0N/``) into ``{dir}/subj0N``,
    where eval.py looks by default (``dynadiff.evaluation.default_checkpoint``)."""

    repo: str = "facebook/dynadiff"
    revision: Revision = "main"
    dir: Path = Path("./checkpoints")
    subjects: list[int] = list(SUBJECTS)

    @pydantic.field_validator("subjects")
    @classmethod
    def _subjects(cls, value: list[int]) -> list[int]:
        bad = [s for s in value if s not in SUBJECTS]
        if bad or not value:
            raise ValueError(f"published checkpoints exist for subjects {list(SUBJECTS)} only, got {value}")
        return sorted(set(value))


class VdSource(_Strict):
    """Versatile Diffusion's folders that Dynadiff loads, into ``vd_cache_dir`` (eval.py's and train.py's
    ``versatilediffusion_config.vd_cache_dir``); ``text_unet`` only for ``dual_attention``."""

    repo: str = "shi-labs/versatile-diffusion"
    revision: Revision = "main"
    vd_cache_dir: Path = Path("./versatile_diffusion")
    subfolders: list[VdSubfolder] = ["image_unet", "vae", "scheduler"]

    @pydantic.field_validator("subfolders")
    @classmethod
    def _subfolders(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one subfolder")
        return list(dict.fromkeys(value))


class MetricsSource(_Strict):
    clip_revision: Revision = "main"  # of dynadiff.metrics.weights.CLIP_REPO


class SegmenterSource(_Strict):
    """Mask2Former (COCO panoptic) for the in-environment mIoU (:mod:`dynadiff.segmenters.mask2former`):
    ``config.json``, ``preprocessor_config.json`` and one copy of the weights (``model.safetensors``, else
    ``pytorch_model.bin``) into ``path``, by default ``{metrics_weights.weights_dir}/mask2former-swin-large-coco-
    panoptic``, where the segmenter reads them."""

    repo: str = mask2former.REPO
    revision: Revision = "main"
    path: Path | None = None

    def resolved_path(self, weights: MetricsWeightsConfig) -> Path:
        if self.path is not None:
            return Path(self.path).expanduser()
        return weights.resolved_weights_dir() / mask2former.FOLDER_NAME


class Mirrors(_Strict):
    """Base URLs of the plain downloads; each published URL starting with the default is fetched from the
    value instead (a mirror, or a local server in the tests). The Hub's is ``HF_ENDPOINT``."""

    torchvision: str = "https://download.pytorch.org/models/"
    fbaipublicfiles: str = "https://dl.fbaipublicfiles.com/"
    github: str = "https://github.com/"

    @pydantic.field_validator("torchvision", "fbaipublicfiles", "github")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("a base URL starts with http:// or https://")
        return value if value.endswith("/") else value + "/"

    def apply(self, url: str) -> str:
        """``url`` with its published base replaced by this mirror's."""
        for name, field in type(self).model_fields.items():
            if url.startswith(field.default):
                return getattr(self, name) + url[len(field.default):]
        return url

    def setting_of(self, url: str) -> str:
        """``mirrors.NAME = value`` for the setting that ``url`` (published or mirrored) comes through."""
        for name, field in type(self).model_fields.items():
            if url.startswith((field.default, getattr(self, name))):
                return f"mirrors.{name} = {getattr(self, name)}"
        return "its URL"


class WeightsFetchConfig(_Strict):
    checkpoints: CheckpointsSource = CheckpointsSource()
    versatilediffusion_config: VdSource = VdSource()
    metrics: MetricsSource = MetricsSource()
    metrics_weights: MetricsWeightsConfig = MetricsWeightsConfig()
    segmenter: SegmenterSource = SegmenterSource()
    mirrors: Mirrors = Mirrors()
