"""The three things ``prepare_weights.py`` does with the plans: fetch, verify (offline), list (for another machine)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

from dynadiff.fetch import hub
from dynadiff.fetch.archive import unpack
from dynadiff.fetch.config import WeightsFetchConfig
from dynadiff.fetch.http import FetchError, download, file_digests, head_size, human, part_path
from dynadiff.fetch.plan import (
    Item,
    Manifest,
    Plan,
    get_listing,
    plan_checkpoints,
    plan_metrics,
    plan_segmenter,
    plan_vd,
)
from dynadiff.metrics import weights as W
from dynadiff.segmenters import mask2former as M2F

logger = logging.getLogger(__name__)


def make_plans(cfg: WeightsFetchConfig, groups: list[str], *, online: bool, retries: int = 5,
               backoff: float = 1.0) -> list[Plan]:
    """The plan of each group. A Hub repository that cannot be listed is one line in the plan's ``errors`` (its
    files are then listed as URL patterns, ``Plan.unlisted``)."""

    unreachable = False  # the Hub could not be reached: one attempt for the other repositories

    def listing(repo, revision, root, key):
        nonlocal unreachable
        try:
            return get_listing(repo, revision, root, online=online, config_key=key,
                               retries=0 if unreachable else retries, backoff=backoff), ""
        except FetchError as e:
            unreachable |= e.unreachable
            return None, str(e)

    plans = []
    for group in groups:
        if group == "checkpoints":
            src = cfg.checkpoints
            found, error = listing(src.repo, src.revision, src.dir, "checkpoints.revision")
            plan = plan_checkpoints(cfg, found)
        elif group == "vd":
            src = cfg.versatilediffusion_config
            found, error = listing(src.repo, src.revision, src.vd_cache_dir, "versatilediffusion_config.revision")
            plan = plan_vd(cfg, found)
        elif group == "metrics":
            found, error = listing(W.CLIP_REPO, cfg.metrics.clip_revision, cfg.metrics_weights.resolved_clip_path(),
                                   "metrics.clip_revision")
            plan = plan_metrics(cfg, found, error)
            error = ""  # already in the plan, beside the other networks' files
        elif group == "segmenter":
            src = cfg.segmenter
            found, error = listing(src.repo, src.revision, src.resolved_path(cfg.metrics_weights), "segmenter.revision")
            plan = plan_segmenter(cfg, found)
        else:
            raise ValueError(f"unknown group {group!r}")
        if error:
            plan.errors.insert(0, error)
        plans.append(plan)
    return plans


# ----------------------------------------------------------------------------- fetch


@dataclasses.dataclass
class Summary:
    downloaded: int = 0
    bytes_fetched: int = 0
    present: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        return (f"downloaded {self.downloaded} file(s) ({human(self.bytes_fetched)}), {self.present} already "
                f"present and valid" + (f", {len(self.failed)} failed" if self.failed else ""))


def fetch(plans: list[Plan], *, retries: int = 5, backoff: float = 1.0, progress: bool = True) -> Summary:
    """Fetch every item that is missing or not the expected file; each failure is logged (one line) and kept in
    ``Summary.failed``, the other files are still fetched."""
    summary = Summary()
    manifests: dict[Path, Manifest] = {}
    unreachable: set[str] = set()  # hosts that could not be reached: one attempt each for their other files

    def manifest(root: Path) -> Manifest:
        key = Path(os.path.abspath(root))
        if key not in manifests:
            manifests[key] = Manifest(root)
        return manifests[key]

    unwritable: dict[Path, str] = {}  # root folder -> why it cannot be written: its items are not attempted

    for plan in plans:
        for note in plan.notes:
            logger.info("%s: %s", plan.group, note)
        for error in plan.errors:
            logger.error("%s", error)
            summary.failed.append(error)
        for folder in dict.fromkeys(item.root for item in plan.items):
            problem = _cannot_write(folder)
            if problem:
                unwritable[folder] = problem
                error = (f"{plan.group}: cannot write into {folder} ({problem}): choose another folder "
                         f"({_FOLDER_OPTION[plan.group]})")
                logger.error("%s", error)
                summary.failed.append(error)
        for root, listing in plan.listings:  # recorded first: --verify knows what to expect even if interrupted
            manifest(root).set_listing(listing)
            manifest(root).save()
            if not hub.is_commit(listing.revision):
                logger.info("%s: %s revision %s is commit %s (to fetch the same files everywhere, pin it in "
                            "config/weights.yaml)", plan.group, listing.repo, listing.revision, listing.commit)
        for item in plan.items:
            if item.root in unwritable:
                continue  # said once above
            m = manifest(item.root)
            host = urlsplit(item.url).netloc
            try:
                _fetch_item(item, m, summary, retries=0 if host in unreachable else retries, backoff=backoff,
                            progress=progress)
            except FetchError as e:
                logger.error("%s", e)
                summary.failed.append(str(e))
                if e.unreachable:
                    unreachable.add(host)
            finally:
                m.save()
    return summary


_FOLDER_OPTION = {"checkpoints": "--checkpoints-dir", "vd": "--vd_cache_dir",
                  "metrics": "--torch-home, --weights-dir, or the metrics_weights.* settings",
                  "segmenter": "--weights-dir, or segmenter.path=DIR"}


def _cannot_write(folder: Path) -> str:
    """Why files cannot be created in ``folder`` (created if missing), '' if they can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return e.strerror or str(e)
    if not os.access(folder, os.W_OK | os.X_OK):
        return "no write permission"
    return ""


def _fetch_item(item: Item, manifest: Manifest, summary: Summary, *, retries: int, backoff: float,
                progress: bool) -> None:
    if item.archive:
        if not item.missing_provides():
            summary.present += 1
            return
        archive = item.download_path
        if not archive.is_file():
            logger.info("%s: downloading %s", item.label, item.url)
            got = download(item.url, archive, label=item.label, expected=item.expected, hint=_hint(item),
                           retries=retries, backoff=backoff, progress=progress, setting=item.setting)
            summary.bytes_fetched += got.bytes_fetched
        logger.info("%s: unpacking %s into %s", item.label, archive.name, item.dest)
        unpack(archive, item.dest, item.archive, item.label)
        missing = item.missing_provides()
        if missing:
            raise FetchError(f"{item.label}: the archive from {item.url} lacks {', '.join(missing)}: check "
                             f"{item.setting or 'its URL'}")
        summary.downloaded += 1
        return
    problem = check_present(item, manifest)
    if problem == "ok":
        summary.present += 1
        return
    if problem:
        logger.warning("%s: %s is not the expected file (%s): downloading it again (it is replaced once the new "
                       "copy is complete)", item.label, item.dest, problem)
    resume = part_path(item.dest)
    if resume.is_file() and resume.stat().st_size:
        logger.info("%s: resuming %s from byte %d", item.label, item.url, resume.stat().st_size)
    else:
        logger.info("%s: downloading %s (%s)", item.label, item.url, human(item.expected.size))
    got = download(item.url, item.dest, label=item.label, expected=item.expected,
                   headers=hub.auth_headers() if item.hub_repo else None, hint=_hint(item), retries=retries,
                   backoff=backoff, progress=progress,
                   setting=f"HF_ENDPOINT ({hub.endpoint()})" if item.hub_repo else item.setting)
    manifest.record(item, got.digests)
    summary.downloaded += 1
    summary.bytes_fetched += got.bytes_fetched


def check_present(item: Item, manifest: Manifest) -> str | None:
    """``"ok"`` when the item's file is there and is the expected one, ``None`` when absent, else what differs.

    Known size and hashes are checked (hashing only files changed since the manifest recorded them); a file
    with nothing published to check against is compared with what was downloaded before, if anything.
    """
    path = item.dest
    if path.is_dir():
        raise FetchError(f"{item.label}: {path} is a folder, where the file should be: move it away, then run again")
    if not path.is_file():
        return None
    if manifest.known(item) is not None:
        return "ok"
    size = path.stat().st_size
    if item.expected.size is not None and size != item.expected.size:
        return f"its size is {size} bytes, expected {item.expected.size}"
    kinds = ("sha256", "git_sha1") if item.expected.git_sha1 else ("sha256",)
    digests = file_digests(path, kinds)
    problem = item.expected.check(path, digests)
    if problem:
        return problem
    before = manifest.recorded(item)
    if not item.expected.has_hash and before and before.get("sha256") and before["sha256"] != digests["sha256"]:
        return f"it changed since it was downloaded (SHA-256 {digests['sha256'][:12]}..., was {before['sha256'][:12]}...)"
    manifest.record(item, digests)
    return "ok"


def _hint(item: Item):
    if item.hub_repo:
        return lambda status: hub.access_hint(item.hub_repo, status)

    def hint(status: int) -> str:
        if status == 404:
            return f": not found: check {item.setting or 'the URL'}"
        if status in (401, 403):
            return f": access refused: check {item.setting or 'the URL'} (a mirror may need credentials)"
        return ""

    return hint


# ----------------------------------------------------------------------------- verify


@dataclasses.dataclass(frozen=True)
class Check:
    group: str
    state: str  # "ok", "MISSING", "BAD"
    path: Path
    detail: str = ""


def verify(plans: list[Plan]) -> list[Check]:
    """Check what is on disk against the plans (built offline, from the recorded listings): every file present,
    its size and hashes (recomputed) the expected ones."""
    checks = []
    for plan in plans:
        for error in plan.errors:
            checks.append(Check(plan.group, "BAD", Path("-"), error))
        for item in plan.items:
            checks.append(_verify_item(item))
        for what, _pattern, dest in plan.unlisted:
            checks.append(_verify_unlisted(plan.group, what, dest))
    return checks


def _verify_item(item: Item) -> Check:
    if item.archive:
        missing = item.missing_provides()
        if missing:
            return Check(item.group, "MISSING", item.dest, f"lacks {', '.join(missing)}" + _partial(item.download_path))
        return Check(item.group, "ok", item.dest, f"{len(item.provides)} file(s) present")
    path = item.dest
    if not path.is_file():
        return Check(item.group, "MISSING", path, _partial(path).removeprefix("; "))
    kinds = ("sha256", "git_sha1") if item.expected.git_sha1 else ("sha256",)
    digests = file_digests(path, kinds)
    problem = item.expected.check(path, digests)
    if problem:
        return Check(item.group, "BAD", path, problem)
    checked = [name for name, known in (("size", item.expected.size is not None),
                                        ("SHA-256", item.expected.sha256 is not None),
                                        ("SHA-256 prefix", bool(item.expected.sha256_prefix)),
                                        ("git hash", item.expected.git_sha1 is not None)) if known]
    if not item.expected.has_hash:
        before = Manifest(item.root).recorded(item)
        if before and before.get("sha256"):
            if before["sha256"] != digests["sha256"]:
                return Check(item.group, "BAD", path, "it changed since it was downloaded (SHA-256 differs)")
            checked.append("SHA-256 recorded at download")
    return Check(item.group, "ok", path, ", ".join(checked) or "present (nothing published to check it against)")


def _verify_unlisted(group: str, what: str, dest: Path) -> Check:
    """A Hub folder whose listing was never recorded here (fetched by another tool): its layout only."""
    unchecked = "present; sizes and hashes not checked (no recorded Hub listing: run prepare_weights.py once online)"
    if group == "checkpoints":
        files = [p for p in dest.rglob("*") if p.is_file()] if dest.is_dir() else []
        if any(p.name in ("mp_rank_00_model_states.pt", "model.safetensors") or p.suffix == ".safetensors" for p in files):
            return Check(group, "ok", dest, unchecked)
        return Check(group, "MISSING", dest, f"{what}: no checkpoint files")
    if group == "vd":
        config = "scheduler_config.json" if what == "scheduler" else "config.json"
        weights = what == "scheduler" or any(dest.glob("diffusion_pytorch_model*"))
        if (dest / config).is_file() and weights:
            return Check(group, "ok", dest, unchecked)
        return Check(group, "MISSING", dest, f"no {config}" if not (dest / config).is_file() else "no weights file")
    if group == "segmenter" and what == "weights":  # either copy of the weights
        present = [dest.with_name(name) for name in M2F.WEIGHT_FILES if dest.with_name(name).is_file()]
        if present:
            return Check(group, "ok", present[0], unchecked)
        return Check(group, "MISSING", dest, f"no {' or '.join(M2F.WEIGHT_FILES)}")
    if dest.is_file():
        return Check(group, "ok", dest, unchecked)
    return Check(group, "MISSING", dest, what)


def _partial(path: Path) -> str:
    part = part_path(path)
    if part.is_file():
        return f"; {human(part.stat().st_size)} partly downloaded ({part.name}): run prepare_weights.py to resume"
    return ""


# ----------------------------------------------------------------------------- list


def list_lines(plans: list[Plan], *, head: bool = True) -> list[str]:
    """``SIZE<TAB>URL<TAB>DEST`` for every file (SIZE in bytes, or ``unknown``), groups introduced by ``#``
    comments: enough to fetch everything elsewhere (curl, wget, a browser) and copy it into place."""
    lines = ["# size_bytes\turl\tdestination (prepare_weights.py --verify checks them once in place)"]
    for plan in plans:
        lines.append(f"# --- {plan.group}")
        for error in plan.errors:
            lines.append(f"# could not list: {error}")
        repos = {}
        for item in plan.items:
            if item.hub_repo:
                repos.setdefault(item.hub_repo, item)
        repos.update({pattern.split("/resolve/")[0]: None for _, pattern, _ in plan.unlisted if "/resolve/" in pattern})
        for repo in repos:
            lines.append(f"# {repo}: Hugging Face Hub files (a gated or private repository needs the header "
                         "'Authorization: Bearer $HF_TOKEN')")
        for _root, listing in plan.listings:
            lines.append(f"# {listing.repo} revision {listing.revision} = commit {listing.commit}")
        for item in plan.items:
            size = item.expected.size
            if size is None and head:
                size = head_size(item.url, hub.auth_headers() if item.hub_repo else None)
            lines.append(f"{size if size is not None else 'unknown'}\t{item.url}\t{item.download_path}")
            if item.archive:
                lines.append(f"#   a zip archive: once it is there, `python prepare_weights.py --only metrics` "
                             f"unpacks it into {item.dest}")
        for what, pattern, dest in plan.unlisted:
            if "*" in pattern:  # a folder of the repository, its file names unknown here
                lines.append(f"unknown\t{pattern}\t{dest}/")
                lines.append(f"#   {what}: every file under that folder of the repository (not listed: the Hub "
                             "could not be reached)")
            else:
                lines.append(f"unknown\t{pattern}\t{dest}")
        if plan.group == "vd" and plan.items:
            listing = plan.listings[0][1]
            lines.append(f"# or: hf download {listing.repo} --revision {listing.commit} --local-dir "
                         f"{plan.items[0].root} " + " ".join(item.rel for item in plan.items))
    return lines


__all__ = ["Check", "Summary", "check_present", "fetch", "list_lines", "make_plans", "verify"]
