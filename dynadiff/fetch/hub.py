"""The Hugging Face Hub side: a repository's files at a revision (names, sizes, hashes), their URLs, the token.

Everything goes through huggingface_hub, so its environment variables apply as
they do for ``hf download``: ``HF_ENDPOINT`` (the server), ``HF_TOKEN`` (else
the token file under ``HF_HOME``, written by ``hf auth login``),
``HF_HUB_OFFLINE``. The bytes themselves are fetched by
:func:`dynadiff.fetch.http.download` (resumable across runs, which
huggingface_hub's own downloads are not: its partial files are discarded).
"""

from __future__ import annotations

import dataclasses
import logging
import re

from dynadiff.fetch.http import FetchError
from dynadiff.retry import Transient, retry

logger = logging.getLogger(__name__)
_COMMIT = re.compile(r"[0-9a-f]{40}")
GIT_FILE_LIMIT = 10 * 2**20  # bytes: larger files of a Hub repository are stored with LFS (or Xet)


@dataclasses.dataclass(frozen=True)
class HubFile:
    path: str  # in the repository, "/"-separated
    size: int | None
    sha256: str | None  # LFS files: the content's SHA-256
    git_sha1: str | None  # other files: the git blob id (SHA-1 of "blob {size}\0" + content)


@dataclasses.dataclass(frozen=True)
class HubListing:
    """The files of ``repo`` at ``revision``, which was ``commit`` when listed."""

    repo: str
    revision: str
    commit: str
    files: dict[str, HubFile]

    def to_json(self) -> dict:
        return {"repo": self.repo, "revision": self.revision, "commit": self.commit,
                "files": {p: [f.size, f.sha256, f.git_sha1] for p, f in self.files.items()}}

    @classmethod
    def from_json(cls, data: dict) -> HubListing:
        files = {p: HubFile(p, *values) for p, values in data["files"].items()}
        return cls(data["repo"], data["revision"], data["commit"], files)


def is_commit(revision: str) -> bool:
    """A full commit hash (immutable), as opposed to a branch or tag."""
    return _COMMIT.fullmatch(revision) is not None


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def repo_page(repo: str) -> str:
    return f"{endpoint()}/{repo}"


def file_url(repo: str, commit: str, path: str) -> str:
    """The ``resolve`` URL of a file at a commit (immutable: it can be resumed and re-fetched safely)."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo, path, revision=commit)


def auth_headers() -> dict[str, str]:
    """huggingface_hub's request headers: user agent and, when a token is set, ``authorization``."""
    from huggingface_hub.utils import build_hf_headers

    return build_hf_headers()


def has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def access_hint(repo: str, status: int) -> str:
    """What to do after an HTTP error ``status`` from the Hub for ``repo`` (leading ': ' included)."""
    if status in (401, 403):
        token = ("the token sent (HF_TOKEN, else the token file under HF_HOME) has no access to it" if has_token()
                 else "no token is set")
        return (f": the repository is gated or private ({token}): accept its terms on {repo_page(repo)} while "
                "logged in, then set HF_TOKEN to a read token of that account")
    if status == 404:
        return f": not found at {endpoint()}: check the repository and revision in config/weights.yaml, and HF_ENDPOINT"
    if status >= 500:
        return f": the Hub ({endpoint()}) is failing: try again later, or check HF_ENDPOINT"
    return ""


def list_repo(repo: str, revision: str, *, config_key: str, retries: int = 5, backoff: float = 1.0) -> HubListing:
    """The files of ``repo`` at ``revision`` with their sizes and hashes (one API call: model info with blobs).

    ``config_key`` names the setting of the revision, for the message when it does not exist.
    Raises :class:`FetchError` (one line) for an unreachable Hub, a missing or gated repository, a missing revision.
    """
    import httpx2
    from huggingface_hub import HfApi, ModelInfo, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if constants.is_offline_mode():
        raise FetchError(f"{repo}: HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: unset it to download from the Hub")
    where = f"{repo}@{revision}"
    unreachable = False  # the last failure: no answer at all (as opposed to a 5xx)

    def once() -> ModelInfo:
        nonlocal unreachable
        try:
            return HfApi().model_info(repo, revision=revision, files_metadata=True)
        except OfflineModeIsEnabled:
            raise FetchError(f"{repo}: HF_HUB_OFFLINE is set: unset it to download from the Hub") from None
        except GatedRepoError as e:
            raise FetchError(f"{where}: access refused (HTTP {e.response.status_code}){access_hint(repo, 403)}") from None
        except RevisionNotFoundError:
            raise FetchError(f"{repo} has no revision {revision!r} at {endpoint()}: check {config_key} "
                             "(a branch, tag or commit hash of the repository)") from None
        except RepositoryNotFoundError as e:
            status = e.response.status_code if e.response is not None else 404
            if status in (401, 403):
                raise FetchError(f"{where}: access refused (HTTP {status}) by {endpoint()}{access_hint(repo, status)}; "
                                 "if the name is wrong, fix it in config/weights.yaml") from None
            raise FetchError(f"no repository {repo} at {endpoint()} (HTTP {status}): check its name in "
                             "config/weights.yaml, and HF_ENDPOINT") from None
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else 0
            if status < 500 and status not in (408, 429):
                raise FetchError(f"{where}: the Hub answered HTTP {status}{access_hint(repo, status)}") from None
            unreachable = False
            raise Transient(f"HTTP {status} from {endpoint()}") from None
        except (httpx2.TransportError, OSError) as e:
            unreachable = True
            raise Transient(f"cannot reach {endpoint()} ({_short(e)})") from None

    def give_up(cause: Transient, attempts: int) -> FetchError:
        return FetchError(f"{where}: giving up after {attempts} attempt(s): {cause}: check the network, proxy "
                          "(HTTPS_PROXY) and HF_ENDPOINT, or try again later", unreachable=unreachable)

    info = retry(once, label=where, retries=retries, backoff=backoff, give_up=give_up, log=logger)
    if not info.sha:
        raise FetchError(f"{where}: the Hub's answer has no commit hash: is HF_ENDPOINT ({endpoint()}) a Hub?")
    files = {}
    for sibling in info.siblings or []:
        lfs = sibling.lfs
        size = lfs.size if lfs is not None else sibling.size
        # the blob id hashes the content only for a file stored in git itself (the Hub keeps those under 10 MB;
        # a bigger one without LFS details is not trusted to be one)
        in_git = lfs is None and size is not None and size <= GIT_FILE_LIMIT
        files[sibling.rfilename] = HubFile(sibling.rfilename, size, lfs.sha256 if lfs is not None else None,
                                           sibling.blob_id if in_git else None)
    return HubListing(repo, revision, info.sha, files)


def _short(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    for marker in ("Connection refused", "Name or service not known", "Temporary failure in name resolution",
                   "timed out", "No route to host", "Network is unreachable"):
        if marker in text:
            return marker
    return text.splitlines()[0][:200]
