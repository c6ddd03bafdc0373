#!/usr/bin/env bash
# Set up (once) and run the main job on the bundled default model: export it for onnxruntime at
# 4 bits (GPTQ, mask-aware calibration) and for llama.cpp (Q4_0 grid), then decode with each artifact.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${DEMO_OUT:-out/demo}
rm -rf "$OUT"
.venv/bin/dllm-export info --model default
.venv/bin/dllm-export --target onnx --bits 4 --method gptq --model default --out "$OUT/onnx-w4" --no-progress
.venv/bin/dllm-export --target gguf --quant Q4_0 --method gptq --model default --out "$OUT/gguf-q4_0" --no-progress
for m in default "$OUT/onnx-w4" "$OUT/gguf-q4_0"; do
  echo "== $m"
  # the edge preset: dual cache refreshed per row after 16 commits (none in llama.cpp, whose diffusion
  # archs keep no KV cache), threshold 0.99, stop at EOS
  .venv/bin/dllm-export generate --model "$m" --prompt "47+38=" --prompt "def fibonacci(n):" \
    --gen-length 32 --block-length 32 --preset edge "$@"
done
.venv/bin/dllm-export bench default "$OUT/onnx-w4" "$OUT/gguf-q4_0" --reps 5
