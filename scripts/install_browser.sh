#!/usr/bin/env bash
# Install Debian's headless-capable Chromium and its matching WebDriver (chromium,
# chromium-driver), as used by the live page's browser test (tests/live) and
# scripts/screenshot_live_page.py. Idempotent: does nothing when they are already
# installed.
set -euo pipefail

PACKAGES=(chromium chromium-driver)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "install_browser: ${PACKAGES[*]} already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: apt-get not found: install ${missing[*]} with your system's package manager" >&2
    echo "install_browser: (the chromium and chromedriver programs, of the same version, on PATH)" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser: installing ${missing[*]} needs root (run: sudo $0)" >&2
    exit 1
fi

echo "install_browser: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install_browser: done ($(chromedriver --version 2>/dev/null | head -n1 || echo 'chromedriver version unknown'))"
