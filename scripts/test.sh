#!/usr/bin/env bash
# Sets up the environment and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$(cd .. && pwd)/shared/tiktoken}"
export HF_DATASETS_OFFLINE=1
# One test process per core (pytest-xdist); worksteal keeps both busy while the long end-to-end tests run.
# The ten slowest tests are named at the end, so that a test that grew slow is seen (docs/development.md).
exec .venv/bin/python -m pytest -q -n auto --dist worksteal --durations=10 "$@"
