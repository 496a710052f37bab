#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and gptctl (editable, with test extras).
set -euo pipefail
cd "$(dirname "$0")/.."
# gptctl serve's chat page is tested in headless Chromium, driven by playwright. Playwright's own browser
# download comes from outside the package registries, so the browser is Debian's package (as root, where
# apt-get is); elsewhere install chromium yourself, or the browser test is skipped (and fails under CI=true).
# It installs in the background while pip works: on a fresh CI machine both mostly wait on downloads.
browser=
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) &
  browser=$!
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Pinned first, so pip takes the CPU wheel instead of downloading a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
if [ -n "$browser" ]; then
  wait "$browser"  # its failure is setup's failure, as before
fi
