"""The whole download, as ``prepare_data.py`` runs it: :func:`run_download`, and NSD's, :func:`download_nsd`.

:func:`run_download` is the one fetch loop of every source (NSD here, OpenNeuro in :mod:`.openneuro`): it
checks the options and the target folder, plans (the source's plan, e.g. :mod:`.plan`), verifies the files
already there (:mod:`.manifest`), then fetches the rest on a thread pool (:mod:`.objects`), largest first, with
progress bars (:mod:`.progress`). A file whose retries ran out is reported at the end, after the others; an
access error or Ctrl-C stops every worker, which removes its temporary file.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
import typing as tp
from pathlib import Path

from tqdm.auto import tqdm

from dynadiff.data.download.errors import DownloadError, _AccessError
from dynadiff.data.download.manifest import (
    _file_md5,
    _load_manifest,
    _manifest_entry,
    _quick_state,
    _save_manifest,
)
from dynadiff.data.download.objects import _RateLimiter, download_object
from dynadiff.data.download.plan import RemoteObject, plan_download
from dynadiff.data.download.progress import DownloadSummary, _human, _locked
from dynadiff.data.download.s3 import (
    AwsOptions,
    make_s3_client,
    parse_aws_args,
    parse_bucket_url,
)
from dynadiff.data.nsd import SUBJECTS, check_download_target, check_subject
from dynadiff.files import part_path

# The package's name, as before the split: log lines keep reading 'dynadiff.data.download: ...'.
logger = logging.getLogger(__package__)


def download_nsd(
    bucket_url: str,
    root: Path,
    subjects: tp.Iterable[int] = SUBJECTS,
    sessions: tp.Iterable[int] | None = None,
    aws_args: str | AwsOptions = "",
    workers: int = 16,
    max_bandwidth: float | None = None,
    retries: int = 5,
    client=None,
) -> DownloadSummary:
    """Download what docs/behaviour.md §1 lists for ``subjects`` (all 40 sessions unless ``sessions``) into ``root``.

    ``max_bandwidth`` caps the total throughput in bytes per second (None: no cap).
    Raises :class:`DownloadError` for missing/unsafe keys, access problems and failed transfers, and
    :class:`~dynadiff.data.nsd.NsdDataError`, before any request, when ``root`` cannot be written to or holds
    a synthetic mini-NSD (real files would be mixed with it).
    """
    bucket, prefix = parse_bucket_url(bucket_url)
    root = Path(root)
    subjects = [check_subject(s) for s in subjects]

    def plan(client) -> list[RemoteObject]:
        logger.info("listing s3://%s/%s for subject(s) %s", bucket, prefix, subjects)
        return plan_download(client, bucket, prefix, root, subjects, sessions)

    return run_download(
        bucket, root, plan, check_target=check_download_target, aws_args=aws_args, workers=workers,
        max_bandwidth=max_bandwidth, retries=retries, client=client, label="NSD download",
    )


def run_download(
    bucket: str,
    root: Path,
    plan: tp.Callable[[tp.Any], list[RemoteObject]],
    *,
    check_target: tp.Callable[[Path], tp.Any],
    aws_args: str | AwsOptions = "",
    workers: int = 16,
    max_bandwidth: float | None = None,
    retries: int = 5,
    client=None,
    label: str = "download",
) -> DownloadSummary:
    """Fetch into ``root`` the objects of ``bucket`` that ``plan(client)`` returns, resuming what is there.

    ``check_target(root)`` raises, before any request, when ``root`` must not be written to; ``client`` (default:
    :func:`make_s3_client` of ``aws_args``) serves the plan and the transfers; ``label`` names the progress bar
    and the summary's log line. ``max_bandwidth`` caps the total throughput in bytes per second (None: no cap).
    """
    start = time.monotonic()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_bandwidth is not None and max_bandwidth <= 0:
        raise ValueError(f"max_bandwidth must be positive, got {max_bandwidth}")
    options = aws_args if isinstance(aws_args, AwsOptions) else parse_aws_args(aws_args)
    root = Path(root)
    check_target(root)
    if client is None:
        client = make_s3_client(options, max_connections=workers)
    objects = plan(client)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {root}: {e.strerror}") from e
    manifest = _load_manifest(root)
    states = {obj.rel: _quick_state(root, obj, manifest) for obj in objects}
    by_rel = {obj.rel: obj for obj in objects}
    summary = DownloadSummary()
    stop = threading.Event()
    lock = threading.Lock()

    def record(obj: RemoteObject) -> None:  # remember a complete file, so it is not hashed again
        entry = _manifest_entry(root / obj.rel, obj)
        with lock:
            manifest[obj.rel] = entry

    failed: list[str] = []
    fetching: dict[cf.Future, RemoteObject] = {}
    saved_at = time.monotonic()
    limiter = _RateLimiter(max_bandwidth) if max_bandwidth else None
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download") as pool:
        try:
            # 1. files with the right size and an MD5 ETag, not yet in the manifest: hash them
            to_verify = [by_rel[r] for r, s in states.items() if s == "verify"]
            if to_verify:
                with tqdm(total=sum(o.size for o in to_verify), unit="B", unit_scale=True, unit_divisor=1024,
                          desc="verifying existing files") as bar:
                    futures = {pool.submit(_file_md5, root / o.rel, _locked(bar, lock)): o for o in to_verify}
                    for future in cf.as_completed(futures):
                        obj = futures[future]
                        ok = future.result() == obj.etag
                        states[obj.rel] = "ok" if ok else "fetch"
                        if not ok:
                            logger.info("%s: content differs from the bucket's, downloading it again", obj.rel)
            for rel, state in states.items():
                if state == "ok":
                    summary.skipped += 1
                    record(by_rel[rel])
                    part_path(root / rel).unlink(missing_ok=True)  # stale temporary file from a crash

            # 2. fetch the rest, largest first so that the biggest file does not finish last, alone
            to_fetch = sorted((by_rel[r] for r, s in states.items() if s == "fetch"), key=lambda o: (-o.size, o.rel))
            logger.info(
                "%d file(s) to download (%s), %d already complete",
                len(to_fetch), _human(sum(o.size for o in to_fetch)), summary.skipped,
            )
            with tqdm(total=sum(o.size for o in to_fetch), unit="B", unit_scale=True, unit_divisor=1024,
                      desc=label) as bar:
                progress = _locked(bar, lock)
                fetching = futures = {
                    pool.submit(
                        download_object, client, bucket, o, root / o.rel,
                        progress=progress, stop=stop, limiter=limiter, retries=retries,
                    ): o
                    for o in to_fetch
                }
                for future in cf.as_completed(futures):
                    obj = futures[future]
                    try:
                        future.result()
                    except _AccessError:
                        raise  # access denied, object gone, ...: every other file would fail the same way
                    except DownloadError as e:  # retries exhausted: go on with the others, report at the end
                        logger.error("%s", e)
                        failed.append(obj.key)
                        continue
                    record(obj)
                    summary.downloaded += 1
                    summary.bytes_downloaded += obj.size
                    if time.monotonic() - saved_at > 30:  # a hard kill then loses little verification work
                        _save_manifest(root, dict(manifest))
                        saved_at = time.monotonic()
        except BaseException:
            # Ctrl-C or an unexpected error: running workers stop at their next chunk and
            # remove their temporary files; queued ones never start.
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            for future, obj in fetching.items():  # finished while we were stopping: remember them
                if future.done() and not future.cancelled() and future.exception() is None:
                    record(obj)
            raise
        finally:
            _save_manifest(root, manifest)
    summary.seconds = time.monotonic() - start
    if failed:
        raise DownloadError(
            f"{len(failed)} file(s) could not be downloaded ({summary}); run the same command again to resume. "
            "Failed: " + ", ".join(failed[:20]) + (" ..." if len(failed) > 20 else "")
        )
    logger.info("%s: %s", label, summary)
    return summary
