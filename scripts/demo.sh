#!/usr/bin/env bash
# Set up (once) and run the main job on the bundled default model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/dllm-export info --model default
.venv/bin/dllm-export generate --model default --prompt "def fibonacci(n):" --gen-length 64 --steps 64 --block-length 32 "$@"
