"""Which weight file each metric reads, where it comes from, whether it is there, how to get it.

The one catalogue of the metric networks' files: ``python -m dynadiff.metrics
weights`` lists what is present and missing from it, and ``prepare_weights.py``
fetches from it (:func:`remote_files`: each file's URL and destination).
Cheap to import (no torch). Loading lives with each network
(:mod:`dynadiff.metrics.features`, :mod:`dynadiff.metrics.dreamsim`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import re
from pathlib import Path

from dynadiff.metrics.config import METRIC_NAMES, MetricsWeightsConfig

TORCHVISION_URL = "https://download.pytorch.org/models/"
# Official torchvision file names (IMAGENET1K_V1 weights); the part after the
# last "-" is the prefix of the file's SHA-256.
TORCHVISION_FILES: dict[str, str] = {
    "alexnet": "alexnet-owt-7be5be79.pth",
    "inception": "inception_v3_google-0cc3c7bd.pth",
    "effnet": "efficientnet_b1_rwightman-bac287d4.pth",  # V1, not the V2 default
}
TORCHVISION_WEIGHTS_ENUM: dict[str, str] = {
    "alexnet": "AlexNet_Weights.IMAGENET1K_V1",
    "inception": "Inception_V3_Weights.IMAGENET1K_V1",
    "effnet": "EfficientNet_B1_Weights.IMAGENET1K_V1",
}
SWAV_URL = "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar"
CLIP_REPO = "openai/clip-vit-large-patch14"
CLIP_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
CLIP_FETCH_FILES = ("config.json", "model.safetensors")  # what prepare_weights.py takes from CLIP_REPO (not the text/TF/Flax files)
# What dreamsim(pretrained=True, cache_dir=...) leaves in its cache for the
# default "ensemble" model: its own files (the release zip, unpacked as is), and
# the torch.hub copy of the DINO repository and weights (it calls
# torch.hub.set_dir(cache_dir), then torch.hub.load("facebookresearch/dino:main",
# "dino_vitb16"), whose hubconf downloads DINO_WEIGHTS_URL into checkpoints/).
DREAMSIM_URL = "https://github.com/ssundaram21/dreamsim/releases/download/v0.2.0-checkpoints/dreamsim_ensemble_checkpoint.zip"
DREAMSIM_ARCHIVE_FILES = (
    "ensemble_lora/adapter_config.json",
    "ensemble_lora/adapter_model.safetensors|ensemble_lora/adapter_model.bin",  # either
    "dino_vitb16_pretrain.pth",
    "clip_vitb16_pretrain.pth.tar",
    "open_clip_vitb16_pretrain.pth.tar",
)
DINO_REPO_URL = "https://github.com/facebookresearch/dino/zipball/main"  # torch.hub's archive of facebookresearch/dino:main
DINO_REPO_DIR = "facebookresearch_dino_main"  # the folder torch.hub unpacks it to
DINO_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
DINO_WEIGHTS_FILE = "checkpoints/dino_vitbase16_pretrain.pth"
DREAMSIM_FILES = (*DREAMSIM_ARCHIVE_FILES, f"{DINO_REPO_DIR}/hubconf.py", DINO_WEIGHTS_FILE)
DREAMSIM_PACKAGE = "dreamsim==0.2.1"

# Network (weight source) of each metric; pixel metrics need none.
SOURCE_OF_METRIC: dict[str, str | None] = {
    "pixcorr": None,
    "ssim": None,
    "alexnet2": "alexnet",
    "alexnet5": "alexnet",
    "inception": "inception",
    "clip": "clip",
    "effnet": "effnet",
    "swav": "swav",
    "dreamsim": "dreamsim",
}
if set(SOURCE_OF_METRIC) != set(METRIC_NAMES):
    raise RuntimeError("SOURCE_OF_METRIC must list every metric")


class WeightsError(RuntimeError):
    """Base class of the metric-weight errors."""


class MissingWeightsError(WeightsError, FileNotFoundError):
    """A requested metric's weights are not on disk (the message says where they were looked for and how to get them)."""


class InvalidWeightsError(WeightsError, ValueError):
    """Weights are on disk but are not the expected ones (hash, architecture or keys differ)."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
    """One download that puts (part of) a metric network's weights where the metric code reads them.

    ``archive``: ``""`` a file saved as ``dest``; ``"zip"`` a zip whose members are unpacked into the folder
    ``dest`` as they are; ``"repo-zip"`` a GitHub archive whose single top folder becomes the folder ``dest``.
    ``provides``: for an archive, the files it puts under ``dest`` (relative; ``"a|b"``: either), which tell
    whether it is in place. ``sha256_prefix``: the start of the file's SHA-256 where published (torchvision's
    file names carry it).
    """

    source: str  # "alexnet", "inception", "effnet", "swav", "dreamsim"
    url: str
    dest: Path
    sha256_prefix: str = ""
    archive: str = ""
    provides: tuple[str, ...] = ()


def remote_files(source: str, config: MetricsWeightsConfig | None = None) -> list[RemoteFile]:
    """The plain-URL downloads of a weight source, to the paths :func:`source_status` looks at.

    CLIP comes from the Hugging Face Hub instead (:data:`CLIP_REPO`, :data:`CLIP_FETCH_FILES` into
    ``config.resolved_clip_path()``): it has no entry here.
    """
    config = config or MetricsWeightsConfig()
    if source in TORCHVISION_FILES:
        name = TORCHVISION_FILES[source]
        prefix = re.search(r"-([a-f0-9]+)\.", name).group(1)
        return [RemoteFile(source, TORCHVISION_URL + name, config.checkpoints_dir() / name, sha256_prefix=prefix)]
    if source == "swav":
        return [RemoteFile(source, SWAV_URL, config.resolved_swav_path())]
    if source == "dreamsim":
        cache = config.resolved_dreamsim_cache()
        return [
            RemoteFile(source, DREAMSIM_URL, cache, archive="zip", provides=DREAMSIM_ARCHIVE_FILES),
            RemoteFile(source, DINO_REPO_URL, cache / DINO_REPO_DIR, archive="repo-zip", provides=("hubconf.py",)),
            RemoteFile(source, DINO_WEIGHTS_URL, cache / DINO_WEIGHTS_FILE),
        ]
    if source == "clip":
        return []
    raise ValueError(f"unknown weight source {source!r}: expected one of {sorted(set(filter(None, SOURCE_OF_METRIC.values())))}")


def prepare_command(config: MetricsWeightsConfig | None = None) -> str:
    """The ``prepare_weights.py`` command that fetches the metric weights to the places ``config`` names."""
    config = config or MetricsWeightsConfig()
    flags = {"torch_home": "--torch-home", "weights_dir": "--weights-dir", "swav_path": "--swav-path",
             "clip_path": "--clip-path", "dreamsim_cache": "--dreamsim-cache"}
    given = "".join(f" {flag} {getattr(config, field)}" for field, flag in flags.items() if getattr(config, field) is not None)
    return f"python prepare_weights.py --only metrics{given}"


@dataclasses.dataclass(frozen=True)
class WeightStatus:
    source: str  # "alexnet", "inception", "effnet", "swav", "clip", "dreamsim"
    path: Path  # the file or folder looked for
    present: bool
    problem: str  # what is missing ("" when present)
    how_to_get: str

    def line(self) -> str:
        """One-line explanation for a missing source."""
        return f"{self.problem}; to get it: {self.how_to_get}"


def source_status(source: str, config: MetricsWeightsConfig | None = None) -> WeightStatus:
    """Look for one weight source's files (existence only: no hashing, no loading)."""
    config = config or MetricsWeightsConfig()
    if source in TORCHVISION_FILES:
        name = TORCHVISION_FILES[source]
        path = (config.checkpoints_dir() / name).absolute()
        how = (
            f"on a machine with internet, run `TORCH_HOME={config.resolved_torch_home()} python -c "
            f"\"import torchvision; torchvision.models.get_weight('{TORCHVISION_WEIGHTS_ENUM[source]}').get_state_dict()\"`, "
            f"or download {TORCHVISION_URL}{name} into {path.parent}; or `{prepare_command(config)}`"
        )
        return _file_status(source, path, how)
    if source == "swav":
        path = config.resolved_swav_path().absolute()
        how = f"download {SWAV_URL} (the facebookresearch/swav hub model's weights) to {path}, or `{prepare_command(config)}`"
        return _file_status(source, path, how)
    if source == "clip":
        path = config.resolved_clip_path().absolute()
        how = (f"`hf download {CLIP_REPO} {' '.join(CLIP_FETCH_FILES)} --local-dir {path}` on a machine with internet, "
               f"then copy the folder; or `{prepare_command(config)}`")
        if not (path / "config.json").is_file():
            return WeightStatus(source, path, False, f"no CLIP ViT-L/14 config at {path / 'config.json'}", how)
        if not any((path / f).is_file() for f in CLIP_WEIGHT_FILES):
            return WeightStatus(source, path, False, f"no CLIP weights in {path} (looked for {', '.join(CLIP_WEIGHT_FILES)})", how)
        return WeightStatus(source, path, True, "", how)
    if source == "dreamsim":
        path = config.resolved_dreamsim_cache().absolute()
        how = (
            f"`pip install {DREAMSIM_PACKAGE}`, then on a machine with internet run `python -c \"from dreamsim import dreamsim; "
            f"dreamsim(pretrained=True, device='cpu', cache_dir='{path}')\"` and copy the folder; or `{prepare_command(config)}`"
        )
        if importlib.util.find_spec("dreamsim") is None:
            return WeightStatus(source, path, False, "the dreamsim package is not installed", how)
        missing = [f.replace("|", " or ") for f in DREAMSIM_FILES if not any((path / alt).is_file() for alt in f.split("|"))]
        if missing:
            return WeightStatus(source, path, False, f"DreamSim cache {path} lacks {', '.join(missing)}", how)
        return WeightStatus(source, path, True, "", how)
    raise ValueError(f"unknown weight source {source!r}: expected one of {sorted(set(filter(None, SOURCE_OF_METRIC.values())))}")


def metric_status(metric: str, config: MetricsWeightsConfig | None = None) -> WeightStatus | None:
    """The weight status of a metric's network, ``None`` for metrics that need no weights."""
    if metric not in SOURCE_OF_METRIC:
        raise ValueError(f"unknown metric {metric!r}: expected one of {list(METRIC_NAMES)}")
    source = SOURCE_OF_METRIC[metric]
    return None if source is None else source_status(source, config)


def require(source: str, config: MetricsWeightsConfig | None = None) -> WeightStatus:
    """The status of ``source``, or :class:`MissingWeightsError` if absent."""
    status = source_status(source, config)
    if not status.present:
        raise MissingWeightsError(f"{source}: {status.line()}")
    return status


def verify_torchvision_hash(path: Path) -> None:
    """Check a torchvision file against the SHA-256 prefix in its name (what torchvision itself checks)."""
    path = Path(path)
    match = re.search(r"-([a-f0-9]+)\.", path.name)
    if match is None:
        return
    stat = path.stat()
    digest = _sha256(str(path.absolute()), stat.st_size, stat.st_mtime_ns)
    if not digest.startswith(match.group(1)):
        raise InvalidWeightsError(
            f"{path} is not torchvision's published file: its SHA-256 starts with {digest[:8]}, "
            f"the name says {match.group(1)}; download it again, or set weights.verify=False to use it anyway"
        )


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_status(source: str, path: Path, how: str) -> WeightStatus:
    if path.is_file():
        return WeightStatus(source, path, True, "", how)
    return WeightStatus(source, path, False, f"no file {path}", how)
