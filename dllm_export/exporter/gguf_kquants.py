"""GGML K-quant blocks (ggml-common.h's block_q2_K .. block_q6_K) packed from a K-quant PTQ grid.

Each super-block of 256 weights: the codes (offset to unsigned), the integer group scales sc (and
minimums m) and the fp16 super-block scales d (and dmin), laid out as llama.cpp reads them. The
values come from `quant.kquant.super_scales`, which checks that the weight is on the grid; the
layouts are checked against gguf.quants' dequantizers in tests/test_gguf.py.
"""

from __future__ import annotations

import numpy as np

from ..quant.kquant import QK_K, super_scales
from ..quant.primitives import QuantizedWeight


def pack_kquant(qw: QuantizedWeight, qtype: str) -> np.ndarray:
    """uint8 [out, in / 256 * type_size]: the rows of `qw` as `qtype` super-blocks, bit for bit."""
    out, n = qw.shape
    S = n // QK_K
    k = super_scales(qw)
    u = (qw.codes.numpy().astype(np.int32) - qw.cfg.qmin).astype(np.uint8).reshape(out * S, QK_K)
    sc = k["sc"].numpy().astype(np.int32).reshape(out * S, -1)
    d = k["d"].numpy().reshape(out * S, 1).view(np.uint8)  # [blocks, 2] little-endian fp16
    if "dmin" in k:
        m = k["m"].numpy().astype(np.int32).reshape(out * S, -1)
        dmin = k["dmin"].numpy().reshape(out * S, 1).view(np.uint8)
    parts = _PACKERS[qtype](u, sc, d, *((m, dmin) if "dmin" in k else ()))
    return np.concatenate(parts, axis=-1).reshape(out, -1)


def _crumbs(u: np.ndarray, chunks: int) -> np.ndarray:
    """2-bit values: element (h, j, l) of chunks of 128 (4 rows of 32) in byte h * 32 + l, bits 2j."""
    v = u.reshape(-1, chunks, 4, 32) & 3
    return (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(len(u), -1)


def _nibbles(u: np.ndarray, width: int) -> np.ndarray:
    """4-bit values: element (c, i, t) of chunks of 2 * width in byte c * width + t, nibble i."""
    v = u.reshape(len(u), -1, 2, width) & 0xF
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(len(u), -1)


def _bit_planes(bits: np.ndarray) -> np.ndarray:
    """One bit per element: element k * 32 + l in byte l, bit k (Q3_K's hmask, Q5_K's qh)."""
    v = bits.reshape(len(bits), 8, 32).astype(np.uint8)
    return sum(v[:, k] << k for k in range(8)).astype(np.uint8)


def _scales_6bit_pairs(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K: 8 6-bit scales and 8 6-bit minimums in 12 bytes (get_scale_min_k4's layout)."""
    lo = (sc[:, :4] | ((sc[:, 4:] >> 4) << 6)).astype(np.uint8)
    mid = (m[:, :4] | ((m[:, 4:] >> 4) << 6)).astype(np.uint8)
    hi = ((sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)).astype(np.uint8)
    return np.concatenate([lo, mid, hi], axis=-1)


def _q2_k(u, sc, d, m, dmin):
    return [(sc | (m << 4)).astype(np.uint8), _crumbs(u, 2), d, dmin]


def _q3_k(u, sc, d):
    s = (sc + 32).astype(np.uint8)  # signed 6-bit scales stored offset by 32
    low = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
    high = sum(((s[:, 4 * i:4 * i + 4] >> 4) & 3) << (2 * i) for i in range(4)).astype(np.uint8)
    return [_bit_planes(u >> 2), _crumbs(u, 2), low.astype(np.uint8), high, d]


def _q4_k(u, sc, d, m, dmin):
    return [d, dmin, _scales_6bit_pairs(sc, m), _nibbles(u, 32)]


def _q5_k(u, sc, d, m, dmin):
    return [d, dmin, _scales_6bit_pairs(sc, m), _bit_planes(u >> 4), _nibbles(u, 32)]


def _q6_k(u, sc, d):
    return [_nibbles(u, 64), _crumbs(u >> 4, 2), sc.astype(np.int8).view(np.uint8), d]


_PACKERS = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
