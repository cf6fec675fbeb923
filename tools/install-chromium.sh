#!/usr/bin/env bash
# Debian's Chromium and ChromeDriver for the web page test (tests/integration/test_web_page.py):
# pip cannot install a browser. Does nothing when both are already on PATH; otherwise installs
# them with apt-get (as root, or through sudo).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
