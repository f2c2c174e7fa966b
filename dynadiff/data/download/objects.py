"""The resumable download of one S3 object, with its retries and the optional bandwidth cap.

A file is written to a temporary name beside its final one (``.<name>.part``)
and renamed only once complete and verified (size, and MD5 when the ETag is
one), so an interrupted run never leaves a truncated file under a final name.
A stream that breaks is resumed with a ranged request pinned to the listed
ETag; the retry loop is :func:`dynadiff.retry.retry`'s.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import typing as tp
from pathlib import Path

from dynadiff.data.download.errors import DownloadError, _AccessError, _Cancelled
from dynadiff.data.download.plan import RemoteObject
from dynadiff.data.download.s3 import _access_hint
from dynadiff.files import atomic_path
from dynadiff.retry import Transient, retry

# The package's name, as before the split: log lines keep reading 'dynadiff.data.download: ...'.
logger = logging.getLogger(__package__)

PART_SUFFIX = ".part"  # the end of the temporary names (dynadiff.files.part_path: .{name}.part)
_CHUNK = 1 << 20  # bytes read from a response at a time


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
