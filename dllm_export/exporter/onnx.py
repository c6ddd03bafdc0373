"""ONNX export: the full-sequence forward of a LLaDA / Dream checkpoint, float or quantized.

The graph is built node by node from the checkpoint folder (no torch tracing), one tensor at a
time, with every weight streamed into `model.onnx.data`: an 8B export never holds the model.
Quantized layers keep their calibrated codes and fp16 scales exactly:

* `qdq`: DequantizeLinear(int4/uint4/int8/uint8 [K, N], axis 0, block_size = group) -> MatMul,
  the standard form onnxruntime rewrites into MatMulNBits at load; 2/3/5/6/7-bit codes are
  stored as dense bit planes that onnxruntime folds back into 8-bit codes at load, and fp16
  scales as fp16 with a Cast it folds too;
* `matmulnbits`: com.microsoft MatMulNBits with codes packed along K (bits 2, 4, 8).

Activation quantization: per-token dynamic 8-bit activations with per-channel weights run as
an integer GEMM (uint8 activations x int8 weights: MatMulIntegerToFloat, or MatMulInteger for
asymmetric activations; 4-bit codes stored as int4), and so do progressive grouped weights (their
int8 weight is rebuilt from int4 codes and integer group scales by nodes folded at load), static
per-tensor 8-bit as QuantizeLinear/DequantizeLinear pairs onnxruntime turns into integer kernels,
W4A8 with other blocked weights as MatMulNBits accuracy level 4 (int8 activations per K-block
inside the kernel), and
anything else (4-bit activations) as an explicit fake-quant simulation graph, flagged in the
manifest. Online rotations become MatMul / Einsum nodes (Kronecker-factored Hadamards).

Graph inputs: `input_ids` int64 [B, L], `attention_mask` int64 [B, L] (1 = real token), and,
unless disabled, `logit_positions` int64 [B, P] selecting the rows that reach the LM head (the
last block computes its queries, attention output and FFN on those rows alone).
Output: raw (unshifted) `logits` float32 [B, P, V].
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..fileio import atomic_folder
from ..formats import FORMAT_VERSIONS, MATMULNBITS_BITS, ONNX_FORMAT, check_matmulnbits, matmulnbits_block_ok
from ..models.checkpoint import source_record
from ..models.layers import rope_cos_sin
from ..quant.primitives import ActQuantConfig, QuantizedWeight, WeightQuantConfig, progressive_scales, quantize_weight
from .source import open_source, write_sidecars

FORMAT = ONNX_FORMAT
VERSION = FORMAT_VERSIONS[FORMAT]
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
FUNCTION_DOMAIN = "dllm_export"  # the graph's local functions (the dense code rebuild)
OPSET = 23  # ONNX Attention (bidirectional, GQA) and blocked int4 DequantizeLinear
IR_VERSION = 11
WEIGHT_FORMATS = ("qdq", "matmulnbits")
ACT_KERNELS = ("auto", "integer", "nbits", "simulate")
_F32_MIN = float(np.finfo(np.float32).min)


@dataclass(frozen=True)
class OnnxExportConfig:
    """How to write the graph.

    Attributes:
        weight_format: "qdq" (DequantizeLinear -> MatMul) or "matmulnbits" (the contrib op) for
            quantized weights; float weights are always plain MatMuls.
        accuracy_level: MatMulNBits compute precision of weight-only layers (0 = fp32 activations,
            exact; 4 = int8 activations per K-block, faster on CPU); None = 0. For `qdq` it is the
            session option the backend sets (`session.qdq_matmulnbits_accuracy_level`). Layers whose
            activations are quantized per token by the scheme never get a second, kernel-side one.
        act_kernel: how per-token 8-bit activation quantization runs: "integer" (integer GEMM,
            exact, needs per-channel weights), "nbits" (MatMulNBits accuracy level 4, needs a
            power-of-two group), "simulate" (fake-quant ops + float GEMM), or "auto" (integer when
            the weights are per channel, else nbits when the group allows, else simulate).
        logit_positions: add the `logit_positions` input, so the LM head (and the last block but
            its keys and values) runs only on those rows.
        kv_cache: the block-step form of Fast-dLLM's caches: inputs `window_start` [1] and
            `past.{i}.key/value` [B, kv_heads, T, head_dim], outputs `present.{i}.key/value`. The
            ids are the tokens of positions [window_start, window_start + W) of a length-T sequence
            (T = attention_mask's length) and attend to the past keys/values of every other
            position; an empty past (T rows 0) with window_start 0 is the plain full forward.
    """

    weight_format: str = "qdq"
    accuracy_level: int | None = None
    act_kernel: str = "auto"
    logit_positions: bool = True
    kv_cache: bool = True
    embed_head: str = "fp32"
    head_accuracy_level: int = 0

    def __post_init__(self):
        if self.weight_format not in WEIGHT_FORMATS:
            raise InputError(f"unknown ONNX weight format {self.weight_format!r} (choose from {', '.join(WEIGHT_FORMATS)})")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise InputError(f"accuracy_level must be 0..4, got {self.accuracy_level}")
        if self.head_accuracy_level not in (0, 4):
            raise InputError(f"head_accuracy_level must be 0 or 4, got {self.head_accuracy_level}")
        if self.embed_head not in ("fp32", "int8"):
            raise InputError(f"embed_head must be 'fp32' or 'int8', got {self.embed_head!r}")
        if self.act_kernel not in ACT_KERNELS:
            raise InputError(f"unknown activation kernel {self.act_kernel!r} (choose from {', '.join(ACT_KERNELS)})")


# ----------------------------------------------------------------------------------------------- graph

class _Graph:
    """Nodes, small constants and streamed external initializers of one ONNX graph."""

    def __init__(self, data_path: Path):
        import onnx

        self.onnx = onnx
        self.nodes: list = []
        self.initializers: list = []
        self.data = open(data_path, "wb")
        self.offset = 0
        self._names: dict[str, int] = {}
        self._consts: dict[tuple, str] = {}
        self.op_counts: dict[str, int] = {}
        self.functions: dict[str, object] = {}  # local functions (FunctionProto) by name

    def fresh(self, base: str) -> str:
        n = self._names.get(base, 0)
        self._names[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def op(self, op_type: str, inputs: list[str], name: str | None = None, domain: str = "", **attrs) -> str:
        return self.op_n(op_type, inputs, [name or op_type.lower()], domain, **attrs)[0]

    def op_n(self, op_type: str, inputs: list[str], names: list[str], domain: str = "", **attrs) -> list[str]:
        """A node with one output per name (e.g. an op whose optional outputs its kernel requires)."""
        outs = [self.fresh(n) for n in names]
        self.nodes.append(self.onnx.helper.make_node(op_type, inputs, outs, name=f"{outs[0]}/{op_type}", domain=domain,
                                                     **attrs))
        self.op_counts[op_type] = self.op_counts.get(op_type, 0) + 1
        return outs

    def prune(self, outputs: list[str]) -> None:
        """Drop the nodes no graph output depends on: the builder writes a value some layers may not
        read (a block's float rows, where its layer took the rows' integer codes instead)."""
        needed, keep = set(outputs), []
        for node in reversed(self.nodes):
            if any(o in needed for o in node.output):
                keep.append(node)
                needed.update(i for i in node.input if i)
            elif self.op_counts.get(node.op_type):
                self.op_counts[node.op_type] -= 1
        self.nodes = keep[::-1]
        self.op_counts = {k: v for k, v in self.op_counts.items() if v}

    def call(self, fn, inputs: list[str], name: str) -> str:
        """A call of local function `fn` (a FunctionProto, added to the model once)."""
        self.functions.setdefault(fn.name, fn)
        return self.op(fn.name, inputs, name, domain=fn.domain)

    def const(self, value, dtype=np.float32, name: str = "const") -> str:
        """A small constant initializer stored inline, once per value (the graph reuses it)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.fresh(name)
            self.initializers.append(self.onnx.numpy_helper.from_array(arr, self._consts[key]))
        return self._consts[key]

    def weight(self, name: str, data: np.ndarray | bytes, dims: list[int], elem_type: int) -> str:
        """A weight initializer whose bytes go to the external data file (page-aligned when large)."""
        raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
        out = self.fresh(name)
        t = self.onnx.TensorProto()
        t.name, t.data_type = out, elem_type
        t.dims.extend(int(d) for d in dims)
        if len(raw) < 1024:
            t.raw_data = raw
        else:
            # pages for the big tensors (onnxruntime maps page-aligned data); the others are read into
            # buffers of its own, so padding them would only add bytes
            pad = -self.offset % 4096 if len(raw) >= 1 << 20 else 0
            self.data.write(b"\0" * pad)
            self.offset += pad
            for key, value in (("location", DATA_FILE), ("offset", str(self.offset)), ("length", str(len(raw)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = self.onnx.TensorProto.EXTERNAL
            self.data.write(raw)
            self.offset += len(raw)
        self.initializers.append(t)
        return out

    def close(self) -> None:
        self.data.close()


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).contiguous().numpy()


def _pack_nibbles(u: np.ndarray) -> bytes:
    """Two 4-bit values per byte, first element in the low nibble (ONNX int4 and MatMulNBits order)."""
    flat = u.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).tobytes()


def _pack_bits(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of unsigned codes `u` LSB-first into uint8 (2, 4 or 8 bits per value)."""
    per = 8 // bits
    u = u.astype(np.uint8)
    pad = -u.shape[-1] % per
    if pad:
        u = np.concatenate([u, np.zeros((*u.shape[:-1], pad), np.uint8)], axis=-1)
    u = u.reshape(*u.shape[:-1], -1, per)
    out = np.zeros(u.shape[:-1], np.uint8)
    for i in range(per):
        out |= u[..., i] << (bits * i)
    return out


def _scales(g: _Graph, s: torch.Tensor, name: str) -> str:
    """Quantization scales as an fp32 graph value. fp16 scales (every grid's default) are stored as
    fp16 and widened by a Cast that onnxruntime folds at load: exact, and half the bytes (0.5 bit
    per weight at groups of 32)."""
    if s.dtype != torch.float16:
        return g.weight(name, _f32(s), list(s.shape), 1)
    half = g.weight(f"{name}.fp16", s.detach().contiguous().numpy(), list(s.shape), 10)
    return g.op("Cast", [half], name, to=1)


def _stored_codes(g: _Graph, codes: np.ndarray, bits: int, signed: bool, name: str) -> str:
    """Integer codes (signed in [-2^(b-1), 2^(b-1)), else in [0, 2^b)) as a DequantizeLinear input of
    their shape: int4 / uint4 at 4 bits, int8 / uint8 at 8, dense bit planes rebuilt as int8 / uint8
    otherwise (`_dense_codes`)."""
    import onnx

    TP = onnx.TensorProto
    if bits == 4:
        return g.weight(name, _pack_nibbles(codes & 0xF), list(codes.shape), TP.INT4 if signed else TP.UINT4)
    if bits == 8:
        return g.weight(name, codes.astype(np.int8 if signed else np.uint8), list(codes.shape),
                        TP.INT8 if signed else TP.UINT8)
    offset = 1 << (bits - 1) if signed else 0
    return _dense_codes(g, codes.astype(np.int16) + offset, bits, name, offset)


def _dense_codes(g: _Graph, u: np.ndarray, bits: int, name: str, offset: int = 0) -> str:
    """Unsigned `bits`-bit codes u (any shape) stored densely as `bits` bit planes (np.packbits, LSB
    first: u.size * bits / 8 bytes), rebuilt as uint8 of u's shape, minus `offset` as int8 when
    `offset` is given (signed codes), by one call of a local function (`_rebuild_function`). Every
    input is an initializer, so onnxruntime inlines and folds the rebuild at load: a file at the
    grid's bits (ONNX has no 3/5/6/7-bit type, and its int2 needs opset 25), the 8-bit kernels in memory."""
    import onnx

    planes = np.stack([np.packbits(((u >> i) & 1).astype(np.uint8).reshape(-1), bitorder="little")
                       for i in range(bits)])  # [bits, M]
    p = g.weight(f"{name}.planes", planes, [bits, planes.shape[1], 1], onnx.TensorProto.UINT8)
    shape = g.const(list(u.shape), np.int64)
    if not offset:
        return g.call(_rebuild_function(False), [p, shape], name)
    return g.call(_rebuild_function(True), [p, shape, g.const(np.array(offset), np.int32)], name)


@functools.lru_cache(maxsize=None)
def _rebuild_function(signed: bool):
    """The local function (planes [bits, M, 1] uint8, shape int64[r][, offset int32]) -> codes of
    `shape`, uint8 (or int8 = value - offset): bit j of plane i is bit i of value 8 m + j. Written
    once per graph however many layers call it, so a dense layer costs one node in the graph (built
    once per process: the model copies it in)."""
    import onnx

    h, TP = onnx.helper, onnx.TensorProto

    def const(name, arr):
        return h.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(arr), name))

    nodes = [
        const("bit_index", np.arange(8, dtype=np.uint8)), const("one", np.array(1, np.uint8)),
        const("zero", np.array([0], np.int64)), const("axis1", np.array([1], np.int64)),
        const("axis0", np.array([0], np.int64)), const("minus1", np.array([-1], np.int64)),
        const("zero_scalar", np.array(0, np.int64)), const("one_scalar", np.array(1, np.int64)),
        h.make_node("BitShift", ["planes", "bit_index"], ["shifted"], direction="RIGHT"),
        h.make_node("BitwiseAnd", ["shifted", "one"], ["bit"]),  # [bits, M, 8]: bit j of each byte
        h.make_node("Shape", ["planes"], ["nbits"], start=0, end=1),
        h.make_node("Concat", ["nbits", "minus1"], ["flat_shape"], axis=0),
        h.make_node("Reshape", ["bit", "flat_shape"], ["flat"]),  # [bits, 8 M]
        h.make_node("ReduceProd", ["shape"], ["n"], keepdims=1),
        h.make_node("Slice", ["flat", "zero", "n", "axis1"], ["used"]),  # the last byte's padding dropped
        h.make_node("Squeeze", ["nbits"], ["nbits_scalar"]),
        h.make_node("Range", ["zero_scalar", "nbits_scalar", "one_scalar"], ["plane_index"]),
        h.make_node("Cast", ["plane_index"], ["plane_shift_flat"], to=TP.UINT8),
        h.make_node("Unsqueeze", ["plane_shift_flat", "axis1"], ["plane_shift"]),  # [bits, 1]
        h.make_node("BitShift", ["used", "plane_shift"], ["weighted"], direction="LEFT"),
        h.make_node("Cast", ["weighted"], ["wide"], to=TP.INT32),
        h.make_node("ReduceSum", ["wide", "axis0"], ["value_flat"], keepdims=0),  # disjoint bits: the sum is the OR
        h.make_node("Reshape", ["value_flat", "shape"], ["value"]),
    ]
    inputs = ["planes", "shape"]
    if signed:
        inputs.append("offset")
        nodes += [h.make_node("Sub", ["value", "offset"], ["centred"]),
                  h.make_node("Cast", ["centred"], ["codes"], to=TP.INT8)]
    else:
        nodes.append(h.make_node("Cast", ["value"], ["codes"], to=TP.UINT8))
    return h.make_function(FUNCTION_DOMAIN, "DenseCodesInt8" if signed else "DenseCodesUint8", inputs, ["codes"],
                           nodes, [h.make_opsetid("", OPSET)])


# ----------------------------------------------------------------------------------------------- layers

class _Builder:
    """Emits the forward of one model family into a `_Graph`."""

    def __init__(self, g: _Graph, cfg: OnnxExportConfig):
        self.g = g
        self.cfg = cfg
        # weight-only layers compute with float activations unless the user asks for the int8 kernel
        self.acc = cfg.accuracy_level or 0
        self.notes: dict[str, str] = {}  # layer -> how its activations run
        self.simulated = False
        # per-token codes of one activation, shared by the layers that read it (q/k/v, gate/up)
        self._codes: dict[tuple[str, ActQuantConfig], dict[str, str]] = {}
        self._row_sources: dict[str, tuple[str, str]] = {}  # rows_of's outputs -> (activation, rows)

    # -- transforms and activation quantization (x [..., K] -> same shape)

    def transform(self, x: str, t, name: str) -> str:
        """x @ T for an online input transform (quant.transforms), by its kind."""
        emit = {"matrix": self._matrix, "chain": self._chain, "block_diagonal": self._block_diagonal,
                "hadamard": self._hadamard}.get(t.kind)
        if emit is None:
            raise InputError(f"layer {name}: online transform {t.kind!r} has no ONNX form")
        return emit(x, t, name)

    def _matrix(self, x: str, t, name: str) -> str:
        return self.g.op("MatMul", [x, self.g.weight(f"{name}.T", _f32(t.M), list(t.M.shape), 1)], f"{name}.rot")

    def _chain(self, x: str, t, name: str) -> str:
        for i, part in enumerate(t.parts):
            x = self.transform(x, part, f"{name}.{i}")
        return x

    def _block_diagonal(self, x: str, t, name: str) -> str:
        g = self.g
        if t.perm is not None:
            x = g.op("Gather", [x, g.const(t.perm.numpy(), np.int64, f"{name}.perm")], f"{name}.permuted", axis=-1)
        k, b, _ = t.blocks.shape
        xb = g.op("Reshape", [x, g.const([0, 0, k, b], np.int64)], f"{name}.blocks_in")
        yb = g.op("Einsum", [xb, g.weight(f"{name}.R", _f32(t.blocks), [k, b, b], 1)], f"{name}.blocks_out",
                  equation="xykb,kbc->xykc")
        return g.op("Reshape", [yb, g.const([0, 0, k * b], np.int64)], f"{name}.rot")

    def _hadamard(self, x: str, t, name: str) -> str:
        # x @ (H_m (x) H_p1 (x) ... (x) I_inner) / sqrt(n): one small contraction per Kronecker factor
        g = self.g
        factors = [f.numpy().astype(np.float32) for f in t.factors()]
        sizes = [f.shape[0] for f in factors]
        y = g.op("Reshape", [x, g.const([0, 0, *sizes, t.inner], np.int64)], f"{name}.kron_in")
        letters = "abcdefgh"[:len(sizes)]
        for i, f in enumerate(factors):
            src = f"xy{letters}i"
            dst = src.replace(letters[i], "z")
            y = g.op("Einsum", [y, g.const(f, np.float32, f"{name}.H{i}")], f"{name}.kron{i}",
                     equation=f"{src},{letters[i]}z->{dst}")
        y = g.op("Reshape", [y, g.const([0, 0, t.size], np.int64)], f"{name}.kron_out")
        return g.op("Mul", [y, g.const(1.0 / math.sqrt(t.n), np.float32)], f"{name}.rot")

    def fake_quant_act(self, x: str, a: ActQuantConfig, name: str, static=None) -> str:
        """The exact fake-quant of `quant.primitives.fake_quantize_act` as float ops."""
        g = self.g
        self.simulated = True
        if a.sym:
            qmax = float((1 << (a.bits - 1)) - 1)
            lo, hi = -qmax - 1, qmax
            if static is None:
                amax = g.op("ReduceMax", [g.op("Abs", [x]), g.const([-1], np.int64)], keepdims=1)
                s = g.op("Max", [g.op("Div", [g.op("Mul", [amax, g.const(a.clip)]), g.const(qmax)]), g.const(1e-8)])
            else:
                s = g.const(float(static[0]), name=f"{name}.act_scale")
            q = g.op("Clip", [g.op("Round", [g.op("Div", [x, s])]), g.const(lo), g.const(hi)])
            return g.op("Mul", [q, s], f"{name}.xq")
        qmax = float((1 << a.bits) - 1)
        if static is None:
            hi_ = g.op("Max", [g.op("Mul", [g.op("ReduceMax", [x, g.const([-1], np.int64)], keepdims=1), g.const(a.clip)]),
                               g.const(0.0)])
            lo_ = g.op("Min", [g.op("Mul", [g.op("ReduceMin", [x, g.const([-1], np.int64)], keepdims=1), g.const(a.clip)]),
                               g.const(0.0)])
            s = g.op("Max", [g.op("Div", [g.op("Sub", [hi_, lo_]), g.const(qmax)]), g.const(1e-8)])
            z = g.op("Round", [g.op("Div", [g.op("Neg", [lo_]), s])])
        else:
            s = g.const(float(static[0]), name=f"{name}.act_scale")
            z = g.const(float(static[1]), name=f"{name}.act_zero")
        q = g.op("Clip", [g.op("Add", [g.op("Round", [g.op("Div", [x, s])]), z]), g.const(0.0), g.const(qmax)])
        return g.op("Mul", [g.op("Sub", [q, z]), s], f"{name}.xq")

    # -- weights

    def float_matmul(self, x: str, W: torch.Tensor, name: str) -> str:
        w = self.g.weight(f"{name}.weight_T", _f32(W).T, [W.shape[1], W.shape[0]], 1)
        return self.g.op("MatMul", [x, w], name)

    def dq_weight(self, qw: QuantizedWeight, name: str) -> str:
        """DequantizeLinear of the codes as [K, N] (the layout onnxruntime's MatMulNBits fusion wants)."""
        g, c = self.g, qw.cfg
        K = qw.shape[1]
        G = qw.scales.shape[1]
        per_channel = G == 1
        inputs = [_stored_codes(g, qw.codes.numpy().T, c.bits, c.sym, f"{name}.qweight")]
        scales = qw.scales.T  # [G, N]
        inputs.append(_scales(g, scales[0] if per_channel else scales, f"{name}.scales"))
        if qw.zeros is not None:  # at the codes' width and type too
            z = qw.zeros.numpy().T  # [G, N]
            inputs.append(_stored_codes(g, z[0] if per_channel else z, c.bits, False, f"{name}.qzeros"))
        attrs = {"axis": 1} if per_channel else {"axis": 0, "block_size": K // G}
        return g.op("DequantizeLinear", inputs, f"{name}.weight", **attrs)

    def nbits_matmul(self, x: str, qw: QuantizedWeight, name: str, acc: int) -> str:
        g, c = self.g, qw.cfg
        N, K = qw.shape
        G = qw.scales.shape[1]
        bs = K // G
        check_matmulnbits(c.bits, bs, f"layer {name}")
        u = (qw.codes.to(torch.int32) - c.qmin).numpy().astype(np.uint8).reshape(N, G, bs)  # unsigned codes
        blob = _pack_bits(u, c.bits)  # [N, G, bs * bits / 8]
        inputs = [x, g.weight(f"{name}.qweight", blob, list(blob.shape), 2),
                  # fp32 initializers: the kernel packs them at load (and misreads computed ones at accuracy 4)
                  g.weight(f"{name}.scales", _f32(qw.scales), [N, G], 1)]
        if qw.zeros is not None:  # asymmetric: explicit zero points, packed like the codes
            zp = _pack_bits(qw.zeros.numpy().astype(np.uint8), c.bits)
            inputs.append(g.weight(f"{name}.qzeros", zp, list(zp.shape), 2))
        # symmetric codes c in [-2^(b-1), 2^(b-1)) stored as c + 2^(b-1): the op's default zero point
        return g.op("MatMulNBits", inputs, name, domain="com.microsoft",
                    K=K, N=N, bits=c.bits, block_size=bs, accuracy_level=acc)

    def integer_matmul(self, x: str, qw: QuantizedWeight, a: ActQuantConfig, name: str) -> str:
        """Per-token dynamic 8-bit activations x per-channel weights, accumulated in int32.

        Activations go as uint8 (the fast u8 x s8 path on x86): symmetric ones as round(x/s) + 128 with
        zero point 128, through MatMulIntegerToFloat (the GEMM and the weight scales in one kernel);
        asymmetric ones as round(x/s) + z_token through MatMulInteger, whose per-row zero point is taken
        out after the GEMM as z_token * sum_k(W_q[k, n] - z_w[n]). Same grid as `fake_quantize_act`.
        """
        g = self.g
        N, K = qw.shape
        x8 = self._act_codes(x, a, K, name)
        wq, col_scales = self._integer_weight(qw, name)
        w_zero = [] if qw.zeros is None else [g.weight(f"{name}.qzeros", qw.zeros[:, 0].numpy().astype(np.uint8), [N], 2)]
        a_zp = g.const(np.array(128 if a.sym else 0, np.uint8), np.uint8, f"{name}.act_zero")
        w_scales = g.weight(f"{name}.scales", _f32(col_scales), [N], 1)
        if a.sym:  # rows x cols in one kernel: (codes - 128)(W_q - z_w) x w_scale, then x the row's scale
            y = g.op("MatMulIntegerToFloat", [x8["codes"], wq, g.const(1.0), w_scales, a_zp, *w_zero], f"{name}.acc",
                     domain="com.microsoft")
            return g.op("Mul", [y, x8["scale"]], name)
        acc = g.op("MatMulInteger", [x8["codes"], wq, a_zp, *w_zero], f"{name}.acc")
        # remove the per-token zero point: acc - z * colsum(W_q - z_w)
        w_int = qw.codes.to(torch.int64) - (0 if qw.zeros is None else qw.zeros.to(torch.int64))
        colsum = g.weight(f"{name}.colsum", w_int.sum(1).numpy().astype(np.int32), [N], 6)
        acc = g.op("Sub", [acc, g.op("Mul", [g.op("Cast", [x8["zero"]], to=6), colsum])])
        y = g.op("Mul", [g.op("Cast", [acc], to=1), x8["scale"]])
        return g.op("Mul", [y, w_scales], name)

    def _integer_weight(self, qw: QuantizedWeight, name: str) -> tuple[str, torch.Tensor]:
        """The codes as an 8-bit [K, N] input of the integer GEMM (int8 symmetric, uint8 with zero
        points) and its column scales [N]. Codes of <= 4 bits are stored as packed int4 / uint4 and
        widened by a Cast, which onnxruntime folds into the kernel's 8-bit weight at load: a 4-bit
        file, the int8 kernel."""
        import onnx

        if qw.cfg.progressive:
            return self._progressive_weight(qw, name)
        g, TP = self.g, onnx.TensorProto
        N, K = qw.shape
        codes = qw.codes.numpy().T
        wide, narrow = (TP.INT8, TP.INT4) if qw.zeros is None else (TP.UINT8, TP.UINT4)
        if qw.cfg.bits > 4:
            stored = codes.astype(np.int8 if qw.zeros is None else np.uint8)
            return g.weight(f"{name}.qweight", stored, [K, N], wide), qw.scales[:, 0]
        q4 = g.weight(f"{name}.qweight", _pack_nibbles(codes & 0xF), [K, N], narrow)
        return g.op("Cast", [q4], f"{name}.qweight8", to=wide), qw.scales[:, 0]

    def _progressive_weight(self, qw: QuantizedWeight, name: str) -> tuple[str, torch.Tensor]:
        """A progressive weight's int8 [K, N] (group-scale integer x code, `primitives.int8_form`)
        and its channel scales, the weight stored as its int4 (2/3-bit: bit-plane) codes and int8
        group integers [G, 1, N] and rebuilt by Cast / Reshape / Mul / Reshape / Cast on initializers
        only, which onnxruntime folds into the integer GEMM's weight at load: a 4-bit file, the int8
        kernel, no work per step."""
        import onnx

        g, TP = self.g, onnx.TensorProto
        N, K = qw.shape
        d, ints = progressive_scales(qw)
        G = ints.shape[1]
        q = g.op("Cast", [_stored_codes(g, qw.codes.numpy().T, qw.cfg.bits, True, f"{name}.qweight")], to=TP.INT32)
        sc = g.weight(f"{name}.scale_ints", ints.T.numpy().astype(np.int8).reshape(G, 1, N), [G, 1, N], TP.INT8)
        grouped = g.op("Reshape", [q, g.const([G, K // G, N], np.int64)])
        w = g.op("Mul", [grouped, g.op("Cast", [sc], to=TP.INT32)])
        w = g.op("Reshape", [w, g.const([K, N], np.int64)])
        return g.op("Cast", [w], f"{name}.qweight8", to=TP.INT8), d

    def rows_of(self, x: str, rows: str, name: str) -> str:
        """x [B, L, K] at `rows` [B, P, 1]; a layer that reads the result takes x's per-token codes
        at those rows (the same codes: gathered, not computed again)."""
        out = _gather_rows(self.g, x, rows, name)
        self._row_sources[out] = (x, rows)
        return out

    def _act_codes(self, x: str, a: ActQuantConfig, K: int, name: str) -> dict[str, str]:
        """uint8 codes, scale and zero point of per-token 8-bit activations (`fake_quantize_act`'s grid),
        computed once per (activation, grid) however many layers read them."""
        if (x, a) not in self._codes:
            if x in self._row_sources:
                src, rows = self._row_sources[x]
                self._codes[(x, a)] = {k: _gather_rows(self.g, v, rows, f"{name}.act_{k}")
                                       for k, v in self._act_codes(src, a, K, name).items()}
            else:
                self._codes[(x, a)] = self._emit_act_codes(x, a, K, name)
        return self._codes[(x, a)]

    def _emit_act_codes(self, x: str, a: ActQuantConfig, K: int, name: str) -> dict[str, str]:
        g = self.g
        axis = g.const([-1], np.int64)
        if a.sym:  # one scale per token [B, L, 1]: QuantizeLinear's blocked form, one block of K per row
            amax = g.op("ReduceMax", [g.op("Abs", [x]), axis], keepdims=1)
            if a.clip != 1.0:  # (x * 1.0 is x: no node for the default)
                amax = g.op("Mul", [amax, g.const(a.clip)])
            s = g.op("Max", [g.op("Div", [amax, g.const(127.0)]), g.const(1e-8)], f"{name}.act_scale")
            z = g.op("ConstantOfShape", [g.op("Shape", [s])],
                     value=g.onnx.helper.make_tensor("z", g.onnx.TensorProto.UINT8, [1], [128]))
            q = g.op("QuantizeLinear", [x, s, z], f"{name}.xq", axis=-1, block_size=K)
            return {"codes": q, "scale": s}
        hi = g.op("Max", [g.op("Mul", [g.op("ReduceMax", [x, axis], keepdims=1), g.const(a.clip)]), g.const(0.0)])
        lo = g.op("Min", [g.op("Mul", [g.op("ReduceMin", [x, axis], keepdims=1), g.const(a.clip)]), g.const(0.0)])
        s = g.op("Max", [g.op("Div", [g.op("Sub", [hi, lo]), g.const(255.0)]), g.const(1e-8)], f"{name}.act_scale")
        z = g.op("Round", [g.op("Div", [g.op("Neg", [lo]), s])], f"{name}.act_zero")
        q = g.op("Clip", [g.op("Add", [g.op("Round", [g.op("Div", [x, s])]), z]), g.const(0.0), g.const(255.0)])
        return {"codes": g.op("Cast", [q], f"{name}.xq", to=2), "scale": s, "zero": z}

    def linear(self, x: str, lin, name: str) -> str:
        """One linear layer (a StoredLinear, or a plain float weight + bias) on x [B, L, K]."""
        g = self.g
        if lin.transform is not None:
            x = self.transform(x, lin.transform, f"{name}.input_transform")
        qw, a = lin.qweight, lin.act
        how = "float"
        if qw is not None and qw.mins is not None:
            raise InputError(f"layer {name}: float minimums (zero_kind='float', GGUF Q4_1 style) have no exact ONNX "
                             f"form; quantize with integer zero points, or use --target gguf")
        if a is not None and a.bits < 16:
            kernel = self._act_kernel(qw, a)
            if kernel == "integer":
                y = self.integer_matmul(x, qw, a, name)
                self.notes[name] = "integer"
                return self._bias(y, lin, name)
            if kernel == "static":
                s = g.const(float(lin.act_scale), name=f"{name}.act_scale")
                z = g.const(np.array(0 if a.sym else int(lin.act_zero), np.int8 if a.sym else np.uint8),
                            np.int8 if a.sym else np.uint8, f"{name}.act_zero")
                x = g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, s, z]), s, z], f"{name}.xq")
                how = "static-qdq"
            elif kernel == "nbits":
                self.notes[name] = "nbits-acc4"
                return self._bias(self.nbits_matmul(x, qw, name, 4), lin, name)
            else:
                static = None if lin.act_scale is None else (lin.act_scale, lin.act_zero if lin.act_zero is not None else 0)
                x = self.fake_quant_act(x, a, name, static)
                how = "simulated"
        if qw is None:
            y = self.float_matmul(x, lin.weight, name)
        elif self.cfg.weight_format == "matmulnbits":
            y = self.nbits_matmul(x, qw, name, self.acc if how == "float" else 0)
        else:
            y = g.op("MatMul", [x, self.dq_weight(qw, name)], name)
        self.notes[name] = how
        return self._bias(y, lin, name)

    def _bias(self, y: str, lin, name: str) -> str:
        if lin.bias is None:
            return y
        return self.g.op("Add", [y, self.g.weight(f"{name}.bias", _f32(lin.bias), [lin.bias.shape[0]], 1)])

    def _act_kernel(self, qw: QuantizedWeight | None, a: ActQuantConfig) -> str:
        static = a.granularity == "per_tensor"
        if static:
            return "static" if a.bits == 8 and qw is not None else "simulate"
        want = self.cfg.act_kernel
        # per channel, or progressive groups: an int8 weight times one scale per column
        int8_weight = qw is not None and qw.mins is None and (qw.scales.shape[1] == 1 or qw.cfg.progressive)
        G = qw.scales.shape[1] if qw is not None else 0
        bs = qw.shape[1] // G if G else 0
        nbits_ok = qw is not None and qw.cfg.bits in MATMULNBITS_BITS and matmulnbits_block_ok(bs)
        exact_int = a.bits == 8 and int8_weight
        if want == "auto":
            return "integer" if exact_int else "nbits" if (nbits_ok and a.bits == 8 and G > 1) else "simulate"
        if want == "integer" and not exact_int:
            raise InputError("act_kernel 'integer' needs 8-bit per-token activations and per-channel or progressive "
                             "weights (scheme W8A8 / W4A8 with group size 0, or --progressive)")
        if want == "nbits" and not (nbits_ok and a.bits == 8):
            raise InputError("act_kernel 'nbits' needs 8-bit activations and 2/4/8-bit weights with a power-of-two "
                             "group >= 16 (e.g. --group-size 128)")
        return want


# ----------------------------------------------------------------------------------------------- model

# embed_head="int8": symmetric 8-bit rows in blocks of 32 (exactly a GGUF Q8_0 grid)
HEAD_GRID = WeightQuantConfig(bits=8, group_size=32, sym=True)


def _quantized_embedding(g: _Graph, qw, name: str) -> str:
    """Gather of a quantized embedding: codes (one byte each in memory; below 8 bits stored as dense
    bit planes), block scales (and zero points) gathered per token, then (codes - zeros) * scales,
    the exact dequantization of `qw` (the `embed_head="int8"` grid, or a mixed recipe's stored
    embedding)."""
    if qw.mins is not None:
        raise InputError(f"{name}: float minimums (zero_kind='float') have no exact ONNX form")
    V, D = qw.shape
    G = qw.scales.shape[1]
    signed = qw.zeros is None
    c = qw.cfg
    if c.bits < 8:
        codes = _dense_codes(g, qw.codes.numpy().astype(np.int16) - c.qmin, c.bits, f"{name}.qweight", -c.qmin)
    else:
        codes = g.weight(f"{name}.qweight", qw.codes.numpy().astype(np.int8 if signed else np.uint8), [V, D],
                         3 if signed else 2)
    scales = _scales(g, qw.scales, f"{name}.scales")
    q = g.op("Cast", [g.op("Gather", [codes, "input_ids"])], to=1)  # [B, L, D]
    qg = g.op("Reshape", [q, g.const([0, 0, G, D // G], np.int64)])
    if not signed:
        zeros = g.weight(f"{name}.qzeros", qw.zeros.numpy().astype(np.uint8), [V, G], 2)
        z = g.op("Unsqueeze", [g.op("Cast", [g.op("Gather", [zeros, "input_ids"])], to=1), g.const([-1], np.int64)])
        qg = g.op("Sub", [qg, z])
    s = g.op("Unsqueeze", [g.op("Gather", [scales, "input_ids"]), g.const([-1], np.int64)])  # [B, L, G, 1]
    return g.op("Reshape", [g.op("Mul", [qg, s]), g.const([0, 0, D], np.int64)], "embed")


def _rms_norm(g: _Graph, x: str, w: torch.Tensor, eps: float, name: str) -> str:
    """weight * x / sqrt(mean(x^2) + eps), the pattern onnxruntime fuses into SimplifiedLayerNormalization."""
    ms = g.op("ReduceMean", [g.op("Pow", [x, g.const(2.0)]), g.const([-1], np.int64)], keepdims=1)
    h = g.op("Div", [x, g.op("Sqrt", [g.op("Add", [ms, g.const(eps)])])])
    return g.op("Mul", [h, g.weight(f"{name}.weight", _f32(w), [w.shape[0]], 1)], name)


def _rope(g: _Graph, x: str, n_heads: int, pro: _Prologue, name: str) -> str:
    """x * cos + rotate_half(x) * sin on x [B, L, n_heads * hd] at the window's positions (ONNX
    RotaryEmbedding, non-interleaved: GPT-NeoX's halves, as `models.layers.apply_rope`)."""
    return g.op("RotaryEmbedding", [x, pro.cos, pro.sin, pro.positions], name, num_heads=n_heads, interleaved=0)


@dataclass(frozen=True)
class _Prologue:
    """Graph values every block reads: the key-padding bias, the window bounds, RoPE's positions
    [B, W] and its cos/sin tables [context, head_dim / 2]."""

    attn_bias: str
    start: str
    end: str
    positions: str
    cos: str
    sin: str


def _graph_inputs(cfg: OnnxExportConfig, dims) -> list:
    """The graph's input value infos (ids, mask, optional logit rows, window start and past K/V)."""
    import onnx

    TP, make = onnx.TensorProto, onnx.helper.make_tensor_value_info
    inputs = [make("input_ids", TP.INT64, ["batch", "length"]),
              make("attention_mask", TP.INT64, ["batch", "total_length"])]
    if cfg.logit_positions:
        inputs.append(make("logit_positions", TP.INT64, ["batch", "positions"]))
    if cfg.kv_cache:
        inputs.append(make("window_start", TP.INT64, [1]))
        for i in range(dims.n_layers):
            for kind in ("key", "value"):
                inputs.append(make(f"past.{i}.{kind}", TP.FLOAT, ["batch", dims.n_kv_heads, "past_length", dims.head_dim]))
    return inputs


def _prologue(g: _Graph, cfg: OnnxExportConfig, spec, dims) -> _Prologue:
    """Attention bias, window bounds, the window's RoPE positions and the cos/sin tables."""
    TP = g.onnx.TensorProto
    # key-padding bias [B, 1, W, keys] (onnxruntime's Attention wants the query axis spelled out);
    # pad query rows stay finite, real rows give pad keys exactly zero weight
    maskf = g.op("Cast", ["attention_mask"], "mask_f", to=TP.FLOAT)
    kbias = g.op("Mul", [g.op("Sub", [g.const(1.0), maskf]), g.const(_F32_MIN)], "key_bias")  # [B, T]
    W_len = g.op("Shape", ["input_ids"], start=1, end=2)
    start = "window_start" if cfg.kv_cache else g.const([0], np.int64)
    end = g.op("Add", [start, W_len], "window_end")
    if cfg.kv_cache:  # keys = [past (P rows: T, or 0 in a full forward), the window's fresh ones]
        kbias = _cached_key_bias(g, kbias, start, end)
    bshape = g.op("Concat", [g.op("Shape", ["input_ids"], start=0, end=1), g.const([1], np.int64), W_len,
                             g.op("Shape", [kbias], start=1, end=2)], axis=0)
    attn_bias = g.op("Expand", [g.op("Unsqueeze", [kbias, g.const([1, 2], np.int64)]), bshape], "attn_bias")
    # RoPE positions: absolute, or (Dream, padded) the count of real tokens before each one
    hd = dims.head_dim
    cos_t, sin_t = rope_cos_sin(torch.arange(dims.context), hd, dims.rope_theta)
    if spec.positions_skip_padding:
        csum = g.op("CumSum", ["attention_mask", g.const(1, np.int64)])
        pos = g.op("Where", [g.op("Cast", ["attention_mask"], to=TP.BOOL),
                             g.op("Sub", [csum, g.const(1, np.int64)]), g.const(1, np.int64)])
        pos = g.op("Slice", [pos, start, end, g.const([1], np.int64)], "positions")
    else:
        pos = g.op("Expand", [g.op("Range", [g.op("Squeeze", [start]), g.op("Squeeze", [end]), g.const(1, np.int64)]),
                              g.op("Shape", ["input_ids"])], "positions")
    half = hd // 2  # the tables repeat over the two halves of the head dim: RotaryEmbedding takes one
    cos = g.weight("rope.cos", cos_t[:, :half].numpy(), [dims.context, half], 1)
    sin = g.weight("rope.sin", sin_t[:, :half].numpy(), [dims.context, half], 1)
    return _Prologue(attn_bias, start, end, pos, cos, sin)


def _cached_key_bias(g: _Graph, kbias: str, start: str, end: str) -> str:
    """Key bias [B, P + W] for the keys [past, fresh window]: the past's rows of the window are
    stale (the fresh ones replace them) and get the masked value; the rest keep their padding bias.
    Attention is order-free over keys, so this equals attending to the past with the window spliced in,
    and the Attention op appends the fresh keys itself: no slicing and splicing of every layer's cache."""
    P_len = g.op("Shape", ["past.0.key"], start=2, end=3)
    j = g.op("Range", [g.const(0, np.int64), g.op("Squeeze", [P_len]), g.const(1, np.int64)], "past_positions")
    stale = g.op("And", [g.op("GreaterOrEqual", [j, start]), g.op("Less", [j, end])], "past_stale")
    past = g.op("Slice", [kbias, g.const([0], np.int64), P_len, g.const([1], np.int64)])
    past = g.op("Where", [stale, g.const(_F32_MIN), past], "past_key_bias")
    fresh = g.op("Slice", [kbias, start, end, g.const([1], np.int64)], "window_key_bias")
    return g.op("Concat", [past, fresh], "cached_key_bias", axis=1)


def _embed(g: _Graph, cfg: OnnxExportConfig, source) -> str:
    """The token embedding gathered at `input_ids` (fp32 rows, or quantized rows x block scales)."""
    spec, tensor = source.spec, source.tensor
    if spec.embedding in source.layers:  # a mixed recipe's quantized embedding, exactly
        return _quantized_embedding(g, source.linear(spec.embedding).qweight, spec.embedding)
    W_emb = tensor(f"{spec.embedding}.weight")
    if cfg.embed_head == "int8":
        return _quantized_embedding(g, quantize_weight(W_emb.float(), HEAD_GRID), spec.embedding)
    return g.op("Gather", [g.weight(f"{spec.embedding}.weight", _f32(W_emb), list(W_emb.shape), 1), "input_ids"],
                "embed")


def _gather_rows(g: _Graph, x: str, rows: str, name: str) -> str:
    """x [B, L, ...] at the positions `rows` [B, P, 1] of each batch row: [B, P, ...]."""
    return g.op("GatherND", [x, rows], name, batch_dims=1)


def _emit_block(g: _Graph, b: _Builder, pro: _Prologue, source, x: str, i: int,
                rows: str | None = None) -> tuple[str, list[str]]:
    """Transformer block `i` on the hidden states `x`: (its output, its present K/V names if cached).

    `rows` ([B, P, 1], the last block's when only some rows reach the head): keys and values still
    come from every row, the queries, attention output and FFN from those rows alone, so the output
    is [B, P, d] (llama.cpp's out_ids; the other rows' outputs would feed nothing)."""
    spec, dims, tensor, stored = source.spec, source.dims, source.tensor, source.linear
    H, kvH = dims.n_heads, dims.n_kv_heads
    p = f"{spec.blocks}.{i}."
    ln = {role: p + n for role, n in spec.linears.items()}
    present = []
    h = _rms_norm(g, x, tensor(p + spec.norms["attn"] + ".weight"), dims.norm_eps, p + spec.norms["attn"])
    h_q, pro_q = h, pro
    if rows is not None:
        h_q, x = b.rows_of(h, rows, f"{p}query_rows"), _gather_rows(g, x, rows, f"{p}residual_rows")
        bias = g.op("Squeeze", [pro.attn_bias, g.const([1], np.int64)])  # [B, W, keys]: gather query rows
        pro_q = dataclasses.replace(pro, positions=_gather_rows(g, pro.positions, rows, f"{p}query_positions"),
                                    attn_bias=g.op("Unsqueeze", [_gather_rows(g, bias, rows, f"{p}query_bias"),
                                                                 g.const([1], np.int64)]))
    q = _rope(g, b.linear(h_q, stored(ln["q"]), ln["q"]), H, pro_q, f"{p}q_rot")
    k = _rope(g, b.linear(h, stored(ln["k"]), ln["k"]), kvH, pro, f"{p}k_rot")
    v = b.linear(h, stored(ln["v"]), ln["v"])
    if b.cfg.kv_cache:
        # the op appends the window's keys/values to the past ones and returns that as its present:
        # the fresh ones alone in a full forward (empty past), the cache's next content; the bias
        # masks the past's stale window rows in a block step
        att, k_all, v_all = g.op_n("Attention", [q, k, v, pro_q.attn_bias, f"past.{i}.key", f"past.{i}.value"],
                                   [f"{p}attention", f"present.{i}.key", f"present.{i}.value"],
                                   is_causal=0, q_num_heads=H, kv_num_heads=kvH)
        present = [k_all, v_all]
    else:
        att = g.op("Attention", [q, k, v, pro_q.attn_bias], f"{p}attention", is_causal=0, q_num_heads=H,
                   kv_num_heads=kvH)
    x = g.op("Add", [x, b.linear(att, stored(ln["o"]), ln["o"])], f"{p}attn_residual")
    h = _rms_norm(g, x, tensor(p + spec.norms["ffn"] + ".weight"), dims.norm_eps, p + spec.norms["ffn"])
    gate = b.linear(h, stored(ln["gate"]), ln["gate"])
    up = b.linear(h, stored(ln["up"]), ln["up"])
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up], f"{p}swiglu")
    x = g.op("Add", [x, b.linear(act, stored(ln["down"]), ln["down"])], f"{p}ffn_residual")
    return x, present


def _emit_head(g: _Graph, b: _Builder, source, x: str) -> None:
    """Final norm and the head on the rows that reach it, as the `logits` output."""
    spec, dims = source.spec, source.dims
    x = _rms_norm(g, x, source.tensor(f"{spec.final_norm}.weight"), dims.norm_eps, spec.final_norm)
    head = spec.embedding if dims.tied_head else spec.head
    if head in source.layers:  # a mixed recipe's quantized head (or tied embedding), exactly
        x = b.linear(x, source.linear(head), "lm_head")
        g.nodes.append(g.onnx.helper.make_node("Identity", [x], ["logits"], name="logits"))
        return
    W_head = source.tensor(f"{head}.weight")
    if b.cfg.embed_head == "int8":
        acc = b.cfg.head_accuracy_level
        x = b.nbits_matmul(x, quantize_weight(W_head.float(), HEAD_GRID), "lm_head", acc)
        b.notes["lm_head"] = "nbits-acc4" if acc == 4 else "float"
        g.nodes.append(g.onnx.helper.make_node("Identity", [x], ["logits"], name="logits"))
    else:
        w = g.weight("lm_head.weight_T", _f32(W_head).T, [W_head.shape[1], W_head.shape[0]], 1)
        g.nodes.append(g.onnx.helper.make_node("MatMul", [x, w], ["logits"], name="lm_head"))


def _graph_outputs(cfg: OnnxExportConfig, dims, present: list[str]) -> list:
    import onnx

    TP, make = onnx.TensorProto, onnx.helper.make_tensor_value_info
    outputs = [make("logits", TP.FLOAT, ["batch", "positions" if cfg.logit_positions else "length", dims.vocab_rows])]
    return outputs + [make(name, TP.FLOAT, ["batch", dims.n_kv_heads, "length", dims.head_dim]) for name in present]


def _manifest(cfg: OnnxExportConfig, source, b: _Builder, g: _Graph, inputs, outputs) -> dict:
    """The artifact manifest: provenance, export settings, per-layer kernels, op counts."""
    qmanifest = source.manifest
    return {
        "format": FORMAT, "version": VERSION, "family": source.spec.family,
        "source": qmanifest["source"] if qmanifest else source_record(source.path),
        "export": dataclasses.asdict(cfg), "accuracy_level": b.acc, "opset": OPSET,
        "inputs": [i.name for i in inputs], "outputs": [o.name for o in outputs], "logits_shifted": False,
        "method": qmanifest["method"] if qmanifest else None, "scheme": qmanifest["scheme"] if qmanifest else None,
        "quantize_settings": qmanifest["settings"] if qmanifest else None,
        "simulated": b.simulated,
        "layers": b.notes, "spec": source.spec.to_dict(), "dims": dataclasses.asdict(source.dims),
        "ops": dict(sorted(g.op_counts.items())),
        "session_options": {"session.qdq_matmulnbits_accuracy_level": str(b.acc)},
        "data_bytes": g.offset,
    }


def export_onnx(model_path: str | Path, out_dir: str | Path, cfg: OnnxExportConfig = OnnxExportConfig(),
                extra_manifest: dict | None = None) -> Path:
    """Write `model.onnx` (+ `model.onnx.data`, config, tokenizer, manifest.json) for a checkpoint folder.

    Args:
        extra_manifest: more manifest entries (e.g. the device profile the artifact was built for).
        model_path: a float checkpoint (config.json + safetensors) or a quantized one written by
            `dllm-export quantize` (manifest.json), or `default` / `default-dream`.
        out_dir: the artifact folder (must not exist or be empty); written atomically.
        cfg: weight format, accuracy level, activation kernel.
    Returns:
        `out_dir`. The graph computes what the torch model (with QLinear fake-quant) computes,
        up to float summation order, except where the manifest's `layers` say `nbits-acc4`
        (int8 activations per K-block inside the kernel).
    """
    import onnx

    source = open_source(model_path)
    with atomic_folder(out_dir) as tmp:
        g = _Graph(tmp / DATA_FILE)
        try:
            b = _Builder(g, cfg)
            inputs = _graph_inputs(cfg, source.dims)
            pro = _prologue(g, cfg, source.spec, source.dims)
            x = _embed(g, cfg, source)
            present = []
            # the requested rows [B, P, 1]: the last block computes its output on them alone
            rows = g.op("Unsqueeze", ["logit_positions", g.const([-1], np.int64)], "head_rows") \
                if cfg.logit_positions else None
            for i in range(source.dims.n_layers):
                last = i == source.dims.n_layers - 1
                x, kv = _emit_block(g, b, pro, source, x, i, rows if last else None)
                present += kv
            _emit_head(g, b, source, x)
        finally:
            g.close()
        outputs = _graph_outputs(cfg, source.dims, present)
        g.prune([o.name for o in outputs])
        graph = onnx.helper.make_graph(g.nodes, f"{source.spec.family}_forward", inputs, outputs,
                                       initializer=g.initializers)
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in (("", OPSET), ("com.microsoft", 1), (FUNCTION_DOMAIN, 1))]
        model = onnx.helper.make_model(graph, opset_imports=opsets, functions=list(g.functions.values()),
                                       producer_name="dllm-export")
        model.ir_version = IR_VERSION
        manifest = _manifest(cfg, source, b, g, inputs, outputs)
        manifest.update(extra_manifest or {})
        onnx.helper.set_model_props(model, {"dllm_export.manifest": json.dumps(manifest)})
        onnx.save_model(model, str(tmp / MODEL_FILE))
        onnx.checker.check_model(str(tmp / MODEL_FILE))
        write_sidecars(tmp, manifest, source)
    return Path(out_dir)
