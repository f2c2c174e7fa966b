"""Download the NSD files Dynadiff needs from S3 (docs/behaviour.md §1), resumably.

What is fetched for each chosen subject:

- the time series and design TSV of every *task* run that
  :func:`dynadiff.data.nsd.list_runs` gives (never the resting-state runs);
- the whole ``roi/`` folder of the subject;

and once: ``nsd_expdesign.mat`` and ``nsd_stimuli.hdf5``, saved at the root of
the local folder. Every other key keeps its bucket path under the local root.

Resuming: a local file with the object's size (and its MD5 when the ETag is a
plain MD5, i.e. not a multipart upload) is kept. A file is written to a
temporary name beside its final one (``.<name>.part``) and renamed only once
complete and verified, so an interrupted run never leaves a truncated file
under a final name. Files checked by hash are recorded in a small manifest
(``.nsd_download_manifest.json``, keyed by path, size, mtime and ETag) so that
the next run does not hash them again.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import os
import re
import shlex
import threading
import time
import typing as tp
from pathlib import Path

from tqdm.auto import tqdm

from dynadiff.data.nsd import (
    EXPDESIGN_FILE,
    EXPDESIGN_KEY,
    NSD_BUCKET_URL,
    ROI_DIR,
    STIMULI_FILE,
    STIMULI_KEY,
    SUBJECTS,
    check_download_target,
    check_subject,
    list_runs,
)
from dynadiff.files import atomic_path, part_path, write_text
from dynadiff.retry import Transient, retry

logger = logging.getLogger(__name__)

DEFAULT_BUCKET = NSD_BUCKET_URL
MANIFEST_FILE = ".nsd_download_manifest.json"
PART_SUFFIX = ".part"  # the end of the temporary names (dynadiff.files.part_path: .{name}.part)
SUPPORTED_AWS_ARGS = ("--no-sign-request", "--profile NAME", "--endpoint-url URL", "--region NAME")
_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}")
_BUCKET_NAME = re.compile(r"[a-zA-Z0-9.\-_]{1,255}")
_CHUNK = 1 << 20  # bytes read from a response at a time


class DownloadError(RuntimeError):
    """The download cannot proceed or did not complete; the message says what and why."""


class _AccessError(DownloadError):
    """The server refused a request for a reason retries cannot fix: the whole download stops."""


class _Cancelled(Exception):
    """Raised inside a worker when the download is being stopped."""


# ----------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class AwsOptions:
    """The AWS CLI options we understand, mapped onto boto3."""

    unsigned: bool = False  # --no-sign-request
    profile: str | None = None  # --profile
    endpoint_url: str | None = None  # --endpoint-url
    region: str | None = None  # --region


def parse_aws_args(text: str | None) -> AwsOptions:
    """Parse an AWS-CLI-like option string (``--aws_args``) into :class:`AwsOptions`.

    Raises ``ValueError`` naming the offending option and listing the supported ones.
    """
    try:
        tokens = shlex.split(text or "")
    except ValueError as e:
        raise ValueError(f"cannot parse --aws_args {text!r}: {e}") from e
    supported = ", ".join(SUPPORTED_AWS_ARGS)
    values: dict[str, tp.Any] = {}
    names = {"--profile": "profile", "--endpoint-url": "endpoint_url", "--region": "region"}
    i = 0
    while i < len(tokens):
        name, eq, value = tokens[i].partition("=")
        if name == "--no-sign-request":
            if eq:
                raise ValueError("--no-sign-request in --aws_args takes no value")
            values["unsigned"] = True
            i += 1
        elif name in names:
            if not eq:
                if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                    raise ValueError(f"{name} in --aws_args needs a value")
                value = tokens[i + 1]
                i += 1
            if not value:
                raise ValueError(f"{name} in --aws_args needs a non-empty value")
            values[names[name]] = value
            i += 1
        else:
            raise ValueError(f"unsupported option {tokens[i]!r} in --aws_args; supported options: {supported}")
    return AwsOptions(**values)


def parse_bucket_url(url: str) -> tuple[str, str]:
    """``s3://bucket[/prefix]`` → (bucket, prefix ending with '/' or empty)."""
    match = re.fullmatch(r"s3://([^/]+)(?:/(.*))?", url.strip())
    if match is None or not match.group(1):
        raise ValueError(f"--nsd_bucket should look like s3://bucket[/prefix], got {url!r}")
    if not _BUCKET_NAME.fullmatch(match.group(1)):  # what botocore accepts (it would fail with a long message)
        raise ValueError(f"--nsd_bucket: {match.group(1)!r} is not a bucket name (letters, digits, '.', '-' and '_' "
                         f"only, e.g. {NSD_BUCKET_URL}), got {url!r}")
    prefix = (match.group(2) or "").strip("/")
    return match.group(1), f"{prefix}/" if prefix else ""


def make_s3_client(options: AwsOptions, max_connections: int = 16):
    """A boto3 S3 client; anonymous (unsigned) when asked or when no credentials are configured.

    The EC2 instance-metadata lookup (one of the places botocore looks for
    credentials) gets a 1 s timeout and a single attempt, so a machine outside
    AWS never hangs on it.
    """
    import boto3
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ProfileNotFound

    core = botocore.session.get_session()
    core.set_config_variable("metadata_service_timeout", 1)
    core.set_config_variable("metadata_service_num_attempts", 1)
    try:
        session = boto3.Session(botocore_session=core, profile_name=options.profile)
        unsigned = options.unsigned
        if not unsigned:
            credentials = session.get_credentials()
            if credentials is None:
                logger.info("no AWS credentials configured: using anonymous (unsigned) requests")
                unsigned = True
        region = options.region or session.region_name or "us-east-1"
        config = Config(
            signature_version=UNSIGNED if unsigned else None,
            max_pool_connections=max(10, max_connections),
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        return session.client("s3", region_name=region, endpoint_url=options.endpoint_url, config=config)
    except ProfileNotFound as e:
        raise DownloadError(f"AWS profile {options.profile!r} not found (from --aws_args --profile): {e}") from e
    except BotoCoreError as e:
        raise DownloadError(f"cannot set up the S3 client: {e}") from e


# ----------------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class RemoteObject:
    key: str  # full key in the bucket
    rel: str  # path relative to the local root, POSIX separators
    size: int  # bytes
    etag: str  # without quotes

    @property
    def has_md5(self) -> bool:
        """True when the ETag is the object's MD5 (single-part upload, no KMS)."""
        return bool(_PLAIN_MD5.fullmatch(self.etag))


def needed_files(
    subjects: tp.Iterable[int], sessions: tp.Iterable[int] | None = None
) -> tuple[dict[str, str], list[str]]:
    """What docs/behaviour.md §1 needs, relative to the bucket prefix.

    Returns ``(files, folders)``: ``files`` maps each exact key to its local
    relative path; ``folders`` lists key prefixes (ending with '/') whose whole
    content is mirrored.
    """
    files = {EXPDESIGN_KEY: EXPDESIGN_FILE, STIMULI_KEY: STIMULI_FILE}
    folders = []
    for subject in subjects:
        check_subject(subject)
        for run in list_runs(subject, sessions):
            for path in (run.timeseries_path(Path("")), run.design_path(Path(""))):
                files[path.as_posix()] = path.as_posix()
        folders.append(ROI_DIR.format(subject=subject) + "/")
    return files, folders


def check_relative_key(rel: str, key: str, root: Path) -> None:
    """Refuse a key whose local path would not stay under ``root`` (``..``, absolute, drive, ...)."""
    parts = rel.split("/")
    bad = (
        not rel
        or rel.startswith("/")
        or "\\" in rel
        or "\x00" in rel
        or re.match(r"[A-Za-z]:", rel) is not None
        or any(part in (".", "..") for part in parts)
    )
    if not bad:
        base = os.path.normpath(os.path.abspath(root))
        target = os.path.normpath(os.path.join(base, *parts))
        bad = os.path.commonpath([base, target]) != base or target == base
    if bad:
        raise DownloadError(
            f"refusing S3 key {key!r}: its local path must stay under {root} without '..', '.', "
            "absolute or drive components"
        )


def _list_prefix(client, bucket: str, prefix: str) -> dict[str, tuple[int, str]]:
    """key → (size, etag) of every object under a prefix."""
    from botocore.exceptions import BotoCoreError, ClientError

    found = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = (int(item["Size"]), item.get("ETag", "").strip('"'))
    except ClientError as e:
        err = e.response.get("Error", {})
        raise DownloadError(
            f"cannot list s3://{bucket}/{prefix}: {err.get('Code', '?')} {err.get('Message', '')}".rstrip()
            + _access_hint(err.get("Code"))
        ) from e
    except BotoCoreError as e:
        raise DownloadError(f"cannot list s3://{bucket}/{prefix}: {e}") from e
    return found


def _access_hint(code) -> str:
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "403"):
        return " (check your AWS credentials, or pass --aws_args \"--no-sign-request\" for anonymous access)"
    if code == "NoSuchBucket":
        return " (check --nsd_bucket)"
    return ""


def plan_download(
    client, bucket: str, prefix: str, root: Path, subjects: tp.Iterable[int], sessions: tp.Iterable[int] | None = None
) -> list[RemoteObject]:
    """List the bucket and return every object to fetch; raise listing all missing or unsafe keys."""
    files, folders = needed_files(subjects, sessions)
    listed: dict[str, tuple[int, str]] = {}
    for folder in sorted({k.rsplit("/", 1)[0] + "/" if "/" in k else "" for k in files} | set(folders)):
        listed.update(_list_prefix(client, bucket, prefix + folder))

    objects, missing, unsafe = [], [], []
    for key, rel in files.items():
        if prefix + key in listed:
            objects.append(RemoteObject(prefix + key, rel, *listed[prefix + key]))
        else:
            missing.append(prefix + key)
    for folder in folders:
        content = sorted(k for k in listed if k.startswith(prefix + folder) and not k.endswith("/"))
        if not content:
            missing.append(prefix + folder + "*")
        for key in content:
            rel = key[len(prefix) :]
            try:
                check_relative_key(rel, key, root)
            except DownloadError:
                unsafe.append(key)
                continue
            objects.append(RemoteObject(key, rel, *listed[key]))
    for obj in objects:  # the fixed keys are ours, but a prefix could still be odd
        try:
            check_relative_key(obj.rel, obj.key, root)
        except DownloadError:
            unsafe.append(obj.key)
    if unsafe:
        raise DownloadError(
            f"refusing {len(unsafe)} S3 key(s) whose local path could resolve outside {root} "
            "('..', '.', absolute or drive components): " + ", ".join(repr(k) for k in unsafe)
        )
    if missing:
        shown = "\n  ".join(f"s3://{bucket}/{k}" for k in missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise DownloadError(
            f"{len(missing)} object(s) missing from s3://{bucket}/{prefix}:\n  {shown}{more}\n"
            "Check --nsd_bucket, or restrict --subjects/--sessions to what the bucket holds."
        )
    return objects


# ----------------------------------------------------------------------------- resume state


def _load_manifest(root: Path) -> dict[str, dict]:
    path = root / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable %s (%s): files will be verified again", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _save_manifest(root: Path, manifest: dict[str, dict]) -> None:
    """Atomic write; a failure only costs re-hashing files on the next run, so it is not fatal."""
    path = root / MANIFEST_FILE
    try:
        write_text(path, json.dumps(manifest, indent=0, sort_keys=True))
    except OSError as e:
        logger.warning("cannot save %s (%s): complete files will be verified again next time", path, e)


def _manifest_entry(path: Path, obj: RemoteObject) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "etag": obj.etag}


def _file_md5(path: Path, on_bytes: tp.Callable[[int], None] | None = None) -> str:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK * 8):
            md5.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return md5.hexdigest()


def _quick_state(root: Path, obj: RemoteObject, manifest: dict[str, dict]) -> str:
    """'ok' (complete), 'verify' (right size, hash needed) or 'fetch'."""
    dest = root / obj.rel
    try:
        st = dest.stat()
    except FileNotFoundError:
        return "fetch"
    if not dest.is_file() or st.st_size != obj.size:
        return "fetch"
    entry = manifest.get(obj.rel)
    if entry == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "etag": obj.etag}:
        return "ok"
    return "verify" if obj.has_md5 else "ok"


# ----------------------------------------------------------------------------- transfer


class _RateLimiter:
    """Caps the total throughput of all workers (bytes per second)."""

    def __init__(self, rate: float):
        self.rate = float(rate)
        self._lock = threading.Lock()
        self._free_at = time.monotonic()

    def consume(self, n: int, stop: threading.Event) -> None:
        with self._lock:
            now = time.monotonic()
            self._free_at = max(self._free_at, now) + n / self.rate
            wait = self._free_at - now
        if wait > 0:
            stop.wait(wait)


_RETRYABLE_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "500",
    "502",
    "503",
    "504",
}


def _is_retryable(exc: BaseException) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ParamValidationError

    if isinstance(exc, (NoCredentialsError, ParamValidationError)):
        return False
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in _RETRYABLE_CODES or status >= 500
    return isinstance(exc, (BotoCoreError, OSError, _IncompleteBody))


class _IncompleteBody(Exception):
    """The body received does not match the listing; ``restart`` discards what was written."""

    def __init__(self, message: str, restart: bool = False):
        super().__init__(message)
        self.restart = restart


def download_object(
    client,
    bucket: str,
    obj: RemoteObject,
    dest: Path,
    *,
    progress: tp.Callable[[int], None] = lambda n: None,
    stop: threading.Event | None = None,
    limiter: _RateLimiter | None = None,
    retries: int = 5,
    backoff: float = 1.0,
) -> None:
    """Fetch one object to ``dest`` through a temporary file, retrying with exponential backoff.

    After a network error the transfer resumes with a ranged request pinned to
    the listed ETag (``IfMatch``); a size or MD5 mismatch restarts it from
    scratch. ``dest`` appears, by rename, only once complete and verified.

    Ours, not boto3's ``download_file``: botocore retries each request (see :func:`make_s3_client`) but not a
    body that breaks mid-stream; s3transfer retries that but starts the range over, and checks no MD5.
    """
    from botocore.exceptions import ClientError

    stop = stop or threading.Event()
    if stop.is_set():
        raise _Cancelled
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = f"s3://{bucket}/{obj.key}"
    chunk_size = _CHUNK if limiter is None else max(4096, min(_CHUNK, int(limiter.rate / 20)))
    done, md5 = 0, hashlib.md5()

    def pause(seconds: float) -> None:
        if stop.wait(seconds):
            raise _Cancelled

    def give_up(error: Transient, attempts: int) -> DownloadError:
        return DownloadError(f"giving up on {url} after {attempts} attempts: {error}")

    with atomic_path(dest) as tmp, open(tmp, "wb") as f:  # "wb": truncates a stale temporary file left by a crash

        def once() -> None:
            nonlocal done, md5
            try:
                _fetch_into(client, bucket, obj, f, done, md5, chunk_size, progress, stop, limiter, tmp)
                return
            except _Partial as partial:
                done, error = partial.done, partial.cause
            if isinstance(error, ClientError):
                code = error.response.get("Error", {}).get("Code")
                if code in ("PreconditionFailed", "412"):
                    raise DownloadError(f"{url} changed while it was being downloaded: run again") from error
                if not _is_retryable(error):
                    message = error.response.get("Error", {}).get("Message", "")
                    raise _AccessError(
                        f"cannot download {url}: {code} {message}".rstrip() + _access_hint(code)
                    ) from error
            elif not _is_retryable(error):
                raise error
            if isinstance(error, _IncompleteBody) and error.restart:
                progress(-done)
                f.seek(0)
                f.truncate()
                done, md5 = 0, hashlib.md5()
            raise Transient(str(error)) from error

        retry(once, label=url, retries=retries, backoff=backoff, give_up=give_up, sleep=pause, log=logger)
        f.flush()
        os.fsync(f.fileno())


class _Partial(Exception):
    """A transfer attempt failed after ``done`` bytes were written; ``cause`` says why."""

    def __init__(self, done: int, cause: BaseException):
        super().__init__(str(cause))
        self.done, self.cause = done, cause


def _fetch_into(client, bucket, obj, f, done, md5, chunk_size, progress, stop, limiter, tmp) -> None:
    """One attempt: append bytes ``done:`` of the object to ``f``; raise :class:`_Partial` on failure."""
    try:
        request = {"Bucket": bucket, "Key": obj.key, "IfMatch": f'"{obj.etag}"'}
        if done:
            request["Range"] = f"bytes={done}-"
        response = client.get_object(**request)
        if done and not str(response.get("ContentRange", "")).startswith(f"bytes {done}-"):
            raise _IncompleteBody("the server ignored the range request", restart=True)
        for chunk in response["Body"].iter_chunks(chunk_size):
            if stop.is_set():
                raise _Cancelled
            try:
                f.write(chunk)
            except OSError as e:  # full disk, permissions: retrying will not help
                raise DownloadError(f"cannot write {tmp}: {e}") from e
            md5.update(chunk)
            done += len(chunk)
            progress(len(chunk))
            if limiter is not None:
                limiter.consume(len(chunk), stop)
        if done != obj.size:
            raise _IncompleteBody(f"received {done} bytes, the listing says {obj.size}", restart=done > obj.size)
        if obj.has_md5 and md5.hexdigest() != obj.etag:
            raise _IncompleteBody(f"MD5 {md5.hexdigest()} differs from the ETag {obj.etag}", restart=True)
    except (_Cancelled, DownloadError):
        raise
    except Exception as e:  # noqa: BLE001 - classified by the caller (retry or give up)
        raise _Partial(done, e) from e


# ----------------------------------------------------------------------------- driver


@dataclasses.dataclass
class DownloadSummary:
    downloaded: int = 0  # files fetched in this run
    skipped: int = 0  # files already complete
    bytes_downloaded: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"downloaded {self.downloaded} file(s) ({_human(self.bytes_downloaded)}), "
            f"skipped {self.skipped} already complete, in {self.seconds:.1f} s"
        )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


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
    start = time.monotonic()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_bandwidth is not None and max_bandwidth <= 0:
        raise ValueError(f"max_bandwidth must be positive, got {max_bandwidth}")
    bucket, prefix = parse_bucket_url(bucket_url)
    options = aws_args if isinstance(aws_args, AwsOptions) else parse_aws_args(aws_args)
    root = Path(root)
    subjects = [check_subject(s) for s in subjects]
    check_download_target(root)
    if client is None:
        client = make_s3_client(options, max_connections=workers)

    logger.info("listing s3://%s/%s for subject(s) %s", bucket, prefix, subjects)
    objects = plan_download(client, bucket, prefix, root, subjects, sessions)
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
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nsd-download") as pool:
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
                      desc="NSD download") as bar:
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
    logger.info("NSD download: %s", summary)
    return summary


def _locked(bar, lock: threading.Lock) -> tp.Callable[[int], None]:
    def update(n: int) -> None:
        with lock:
            bar.update(n)

    return update
