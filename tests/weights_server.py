"""A local HTTP server standing in for the weights' hosts, for tests/test_prepare_weights.py.

It plays, on 127.0.0.1 (the only address the tests' network guard allows):

- the Hugging Face Hub, for ``HF_ENDPOINT``: ``GET /api/models/{repo}/revision/{rev}`` (model info with
  ``blobs=true``: commit, file names, sizes, LFS SHA-256, git blob ids; 404 with ``X-Error-Code`` RepoNotFound /
  RevisionNotFound; 401 RepoNotFound for a private repository without its token) and ``GET|HEAD /{repo}/resolve/{rev}/{path}``
  (small files served directly with ``X-Repo-Commit`` and ``ETag``; LFS files redirected to ``/lfs/{sha256}``;
  401 GatedRepo for a gated repository's files without its token);
- download.pytorch.org, dl.fbaipublicfiles.com and github.com under ``/tv/``, ``/fb/`` and ``/gh/`` (the
  ``mirrors.*`` settings point there).

Every file answers ``Range: bytes=N-`` with 206 (416 past its end). Each request is recorded
(:attr:`WeightsServer.requests`), and faults can be set per path: an HTTP status (``status``, for the next
``times`` requests or always), half the body then a closed connection (``truncate``), or part of the body then
a stall until :meth:`release` (``stall_at``), or a Range header ignored (``ignore_range``).

Run as a script (``python tests/weights_server.py ARGS``), it runs ``prepare_weights.py ARGS`` with the
torchvision file names of ``$FAKE_TORCHVISION_FILES`` (JSON): the published names embed the SHA-256 prefix of
the published files, which tiny test files cannot have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import re
import threading
import typing as tp
from urllib.parse import unquote, urlsplit

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclasses.dataclass
class Fault:
    status: int | None = None  # answer this status instead of the file
    times: int | None = None  # for that many requests (None: always)
    truncate: bool = False  # send half the body, then close the connection (once)
    stall_at: int | None = None  # send this many bytes, then wait for release() (once)
    ignore_range: bool = False  # answer a Range request with the whole file (200)


@dataclasses.dataclass
class Repo:
    files: dict[str, bytes]
    lfs: set[str]
    commit: str = COMMIT
    revision: str = "main"
    token: str | None = None  # private: every request must carry "Authorization: Bearer {token}"
    gated: str | None = None  # gated: listing open, file downloads need "Authorization: Bearer {gated}"


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class WeightsServer:
    def __init__(self):
        self.files: dict[str, bytes] = {}  # URL path -> content (plain URLs and LFS blobs)
        self.repos: dict[str, Repo] = {}
        self.faults: dict[str, Fault] = {}
        self.requests: list[Request] = []
        self._release = threading.Event()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                server._handle(self, head=True)

            def do_GET(self):
                server._handle(self, head=False)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ set-up

    def add_file(self, path: str, content: bytes) -> str:
        """Serve ``content`` at ``path`` (e.g. ``/tv/alexnet-....pth``); returns its URL."""
        self.files[path] = content
        return self.url + path

    def add_repo(self, repo: str, files: dict[str, bytes], lfs: tp.Iterable[str] = (), **kw) -> Repo:
        self.repos[repo] = Repo(dict(files), set(lfs), **kw)
        for name in self.repos[repo].lfs:
            self.files[f"/lfs/{hashlib.sha256(files[name]).hexdigest()}"] = files[name]
        return self.repos[repo]

    def fault(self, path: str, **kw) -> None:
        self.faults[path] = Fault(**kw)

    def release(self) -> None:
        self._release.set()

    def close(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    # ------------------------------------------------------------------ queries

    def gets(self, prefix: str = "") -> list[Request]:
        """File downloads (GET of a file body, API calls excluded) whose path starts with ``prefix``."""
        return [r for r in self.requests if r.method == "GET" and not r.path.startswith("/api/")
                and r.path.startswith(prefix)]

    def api_calls(self) -> list[Request]:
        return [r for r in self.requests if r.path.startswith("/api/")]

    # ------------------------------------------------------------------ serving

    def _handle(self, h: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self._lock:
            self.requests.append(Request(h.command, path, h.headers.get("Range"), h.headers.get("Authorization")))
            fault = self.faults.get(path)
            if fault is not None and fault.status is not None and fault.times is not None:
                fault.times -= 1
                if fault.times < 0:
                    fault = None
        if fault is not None and fault.status is not None:
            return self._send(h, fault.status, b"failure\n", {"Content-Type": "text/plain"}, head)
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
        if m:
            return self._model_info(h, m.group(1), m.group(2), head)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m:
            return self._resolve(h, m.group(1), m.group(2), m.group(3), head, fault)
        if path in self.files:
            return self._body(h, self.files[path], head, fault, {})
        return self._send(h, 404, b"not found\n", {"Content-Type": "text/plain"}, head)

    def _repo_or_error(self, h, repo_id: str, head: bool) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._send(h, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)
            return None
        if repo.token is not None and h.headers.get("Authorization") != f"Bearer {repo.token}":
            self._send(h, 401, b"{}", {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, head)
            return None
        return repo

    def _model_info(self, h, repo_id: str, revision: str, head: bool) -> None:
        repo = self._repo_or_error(h, repo_id, head)
        if repo is None:
            return
        if unquote(revision) not in (repo.revision, repo.commit):
            return self._send(h, 404, b"{}", {"X-Error-Code": "RevisionNotFound"}, head)
        siblings = []
        for name, data in sorted(repo.files.items()):
            entry = {"rfilename": name, "size": len(data), "blobId": git_sha1(data)}
            if name in repo.lfs:
                entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entry["blobId"] = git_sha1(b"version https://git-lfs.github.com/spec/v1\n")  # the pointer's
            siblings.append(entry)
        body = json.dumps({"id": repo_id, "sha": repo.commit, "siblings": siblings}).encode()
        self._send(h, 200, body, {"Content-Type": "application/json"}, head)

    def _resolve(self, h, repo_id: str, revision: str, name: str, head: bool, fault: Fault | None) -> None:
        repo = self._repo_or_error(h, repo_id, head)
        if repo is None:
            return
        if revision not in (repo.revision, repo.commit):
            return self._send(h, 404, b"", {"X-Error-Code": "RevisionNotFound"}, head)
        if name not in repo.files:
            return self._send(h, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit}, head)
        if repo.gated is not None and h.headers.get("Authorization") != f"Bearer {repo.gated}":
            return self._send(h, 401, b"", {"X-Error-Code": "GatedRepo", "X-Repo-Commit": repo.commit}, head)
        data = repo.files[name]
        headers = {"X-Repo-Commit": repo.commit}
        if name in repo.lfs:
            sha = hashlib.sha256(data).hexdigest()
            headers.update({"Location": f"/lfs/{sha}", "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                            "ETag": f'"{git_sha1(data)}"'})
            return self._send(h, 302, b"", headers, head)
        headers["ETag"] = f'"{git_sha1(data)}"'
        return self._body(h, data, head, fault, headers)

    def _body(self, h, data: bytes, head: bool, fault: Fault | None, headers: dict) -> None:
        start = 0
        status = 200
        match = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if match and not (fault is not None and fault.ignore_range):
            start = int(match.group(1))
            if start >= len(data):
                return self._send(h, 416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        body = data[start:]
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body)), "Accept-Ranges": "bytes",
                     "Content-Type": "application/octet-stream"}.items():
            h.send_header(k, v)
        h.end_headers()
        if head:
            return
        if fault is not None and fault.truncate:
            fault.truncate = False
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        if fault is not None and fault.stall_at is not None:
            cut, fault.stall_at = fault.stall_at, None
            h.wfile.write(body[:cut])
            h.wfile.flush()
            self._release.wait(60)
            h.close_connection = True
            return
        h.wfile.write(body)

    @staticmethod
    def _send(h, status: int, body: bytes, headers: dict, head: bool) -> None:
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)


if __name__ == "__main__":
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dynadiff.metrics import weights

    weights.TORCHVISION_FILES.update(json.loads(os.environ.get("FAKE_TORCHVISION_FILES", "{}")))
    from scripts import load_script

    sys.exit(load_script("prepare_weights").main(sys.argv[1:]))
