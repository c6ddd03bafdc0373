#!/usr/bin/env bash
# The GPU measurements of this repo, on a machine with CUDA and PyTorch (results go to $OUT, default
# benchmarks/results). Stages: check (torch CUDA against the CPU), decode (fast decoding on the
# bundled model and a ~1.3B shape), bench (dllm-export bench on CPU and CUDA), quantize8b (the full
# LLaDA-8B-shaped GPTQ run, about 7 minutes on an H100).
#
#   bash benchmarks/gpu.sh check decode bench quantize8b
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
for stage in "$@"; do
    case "$stage" in
        check) python3 benchmarks/cuda_check.py --out "$OUT/cuda_check.json" ;;
        decode)
            python3 benchmarks/decode_speed.py --device cuda --problems 50 --variants reference dual threshold0.9 \
                dual+threshold0.9 threshold0.99 dual+threshold0.99 --out "$OUT/decode_speed_default_cuda.json"
            python3 benchmarks/decode_speed.py --shape 1b --device cuda --problems 0 --code-prompts 2 \
                --out "$OUT/decode_speed_1b_cuda.json" ;;
        bench)
            for dev in cpu cuda; do
                python3 -m dllm_export.cli bench default default-dream --torch-device "$dev" --gen-length 256 \
                    --quality --json "$OUT/bench_default_$dev.json" --markdown "$OUT/bench_default_$dev.md"
            done ;;
        quantize8b)
            python3 benchmarks/quantize_memory.py --shape 8b --torch-device cuda --workdir /tmp \
                --out "$OUT/quantize_8b_cuda.json" ;;
        *) echo "unknown stage $stage (check, decode, bench, quantize8b)" >&2; exit 2 ;;
    esac
done
