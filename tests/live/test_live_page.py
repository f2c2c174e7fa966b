"""The live page (dynadiff.live.server): its HTTP answers, and a real headless Chromium showing each trial of a
session's folder within a second of its file appearing.

The browser test is skipped, with the reason, where Debian's chromium and chromium-driver are not installed
(scripts/install_browser.sh) or selenium is missing; with DYNADIFF_REQUIRE_BROWSER=1 (CI) it fails instead, so
a broken install cannot pass as a skip.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import time

import browser  # scripts/browser.py
import numpy as np
import pytest

from dynadiff.live.record import LiveRecord, TrialResult
from dynadiff.live.server import ServeError, start_server

TR = 1.6


def get(server, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of ``GET path``, sent as it is (no normalisation of ``..``, no proxy)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def add_trial(record: LiveRecord, trial: int, nsd_id: int | None, shape: tuple[int, int], truth: bool, seed: int):
    """Write a trial of random images (``shape``: height, width) whose last volume was written 1.5 s ago."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    seen = rng.integers(0, 256, (*shape, 3), dtype=np.uint8) if truth else None
    now = time.time()
    result = TrialResult(trial=trial, onset_volume=3 * trial + 2, last_volume=3 * trial + 5, nsd_id=nsd_id,
                         volume_written=now - 1.5, volume_seen=now - 1.4, image_written=0.0)
    return record.add(result, image, seen)


@pytest.fixture
def served(tmp_path):
    """A server on a session folder that does not exist yet (as when the page is opened before the first volume)."""
    out = tmp_path / "live"
    with start_server(out) as server:
        yield server, out


# --- HTTP -----------------------------------------------------------------------------------------------------


def test_page_is_self_contained(served):
    server, _ = served
    assert server.url == f"http://127.0.0.1:{server.port}/"
    status, headers, body = get(server, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    page = body.decode()
    assert "Waiting for the first trial" in page and "trials.json" in page
    # Nothing from elsewhere: no URL with a scheme or a network-path reference, no external script or style.
    assert not re.search(r"https?://|(src|href)=\"//|<script[^>]*\ssrc=|<link[^>]*stylesheet", page)


def test_state_empty_then_written_and_revalidated(served):
    server, out = served
    status, headers, body = get(server, "/trials.json")
    assert status == 200 and headers["cache-control"] == "no-store"
    state = json.loads(body)
    assert state["status"] == "waiting" and state["trials"] == [] and state["messages"] == []

    record = LiveRecord(out, tr=TR)
    result = add_trial(record, 0, 731, (9, 7), truth=True, seed=0)
    status, headers, body = get(server, "/trials.json")
    state = json.loads(body)
    assert status == 200 and headers["cache-control"] == "no-store"
    assert [(t["name"], t["image"], t["truth"], t["nsd_id"]) for t in state["trials"]] == [
        ("0000", "0000.png", "0000_truth.png", 731)]
    assert state["trials"][0]["latency_s"] == pytest.approx(result.latency_s, abs=1e-4)
    assert body == (out / "trials.json").read_bytes()

    # Unchanged: 304 without a body; changed (a message): the new state.
    etag = headers["etag"]
    status, _, body = get(server, "/trials.json", {"If-None-Match": etag})
    assert status == 304 and body == b""
    record.note("warning", "volume 9 arrived late")
    status, headers, body = get(server, "/trials.json", {"If-None-Match": etag})
    assert status == 200 and headers["etag"] != etag
    assert json.loads(body)["messages"][-1]["text"] == "volume 9 arrived late"


def test_images_of_the_record_only(served):
    server, out = served
    add_trial(LiveRecord(out, tr=TR), 0, 5, (9, 7), truth=True, seed=1)
    for name in ("0000.png", "0000_truth.png"):
        status, headers, body = get(server, "/" + name)
        assert status == 200 and headers["content-type"] == "image/png"
        assert body == (out / name).read_bytes()
        status, _, body = get(server, "/" + name, {"If-None-Match": headers["etag"]})
        assert status == 304 and body == b""

    (out.parent / "0001.png").write_bytes((out / "0000.png").read_bytes())  # beside the folder, not in it
    (out / "0002.png.tmp.png").write_bytes(b"half-written")
    (out / "sub").mkdir()
    (out / "sub" / "0003.png").write_bytes((out / "0000.png").read_bytes())
    (out / "0004.png").mkdir()
    for path in ("/../0001.png", "/%2e%2e/0001.png", "/..%2f0001.png", "/sub/0003.png", "/0002.png.tmp.png",
                 "/latency.csv", "/0009.png", "/0000.PNG", "/0004.png", "/etc/passwd", "//0001.png", "/x.png"):
        status, _, _ = get(server, path)
        assert status == 404, path


def test_page_answers_to_localhost_only(served):
    server, _ = served
    assert get(server, "/trials.json", {"Host": f"localhost:{server.port}"})[0] == 200
    status, _, body = get(server, "/trials.json", {"Host": f"rebound.example:{server.port}"})
    assert status == 403 and b"localhost" in body


def test_port_in_use_is_one_line_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServeError, match=rf"^port {port} on 127\.0\.0\.1 is already in use: .*--port 0") as e:
            start_server(tmp_path, port=port)
        assert "\n" not in str(e.value)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ServeError, match="a_file: it is a file"):
        start_server(tmp_path / "a_file")


def test_close_frees_the_port(tmp_path):
    server = start_server(tmp_path)
    port = server.port
    server.close()
    with start_server(tmp_path, port=port) as again:
        assert get(again, "/")[0] == 200


# --- a real browser -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    """Headless Chromium (Debian's, through Debian's chromedriver); skipped, or failed with
    DYNADIFF_REQUIRE_BROWSER=1, where it is not installed."""
    reason = browser.unavailable_reason()
    if reason:
        if os.environ.get("DYNADIFF_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DYNADIFF_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    driver = browser.start_chromium(width=1000, height=800)
    yield driver
    driver.quit()


ROWS_JS = """
return [...document.querySelectorAll('#trials > li')].map((li) => ({
  trial: Number(li.dataset.trial),
  text: li.innerText,
  latency: (li.querySelector('.latency') || {}).textContent,
  images: [...li.querySelectorAll('img')].map((img) => ({
    src: img.getAttribute('src'), alt: img.alt, width: img.naturalWidth, height: img.naturalHeight,
    loaded: img.complete && img.naturalWidth > 0})),
}));
"""


def wait_for(driver, condition, timeout: float = 5.0):
    """Poll the page every 10 ms until ``condition(rows)`` is true: (rows, seconds waited)."""
    start = time.monotonic()
    while True:
        rows = driver.execute_script(ROWS_JS)
        if condition(rows):
            return rows, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"the page did not show it within {timeout} s; it shows: {rows}")
        time.sleep(0.01)


def shown(name: str):
    """The newest row is trial ``name`` with its reconstruction loaded."""
    def condition(rows):
        return bool(rows) and rows[0]["images"] and rows[0]["images"][0]["src"].endswith(f"{name}.png") \
            and rows[0]["images"][0]["loaded"]
    return condition


def page_text(driver, element_id: str) -> str:
    return driver.execute_script(f"return document.getElementById('{element_id}').innerText")


def test_browser_shows_each_trial_within_a_second(chromium, served):
    server, out = served
    driver = chromium
    driver.get(server.url)
    deadline = time.monotonic() + 5
    while "Waiting for the first trial" not in page_text(driver, "status"):
        assert time.monotonic() < deadline, page_text(driver, "status")
        time.sleep(0.02)
    assert driver.execute_script(ROWS_JS) == []

    record = LiveRecord(out, tr=TR)
    # Timed from before the call that writes the PNG (so an upper bound of "since the file appeared").
    before = time.monotonic()
    first = add_trial(record, 0, 46003, (48, 40), truth=True, seed=2)
    rows, _ = wait_for(driver, shown("0000"))
    appeared = time.monotonic() - before
    assert appeared < 1.0, f"the first trial took {appeared:.3f} s to show"
    (row,) = rows
    recon, truth = row["images"]
    assert (recon["width"], recon["height"]) == (40, 48)  # the file itself, not a placeholder
    assert truth["src"].endswith("0000_truth.png") and truth["loaded"] and truth["width"] == 40
    assert "Reconstruction of trial 0000" in recon["alt"] and "NSD image 46003" in truth["alt"]
    assert "Trial 0000" in row["text"] and "46003" in row["text"]
    assert row["latency"].endswith(" s") and float(row["latency"][:-2]) == pytest.approx(first.latency_s, abs=0.006)

    before = time.monotonic()
    add_trial(record, 1, None, (48, 40), truth=False, seed=3)
    rows, _ = wait_for(driver, shown("0001"))
    appeared_second = time.monotonic() - before
    assert appeared_second < 1.0, f"the second trial took {appeared_second:.3f} s to show"
    assert [r["trial"] for r in rows] == [1, 0]  # newest first
    assert len(rows[0]["images"]) == 1 and "Ground truth unknown" in rows[0]["text"]
    # The first trial's images were fetched once: kept, not reloaded, when the second arrived.
    fetched = driver.execute_script(
        "return ['0000.png', '0000_truth.png'].map((n) => performance.getEntriesByName(new URL(n, location).href).length)")
    assert fetched == [1, 1]

    record.note("warning", "volume 12 arrived 0.8 s late")
    deadline = time.monotonic() + 1.0
    while "volume 12 arrived 0.8 s late" not in page_text(driver, "messages"):
        assert time.monotonic() < deadline, page_text(driver, "messages")
        time.sleep(0.02)
    assert "WARNING" in page_text(driver, "messages").upper()

    record.set_status("done")
    deadline = time.monotonic() + 1.0
    while "Done: 2 trials decoded" not in page_text(driver, "status"):
        assert time.monotonic() < deadline, page_text(driver, "status")
        time.sleep(0.02)
    print(f"trials shown {appeared:.3f} s and {appeared_second:.3f} s after the calls that wrote them")
