"""The page of a live session: the reconstructions of one output folder (:mod:`.record`) as they arrive.

    server = start_server(folder)          # 127.0.0.1, a free port; serves from a daemon thread
    print(server.url)                      # http://127.0.0.1:PORT/
    ...
    server.close()

It serves ``GET /`` (the page: self-contained, no resource from outside this server, so it works offline),
``GET /trials.json`` (the folder's state, never cached; an empty state until the session writes it) and the
trials' PNGs (``0007.png``, ``0007_truth.png``: only names of that form, from that folder; anything else is a
404). The page polls ``trials.json`` every 250 ms (1 s while hidden) with ``If-None-Match``, so an unchanged
state costs a 304; it adds each new trial at the top without reloading and never fetches an image twice.

Requests whose ``Host`` is not this machine are refused (403) when bound to a loopback address: a web page
elsewhere cannot read the session through a DNS-rebinding name.

The page's source is package data, ``page/index.html``, ``page.css`` and ``page.js``: served as one document,
the stylesheet and the script inlined in place of the ``<link>`` and ``<script src>`` that name them, and
``__POLL_MS__`` in the script replaced by :data:`POLL_MS`.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import http.server
import importlib.resources
import ipaddress
import json
import logging
import os
import re
import socket
import socketserver
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

from dynadiff.live.record import STATE_FILE

logger = logging.getLogger(__name__)

# The record's images: {name}.png and {name}_truth.png, name = the trial's number on 4 digits or more.
IMAGE_NAME = re.compile(r"\d{4,}(_truth)?\.png")
POLL_MS = 250
# The page's files (package data) and where index.html names the other two: replaced by their text, inlined.
PAGE_FILES = "page"
_INLINED = {
    "page.css": (b'<link rel="stylesheet" href="page.css">', b"<style>\n%s</style>"),
    "page.js": (b'<script src="page.js"></script>', b"<script>\n%s</script>"),
}
EMPTY_STATE = {"version": 1, "status": "waiting", "updated": None, "tr_s": None, "trials": [], "messages": []}


class ServeError(RuntimeError):
    """The page cannot be served (port taken, address not available): the message is one line for the user."""


@dataclasses.dataclass
class LiveServer:
    """A running server (:func:`start_server`); ``close()`` stops it (also on leaving a ``with`` block)."""

    folder: Path
    host: str
    port: int
    _httpd: http.server.ThreadingHTTPServer = dataclasses.field(repr=False)
    _thread: threading.Thread = dataclasses.field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def close(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_server(folder: Path, host: str = "127.0.0.1", port: int = 0) -> LiveServer:
    """Serve the page of ``folder`` (which may not exist yet: the page then waits for the first trial) on
    ``host:port`` (``port=0``: a free one) from a daemon thread. Raises :class:`ServeError` when the address
    cannot be bound."""
    folder = Path(folder).resolve()
    if folder.exists() and not folder.is_dir():
        raise ServeError(f"cannot serve {folder}: it is a file, not a live session's folder")
    if not 0 <= port <= 65535:
        raise ServeError(f"port {port} is not a port number (0-65535; 0 picks a free one)")
    page()  # a broken installation (page files missing) fails here, not at the first request
    handler = type("LiveHandler", (_Handler,), {"folder": folder, "loopback_only": _is_loopback(host)})
    server_class = _Server6 if ":" in host else _Server
    try:
        httpd = server_class((host, port), handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is already in use: choose another with --port N, "
                             f"or --port 0 for a free one") from None
        if e.errno == errno.EACCES:
            raise ServeError(f"no permission to listen on port {port} (ports below 1024 need root): "
                             f"choose another with --port N, or --port 0 for a free one") from None
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound_port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"live-page-{bound_port}", daemon=True)
    thread.start()
    server = LiveServer(folder, host, bound_port, httpd, thread)
    logger.info("live page of %s at %s", folder, server.url)
    return server


@functools.cache
def page() -> bytes:
    """The page served at ``/``: ``page/index.html`` with ``page.css`` and ``page.js`` inlined (read once)."""
    folder = importlib.resources.files("dynadiff.live").joinpath(PAGE_FILES)
    html = folder.joinpath("index.html").read_bytes()
    for name, (tag, inline) in _INLINED.items():
        if html.count(tag) != 1:
            raise RuntimeError(f"dynadiff/live/{PAGE_FILES}/index.html should name {name} once, as {tag.decode()}")
        text = folder.joinpath(name).read_bytes().replace(b"__POLL_MS__", str(POLL_MS).encode())
        html = html.replace(tag, inline % text)
    return html


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Server(http.server.ThreadingHTTPServer):
    def server_bind(self) -> None:
        # HTTPServer.server_bind would look the host's name up (socket.getfqdn): slow, or stuck, offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request, client_address) -> None:
        # A page closed mid-request, a malformed request: not worth a traceback on the session's terminal.
        logger.debug("live page: error answering %s", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


def _etag(st: os.stat_result) -> str:
    # A new file (renamed into place) has a new inode and modification time.
    return f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'


class _Handler(http.server.BaseHTTPRequestHandler):
    folder: Path
    loopback_only: bool
    server_version = "dynadiff-live"
    sys_version = ""

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's signature)
        logger.debug("%s %s", self.address_string(), format % args)

    def _respond(self, body: bool) -> None:
        if self.loopback_only and not self._host_is_local():
            self._send(403, b"Forbidden: this page answers to localhost only\n", "text/plain; charset=utf-8", body)
            return
        path = unquote(urlsplit(self.path).path)
        if path in ("/", "/index.html"):
            self._send(200, page(), "text/html; charset=utf-8", body, {"Cache-Control": "no-store"})
        elif path == "/" + STATE_FILE:
            self._send_state(body)
        elif path.startswith("/") and IMAGE_NAME.fullmatch(path[1:]):
            self._send_image(path[1:], body)
        else:
            self._send(404, b"Not found\n", "text/plain; charset=utf-8", body)

    def _host_is_local(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        if not host:
            return True  # not a browser (browsers always send it)
        host = host[1:host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0]
        return _is_loopback(host)

    def _send_state(self, body: bool) -> None:
        path = self.folder / STATE_FILE
        try:
            with open(path, "rb") as f:  # replaced atomically by the session: this is one whole version
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            data, st = json.dumps(EMPTY_STATE).encode(), None
        except OSError as e:
            self._send(503, f"cannot read {STATE_FILE}: {e.strerror or e}\n".encode(), "text/plain; charset=utf-8",
                       body)
            return
        headers = {"Cache-Control": "no-store"}
        if st is not None:
            headers["ETag"] = _etag(st)
            if self.headers.get("If-None-Match") == headers["ETag"]:
                self._send(304, b"", None, False, headers)
                return
        self._send(200, data, "application/json", body, headers)

    def _send_image(self, name: str, body: bool) -> None:
        try:
            with open(self.folder / name, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except OSError:  # absent, a folder, unreadable
            self._send(404, b"Not found\n", "text/plain; charset=utf-8", body)
            return
        # Written once (to a temporary name, then renamed): revalidated, never re-sent unchanged.
        headers = {"Cache-Control": "no-cache", "ETag": _etag(st)}
        if self.headers.get("If-None-Match") == headers["ETag"]:
            self._send(304, b"", None, False, headers)
            return
        self._send(200, data, "image/png", body, headers)

    def _send(self, code: int, data: bytes, content_type: str | None, body: bool,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        if content_type is not None:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if body and data:
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the page went away mid-response
