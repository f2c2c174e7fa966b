#!/usr/bin/env bash
# Install Debian's headless-capable Chromium and its matching WebDriver (chromium,
# chromium-driver), as used by the live page's browser test (tests/live) and
# scripts/screenshot_live_page.py. Idempotent: does nothing when they are already
# installed.
set -euo pipefail

PACKAGES=(chromium chromium-driver)
# shellcheck source=apt_packages.sh
source "$(dirname "$0")/apt_packages.sh"
missing_packages install_browser "${PACKAGES[@]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install_browser: done ($(chromedriver --version 2>/dev/null | head -n1 || echo 'chromedriver version unknown'))"
