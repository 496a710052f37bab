#!/usr/bin/env bash
# Sets up, tokenizes tiny Shakespeare and trains the tiny GPT-2 preset on CPU for a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$(cd .. && pwd)/shared/tiktoken}"
corpus="${CORPUS:-../shared/data/tinyshakespeare.txt}"
if [ ! -f data/shakespeare/manifest.json ]; then
  .venv/bin/gptctl data prepare --input "$corpus" --data-root data/shakespeare
fi
.venv/bin/gptctl pretrain --model tiny --data-root data/shakespeare \
  --seq-len 64 --batch-size 8 --total-batch-size 512 \
  --max-steps 300 --warmup-steps 20 --max-lr 3e-3 \
  --eval-interval 50 --eval-steps 8 --checkpoint-interval 100 --keep-last-n-checkpoints 2 \
  --run-name shakespeare-demo --auto-resume
.venv/bin/gptctl runs list
.venv/bin/gptctl ckpt list
.venv/bin/gptctl sample shakespeare-demo --prompt "ROMEO:" --max-new-tokens 60
