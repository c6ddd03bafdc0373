"""Exporters: checkpoint (float or quantized) -> an edge artifact, and the one-call `export` that
quantizes and exports for a target.

    from dllm_export.exporter import export
    export("default", "out/onnx-w4", target="onnx", bits=4, method="gptq")
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

# target -> (one-line description, weight bit-widths it can carry)
TARGETS: dict[str, tuple[str, tuple[int, ...]]] = {
    "onnx": ("onnxruntime graph, QDQ or MatMulNBits weights", (2, 3, 4, 5, 6, 7, 8, 16, 32)),
}


@dataclass(frozen=True)
class ExportResult:
    """What `export` wrote: the artifact folder and its manifest."""

    path: Path
    manifest: dict
    quantize_seconds: float
    export_seconds: float


def export(model: str | Path, out: str | Path, *, target: str = "onnx", bits: int | None = None,
           method: str = "gptq", scheme: str | None = None, group_size: int | None = None,
           weight_format: str = "qdq", accuracy_level: int | None = None, act_kernel: str = "auto",
           quantize_options: dict | None = None, progress: bool = False) -> ExportResult:
    """Quantize `model` (unless bits is None / 16 / 32 and no scheme is given) and export it for `target`.

    Args:
        model: checkpoint folder, `default` or `default-dream`, or a quantized checkpoint (exported as is).
        out: artifact folder (must not exist or be empty; written atomically).
        bits: weight bits; picks scheme W{bits}A16 unless `scheme` is given (then it overrides its bits).
        method / scheme / group_size / quantize_options: the PTQ run (see `quant.QuantizeConfig`).
        weight_format / accuracy_level / act_kernel: the ONNX graph (see `exporter.onnx.OnnxExportConfig`).
    """
    import time

    from ..models.loader import resolve_model_path
    from ..quant import QuantizeConfig, quantize

    if target not in TARGETS:
        raise InputError(f"unknown export target {target!r} (choose from {', '.join(TARGETS)})")
    allowed = TARGETS[target][1]
    if bits is not None and bits not in allowed:
        raise InputError(f"target {target} cannot carry {bits}-bit weights (supported: {', '.join(map(str, allowed))})")
    from .onnx import OnnxExportConfig, export_onnx

    ocfg = OnnxExportConfig(weight_format=weight_format, accuracy_level=accuracy_level, act_kernel=act_kernel)
    if weight_format == "matmulnbits" and bits is not None and bits not in (2, 4, 8, 16, 32):
        raise InputError(f"--format matmulnbits stores 2, 4 or 8-bit weights, not {bits}-bit (use --format qdq)")
    src = resolve_model_path(model)
    quantized_input = (src / "manifest.json").is_file()
    float_export = scheme is None and (bits is None or bits >= 16)
    t0 = time.perf_counter()
    if quantized_input or float_export:
        path = export_onnx(src, out, ocfg)
        t_q = 0.0
    else:
        scheme = scheme or f"W{bits}A16"
        opts = dict(quantize_options or {})
        if bits is not None:
            opts["bits"] = bits
        qcfg = QuantizeConfig(method=method, scheme=scheme, group_size=group_size, **opts)
        _precheck_onnx(src, qcfg, ocfg)  # refuse before a long calibration, not after
        out_p = Path(out)
        out_p.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out_p.name}.quantized.", dir=out_p.parent))
        try:
            qdir = quantize(src, work / "q", qcfg, progress=progress)
            t_q = time.perf_counter() - t0
            path = export_onnx(qdir, out, ocfg)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    import json

    manifest = json.loads((Path(path) / "manifest.json").read_text())
    return ExportResult(Path(path), manifest, round(t_q, 3), round(time.perf_counter() - t0 - t_q, 3))


def _precheck_onnx(src: Path, qcfg, ocfg) -> None:
    """Raise the errors `export_onnx` would raise for this grid, before any quantization runs."""
    from ..models import family_for
    from ..models.loader import read_config
    from ..quant.driver import fit_group_size

    dims = family_for((cfg := read_config(src)).get("model_type")).parse_config(cfg).dims
    widths = [dims.d_model, dims.n_heads * dims.head_dim, dims.mlp_hidden]
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
