"""The roofline of one denoising step: what the host can do (memory read bandwidth, GEMM rates)
and what a step needs (bytes read, FLOPs), so a measured step time reads as a ratio to its floor:

    floor = max(bytes read per step / bandwidth, sum over kernel kinds of FLOPs / that kind's peak)

A step reads every block weight once at its stored precision, the head rows it computes, the
embedding rows of its tokens and (block steps) the cached keys/values of every layer; its FLOPs
are 2 x rows x params of the linears and the head on its rows, at the peak of the linears' kernel
(int8 for the integer artifacts), plus the attention products at the peak of the kind they run in
(fp32 in onnxruntime and llama.cpp, bf16 in torch bf16). Each kind's peak is the best any runtime
here reaches on this host (fp32: torch's or onnxruntime's MLAS GEMM, whichever is faster).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

# the ISA features that decide which GEMM kernels a CPU runtime can use
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16", "asimddp", "i8mm", "bf16", "sve", "sme")


@dataclass(frozen=True)
class HostLimits:
    """Measured host limits at `threads` threads.

    Attributes:
        bandwidth_gbs: memory read bandwidth (GB/s, a sum over a buffer far larger than the caches).
        gemm_tflops: peak GEMM rate per compute kind ("fp32", "bf16", "int8"), TFLOP/s (int8: TOP/s).
        Both are the best of several runs (the host's peak, not its average under other load).
        gemm_shape: (M, K, N) of the GEMM the rates were measured on.
        flags: the ISA flags of `ISA_FLAGS` this host has.
    """

    bandwidth_gbs: float
    gemm_tflops: dict[str, float]
    gemm_shape: tuple[int, int, int]
    flags: tuple[str, ...]
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def _best_s(fn, reps: int) -> float:
    """Fastest of `reps` timed calls: a peak is what the host reaches when nothing else runs."""
    fn()  # warm-up: allocation, weight prepacking
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _ort_gemm_s(kind: str, M: int, K: int, N: int, reps: int, threads: int) -> float | None:
    """One GEMM in onnxruntime: "int8" = u8 x s8 through MatMulInteger (the MLAS kernel under the
    W8A8 artifacts' MatMulIntegerToFloat / MatMulInteger nodes), "fp32" = MatMul (MLAS SGEMM, the
    fp32 graphs and every artifact's attention)."""
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
    except ImportError:
        return None
    h, TP = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(0)
    if kind == "int8":
        w, a = rng.integers(-127, 128, (K, N), dtype=np.int8), rng.integers(0, 256, (M, K), dtype=np.uint8)
        op, a_type, y_type = "MatMulInteger", TP.UINT8, TP.INT32
    else:
        w, a = rng.standard_normal((K, N), dtype=np.float32), rng.standard_normal((M, K), dtype=np.float32)
        op, a_type, y_type = "MatMul", TP.FLOAT, TP.FLOAT
    graph = h.make_graph([h.make_node(op, ["a", "w"], ["y"])], f"{kind}_gemm",
                         [h.make_tensor_value_info("a", a_type, [M, K])],
                         [h.make_tensor_value_info("y", y_type, [M, N])],
                         initializer=[onnx.numpy_helper.from_array(w, "w")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return _best_s(lambda: sess.run(None, {"a": a}), reps)


def measure_host(threads: int = 2, quick: bool = False) -> HostLimits:
    """Bandwidth and GEMM rates of this host (fp32: the faster of torch and onnxruntime; bf16: torch;
    int8: onnxruntime)."""
    import torch

    from ..targets import host_flags

    torch.set_num_threads(threads)
    # read bandwidth: a sum streams the buffer once; 1 GiB (256 MiB quick) is far beyond any L3
    buf = torch.ones((256 if quick else 1024) << 18, dtype=torch.float32)
    reps = 5 if quick else 11
    bw = buf.numel() * 4 / _best_s(lambda: buf.sum(), reps) / 1e9
    del buf
    M, K, N = 256, 2048, 4096  # large enough to be compute-bound on a few cores
    rates = {}
    for kind, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(M, K).to(dtype), torch.randn(K, N).to(dtype)
        rates[kind] = 2 * M * K * N / _best_s(lambda: a @ b, reps) / 1e12
    for kind in ("fp32", "int8"):
        s = _ort_gemm_s(kind, M, K, N, reps, threads)
        if s is not None:
            rates[kind] = max(rates.get(kind, 0.0), 2 * M * K * N / s / 1e12)
    flags = host_flags()
    return HostLimits(round(bw, 2), {k: round(v, 3) for k, v in rates.items()}, (M, K, N),
                      tuple(f for f in ISA_FLAGS if f in flags), threads)


@dataclass(frozen=True)
class Precision:
    """Stored bits per weight and the GEMM kind that runs them.

    Attributes:
        linear_bits: bits per block-linear weight, scales included (e.g. 4.5 for 4-bit in groups of 32
            with fp16 scales, 4.125 for groups of 128).
        embed_bits / head_bits: bits per embedding / LM-head weight.
        compute: the peak rate that applies to the linears and the head ("fp32", "bf16" or "int8").
        kv_bytes: bytes per cached key/value element.
        attention: the kind the attention products run in (fp32 but in torch bf16).
    """

    linear_bits: float
    embed_bits: float
    head_bits: float
    compute: str
    kv_bytes: int = 4
    attention: str = "fp32"


@dataclass(frozen=True)
class StepCost:
    """Bytes read and FLOPs of one forward (`attention_flops` of them in the attention products), and
    the rows it ran."""

    bytes: float
    flops: float
    rows: int
    keys: int
    head_rows: int
    parts: dict = field(default_factory=dict)
    attention_flops: float = 0.0


def step_cost(dims, prec: Precision, rows: int, keys: int, head_rows: int, cached: bool) -> StepCost:
    """Cost of one forward of `rows` tokens attending to `keys` positions, the head on `head_rows`.

    The last block computes its keys and values on every row, its queries, attention output and MLP
    on the `head_rows` alone (the runtimes with `rows`; pass head_rows = rows for one without).
    `cached`: a block step that reads the past keys/values of the other `keys - rows` positions.
    """
    d, L, hd = dims.d_model, dims.n_layers, dims.head_dim
    q_out, kv_out = dims.n_heads * hd, dims.n_kv_heads * hd
    per_layer = d * (q_out + 2 * kv_out) + q_out * d + 3 * d * dims.mlp_hidden
    linear_params = L * per_layer
    rows_only = per_layer - 2 * d * kv_out  # the last block's weights that see only the head rows
    head_params = d * dims.vocab_rows
    parts = {
        "linear_weights": linear_params * prec.linear_bits / 8,
        "head_weights": head_params * prec.head_bits / 8,
        "embedding_rows": rows * d * prec.embed_bits / 8,
        "kv_cache": (2 * L * (keys - rows) * kv_out * prec.kv_bytes) if cached else 0,
    }
    attention = ((L - 1) * rows + head_rows) * 4 * keys * q_out  # scores and the weighted values
    flops = 2 * rows * linear_params - 2 * (rows - head_rows) * rows_only + attention + 2 * head_rows * head_params
    return StepCost(sum(parts.values()), float(flops), rows, keys, head_rows, parts, float(attention))


def floor_s(cost: StepCost, host: HostLimits, compute: str, attention: str = "fp32") -> dict:
    """The floor of a step and which limit sets it: {"floor_s", "memory_s", "compute_s", "bound"}.
    The linears and head run at `compute`'s peak, the attention products at `attention`'s (an
    unmeasured kind at fp32's): one kernel after the other, so their times add."""

    def rate(kind: str) -> float:
        return (host.gemm_tflops.get(kind) or host.gemm_tflops["fp32"]) * 1e12

    mem = cost.bytes / (host.bandwidth_gbs * 1e9)
    comp = (cost.flops - cost.attention_flops) / rate(compute) + cost.attention_flops / rate(attention)
    return {"floor_s": max(mem, comp), "memory_s": mem, "compute_s": comp,
            "bound": "memory" if mem >= comp else "compute"}


def _linear_bits(bits: int, group: int | None) -> float:
    """Bits per weight with one fp16 scale per group (per channel: negligible)."""
    return bits + (16 / group if group else 0)


def artifact_precision(path, torch_dtype: str = "float32") -> Precision:
    """The `Precision` of a checkpoint (at `torch_dtype`), an ONNX artifact or a GGUF file/folder."""
    import json
    from pathlib import Path

    path = Path(path)
    man = path / "manifest.json"
    gguf = path if path.suffix == ".gguf" else path / "model.gguf"
    if gguf.is_file():
        return _gguf_precision(gguf)
    if (path / "model.onnx").is_file():
        m = json.loads(man.read_text())
        eh = (m.get("export") or {}).get("embed_head", "fp32")
        eh_bits = 9.0 if eh == "int8" else 32  # int8 codes + an fp32 scale per 32
        if not m.get("scheme"):
            return Precision(32, eh_bits, eh_bits, "fp32")
        from ..quant.schemes import get_scheme

        sch, st = get_scheme(m["scheme"]), m.get("quantize_settings") or {}
        bits = st.get("bits") or sch.w_bits
        group = sch.group_size if st.get("group_size") is None else st["group_size"]
        sym = sch.sym if st.get("sym") is None else st["sym"]
        # ONNX keeps fp32 scales (and, asymmetric, a zero point) per group; per channel they are negligible
        extra = (32 + (0 if sym else bits)) / group if group else 0
        layers = set((m.get("layers") or {}).values())
        int_kernel = bool(layers & {"integer", "nbits-acc4", "static-qdq"}) or m.get("accuracy_level") == 4
        if "integer" in layers:  # the integer GEMM reads int8 codes and a scale per column (4-bit codes and
            bits, extra = max(bits, 8), 0.0  # progressive groups are widened into them at load)
        return Precision(bits + extra, eh_bits, eh_bits, "int8" if int_kernel else "fp32")
    bits = {"float32": 32, "bfloat16": 16, "float16": 16}[torch_dtype]
    kind = "bf16" if bits == 16 else "fp32"
    return Precision(bits, bits, bits, kind, kv_bytes=bits // 8, attention=kind)


def _gguf_precision(path) -> Precision:
    """Bits per weight of the block linears, embedding and head, read from the GGUF tensors."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    sums: dict[str, list[float]] = {"linear": [0, 0], "embed": [0, 0], "head": [0, 0]}
    for t in r.tensors:
        if len(t.shape) < 2:
            continue
        kind = "embed" if t.name == "token_embd.weight" else "head" if t.name == "output.weight" else "linear"
        sums[kind][0] += int(t.n_bytes) * 8
        sums[kind][1] += int(t.n_elements)
    bits = {k: (v[0] / v[1] if v[1] else 16.0) for k, v in sums.items()}
    if not sums["head"][1]:  # tied head
        bits["head"] = bits["embed"]
    compute = "int8" if bits["linear"] <= 9 else "fp32"  # ggml's quantized dot products run on int8
    return Precision(bits["linear"], bits["embed"], bits["head"], compute, kv_bytes=4)


__all__ = ["HostLimits", "ISA_FLAGS", "Precision", "StepCost", "artifact_precision", "floor_s", "measure_host",
           "step_cost"]
