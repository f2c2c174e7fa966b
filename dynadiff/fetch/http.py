"""One URL to one file: resumable, atomic, retried, checked.

The bytes go to ``.{name}.part`` beside the destination, which is renamed to
its final name only once complete and checked (size, SHA-256 or git blob hash
where known): a killed download never leaves a file under its final name. The
next attempt (in this run, after a network error, or in a later run) asks for
the rest only (HTTP ``Range``); a server that ignores the range, or a hash that
disagrees after a resumed transfer, starts the file over. The ``.part`` file is
locked while written, so a second process fetching the same file stops with a
clear error instead of writing into it.

Errors are :class:`FetchError`, one line: which file, which URL, what happened
and what to do.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import typing as tp
from pathlib import Path

import requests
from tqdm.auto import tqdm

from dynadiff.files import part_path  # where a file is written before it is complete: .{name}.part
from dynadiff.retry import Transient, retry

logger = logging.getLogger(__name__)

CHUNK = 1 << 18  # bytes read from a response at a time
TIMEOUT = (15, 60)  # s: connect, between two reads
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class FetchError(RuntimeError):
    """A file could not be fetched (or checked); the message is one line saying what to do. ``unreachable``:
    the server could not be reached at all (connection refused, name unknown, timeouts), as opposed to an answer."""

    def __init__(self, message: str, unreachable: bool = False):
        super().__init__(message)
        self.unreachable = unreachable


@dataclasses.dataclass(frozen=True)
class Expected:
    """What the finished file must be, where known."""

    size: int | None = None
    sha256: str | None = None  # full hex digest
    sha256_prefix: str | None = None  # torchvision: the start of the digest, from the file name
    git_sha1: str | None = None  # git blob id (small files of a Hub repo)

    def check(self, path: Path, digests: dict[str, str] | None = None) -> str:
        """'' when ``path`` is the expected file, else what differs (hashes computed unless in ``digests``)."""
        size = path.stat().st_size
        if self.size is not None and size != self.size:
            return f"its size is {size} bytes, expected {self.size}"
        digests = digests if digests is not None else file_digests(path, self.hash_kinds())
        if self.sha256 is not None and digests["sha256"] != self.sha256:
            return f"its SHA-256 is {digests['sha256'][:12]}..., expected {self.sha256[:12]}..."
        if self.sha256_prefix and not digests["sha256"].startswith(self.sha256_prefix):
            return f"its SHA-256 starts with {digests['sha256'][:len(self.sha256_prefix)]}, expected {self.sha256_prefix}"
        if self.git_sha1 is not None and digests["git_sha1"] != self.git_sha1:
            return f"its git blob hash is {digests['git_sha1'][:12]}..., expected {self.git_sha1[:12]}..."
        return ""

    def hash_kinds(self) -> tuple[str, ...]:
        kinds = ("sha256",) if (self.sha256 or self.sha256_prefix) else ()
        return kinds + (("git_sha1",) if self.git_sha1 else ())

    @property
    def has_hash(self) -> bool:
        return bool(self.hash_kinds())


def file_digests(path: Path, kinds: tp.Iterable[str] = ("sha256",)) -> dict[str, str]:
    """``{"sha256": hex, "git_sha1": hex}`` (those asked for) of a file, read once."""
    kinds = set(kinds)
    size = path.stat().st_size
    sha256 = hashlib.sha256() if "sha256" in kinds else None
    git = hashlib.sha1(f"blob {size}\0".encode()) if "git_sha1" in kinds else None
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            if sha256 is not None:
                sha256.update(block)
            if git is not None:
                git.update(block)
    out = {}
    if sha256 is not None:
        out["sha256"] = sha256.hexdigest()
    if git is not None:
        out["git_sha1"] = git.hexdigest()
    return out


def human(n: float | None) -> str:
    if n is None:
        return "unknown size"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


_session_local: dict[int, requests.Session] = {}


def session() -> requests.Session:
    """One HTTP session per process (proxies from HTTPS_PROXY/HTTP_PROXY, as requests reads them)."""
    pid = os.getpid()
    if pid not in _session_local:
        _session_local[pid] = requests.Session()
    return _session_local[pid]


def head_size(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> int | None:
    """The size the server announces for ``url`` (after redirects), None if it says none or cannot be reached."""
    try:
        r = session().head(url, headers={**(headers or {}), "Accept-Encoding": "identity"}, allow_redirects=True,
                            timeout=timeout)
    except requests.RequestException as e:
        logger.debug("HEAD %s: %s", url, e)
        return None
    if r.status_code != 200:
        logger.debug("HEAD %s: HTTP %s", url, r.status_code)
        return None
    length = r.headers.get("X-Linked-Size") or r.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


class _Retry(Transient):
    """An attempt failed in a way worth retrying; the message says why (for the final message). ``done``: the bytes
    now in the part file when the attempt changed them (None: unchanged), ``received``: bytes it received."""

    def __init__(self, cause: str, done: int | None = None, received: int = 0, unreachable: bool = False):
        super().__init__(cause)
        self.done, self.received, self.unreachable = done, received, unreachable


@dataclasses.dataclass
class Downloaded:
    path: Path
    bytes_fetched: int  # bytes received in this call
    resumed_from: int  # bytes already in the .part file when this call started (0: fresh)
    digests: dict[str, str]  # "sha256" (and "git_sha1" when one was expected) of the file


def download(
    url: str,
    dest: Path,
    *,
    label: str,
    expected: Expected = Expected(),
    headers: dict[str, str] | None = None,
    hint: tp.Callable[[int], str] = lambda status: "",
    retries: int = 5,
    backoff: float = 1.0,
    progress: bool = True,
    setting: str = "",
) -> Downloaded:
    """Fetch ``url`` to ``dest`` through ``.{name}.part`` (resumed if present), check it, rename it.

    ``hint(status)`` completes the message of an HTTP error (what to do); ``retries`` more attempts follow a
    network error, a 408/429/5xx answer or an incomplete body, ``backoff * 2**k`` seconds apart (jittered).
    ``setting`` names where the URL comes from (e.g. ``mirrors.torchvision = ...``), for the messages.
    Raises :class:`FetchError`; a partial ``.part`` is kept for the next run, except after a hash mismatch.
    """
    dest = Path(dest)
    part = part_path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        part.touch()
    except OSError as e:
        raise FetchError(f"{label}: cannot write {part}: {e.strerror or e}") from None
    with open(part, "ab") as f:  # appends: what is already there is kept (resumed)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise FetchError(f"{label}: {part} is being written by another process (a second prepare_weights.py?): "
                                 "let it finish, or stop it and run again") from None
            raise
        try:
            return _download_locked(url, dest, part, f, label=label, expected=expected, headers=headers, hint=hint,
                                    retries=retries, backoff=backoff, progress=progress, setting=setting)
        except BaseException:
            if part.is_file() and part.stat().st_size == 0:  # nothing worth resuming
                part.unlink(missing_ok=True)
            raise


def _download_locked(url, dest, part, f, *, label, expected, headers, hint, retries, backoff, progress,
                     setting) -> Downloaded:
    """:func:`download` once the ``.part`` file ``f`` is open and locked."""
    start = f.seek(0, os.SEEK_END)
    if expected.size is not None and start > expected.size:
        f.truncate(0)
        start = 0
    fetched, restarted = _transfer(url, f, part, label=label, expected=expected, headers=headers or {}, hint=hint,
                                   retries=retries, backoff=backoff, progress=progress, start=start, setting=setting)
    f.flush()
    os.fsync(f.fileno())
    kinds = ("sha256", "git_sha1") if expected.git_sha1 else ("sha256",)  # SHA-256 always: the manifest keeps it
    digests = file_digests(part, kinds)
    problem = expected.check(part, digests)
    if problem and start and not restarted:  # the old part may come from another version of the file
        logger.warning("%s: the resumed download is not the expected file (%s): downloading it again", label,
                       problem)
        f.truncate(0)
        fetched += _transfer(url, f, part, label=label, expected=expected, headers=headers or {}, hint=hint,
                             retries=retries, backoff=backoff, progress=progress, start=0, setting=setting)[0]
        f.flush()
        os.fsync(f.fileno())
        digests = file_digests(part, kinds)
        problem = expected.check(part, digests)
    if problem:
        part.unlink(missing_ok=True)
        raise FetchError(f"{label}: the file downloaded from {url} is not the expected one: {problem}; it was "
                         f"deleted. The server serves another file: try again, or check {setting or 'the URL'}")
    os.replace(part, dest)  # not files.atomic_path: a failed download's part is kept (resumed), and the lock held
    return Downloaded(dest, fetched, start, digests)


def _transfer(url: str, f, part: Path, *, label: str, expected: Expected, headers: dict[str, str],
              hint: tp.Callable[[int], str], retries: int, backoff: float, progress: bool, start: int,
              setting: str = "") -> tuple[int, bool]:
    """Append the bytes of ``url`` from ``start`` to ``f`` until complete; (bytes received, restarted from 0)."""
    done, fetched, restarted = start, 0, False
    total = expected.size
    if total is not None and done == total:
        return 0, False
    bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, desc=label[-40:],
               disable=None if progress else True, leave=False)

    def once() -> None:
        nonlocal done, fetched, restarted, total
        try:
            received, done, total, reset = _attempt(url, f, part, label=label, headers=headers, hint=hint,
                                                    done=done, total=total, bar=bar)
        except _Retry as e:
            if e.done is not None:
                done, fetched = e.done, fetched + e.received
            raise
        fetched += received
        restarted |= reset
        if total is not None and done != total:
            raise _Retry(f"the connection closed after {done} of {total} bytes")

    def give_up(e: _Retry, attempts: int) -> FetchError:
        kept = f" ({human(done)} kept in {part}: run again to resume)" if done else ""
        where = setting or "the server address"
        todo = (f"the server is failing: try again later, or check {where}" if str(e).startswith("HTTP")
                else f"check the network, the proxy (HTTPS_PROXY) and {where}")
        return FetchError(f"{label}: giving up on {url} after {attempts} attempt(s): {e}{kept}; {todo}",
                          unreachable=e.unreachable)

    try:
        retry(once, label=label, retries=retries, backoff=backoff, give_up=give_up,
              note=lambda: f" from byte {done}" if done else "", log=logger)
    finally:
        bar.close()
    return fetched, restarted


def _attempt(url, f, part, *, label, headers, hint, done, total, bar) -> tuple[int, int, int | None, bool]:
    """One GET from byte ``done``: (bytes received, new done, total size, whether it started over)."""
    request_headers = {**headers, "Accept-Encoding": "identity"}  # the size on disk is the size announced
    if done:
        request_headers["Range"] = f"bytes={done}-"
    try:
        response = session().get(url, headers=request_headers, stream=True, timeout=TIMEOUT)
    except requests.RequestException as e:
        raise _Retry(_reason(e), unreachable=isinstance(e, (requests.ConnectionError, requests.Timeout))) from None
    reset = False
    with response:
        status = response.status_code
        if status == 416 and done:  # the part is not a prefix of this file (or is the whole of it)
            announced = response.headers.get("Content-Range", "").rsplit("/", 1)[-1]  # "bytes */SIZE"
            total = total if total is not None or not announced.isdigit() else int(announced)
            if total is not None and done == total:
                return 0, done, total, False
            f.truncate(0)
            bar.reset(total=total)
            raise _Retry("the server refused to resume (HTTP 416): starting the file over", done=0)
        if status in RETRY_STATUS:
            raise _Retry(f"HTTP {status} {response.reason}".rstrip())
        if status >= 400:
            raise FetchError(f"{label}: {url} answered HTTP {status} {response.reason}{hint(status)}".rstrip())
        if status == 206 and done:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {done}-"):
                raise _Retry(f"unexpected Content-Range {content_range!r} for a resume from byte {done}")
            announced = content_range.rsplit("/", 1)[-1]
            length = int(announced) if announced.isdigit() else None
        elif status == 200:
            if done:  # the server ignored the range: start over
                logger.info("%s: the server does not resume downloads: starting over", label)
                f.truncate(0)
                done, reset = 0, True
                bar.reset(total=total)
            announced = response.headers.get("Content-Length", "")
            length = int(announced) if announced.isdigit() else None
        else:
            raise FetchError(f"{label}: {url} answered HTTP {status} {response.reason}, not the file".rstrip())
        if length is not None:
            if total is not None and length != total:
                raise FetchError(f"{label}: {url} has {length} bytes, expected {total}: the server serves another "
                                 "file; check the URL (or the repository's revision)")
            total = length
            if bar.total != total:
                bar.total = total
                bar.refresh()
        if total is not None:
            _check_space(part, total - done, label)
        received = 0
        try:
            for chunk in response.iter_content(CHUNK):
                try:
                    f.write(chunk)
                except OSError as e:
                    raise FetchError(f"{label}: cannot write {part}: {e.strerror or e}") from None
                received += len(chunk)
                done += len(chunk)
                bar.update(len(chunk))
        except requests.RequestException as e:
            f.flush()
            raise _Retry(f"the transfer broke after {done} bytes ({_reason(e)})", done=done, received=received) from None
        f.flush()
    return received, done, total, reset


def _check_space(part: Path, needed: int, label: str) -> None:
    try:
        free = shutil.disk_usage(part.parent).free
    except OSError:
        return
    if needed > free:
        raise FetchError(f"{label}: {human(needed)} to download but only {human(free)} free in {part.parent}: "
                         "free some space, or choose another folder")


def _reason(error: BaseException) -> str:
    """A short reason of a requests error ('Connection refused', 'Read timed out', ...)."""
    text = str(error)
    for marker in ("Connection refused", "Name or service not known", "Temporary failure in name resolution",
                   "No route to host", "Network is unreachable", "Read timed out", "Connection reset by peer",
                   "timed out", "IncompleteRead", "Connection broken"):
        if marker in text:
            return marker
    return f"{type(error).__name__}: {text[:200]}"
