#!/usr/bin/env bash
# Idempotent set-up: a .venv beside the repo with torch (CPU build) first, then this package.
# Re-runs only when pyproject.toml changed. Needs only python3 (>= 3.10) and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP="$VENV/.dllm-export-setup"
WANT="$( (cat pyproject.toml scripts/setup.sh scripts/amx_probe.c; echo "variants=${LLAMA_CPU_VARIANTS:-0}") |
  sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first and pinned: otherwise pip resolves `torch` to a multi-GB CUDA build.
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
# llama-cpp-python compiles llama.cpp from source (PyPI has only the sdist; ~6 min on 2 cores).
# Not -march=native: the x86 vector extensions this CPU has, and AMX only where scripts/amx_probe.c
# (one AMX tile multiply) runs: some VMs advertise AMX that the hypervisor does not enable, and
# ggml's AMX kernels then crash on the first quantized matmul. LLAVA_BUILD=OFF skips the
# multimodal library we do not use.
# LLAMA_CPU_VARIANTS=1: ggml's run-time CPU variants instead (GGML_BACKEND_DL + GGML_CPU_ALL_VARIANTS:
# one CPU backend per x86 ISA level, x64 to sapphirerapids; the best this CPU scores loads at run
# time, so the venv moves between machines). 387 compile steps instead of ~140: more than twice
# the build time, hence not the default. The AMX variant is removed where the probe fails.
amx_runs() {
  local d rc
  d="$(mktemp -d)"
  cc -O1 -mamx-tile -mamx-int8 scripts/amx_probe.c -o "$d/probe" 2>/dev/null && timeout 20 "$d/probe" >/dev/null 2>&1
  rc=$?
  rm -rf "$d"
  return $rc
}
AMX=OFF
if [ "$(uname -m)" = "x86_64" ] && [ -r /proc/cpuinfo ]; then
  flags="$(grep -m1 '^flags' /proc/cpuinfo)"
  has() { case " $flags " in *" $1 "*) echo ON ;; *) echo OFF ;; esac; }
  if [ "$(has amx_tile)$(has amx_int8)" = ONON ] && amx_runs; then AMX=ON; fi
fi
if [ "${LLAMA_CPU_VARIANTS:-0}" = 1 ]; then
  LLAMA_CMAKE="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"
elif [ -n "${flags:-}" ]; then
  LLAMA_CMAKE="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) \
-DGGML_FMA=$(has fma) -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni) \
-DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni) \
-DGGML_AVX512_BF16=$(has avx512_bf16) -DGGML_AMX_TILE=$AMX -DGGML_AMX_INT8=$AMX -DGGML_AMX_BF16=$AMX"
else
  LLAMA_CMAKE="-DLLAVA_BUILD=OFF"
fi
REBUILD=()  # switching an existing venv to the variants needs a rebuild of the same version
[ "${LLAMA_CPU_VARIANTS:-0}" = 1 ] && REBUILD=(--force-reinstall --no-deps)
CMAKE_ARGS="$LLAMA_CMAKE" "$VENV/bin/python" -m pip install --quiet --no-cache-dir --no-binary llama-cpp-python \
  "${REBUILD[@]}" "llama-cpp-python==0.3.36"
if [ "${LLAMA_CPU_VARIANTS:-0}" = 1 ] && [ "$AMX" = OFF ]; then
  # the wheel puts the variants in site-packages/bin (dllm_export/runtime/llamacpp.py loads them from there)
  rm -f "$VENV"/lib/python3*/site-packages/bin/libggml-cpu-sapphirerapids.so
fi
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
echo "$WANT" > "$STAMP"
