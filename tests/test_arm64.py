"""ARM artifacts run on aarch64 onnxruntime and llama.cpp (under qemu-user emulation) give x86's
logits and tokens.

Optional: needs the arm64 root that `scripts/arm64-root.sh` builds (Debian arm64 + aarch64
onnxruntime and numpy, and llama-cpp-python with llama.cpp cross-compiled on the host, run through
binfmt_misc / qemu-aarch64-static) and root for chroot; skipped where either is missing (CI), the
GGUF cases also where the root has no llama-cpp-python or the host has none. Correctness only:
emulated timings mean nothing.

    sudo bash scripts/arm64-root.sh && .venv/bin/python -m pytest -q tests/test_arm64.py
"""

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from dllm_export.exporter import export

ROOT = Path(os.environ.get("DLLM_ARM64_ROOT", Path(__file__).parents[1] / ".arm64-root"))
RUNNER = Path(__file__).parents[1] / "dllm_export" / "ondevice.py"
ARGS = ["--canvas", "24", "--gen-length", "8", "--block-length", "8", "--reps", "1", "--threads", "1"]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (ROOT / "opt" / "dllm-ready").exists() or os.geteuid() != 0
    or not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists(),
    reason="no arm64 root with onnxruntime (scripts/arm64-root.sh), no root, or no qemu-aarch64 binfmt")]

# (family, export options, max |logit difference| between x86 and aarch64 runs, or None: int8
# activations, where the kernels differ by design: x86 quantizes activations per block of 32,
# KleidiAI per row. Those are held to the fp32 logits instead: aarch64's error at most 1.5x x86's.)
CASES = [
    ("llada", dict(bits=None), 1e-4),  # fp32: the same math, only summation order may differ
    ("llada", dict(bits=4, method="rtn", device="arm64-dotprod", accuracy_level=0), 1e-4),  # 4-bit unpacking
    ("dream", dict(bits=4, method="rtn", device="arm64-dotprod", accuracy_level=0), 1e-4),
    ("llada", dict(scheme="W8A8", method="rtn", device="arm64-i8mm"), 2e-2),  # MatMulInteger
    ("llada", dict(bits=4, method="rtn", device="arm64-dotprod"), None),  # MatMulNBits, int8 dot products
    ("dream", dict(bits=4, method="rtn", device="arm64-dotprod"), None),
]


def _run_x86(art: Path, dump: Path) -> dict:
    done = subprocess.run([sys.executable, str(RUNNER), str(art), *ARGS, "--dump", str(dump)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_arm64(art: Path, dump_name: str) -> tuple[dict, Path]:
    """Copy the runner and the artifact into the arm64 root and run them there with chroot."""
    work = ROOT / "tmp" / f"dllm-{uuid.uuid4().hex[:8]}"
    shutil.copytree(art, work / "art")
    shutil.copy(RUNNER, work / "ondevice.py")
    inner = Path("/") / work.relative_to(ROOT)
    try:
        # onnxruntime opens external data through /proc/self/fd: /proc is mounted in a private mount
        # namespace (gone when the run ends). /sys is not: with both, pytorch-cpuinfo parses the
        # host's x86 CPU lists and crashes; without, onnxruntime takes the CPU features from the
        # auxiliary vector (HWCAP), which qemu fills for its emulated `max` CPU (dot product, i8mm)
        cmd = (f"mount -t proc proc {ROOT}/proc && exec chroot {ROOT} /opt/venv/bin/python {inner}/ondevice.py "
               f"{inner}/art {' '.join(ARGS)} --dump {inner}/{dump_name}")
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", cmd],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        out = work.parent / f"{work.name}-{dump_name}"
        shutil.copy(work / dump_name, out)
        return json.loads(done.stdout.strip().splitlines()[-1]), out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _case_id(c) -> str:
    o = c[1]
    return "-".join(str(x) for x in (c[0], o.get("device", "fp32"), o.get("scheme") or o.get("bits"),
                                     f"acc{o['accuracy_level']}" if "accuracy_level" in o else "") if x)


def _check(art: Path, tol, tmp_path: Path, fp32_ref=None) -> None:
    """Run `art` on both sides; hold aarch64 to x86 within `tol` (None: no such bound), and where
    `fp32_ref` is given, to the fp32 logits of the artifact it returns (run on x86): aarch64's error
    at most 1.5x x86's."""
    x86 = _run_x86(art, tmp_path / "x86.npz")
    arm, arm_dump = _run_arm64(art, "arm.npz")
    try:
        a, b = np.load(tmp_path / "x86.npz"), np.load(arm_dump)
        assert x86["machine"]["arch"] == "x86_64" and arm["machine"]["arch"] == "aarch64"
        assert x86["backend"] == arm["backend"]
        assert np.array_equal(a["ids"], b["ids"]) and arm["nfe"] == x86["nfe"]
        diff = float(np.abs(a["logits"] - b["logits"]).max())
        same = bool(np.array_equal(a["tokens"], b["tokens"]))
        print(f"max |logit diff| {diff:.3g}, tokens equal {same}")  # shown with pytest -s
        if tol is not None:
            assert diff <= tol, f"max |logit diff| {diff:.3g} > {tol}"
            assert same  # the same greedy decode, token for token
        if fp32_ref is not None:
            _run_x86(fp32_ref(), tmp_path / "fp32.npz")
            f = np.load(tmp_path / "fp32.npz")["logits"]
            err_x86, err_arm = (float(np.abs(v - f).max()) for v in (a["logits"], b["logits"]))
            print(f"error against fp32: x86 {err_x86:.3g}, aarch64 {err_arm:.3g}")
            assert err_arm <= 1.5 * err_x86, f"aarch64 error {err_arm:.3g} vs x86 {err_x86:.3g} (diff {diff:.3g})"
    finally:
        arm_dump.unlink(missing_ok=True)


@pytest.mark.parametrize("family,options,tol", CASES, ids=[_case_id(c) for c in CASES])
def test_arm64_artifact_matches_x86(family, options, tol, tiny_dirs, tmp_path):
    art = export(tiny_dirs[family], tmp_path / "art", target="onnx", group_size=32, **options).path
    _check(art, tol, tmp_path,
           None if tol is not None else lambda: export(tiny_dirs[family], tmp_path / "fp32", target="onnx").path)


# GGUF through llama.cpp: (family, GGUF type of the block linears, embedding and head in F32 (else
# F16, export()'s default), max |logit difference| between x86 and aarch64). All-F32 files agree to
# float rounding (measured up to 7.5e-6, logits up to 6.7). With an F16 head, x86 (AVX-512 / AVX2)
# rounds the head's activations to f16 before the dot products, while the aarch64 build (armv8.2-a,
# no fp16 vector arithmetic) multiplies them in f32 (llamafile's tinyBLAS): measured up to 1.5e-3,
# about 2e-4 of the logit scale. Q8_0 / Q4_0 add next to nothing to that (up to 1.8e-3: both sides
# quantize activations to Q8_0 blocks of 32). Bound for those: 5e-3, under 1e-3 of the logit scale;
# the quantized ones are also held to the all-F32 logits, like the int8 ONNX cases (aarch64's error
# at most 1.5x x86's).
GGUF_CASES = [
    ("llada", "F32", True, 1e-4),
    ("dream", "F32", True, 1e-4),
    ("llada", "F32", False, 5e-3),
    ("dream", "F32", False, 5e-3),
    ("llada", "Q8_0", False, 5e-3),
    ("dream", "Q8_0", False, 5e-3),
    ("llada", "Q4_0", False, 5e-3),
    ("dream", "Q4_0", False, 5e-3),
]


def _all_f32(src: Path, out: Path) -> Path:
    from dllm_export.exporter.gguf import GgufExportConfig, export_gguf

    return export_gguf(src, out, GgufExportConfig(quant="F32", embed_type="F32", head_type="F32"))


@pytest.mark.skipif(not (ROOT / "opt" / "dllm-llama-ready").exists(),
                    reason="the arm64 root has no llama-cpp-python (scripts/arm64-root.sh builds it)")
@pytest.mark.parametrize("family,quant,f32_head,tol", GGUF_CASES,
                         ids=[f"{f}-gguf-{q}{'-f32head' if h else ''}" for f, q, h, _ in GGUF_CASES])
def test_arm64_gguf_matches_x86(family, quant, f32_head, tol, tiny_dirs, tmp_path):
    pytest.importorskip("llama_cpp")  # the x86 side
    if f32_head:
        art = _all_f32(tiny_dirs[family], tmp_path / "art")
    else:
        art = export(tiny_dirs[family], tmp_path / "art", target="gguf", quant=quant, method="rtn").path
    ref = None if quant == "F32" else (lambda: _all_f32(tiny_dirs[family], tmp_path / "fp32"))
    _check(art, tol, tmp_path, ref)
