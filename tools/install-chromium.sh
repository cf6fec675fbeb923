#!/usr/bin/env bash
# The Debian packages the test suite needs and pip cannot install: Chromium and ChromeDriver for
# the web page test (tests/integration/test_web_page.py), and a C++ compiler for torch.compile's
# CPU backend (tests/unit/test_compiled_decode.py). Does nothing when all are already on PATH;
# otherwise installs them with apt-get (as root, or through sudo).
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v g++ >/dev/null; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -q
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver g++
