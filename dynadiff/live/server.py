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
"""

from __future__ import annotations

import dataclasses
import errno
import http.server
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
            self._send(200, PAGE.encode(), "text/html; charset=utf-8", body, {"Cache-Control": "no-store"})
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


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Dynadiff live</title>
<link rel="icon" href="data:,">
<style>
:root {
  color-scheme: light dark;
  --bg: #f5f5f4; --panel: #ffffff; --text: #1c1c1c; --muted: #5f5f5f; --line: #dcdcdc;
  --info: #2f5f9e; --warning: #8a5a00; --error: #b3261e; --ok: #2e7d32;
}
@media (prefers-color-scheme: dark) {
  :root { --bg: #161617; --panel: #202022; --text: #ececec; --muted: #a3a3a3; --line: #38383b;
          --info: #8ab4f8; --warning: #f0b44c; --error: #f28b82; --ok: #81c995; }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--text);
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header { position: sticky; top: 0; z-index: 1; background: var(--bg); border-bottom: 1px solid var(--line);
         padding: 12px 20px; display: flex; flex-wrap: wrap; align-items: baseline; gap: 6px 18px; }
h1 { font-size: 18px; margin: 0; font-weight: 600; }
#status { font-weight: 600; }
#status.waiting { color: var(--muted); }
#status.running { color: var(--info); }
#status.done { color: var(--ok); }
#status.lost { color: var(--error); }
#summary { color: var(--muted); font-variant-numeric: tabular-nums; }
main { display: grid; grid-template-columns: minmax(0, 1fr) 320px; gap: 20px; padding: 16px 20px;
       max-width: 1200px; }
@media (max-width: 820px) { main { grid-template-columns: 1fr; } #side { order: -1; } #messages { max-height: 9.5em; } }
h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin: 0 0 8px;
     font-weight: 600; }
#trials { list-style: none; margin: 0; padding: 0; display: flex; flex-direction: column; gap: 10px; }
.trial { display: grid; grid-template-columns: auto auto minmax(0, 1fr); gap: 14px; align-items: start;
         background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 10px; }
.trial.new { animation: arrive 1.2s ease-out; }
@keyframes arrive { from { border-color: var(--info); box-shadow: 0 0 0 2px var(--info); } }
figure { margin: 0; }
figure img, .missing { display: block; width: 176px; height: 176px; object-fit: contain; border-radius: 4px;
                       background: var(--bg); }
.missing { display: flex; align-items: center; justify-content: center; text-align: center; padding: 8px;
           color: var(--muted); border: 1px dashed var(--line); font-size: 13px; }
figcaption { font-size: 12px; color: var(--muted); margin-top: 4px; }
dl { margin: 0; display: grid; grid-template-columns: auto 1fr; gap: 2px 12px;
     font-variant-numeric: tabular-nums; }
dt { color: var(--muted); }
dd { margin: 0; }
.name { font-size: 17px; font-weight: 600; }
#empty { color: var(--muted); padding: 28px 0; }
#messages { list-style: none; margin: 0; padding: 0; max-height: 70vh; overflow-y: auto;
            background: var(--panel); border: 1px solid var(--line); border-radius: 8px; }
#messages li { padding: 7px 10px; border-bottom: 1px solid var(--line); font-size: 13px; }
#messages li:last-child { border-bottom: 0; }
#messages time { color: var(--muted); font-variant-numeric: tabular-nums; margin-right: 6px; }
.level { font-weight: 600; text-transform: uppercase; font-size: 11px; margin-right: 6px; }
.level.info { color: var(--info); } .level.warning { color: var(--warning); } .level.error { color: var(--error); }
#no-messages { color: var(--muted); font-size: 13px; }
</style>
</head>
<body>
<header>
  <h1>Dynadiff live</h1>
  <span id="status" class="waiting" role="status" aria-live="polite">Waiting for the first trial&hellip;</span>
  <span id="summary"></span>
</header>
<main>
  <section aria-labelledby="trials-title">
    <h2 id="trials-title">Trials, newest first</h2>
    <p id="empty">Waiting for the first trial: each reconstruction appears here as soon as it is decoded.</p>
    <ol id="trials"></ol>
  </section>
  <aside id="side" aria-labelledby="messages-title">
    <h2 id="messages-title">Messages</h2>
    <p id="no-messages">None yet.</p>
    <ol id="messages" role="log" aria-live="polite" hidden></ol>
  </aside>
</main>
<script>
"use strict";
const POLL_MS = __POLL_MS__, HIDDEN_POLL_MS = 1000;
const $ = (id) => document.getElementById(id);
const rows = new Map();  // trial number -> {row, image_written}
const decoded = new Map();  // trial number -> image_written of every version shown (a folder can be restarted)
let etag = null, lastMessages = "", state = null, lost = false;

function el(tag, props, children) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const c of children || []) e.append(c);
  return e;
}
const fmtSeconds = (s) => (typeof s === "number" && isFinite(s)) ? s.toFixed(2) + " s" : "\\u2013";
const fmtTime = (t) => new Date(t * 1000).toLocaleTimeString([], {hour12: false});

function figure(src, alt, caption) {
  const img = el("img", {src: src, alt: alt, decoding: "async"});
  return el("figure", {}, [el("a", {href: src, target: "_blank", rel: "noopener"}, [img]),
                           el("figcaption", {textContent: caption})]);
}

function trialRow(t) {
  const number = "trial " + t.name;
  // A new version of a trial already shown (a session restarted on a cleared folder): a new URL, or the
  // browser would show the image it holds.
  const again = decoded.has(t.trial) && decoded.get(t.trial) !== t.image_written;
  const v = again ? "?v=" + encodeURIComponent(t.image_written) : "";
  const seen = t.nsd_id === null || t.nsd_id === undefined ? "" : " (NSD image " + t.nsd_id + ")";
  const truth = t.truth ? figure(t.truth + v, "Image shown at " + number + seen, "Ground truth")
    : el("figure", {}, [el("div", {className: "missing", textContent: "Ground truth unknown"}),
                        el("figcaption", {textContent: "Ground truth"})]);
  const meta = el("dl", {}, []);
  const add = (k, v, cls) => { meta.append(el("dt", {textContent: k}),
                                           el("dd", {textContent: v, className: cls || ""})); };
  add("NSD image", t.nsd_id === null || t.nsd_id === undefined ? "unknown" : String(t.nsd_id), "nsd-id");
  add("Latency", fmtSeconds(t.latency_s), "latency");
  add("Onset, last vol.", t.onset_volume + ", " + t.last_volume);
  if (t.image_written) add("Decoded at", fmtTime(t.image_written));
  const row = el("li", {className: "trial new", id: "trial-" + t.name}, [
    figure(t.image + v, "Reconstruction of " + number + " decoded from fMRI", "Reconstruction"), truth,
    el("div", {}, [el("div", {className: "name", textContent: "Trial " + t.name}), meta])]);
  row.dataset.trial = String(t.trial);
  row.addEventListener("animationend", () => row.classList.remove("new"));
  return row;
}

function renderTrials(trials) {
  const list = $("trials"), present = new Set();
  for (const t of trials) {
    present.add(t.trial);
    const known = rows.get(t.trial);
    if (known && known.image_written === t.image_written) continue;  // shown: its images are not fetched again
    const row = trialRow(t);
    if (known) known.row.replaceWith(row);
    else {  // newest (highest trial number) first
      let before = null;
      for (const r of list.children) if (Number(r.dataset.trial) < t.trial) { before = r; break; }
      list.insertBefore(row, before);
    }
    rows.set(t.trial, {row: row, image_written: t.image_written});
    decoded.set(t.trial, t.image_written);
  }
  for (const [trial, known] of rows) if (!present.has(trial)) { known.row.remove(); rows.delete(trial); }
  $("empty").hidden = rows.size > 0;
}

function renderMessages(messages) {
  const key = JSON.stringify(messages);
  if (key === lastMessages) return;
  lastMessages = key;
  const list = $("messages");
  list.replaceChildren(...messages.slice().reverse().map((m) => el("li", {className: "message " + m.level}, [
    el("time", {textContent: fmtTime(m.time)}), el("span", {className: "level " + m.level, textContent: m.level}),
    el("span", {className: "text", textContent: m.text})])));
  list.hidden = messages.length === 0;
  $("no-messages").hidden = messages.length > 0;
}

function renderStatus() {
  const s = $("status"), n = rows.size, trials = n + (n === 1 ? " trial" : " trials");
  let text, cls;
  if (lost) { text = "Lost contact with the server: retrying\\u2026"; cls = "lost"; }
  else if (!state) { text = "Connecting\\u2026"; cls = "waiting"; }
  else if (state.status === "done") { text = "Done: " + trials + " decoded"; cls = "done"; }
  else if (n === 0) { text = "Waiting for the first trial\\u2026"; cls = "waiting"; }
  else if (state.status === "running") { text = "Running: " + trials + " decoded"; cls = "running"; }
  else { text = "Waiting for volumes: " + trials + " so far"; cls = "waiting"; }
  if (s.textContent !== text) s.textContent = text;
  s.className = cls;
  document.title = (n ? "(" + n + ") " : "") + "Dynadiff live";
}

function renderSummary(trials) {
  const lat = trials.map((t) => t.latency_s).filter((x) => typeof x === "number").sort((a, b) => a - b);
  if (!lat.length) { $("summary").textContent = ""; return; }
  const mid = lat.length >> 1, median = lat.length % 2 ? lat[mid] : (lat[mid - 1] + lat[mid]) / 2;
  const last = trials.reduce((a, b) => (b.trial > a.trial ? b : a));
  $("summary").textContent = "latency: last " + fmtSeconds(last.latency_s) + ", median " + fmtSeconds(median)
    + ", max " + fmtSeconds(lat[lat.length - 1]);
}

async function poll() {
  try {
    const response = await fetch("trials.json", {cache: "no-store", headers: etag ? {"If-None-Match": etag} : {}});
    if (response.status === 200) {
      const next = await response.json();
      etag = response.headers.get("ETag");
      state = next;
      renderTrials(state.trials || []);
      renderMessages(state.messages || []);
      renderSummary(state.trials || []);
    } else if (response.status !== 304) {
      throw new Error("HTTP " + response.status);
    }
    lost = false;
  } catch (e) {
    lost = true;
  }
  renderStatus();
  setTimeout(poll, document.hidden ? HIDDEN_POLL_MS : POLL_MS);
}
poll();
</script>
</body>
</html>
""".replace("__POLL_MS__", str(POLL_MS))
