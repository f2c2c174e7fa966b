"""Screenshot of the live page (dynadiff.live.server) of a session's folder, in headless Chromium.

    .venv/bin/python scripts/screenshot_live_page.py FOLDER OUT.png [--example] [--width 1000] [--dark]

--example first writes three example trials into FOLDER (a new folder): stimuli of the synthetic mini-NSD as
ground truths, degraded copies of them as reconstructions, and two messages (to look at the page's layout
without a decoder). The README's picture is a real session's: the demo's trained decoder on a replayed run
(docs/live.md has the live.py command, here with --out /tmp/live_shot --speed 6 and session 21's run 5), then

    .venv/bin/python scripts/screenshot_live_page.py /tmp/live_shot docs/images/live_page.png --height 760

Needs Debian's chromium and chromium-driver (scripts/install_browser.sh) and selenium (requirements-dev.txt).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from browser import BrowserError, start_chromium  # scripts/browser.py, beside this script

from dynadiff.live.record import STATE_FILE, LiveRecord, TrialResult
from dynadiff.live.server import ServeError, start_server

MAX_BYTES = 150_000  # above: the PNG is reduced to 256 colours (dithered)


def write_example(folder: Path, n: int = 3, size: int = 256, tr: float = 1.6) -> None:
    """``n`` trials as a session would write them: ground truths from the synthetic stimuli, reconstructions
    that keep their coarse layout only (blurred, mixed with another smooth image, colours shifted)."""
    from scipy.ndimage import gaussian_filter

    from dynadiff.data.synthetic import make_images

    if (folder / STATE_FILE).exists():
        raise FileExistsError(f"{folder} already holds a session ({STATE_FILE}): give --example a new folder")
    rng = np.random.default_rng(7)
    images = make_images(2 * n, rng, size=size).astype(np.float32)  # (2n, size, size, 3)
    record = LiveRecord(folder, tr=tr)
    record.set_status("running")
    record.note("info", "watching volumes in /data/scanner/run01 (TR 1.6 s)")
    for trial in range(n):
        truth, other = images[trial], images[n + trial]
        recon = gaussian_filter(0.7 * truth + 0.3 * other, sigma=(size / 40, size / 40, 0))
        recon = np.clip((recon - 128.0) * 0.85 + 128.0 + rng.normal(0, 8, 3), 0, 255).astype(np.uint8)
        onset = 3 + 4 * trial
        written = time.time() - rng.uniform(1.2, 1.7)  # as if its last volume had arrived that long ago
        result = TrialResult(trial=trial, onset_volume=onset, last_volume=onset + 3, nsd_id=int(rng.integers(73000)),
                             volume_written=written, volume_seen=written + 0.05, image_written=0.0)
        record.add(result, recon, truth.astype(np.uint8))
        if trial == 1:
            record.note("warning", f"volume {onset + 5} arrived 0.8 s late (the scanner's export lagged)")


def screenshot(folder: Path, out: Path, width: int = 1000, dark: bool = False, height: int | None = None) -> int:
    """Open the page of ``folder``, wait for its images, write a PNG of the whole page; returns its size."""
    from PIL import Image

    with start_server(folder) as server:
        driver = start_chromium(width=width, height=700, color_scheme="dark" if dark else "light")
        try:
            driver.get(server.url)
            deadline = time.monotonic() + 10
            loaded = "return [...document.images].length > 0 && [...document.images].every((i) => i.complete)"
            while not driver.execute_script(loaded):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the page of {folder} showed no loaded image within 10 s")
                time.sleep(0.05)
            driver.execute_script("document.querySelectorAll('.new').forEach((e) => e.classList.remove('new'))")
            height = height or driver.execute_script("return document.documentElement.scrollHeight")
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",  # the viewport: the whole page or its top
                                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
            time.sleep(0.2)  # layout and paint at the new size
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    if buffer.tell() > MAX_BYTES:
        buffer = io.BytesIO()
        palette = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        # Dithered (smooth images would show bands): PIL dithers only towards a given palette.
        image.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(buffer, format="PNG", optimize=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    return buffer.tell()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a live session's output folder")
    p.add_argument("out", type=Path, help="the PNG to write")
    p.add_argument("--example", action="store_true", help="first write three example trials into FOLDER (new)")
    p.add_argument("--width", type=int, default=1000, help="page width in CSS pixels (default 1000)")
    p.add_argument("--dark", action="store_true", help="the dark colour scheme")
    p.add_argument("--height", type=int, help="only the top of the page, this many CSS pixels (default: all)")
    args = p.parse_args(argv)
    try:
        if args.example:
            write_example(args.folder)
        elif not (args.folder / STATE_FILE).is_file():
            raise FileNotFoundError(f"{args.folder} holds no {STATE_FILE}: not a live session's folder "
                                    f"(--example writes one)")
        size = screenshot(args.folder, args.out, width=args.width, dark=args.dark, height=args.height)
    except (BrowserError, ServeError, FileExistsError, FileNotFoundError, TimeoutError) as e:
        print(f"screenshot_live_page: {e}", file=sys.stderr)
        return 1
    print(f"{args.out} ({size / 1000:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
