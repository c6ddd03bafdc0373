"""Exporters: checkpoint (float or quantized) -> an edge artifact, and the one-call `export` that
quantizes and exports for a target.

    from dllm_export.exporter import export
    export("default", "out/onnx-w4", target="onnx", bits=4, method="gptq")
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..fileio import temp_folder

# target -> (one-line description, weight bit-widths it can carry)
TARGETS: dict[str, tuple[str, tuple[int, ...]]] = {
    "onnx": ("onnxruntime graph, QDQ or MatMulNBits weights", (2, 3, 4, 5, 6, 7, 8, 16, 32)),
    "gguf": ("llama.cpp file, arch llada / dream, Q4_0 / Q4_1 / Q5_x / Q8_0 / K-quants", (4, 5, 8, 16, 32)),
}
# GGUF: bits -> the block type a symmetric group-32 PTQ grid is written as exactly
_GGUF_BY_BITS = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0", 16: "F16", 32: "F32"}


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote: the artifact folder and its manifest."""

    path: Path
    manifest: dict
    quantize_seconds: float
    export_seconds: float


def export(model: str | Path, out: str | Path, *, target: str = "onnx", bits: int | None = None,
           method: str = "gptq", scheme: str | None = None, group_size: int | None = None,
           weight_format: str | None = None, accuracy_level: int | None = None, act_kernel: str = "auto",
           quant: str | None = None, device: str | None = None, embed_head: str = "fp32",
           quantize_options: dict | None = None, extra_manifest: dict | None = None,
           progress: bool = False) -> ExportResult:
    """Quantize `model` with a PTQ method where the request needs it, then export it for `target`.

    Args:
        model: checkpoint folder, `default` or `default-dream`, or a quantized checkpoint (exported as is).
        out: artifact folder (must not exist or be empty; written atomically).
        target: "onnx" or "gguf".
        bits: weight bits; picks scheme W{bits}A16 unless `scheme` is given (then it overrides its bits).
            None / 16 / 32 without a scheme exports float weights.
        method / scheme / group_size / quantize_options: the PTQ run (see `quant.QuantizeConfig`).
        weight_format / accuracy_level / act_kernel / embed_head: the ONNX graph (see
            `exporter.onnx.OnnxExportConfig`).
        quant: GGUF type. Q4_0 / Q5_0 / Q8_0 / Q4_1 / Q5_1: `method` rounds a group-32 grid of that
            format, written exactly; F32 / F16 / BF16 and K-quants (Q4_K_M, ...): float weights (the
            K-quants rounded by llama.cpp's quantizer). Default: from `bits` (4 -> Q4_0, 8 -> Q8_0).
        device: a profile of `dllm_export.targets` (or "auto" for this host) that fills every choice
            left open (scheme, group size, ONNX format and accuracy level, GGUF type, threads) and is
            recorded in the manifest for the runtime.
        extra_manifest: entries added to the artifact's manifest (the mixed-precision allocation).
    """
    import json
    import time

    from ..models.loader import resolve_model_path
    from ..quant import QuantizeConfig, quantize

    if target not in TARGETS:
        raise InputError(f"unknown export target {target!r} (choose from {', '.join(TARGETS)})")
    allowed = TARGETS[target][1]
    if bits is not None and bits not in allowed:
        raise InputError(f"target {target} cannot carry {bits}-bit weights (supported: {', '.join(map(str, allowed))})")
    src = resolve_model_path(model)
    out_p = Path(out)
    if out_p.exists() and (not out_p.is_dir() or any(out_p.iterdir())):  # before any quantization runs
        raise InputError(f"output folder {out_p} exists and is not empty")
    quantized_input = (src / "manifest.json").is_file()
    opts = dict(quantize_options or {})
    extra = dict(extra_manifest or {})
    if device is not None:
        from ..targets import get_profile

        profile = get_profile(device)
        extra["device"] = profile.to_dict()
        if target == "onnx":
            if bits is None and scheme is None and not quantized_input:
                scheme = profile.scheme
            weight_format = weight_format or profile.onnx_format
            weight_only = (scheme or f"W{bits}A16").upper().endswith("A16")
            if accuracy_level is None and weight_only:
                accuracy_level = profile.accuracy_level
            if group_size is None and weight_only:
                group_size = _fit_group(src, profile.group_size)
        elif bits is None and quant is None:
            quant = profile.gguf_quant
    weight_format = weight_format or "qdq"
    if target == "onnx":
        from .onnx import OnnxExportConfig, export_onnx

        ocfg = OnnxExportConfig(weight_format=weight_format, accuracy_level=accuracy_level, act_kernel=act_kernel,
                                embed_head=embed_head)
        if weight_format == "matmulnbits" and bits is not None and bits not in (2, 4, 8, 16, 32):
            raise InputError(f"--format matmulnbits stores 2, 4 or 8-bit weights, not {bits}-bit (use --format qdq)")
        needs_ptq = not quantized_input and not (scheme is None and (bits is None or bits >= 16))
        scheme = scheme or (f"W{bits}A16" if needs_ptq else None)

        def write(path):
            return export_onnx(path, out, ocfg, extra_manifest=extra)

        def precheck(qcfg):
            _precheck_onnx(src, qcfg, ocfg)
    else:
        from ..quant import get_scheme
        from .gguf import BLOCK_TYPES, GgufExportConfig, export_gguf

        if quant is None and bits is None and scheme is not None:
            bits = get_scheme(scheme).w_bits
        quant = quant or (None if quantized_input else _GGUF_BY_BITS.get(bits or 16))
        if quant is not None and bits is not None and quant in BLOCK_TYPES and int(quant[1]) != bits:
            raise InputError(f"--quant {quant} stores {quant[1]}-bit weights, not {bits}-bit")
        if scheme is not None and scheme.upper() not in ("W4A16", "W5A16", "W8A16"):
            raise InputError(f"GGUF carries weight-only schemes; {scheme} quantizes activations, which llama.cpp "
                             f"does itself. Use --target onnx for {scheme}")
        needs_ptq = not quantized_input and quant in BLOCK_TYPES
        gcfg = GgufExportConfig(quant=None if needs_ptq else quant)
        if needs_ptq:
            bits = int(quant[1])
            scheme = f"W{bits}A16"
            opts.update(bits=bits, sym=quant.endswith("_0"), zero_kind="int" if quant.endswith("_0") else "float")
            if group_size not in (None, 32):
                raise InputError(f"GGUF block formats hold groups of 32 weights, not {group_size}")
            group_size = 32

        def write(path):
            return export_gguf(path, out, gcfg, extra_manifest=extra)

        def precheck(qcfg):
            _precheck_widths(src, 32)
    t0 = time.perf_counter()
    t_q = 0.0
    if not needs_ptq:
        path = write(src)
    else:
        qcfg = QuantizeConfig(method=method, scheme=scheme, group_size=group_size, **opts)
        precheck(qcfg)  # refuse before a long calibration, not after
        # named like every temporary folder for `out`, so a run killed here is cleaned up by the next
        work = temp_folder(out_p, "quantized")
        try:
            qdir = quantize(src, work / "q", qcfg, progress=progress)
            t_q = time.perf_counter() - t0
            path = write(qdir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    return ExportResult(Path(path), manifest, round(t_q, 3), round(time.perf_counter() - t0 - t_q, 3))


def _fit_group(src: Path, group: int) -> int:
    """The largest power-of-two block <= `group` (and >= 16) that tiles every layer width."""
    widths = _widths(src)
    g = group
    while g > 16 and any(w % g for w in widths):
        g //= 2
    return g


def _widths(src: Path) -> list[int]:
    from ..models import family_for
    from ..models.loader import read_config

    config = read_config(src)
    dims = family_for(config.get("model_type")).parse_config(config).dims
    return [dims.d_model, dims.n_heads * dims.head_dim, dims.mlp_hidden]


def _precheck_widths(src: Path, group: int) -> None:
    for K in _widths(src):
        if K % group:
            raise InputError(f"GGUF block formats need input widths divisible by {group}; this model has {K}")


def _precheck_onnx(src: Path, qcfg, ocfg) -> None:
    """Raise the errors `export_onnx` would raise for this grid, before any quantization runs."""
    from ..quant.driver import fit_group_size

    widths = _widths(src)
    qcfg = fit_group_size(qcfg, widths)
    w = qcfg.weight_config()
    if not w.sym and w.zero_kind == "float":
        raise InputError("float minimums (zero_kind='float', GGUF Q4_1 style) have no exact ONNX form; "
                         "use integer zero points (the default) or --target gguf")
    if ocfg.weight_format == "matmulnbits":
        if w.bits not in (2, 4, 8):
            raise InputError(f"--format matmulnbits stores 2, 4 or 8-bit weights, not {w.bits}-bit (use --format qdq)")
        for K in widths:
            bs = w.group_size or K
            if bs < 16 or bs & (bs - 1):
                raise InputError(f"MatMulNBits needs a power-of-two block size >= 16; the grid gives blocks of {bs} "
                                 f"for input width {K} (pass --group-size 32/64/128, or use --format qdq)")


__all__ = ["ExportResult", "TARGETS", "export"]
