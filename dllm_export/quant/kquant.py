"""llama.cpp's K-quants as PTQ grids: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

A K-quant super-block holds 256 weights of a row in groups of 16 or 32. Each group has its own
scale (and, for Q2_K / Q4_K / Q5_K, its own minimum), stored not as fp16 but as a small integer
times one fp16 scale `d` (and `dmin`) per super-block:

    Q3_K, Q6_K (symmetric):  w = d * sc * q                    sc signed, q in [-2^(b-1), 2^(b-1))
    Q2_K, Q4_K, Q5_K:        w = d * sc * q - dmin * m          sc, m unsigned, q in [0, 2^b)

`WeightQuantConfig(super_group=256, scale_bits=...)` is that grid: `compute_grid` rounds the
group scales onto it, every method (RTN, GPTQ, AWQ) rounds the codes against those scales, and the
GGUF writer packs codes, sc, m, d and dmin bit for bit (`exporter.gguf_kquants`), so llama.cpp
dequantizes to exactly the weights our fake-quant computes with. A layer whose input width is not
a multiple of 256 takes the type's fallback, as llama.cpp's quantizer does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from .primitives import QuantizedWeight, WeightQuantConfig

QK_K = 256  # weights per super-block (ggml's QK_K)


@dataclass(frozen=True)
class KQuant:
    """One K-quant type: code bits, group size, symmetry, bits of the group scales, and the
    block type a layer falls back to when its width is not a multiple of QK_K."""

    bits: int
    group_size: int
    sym: bool
    scale_bits: int
    fallback: str

    def grid(self) -> WeightQuantConfig:
        return WeightQuantConfig(bits=self.bits, group_size=self.group_size, sym=self.sym,
                                 zero_kind="int" if self.sym else "float", scale_dtype=torch.float32,
                                 super_group=QK_K, scale_bits=self.scale_bits)


# ggml-common.h's block_q2_K .. block_q6_K; fallbacks as llama.cpp's (IQ4_NL -> Q4_0: we have no IQ grid)
KQUANTS = {
    "Q2_K": KQuant(2, 16, False, 4, "Q4_0"),
    "Q3_K": KQuant(3, 16, True, 6, "Q4_0"),
    "Q4_K": KQuant(4, 32, False, 6, "Q5_0"),
    "Q5_K": KQuant(5, 32, False, 6, "Q5_1"),
    "Q6_K": KQuant(6, 16, True, 8, "Q8_0"),
}

# the classic block types as grids (groups of 32, fp16 scales): a K-quant's fallbacks, and the GGUF
# writer's map from a grid to the block type that stores it
BLOCK_GRIDS = {
    "Q4_0": WeightQuantConfig(bits=4, group_size=32, sym=True),
    "Q5_0": WeightQuantConfig(bits=5, group_size=32, sym=True),
    "Q8_0": WeightQuantConfig(bits=8, group_size=32, sym=True),
    "Q4_1": WeightQuantConfig(bits=4, group_size=32, sym=False, zero_kind="float"),
    "Q5_1": WeightQuantConfig(bits=5, group_size=32, sym=False, zero_kind="float"),
}


def kquant_grid(name: str) -> WeightQuantConfig:
    """The PTQ grid of K-quant `name` (Q2_K .. Q6_K)."""
    if name not in KQUANTS:
        raise InputError(f"unknown K-quant {name!r} (choose from {', '.join(KQUANTS)})")
    return KQUANTS[name].grid()


def kquant_family_grid(bits: int) -> WeightQuantConfig:
    """The grid of a `bits`-wide layer in a K-quant mix: Q{bits}_K, or Q8_0 for 8 bits."""
    if bits == 8:
        return BLOCK_GRIDS["Q8_0"]
    if f"Q{bits}_K" not in KQUANTS:
        raise InputError(f"the K-quant family stores 2, 3, 4, 5, 6 or 8-bit layers, not {bits}-bit")
    return KQUANTS[f"Q{bits}_K"].grid()


def kquant_name(cfg: WeightQuantConfig) -> str | None:
    """The K-quant type whose grid `cfg` is, or None."""
    for name, k in KQUANTS.items():
        if cfg == k.grid():
            return name
    return None


def grid_for_width(cfg: WeightQuantConfig, in_features: int) -> WeightQuantConfig:
    """`cfg`, or for a K-quant grid on a layer whose width is not a multiple of QK_K, its fallback."""
    name = kquant_name(cfg) if cfg.super_group else None
    if name is None or in_features % QK_K == 0:
        return cfg
    return BLOCK_GRIDS[KQUANTS[name].fallback]


def super_scales(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The K-quant fields of a quantized weight: d [out, S] (fp16), the integer group scales sc
    [out, S, per], and for grids with minimums dmin [out, S] and the integer minimums m. Read back
    from the stored products (the largest sc and m are pinned to the extreme integer by
    `compute_grid`); raises if the scales are not on the grid."""
    cfg = qw.cfg
    out, G = qw.scales.shape
    per = cfg.super_group // cfg.group_size
    s = qw.scales.float().reshape(out, G // per, per)
    lo, top = cfg.scale_code_range
    if cfg.sym:
        d = torch.gather(s, -1, s.abs().argmax(-1, keepdim=True)) / lo
        res = {"d": d[..., 0], "sc": _integers(s, d, lo, top, "scale")}
    else:
        d = s.amax(-1, keepdim=True) / top
        m = -qw.mins.float().reshape(out, G // per, per)
        dmin = m.amax(-1, keepdim=True) / top
        res = {"d": d[..., 0], "sc": _integers(s, d, lo, top, "scale"), "dmin": dmin[..., 0],
               "m": _integers(m, dmin, 0, top, "minimum")}
    for key in ("d", "dmin"):
        if key in res:
            half = res[key].to(torch.float16)
            if not torch.equal(half.float(), res[key]):
                raise InputError(f"K-quant super-block {key} is not an fp16 number: the weight is not on the grid")
            res[key] = half
    return res


def _integers(v: torch.Tensor, unit: torch.Tensor, lo: int, hi: int, what: str) -> torch.Tensor:
    """v / unit as exact integers in [lo, hi] (0 where unit is 0), or InputError."""
    q = torch.where(unit == 0, torch.zeros_like(v), v / torch.where(unit == 0, 1.0, unit))
    r = torch.round(q)
    if not torch.equal(r * unit, v) or r.min() < lo or r.max() > hi:
        raise InputError(f"K-quant group {what}s are not integers in [{lo}, {hi}] times the super-block's: "
                         f"the weight is not on the grid")
    return r.to(torch.int16)
