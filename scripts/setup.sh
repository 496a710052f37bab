#!/usr/bin/env bash
# Creates .venv with the CPU build of torch and gptctl (editable, with test extras).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Pinned first, so pip takes the CPU wheel instead of downloading a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[dev]'
