"""Every weight file of a group, as a URL, a destination and what the file must be.

Groups: ``checkpoints`` (the published Dynadiff checkpoints), ``vd``
(Versatile Diffusion's image UNet, VAE, scheduler), ``metrics`` (the metric
networks, from :mod:`dynadiff.metrics.weights`, the one catalogue of their
files) and ``segmenter`` (Mask2Former, for the in-environment mIoU,
:mod:`dynadiff.segmenters.mask2former`). A Hub group is planned from a
listing of its repository (names, sizes, hashes): fresh from the Hub, or the
one recorded when it was fetched (see :class:`Manifest`), which is what
``--verify`` uses, offline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import re
from pathlib import Path

from dynadiff.fetch import hub
from dynadiff.fetch.config import WeightsFetchConfig
from dynadiff.fetch.http import Expected, FetchError, human
from dynadiff.files import write_text
from dynadiff.metrics import weights as W
from dynadiff.segmenters import mask2former as M2F

logger = logging.getLogger(__name__)

MANIFEST = ".dynadiff-weights.json"
METRIC_SOURCES = ("alexnet", "inception", "effnet", "swav", "clip", "dreamsim")
# Files of a VD subfolder never fetched: other formats and half-precision copies of the same weights.
_VD_SKIP = re.compile(r"(\.fp16\.|\.msgpack$|\.onnx|\.h5$|\.ckpt$|\.ot$)")


@dataclasses.dataclass(frozen=True)
class Item:
    """One download: ``url`` to ``dest`` (an archive: unpacked into the folder ``dest``)."""

    group: str  # "checkpoints", "vd", "metrics", "segmenter"
    label: str  # how logs name it
    url: str
    dest: Path
    root: Path  # folder of the manifest that records it
    expected: Expected = dataclasses.field(default_factory=Expected)
    hub_repo: str | None = None  # a Hub file: sent with the token, errors explained for this repository
    archive: str = ""  # "", "zip", "repo-zip" (dynadiff.metrics.weights.RemoteFile)
    provides: tuple[str, ...] = ()
    setting: str = ""  # the setting its URL comes through (mirrors.X = ...), for error messages

    @property
    def download_path(self) -> Path:
        """Where the downloaded file lies: ``dest``, or for an archive the zip beside/inside its folder."""
        if self.archive == "zip":
            return self.dest / posixpath.basename(self.url)
        if self.archive == "repo-zip":
            return self.dest.with_name(self.dest.name + ".zip")
        return self.dest

    @property
    def rel(self) -> str:
        return os.path.relpath(self.download_path, self.root).replace(os.sep, "/")

    def missing_provides(self) -> list[str]:
        return [p.replace("|", " or ") for p in self.provides
                if not any((self.dest / alt).is_file() for alt in p.split("|"))]


@dataclasses.dataclass
class Plan:
    """What a group fetches; ``errors`` (one line each) when it could not be planned, whole or in part."""

    group: str
    items: list[Item] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    listings: list[tuple[Path, hub.HubListing]] = dataclasses.field(default_factory=list)  # (manifest root, listing)
    unlisted: list[tuple[str, str, Path]] = dataclasses.field(default_factory=list)  # (what, URL pattern, dest): no listing


# ----------------------------------------------------------------------------- manifest


class Manifest:
    """``{root}/.dynadiff-weights.json``: the Hub listings a folder was fetched from, and per file what it was
    when last checked (size, modification time, hashes), so that a rerun hashes only files that changed."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / MANIFEST
        self.listings: dict[str, dict] = {}
        self.files: dict[str, dict] = {}
        try:
            data = json.loads(self.path.read_text())
            self.listings = dict(data.get("listings", {}))
            self.files = dict(data.get("files", {}))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError, TypeError) as e:
            logger.warning("ignoring unreadable %s (%s): files will be checked again", self.path, e)
        self._dirty = False

    def listing(self, repo: str, revision: str | None = None) -> hub.HubListing | None:
        data = self.listings.get(repo)
        if data is None or (revision is not None and revision not in (data.get("revision"), data.get("commit"))):
            return None
        try:
            return hub.HubListing.from_json(data)
        except (KeyError, TypeError, ValueError):
            return None

    def set_listing(self, listing: hub.HubListing) -> None:
        self.listings[listing.repo] = listing.to_json()
        self._dirty = True

    def known(self, item: Item) -> dict | None:
        """What was recorded of the item's file, if it is still the same file (size and mtime) and agrees with
        what the item expects."""
        entry = self.files.get(item.rel)
        path = item.download_path
        try:
            st = path.stat()
        except OSError:
            return None
        if not isinstance(entry, dict) or entry.get("stamp") != [st.st_size, st.st_mtime_ns]:
            return None
        digests = {k: entry[k] for k in ("sha256", "git_sha1") if isinstance(entry.get(k), str)}
        if not set(item.expected.hash_kinds()) <= set(digests):
            return None
        return entry if not item.expected.check(path, digests) else None

    def recorded(self, item: Item) -> dict | None:
        """The entry of the item's file, whatever the file is now."""
        entry = self.files.get(item.rel)
        return entry if isinstance(entry, dict) else None

    def record(self, item: Item, digests: dict[str, str]) -> None:
        st = item.download_path.stat()
        self.files[item.rel] = {"url": item.url, "size": st.st_size, "stamp": [st.st_size, st.st_mtime_ns], **digests}
        self._dirty = True

    def forget(self, item: Item) -> None:
        if self.files.pop(item.rel, None) is not None:
            self._dirty = True

    def save(self) -> None:
        """Atomic write; a failure only costs hashing the files again next time."""
        if not self._dirty:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            data = {"listings": self.listings, "files": self.files}
            write_text(self.path, json.dumps(data, indent=1, sort_keys=True))
            self._dirty = False
        except OSError as e:
            logger.warning("cannot save %s (%s): complete files will be hashed again next time", self.path, e)


# ----------------------------------------------------------------------------- listings


def get_listing(repo: str, revision: str, root: Path, *, online: bool, config_key: str, retries: int,
                backoff: float) -> hub.HubListing | None:
    """The listing of ``repo`` at ``revision``: the one recorded under ``root`` when ``revision`` is a commit
    hash it was listed at (no request), else from the Hub when ``online``, else the recorded one (any
    revision, offline) or None. Raises :class:`FetchError` when the Hub cannot be listed."""
    recorded = Manifest(root).listing(repo)
    if recorded is not None and hub.is_commit(revision) and recorded.commit == revision:
        return recorded
    if online:
        return hub.list_repo(repo, revision, config_key=config_key, retries=retries, backoff=backoff)
    if recorded is not None and revision in (recorded.revision, recorded.commit):
        return recorded
    return None


def _hub_item(group: str, listing: hub.HubListing, path: str, dest: Path, root: Path) -> Item:
    f = listing.files[path]
    _check_inside(dest, root, f"{listing.repo} file {path!r}")
    return Item(group, os.path.relpath(dest, root.parent) if group != "metrics" else f"clip/{path}",
                hub.file_url(listing.repo, listing.commit, path), dest, root,
                Expected(size=f.size, sha256=f.sha256, git_sha1=f.git_sha1), hub_repo=listing.repo)


def _check_inside(dest: Path, root: Path, what: str) -> None:
    base = os.path.normpath(os.path.abspath(root))
    target = os.path.normpath(os.path.abspath(dest))
    if os.path.commonpath([base, target]) != base or target == base:
        raise FetchError(f"refusing {what}: its local path {dest} would lie outside {root}")


# ----------------------------------------------------------------------------- groups


def plan_checkpoints(cfg: WeightsFetchConfig, listing: hub.HubListing | None) -> Plan:
    """Each subject's folder, ``subj0N/`` or ``sub0N/`` in the repository (the original code reads the
    latter, its README names the former), into ``{dir}/subj0N`` where eval.py reads it."""
    src = cfg.checkpoints
    plan = Plan("checkpoints")
    if listing is None:
        for s in src.subjects:
            pattern = f"{hub.endpoint()}/{src.repo}/resolve/{src.revision}/subj{s:02d}/* (or sub{s:02d}/*)"
            plan.unlisted.append((f"subject {s}", pattern, src.dir / f"subj{s:02d}"))
        return plan
    plan.listings.append((src.dir, listing))
    for s in src.subjects:
        found = [name for name in (f"subj{s:02d}", f"sub{s:02d}") if any(p.startswith(name + "/") for p in listing.files)]
        if not found:
            tops = sorted({p.split("/", 1)[0] + "/" for p in listing.files if "/" in p})
            plan.errors.append(f"{src.repo}@{src.revision} (commit {listing.commit[:12]}) has no folder subj{s:02d}/ "
                               f"or sub{s:02d}/ for subject {s} (its folders: {', '.join(tops) or 'none'}): check "
                               "checkpoints.repo and checkpoints.revision in config/weights.yaml")
            continue
        if len(found) > 1:
            plan.notes.append(f"subject {s}: {src.repo} has both subj{s:02d}/ and sub{s:02d}/: using subj{s:02d}/")
        name = found[0]
        paths = sorted(p for p in listing.files if p.startswith(name + "/"))
        size = sum(listing.files[p].size or 0 for p in paths)
        plan.notes.append(f"subject {s}: folder {name}/ of {src.repo} ({len(paths)} file(s), {human(size)}) -> "
                          f"{src.dir / f'subj{s:02d}'}")
        for p in paths:
            plan.items.append(_hub_item("checkpoints", listing, p, src.dir / f"subj{s:02d}" / p[len(name) + 1:], src.dir))
    return plan


def plan_vd(cfg: WeightsFetchConfig, listing: hub.HubListing | None) -> Plan:
    """``image_unet/``, ``vae/``, ``scheduler/`` (and ``text_unet/`` if asked) of Versatile Diffusion: configs
    and one copy of the weights (safetensors when the repository has them, else .bin; no fp16/Flax/ONNX copies)."""
    src = cfg.versatilediffusion_config
    plan = Plan("vd")
    if listing is None:
        for sub in src.subfolders:
            plan.unlisted.append((sub, f"{hub.endpoint()}/{src.repo}/resolve/{src.revision}/{sub}/*",
                                  src.vd_cache_dir / sub))
        return plan
    plan.listings.append((src.vd_cache_dir, listing))
    for sub in src.subfolders:
        paths = vd_files(listing, sub)
        config = "scheduler_config.json" if sub == "scheduler" else "config.json"
        if f"{sub}/{config}" not in paths:
            plan.errors.append(f"{src.repo}@{src.revision} (commit {listing.commit[:12]}) has no {sub}/{config}: check "
                               "versatilediffusion_config.repo and .revision in config/weights.yaml")
            continue
        for p in paths:
            plan.items.append(_hub_item("vd", listing, p, src.vd_cache_dir / p, src.vd_cache_dir))
    return plan


def vd_files(listing: hub.HubListing, subfolder: str) -> list[str]:
    """The files of ``subfolder`` that diffusers' ``from_pretrained`` reads (one format of the weights)."""
    paths = sorted(p for p in listing.files if p.startswith(subfolder + "/") and not _VD_SKIP.search(p))
    if any(p.endswith(".safetensors") for p in paths):  # diffusers prefers them: the .bin copies are not read
        paths = [p for p in paths if not p.endswith((".bin", ".bin.index.json"))]
    return paths


def plan_metrics(cfg: WeightsFetchConfig, clip_listing: hub.HubListing | None, clip_error: str = "") -> Plan:
    """Every metric network's files, to the paths the metric code reads (MetricsWeightsConfig, TORCH_HOME,
    DYNADIFF_WEIGHTS), from :func:`dynadiff.metrics.weights.remote_files` and :data:`~.CLIP_REPO`."""
    weights = cfg.metrics_weights
    plan = Plan("metrics")
    for source in METRIC_SOURCES:
        if source == "clip":
            _plan_clip(cfg, clip_listing, clip_error, plan)
            continue
        for rf in W.remote_files(source, weights):
            url = cfg.mirrors.apply(rf.url)
            # manifest: beside the file (torch's hub/checkpoints, SwAV's folder), or in the DreamSim cache
            root = weights.resolved_dreamsim_cache() if source == "dreamsim" else rf.dest.parent
            name = rf.dest.name if rf.archive == "repo-zip" else posixpath.basename(rf.url)
            plan.items.append(Item("metrics", f"{source}: {name}", url, rf.dest, root,
                                   Expected(sha256_prefix=rf.sha256_prefix or None), archive=rf.archive,
                                   provides=rf.provides, setting=cfg.mirrors.setting_of(url)))
    return plan


def _plan_clip(cfg: WeightsFetchConfig, listing: hub.HubListing | None, error: str, plan: Plan) -> None:
    folder = cfg.metrics_weights.resolved_clip_path()
    revision = cfg.metrics.clip_revision
    if error:
        plan.errors.append(error)
    if listing is None:
        for name in W.CLIP_FETCH_FILES:
            plan.unlisted.append((f"clip {name}", f"{hub.endpoint()}/{W.CLIP_REPO}/resolve/{revision}/{name}", folder / name))
        return
    plan.listings.append((folder, listing))
    wanted = list(W.CLIP_FETCH_FILES)
    if "model.safetensors" not in listing.files:  # an older revision: the PyTorch pickle instead
        wanted = ["config.json"] + [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json") if f in listing.files]
    missing = [f for f in wanted if f not in listing.files]
    if missing or len(wanted) < 2:
        plan.errors.append(f"{W.CLIP_REPO}@{revision} (commit {listing.commit[:12]}) lacks "
                           f"{', '.join(missing) or 'weights'}: check metrics.clip_revision in config/weights.yaml")
        return
    for name in wanted:
        plan.items.append(_hub_item("metrics", listing, name, folder / name, folder))


def plan_segmenter(cfg: WeightsFetchConfig, listing: hub.HubListing | None) -> Plan:
    """Mask2Former's ``config.json``, ``preprocessor_config.json`` and one copy of its weights (``model.safetensors``
    where the repository has it, else ``pytorch_model.bin``; no TF/Flax copies) into the folder the segmenter
    reads (``segmenter.path``, by default ``{metrics_weights.weights_dir}/mask2former-swin-large-coco-panoptic``)."""
    src = cfg.segmenter
    folder = src.resolved_path(cfg.metrics_weights)
    plan = Plan("segmenter")
    if listing is None:
        base = f"{hub.endpoint()}/{src.repo}/resolve/{src.revision}"
        for name in M2F.CONFIG_FILES:
            plan.unlisted.append((name, f"{base}/{name}", folder / name))
        weights = M2F.WEIGHT_FILES
        plan.unlisted.append(("weights", f"{base}/{weights[0]} (or {' or '.join(weights[1:])})", folder / weights[0]))
        return plan
    plan.listings.append((folder, listing))
    weights = [name for name in M2F.WEIGHT_FILES if name in listing.files][:1]
    missing = [name for name in M2F.CONFIG_FILES if name not in listing.files]
    if missing or not weights:
        lacks = missing + ([] if weights else [" or ".join(M2F.WEIGHT_FILES)])
        plan.errors.append(f"{src.repo}@{src.revision} (commit {listing.commit[:12]}) lacks {', '.join(lacks)}: check "
                           "segmenter.repo and segmenter.revision in config/weights.yaml")
        return plan
    names = [*M2F.CONFIG_FILES, *weights]
    size = sum(listing.files[name].size or 0 for name in names)
    plan.notes.append(f"{src.repo}: {', '.join(names)} ({human(size)}) -> {folder}")
    for name in names:
        plan.items.append(_hub_item("segmenter", listing, name, folder / name, folder))
    return plan
