#!/usr/bin/env bash
# Idempotent set-up: a .venv beside the repo with torch (CPU build) first, then this package.
# Re-runs only when pyproject.toml changed. Needs only python3 (>= 3.10) and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.dllm-export-setup"
WANT="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first and pinned: otherwise pip resolves `torch` to a multi-GB CUDA build.
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
# llama-cpp-python compiles llama.cpp from source (PyPI has only the sdist; ~6 min on 2 cores).
# Not -march=native: some VMs advertise AMX that the kernel does not enable, and ggml's AMX
# kernels then crash on the first quantized matmul. Instead: the x86 vector extensions this CPU
# has, AMX excluded. LLAVA_BUILD=OFF skips the multimodal library we do not use.
if [ "$(uname -m)" = "x86_64" ] && [ -r /proc/cpuinfo ]; then
  flags="$(grep -m1 '^flags' /proc/cpuinfo)"
  has() { case " $flags " in *" $1 "*) echo ON ;; *) echo OFF ;; esac; }
  LLAMA_CMAKE="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) \
-DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni) \
-DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni) \
-DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
else
  LLAMA_CMAKE="-DLLAVA_BUILD=OFF"
fi
CMAKE_ARGS="$LLAMA_CMAKE" "$VENV/bin/python" -m pip install --quiet --no-cache-dir --no-binary llama-cpp-python \
  "llama-cpp-python==0.3.36"
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
echo "$WANT" > "$STAMP"
