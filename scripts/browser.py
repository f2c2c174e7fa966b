"""Headless Chromium driven by Selenium: for the live page's browser test and its README screenshot.

Debian's ``chromium`` with Debian's ``chromedriver`` (same version, from the ``chromium-driver`` package:
``scripts/install_browser.sh``). The driver's path is given to Selenium, so Selenium Manager never runs (it would
download a driver). Chromium is started so that it reaches nothing but this machine: no background
networking, component updates, sync, metrics or first-run pings, and every host name but ``localhost``
resolves to nothing (pages are opened at ``127.0.0.1``, which needs no lookup).

Tooling, not part of the ``dynadiff`` package: ``scripts/screenshot_live_page.py`` imports it from beside it,
the tests as ``browser`` (``scripts/`` is on their ``sys.path``: ``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

import shutil

PROGRAMS = {"chromium": "chromium", "chromedriver": "chromium-driver"}  # program -> Debian package
OFFLINE_FLAGS = (
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--disable-extensions",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-features=OptimizationHints,MediaRouter,Translate,AutofillServerCommunication,"
    "CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions",
    "--metrics-recording-only",
    "--no-default-browser-check",
    "--no-first-run",
    "--no-pings",
    "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
)


class BrowserError(RuntimeError):
    """Headless Chromium cannot be started here: the message says why and what to install."""


def find_programs() -> tuple[str, str]:
    """Paths of ``chromium`` and ``chromedriver``; :class:`BrowserError` naming what is missing."""
    found = {name: shutil.which(name) for name in PROGRAMS}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        packages = " ".join(PROGRAMS[name] for name in missing)
        raise BrowserError(f"{' and '.join(missing)} not found: install Debian's {packages} "
                           f"(scripts/install_browser.sh)")
    return found["chromium"], found["chromedriver"]


def unavailable_reason() -> str | None:
    """Why :func:`start_chromium` cannot work here, or None if it can."""
    try:
        find_programs()
        import selenium  # noqa: F401
    except BrowserError as e:
        return str(e)
    except ImportError:
        return "selenium is not installed (it is in requirements-dev.txt: run ./setup.sh)"
    return None


def start_chromium(width: int = 1100, height: int = 900, color_scheme: str | None = None):
    """A headless Chromium (``selenium.webdriver.Chrome``) with a ``width`` x ``height`` CSS-pixel window at
    scale 1; ``color_scheme``: ``"light"`` or ``"dark"`` to emulate that preference. ``quit()`` it when done."""
    chromium, chromedriver = find_programs()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserError("selenium is not installed (it is in requirements-dev.txt: run ./setup.sh)") from None

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new",
                 "--no-sandbox",  # as root (tests, containers) Chromium refuses to start with its sandbox
                 "--disable-dev-shm-usage",  # small /dev/shm in containers
                 "--disable-gpu",
                 "--hide-scrollbars",
                 "--force-device-scale-factor=1",
                 "--force-color-profile=srgb",
                 f"--window-size={width},{height}",
                 *OFFLINE_FLAGS):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    except Exception as e:  # selenium's SessionNotCreatedException, WebDriverException: a broken install
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BrowserError(f"headless Chromium did not start ({chromium}, {chromedriver}): {first}") from e
    if color_scheme is not None:
        driver.execute_cdp_cmd("Emulation.setEmulatedMedia",
                               {"features": [{"name": "prefers-color-scheme", "value": color_scheme}]})
    return driver
