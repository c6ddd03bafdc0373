"""The one representation of a quantized weight, its quantizer grid, and activation fake-quant.

`QuantizedWeight` is what every PTQ method produces and every exporter consumes:
integer codes, fp16 scales, zero points (integer, ONNX/GPTQ style) or minimums (float, GGUF
Q4_1/Q5_1 style), bits, group size and symmetry. Dequantization is defined once, here:

    sym:            w = scale * code                  code in [-2^(b-1), 2^(b-1) - 1]
    asym, int zero: w = scale * (code - zero)         code, zero in [0, 2^b - 1]
    asym, float min: w = scale * code + min           code in [0, 2^b - 1]

computed in float32 from fp16 scales, so an exporter that stores the same fp16 numbers
reproduces our dequantized weights bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from ..checks import check_fields
from ..errors import InputError


@dataclass(frozen=True)
class WeightQuantConfig:
    """How to quantize a weight matrix.

    Attributes:
        bits: 2..8.
        group_size: input channels sharing one scale; 0 = per output channel (one group per row).
        sym: symmetric grid (no zero point).
        zero_kind: for asymmetric grids, "int" (integer zero point) or "float" (fp16 minimum).
        scale_dtype: storage dtype of scales and minimums (the targets store fp16).
        super_group: K-quants (llama.cpp's Q2_K..Q6_K): weights per super-block (256), whose
            group scales (and minimums) are integers of `scale_bits` times one fp16 scale (and one
            fp16 minimum scale) per super-block; 0 = plain groups. The stored scales are those
            products (fp32, `scale_dtype` float32).
        scale_bits: bits of the K-quant group scales: signed for symmetric grids (Q3_K 6, Q6_K 8),
            unsigned for grids with minimums (Q2_K 4, Q4_K / Q5_K 6).
        progressive: QServe's progressive group quantization (Lin et al., 2024, arXiv 2405.04532):
            each group scale is a signed integer of at most `progressive_max` times one scale per
            output channel, so scale_int * code fits int8 and a grouped weight runs exactly as a
            per-channel int8 weight on the integer GEMMs (symmetric grids of <= 4 bits; the stored
            scales are the products, fp32, `scale_dtype` float32).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    zero_kind: str = "int"
    scale_dtype: torch.dtype = torch.float16
    super_group: int = 0
    scale_bits: int = 0
    progressive: bool = False

    def __post_init__(self):
        check_fields(self, ints=("bits", "group_size", "super_group", "scale_bits"), bools=("sym", "progressive"),
                     strs=("zero_kind",))
        if not 2 <= self.bits <= 8:
            raise InputError(f"weight bits must lie in 2..8, got {self.bits}")
        if self.group_size < 0:
            raise InputError(f"group size must be >= 0 (0 = per channel), got {self.group_size}")
        if self.zero_kind not in ("int", "float"):
            raise InputError(f"zero_kind must be 'int' or 'float', got {self.zero_kind!r}")
        if self.super_group:
            if not self.group_size or self.super_group % self.group_size:
                raise InputError(f"a super-block of {self.super_group} weights needs groups that tile it "
                                 f"(got group size {self.group_size})")
            if not 4 <= self.scale_bits <= 8:
                raise InputError(f"K-quant group scales take 4..8 bits, got {self.scale_bits}")
            if not self.sym and self.zero_kind != "float":
                raise InputError("K-quant grids with minimums store them as floats: zero_kind 'float'")
            if self.scale_dtype != torch.float32:
                raise InputError("K-quant group scales (integer x fp16) need scale_dtype float32")
        if self.progressive:
            if not self.sym or self.bits > 4 or not self.group_size or self.super_group:
                raise InputError(f"progressive group scales need a symmetric grouped grid of at most 4 bits "
                                 f"(got {self.bits}-bit, {'sym' if self.sym else 'asym'}, group size "
                                 f"{self.group_size}{', K-quant' if self.super_group else ''}): it takes --bits <= 4, a "
                                 f"--group-size > 0 and no --asym")
            if self.scale_dtype != torch.float32:
                raise InputError("progressive group scales (integer x channel scale) need scale_dtype float32")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.sym else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.sym else (1 << self.bits) - 1

    @property
    def progressive_max(self) -> int:
        """Progressive grids: the largest group-scale integer, 127 // 2^(b-1) (15 at 4 bits), so that
        |scale_int * code| <= 127 for every code in [-2^(b-1), 2^(b-1))."""
        return 127 // (1 << (self.bits - 1))

    @property
    def scale_code_range(self) -> tuple[int, int]:
        """K-quants: the integers a group scale is stored as (signed for symmetric grids, never 0
        for grids with minimums); minimums take [0, the same top]."""
        if self.sym:
            return -(1 << (self.scale_bits - 1)), (1 << (self.scale_bits - 1)) - 1
        return 1, (1 << self.scale_bits) - 1

    def groups(self, in_features: int) -> int:
        """Number of groups along the input dim; raises if the group size does not divide it."""
        g = self.group_size or in_features
        if in_features % g:
            raise InputError(f"group size {g} does not divide the input width {in_features}")
        if self.super_group and in_features % self.super_group:
            raise InputError(f"K-quant super-blocks of {self.super_group} weights do not tile the input width "
                             f"{in_features}")
        return in_features // g

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale_dtype"] = str(self.scale_dtype).replace("torch.", "")
        return d


@dataclass
class QuantizedWeight:
    """A quantized [out_features, in_features] weight: integer codes plus per-group scales.

    Attributes:
        codes: int16 [out, in] integer codes (unpacked; see `pack_codes` for storage).
        scales: [out, n_groups] in `cfg.scale_dtype` (may be negative for symmetric grids).
        zeros: [out, n_groups] int16 zero points (asymmetric, zero_kind "int") or None.
        mins: [out, n_groups] minimums in `cfg.scale_dtype` (asymmetric, zero_kind "float") or None.
        cfg: the grid.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    mins: torch.Tensor | None
    cfg: WeightQuantConfig

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the quantized layer computes with (float32 arithmetic, then cast)."""
        out, n = self.codes.shape
        G = self.scales.shape[1]
        q = self.codes.to(torch.float32).view(out, G, n // G)
        s = self.scales.to(torch.float32)[..., None]
        if self.mins is not None:
            w = s * q + self.mins.to(torch.float32)[..., None]
        elif self.zeros is not None:
            w = s * (q - self.zeros.to(torch.float32)[..., None])
        else:
            w = s * q
        return w.view(out, n).to(dtype)


def _group_view(W: torch.Tensor, cfg: WeightQuantConfig) -> torch.Tensor:
    out, n = W.shape
    G = cfg.groups(n)
    return W.reshape(out, G, n // G)


def compute_grid(W: torch.Tensor, cfg: WeightQuantConfig, clip: torch.Tensor | float = 1.0):
    """Scales and zero points / minimums for W [out, in] (fp32), optionally shrinking the range by `clip`.

    Symmetric: the largest-magnitude weight of each group maps exactly onto the most negative
    code (scale = x_absmax_signed / -2^(b-1), as GGUF Q4_0 does), using all 2^b levels.
    Asymmetric: [min, max] (each scaled by `clip`) spans [0, 2^b - 1].
    K-quants (`cfg.super_group`): those group scales (for the types with minimums, scale and
    minimum from `scale_min_search`) rounded onto the super-block's integer grid.
    Returns:
        (scales [out, G] in scale_dtype, zeros [out, G] int16 or None, mins [out, G] or None).
    """
    Wg = _group_view(W.float(), cfg)  # (out, G, g)
    clip = torch.as_tensor(clip, dtype=torch.float32)
    if clip.dim() == 2:
        clip = clip[..., None]
    if cfg.sym:
        idx = Wg.abs().argmax(dim=-1, keepdim=True)
        xm = torch.gather(Wg, -1, idx).squeeze(-1) * clip.squeeze(-1)  # signed max-magnitude value
        scales = (xm / cfg.qmin).to(cfg.scale_dtype)
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        if cfg.progressive:
            return _progressive_grid(scales, cfg), None, None
        return _super_block_grid(scales, None, cfg) if cfg.super_group else (scales, None, None)
    xmax = (Wg.amax(dim=-1) * clip.squeeze(-1)).clamp(min=0)
    xmin = (Wg.amin(dim=-1) * clip.squeeze(-1)).clamp(max=0)
    if cfg.super_group:  # K-quants with minimums: searched per group, then rounded onto the super-block
        scales, xmin = scale_min_search(Wg, xmin, xmax, cfg.qmax)
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)
        return _super_block_grid(scales, xmin, cfg)
    scales = ((xmax - xmin) / cfg.qmax).to(cfg.scale_dtype)
    scales = torch.where(scales == 0, torch.ones_like(scales), scales)
    if cfg.zero_kind == "float":
        return scales, None, xmin.to(cfg.scale_dtype)
    zeros = torch.round(-xmin / scales.float()).clamp(0, cfg.qmax).to(torch.int16)
    return scales, zeros, None


def scale_min_search(Wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmax: int, steps: int = 20,
                     shift: float = -1.0, step: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scale and minimum (w = s * q + m, q in [0, qmax]) by search instead of from the range,
    as llama.cpp's K-quant quantizer does: for each of `steps` + 1 stretched grids over [lo, hi]
    (levels qmax + shift + step * i) round the group, refit (s, m) by least squares weighted by
    rms(group) + |w| (the large weights count more; m <= 0), and keep the fit of least weighted
    error. Wg [out, G, g]; lo, hi [out, G]. Returns (scales, minimums) [out, G], float32."""
    x = Wg.float()
    w = x.pow(2).mean(-1, keepdim=True).sqrt() + x.abs()
    lo, hi = lo.float()[..., None], hi.float()[..., None]
    span = (hi - lo).clamp(min=1e-30)
    sw, swx = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True)

    def error(s, m, q):
        return (w * (s * q + m - x) ** 2).sum(-1, keepdim=True)

    best_s, best_m = span / qmax, lo
    best_e = error(best_s, best_m, torch.round((x - lo) / best_s).clamp(0, qmax))
    for i in range(steps + 1):
        q = torch.round((qmax + shift + step * i) / span * (x - lo)).clamp(0, qmax)
        swq, swq2, swxq = (w * q).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True), (w * q * x).sum(-1, keepdim=True)
        det = sw * swq2 - swq * swq
        ok = det > 0
        det = torch.where(ok, det, 1.0)
        s, m = (sw * swxq - swx * swq) / det, (swq2 * swx - swq * swxq) / det
        s = torch.where(m > 0, swxq / swq2.clamp(min=1e-30), s)  # a positive minimum: refit through 0
        m = m.clamp(max=0)
        e = error(s, m, q)
        better = ok & (s > 0) & (e < best_e)
        best_s, best_m, best_e = torch.where(better, s, best_s), torch.where(better, m, best_m), torch.where(better, e, best_e)
    return best_s[..., 0], best_m[..., 0]


def _super_block_grid(scales: torch.Tensor, xmin: torch.Tensor | None, cfg: WeightQuantConfig):
    """K-quants: round each super-block's group scales (and minimums) to integers of
    cfg.scale_bits times one fp16 scale d (and dmin). The largest is pinned to the extreme integer,
    so d and dmin read back exactly from the products (`quant.kquant.super_scales`); no scale
    rounds to 0. Returns (scales, None, mins) as `compute_grid`, the products in float32."""
    out, G = scales.shape
    per = cfg.super_group // cfg.group_size
    s = scales.float().reshape(out, G // per, per)
    tiny = 2.0 ** -24  # the smallest fp16 (subnormal): an all-zero super-block still gets a usable d
    lo, top = cfg.scale_code_range
    if cfg.sym:  # signed integers in [lo, top]; the largest-magnitude scale -> lo (as Q3_K / Q6_K)
        idx = s.abs().argmax(-1, keepdim=True)
        d = (torch.gather(s, -1, idx) / lo).to(torch.float16).float()
        d = torch.where(d == 0, torch.full_like(d, tiny), d)
        sc = torch.round(s / d).clamp(lo, top)
        sc = torch.where(sc == 0, torch.where(s / d < 0, -1.0, 1.0), sc).scatter(-1, idx, float(lo))
        return (d * sc).reshape(out, G), None, None
    # unsigned integers in [1, top]; minimums in [0, top] (subtracted)
    idx = s.argmax(-1, keepdim=True)
    d = (torch.gather(s, -1, idx) / top).to(torch.float16).float()
    d = torch.where(d == 0, torch.full_like(d, tiny), d)
    sc = torch.round(s / d).clamp(1, top).scatter(-1, idx, float(top))
    m = (-xmin.float()).reshape(out, G // per, per)  # >= 0
    midx = m.argmax(-1, keepdim=True)
    dmin = (torch.gather(m, -1, midx) / top).to(torch.float16).float()
    mc = torch.round(m / torch.where(dmin > 0, dmin, 1.0)).clamp(0, top)
    mc = torch.where(dmin > 0, mc.scatter(-1, midx, float(top)), 0.0)
    return (d * sc).reshape(out, G), None, -(dmin * mc).reshape(out, G)


def _progressive_grid(scales: torch.Tensor, cfg: WeightQuantConfig) -> torch.Tensor:
    """Progressive grids: each row's group scales [out, G] rounded to integers in
    [-progressive_max, progressive_max] (never 0) times one channel scale d with 8 significant bits
    (bf16's), so every product d * int is exact in fp32 and `progressive_scales` reads d and the
    integers back; the row's largest scale maps to +-progressive_max. Returns the products (fp32)."""
    S = cfg.progressive_max
    s = scales.float()
    d = (s.abs().amax(dim=1, keepdim=True) / S).to(torch.bfloat16).float()
    d = torch.where(d == 0, torch.full_like(d, 2.0 ** -126), d)
    sc = torch.round(s / d).clamp(-S, S)
    sc = torch.where(sc == 0, torch.where(s < 0, -1.0, 1.0), sc)
    return d * sc


def progressive_scales(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(channel scales d [out] fp32, group-scale integers [out, G] int32) of a progressive weight:
    scales == d[:, None] * ints exactly. Raises InputError when the stored scales are not of that form
    (a checkpoint written by other code)."""
    s = qw.scales.float()
    d = s.abs().amax(dim=1) / qw.cfg.progressive_max
    ints = torch.round(s / d[:, None])
    if not torch.equal(d[:, None] * ints, s) or bool((ints.abs() > qw.cfg.progressive_max).any()):
        raise InputError("a progressive weight's scales are not integers x one channel scale: the checkpoint "
                         "was not written by this quantizer")
    return d, ints.to(torch.int32)


def int8_form(qw: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int8 codes c [out, in], fp32 channel scales [out]) with w = scale[n] * c[n, k] exactly, for
    the integer GEMMs: per-channel grids whose codes minus zero point fit int8, and progressive grids
    (c = group-scale integer * code). None for every other grid."""
    if qw.mins is not None:
        return None
    c = qw.codes.to(torch.int32)
    if qw.cfg.progressive:
        d, ints = progressive_scales(qw)
        return (c * ints.repeat_interleave(c.shape[1] // ints.shape[1], dim=1)).to(torch.int8), d
    if qw.scales.shape[1] != 1:
        return None
    if qw.zeros is not None:
        c = c - qw.zeros.to(torch.int32)
    if int(c.min()) < -128 or int(c.max()) > 127:
        return None
    return c.to(torch.int8), qw.scales[:, 0].float()


def quantize_to_grid(W: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, mins: torch.Tensor | None,
                     cfg: WeightQuantConfig) -> torch.Tensor:
    """Round W [out, in] (or one group column block) onto a given grid; returns int16 codes of W's shape."""
    out, n = W.shape
    G = scales.shape[1]
    Wg = W.float().reshape(out, G, n // G)
    s = scales.float()[..., None]
    if mins is not None:
        q = torch.round((Wg - mins.float()[..., None]) / s)
    elif zeros is not None:
        q = torch.round(Wg / s) + zeros.float()[..., None]
    else:
        q = torch.round(Wg / s)
    return q.clamp(cfg.qmin, cfg.qmax).to(torch.int16).reshape(out, n)


def quantize_weight(W: torch.Tensor, cfg: WeightQuantConfig, clip: torch.Tensor | float = 1.0) -> QuantizedWeight:
    """Round-to-nearest quantization of W [out, in] onto the grid of `compute_grid`."""
    scales, zeros, mins = compute_grid(W, cfg, clip)
    codes = quantize_to_grid(W, scales, zeros, mins, cfg)
    return QuantizedWeight(codes, scales, zeros, mins, cfg)


def fake_quantize_weight(W: torch.Tensor, cfg: WeightQuantConfig, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    """quantize_weight(...).dequantize() in W's dtype."""
    return quantize_weight(W, cfg, clip).dequantize(W.dtype)


# ---- storage: codes packed little-endian along the input dim (2 per byte for <= 4 bits) ------------

def pack_codes(codes: torch.Tensor, cfg: WeightQuantConfig) -> torch.Tensor:
    """uint8 storage of int16 codes: offset to unsigned, then two 4-bit codes per byte when bits <= 4
    (low nibble = even input index)."""
    u = (codes.to(torch.int32) - cfg.qmin).to(torch.uint8)
    if cfg.bits <= 4:
        if u.shape[-1] % 2:
            raise InputError(f"cannot pack {cfg.bits}-bit codes of odd width {u.shape[-1]}")
        return u[..., 0::2] | (u[..., 1::2] << 4)
    return u


def unpack_codes(packed: torch.Tensor, cfg: WeightQuantConfig) -> torch.Tensor:
    """Inverse of `pack_codes`."""
    if cfg.bits <= 4:
        u = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    else:
        u = packed
    return (u.to(torch.int32) + cfg.qmin).to(torch.int16)


# ---- activations ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ActQuantConfig:
    """Activation quantization at a linear layer's input.

    Attributes:
        bits: 4..16 (16 = off).
        granularity: "per_token" (dynamic, one scale per token) or "per_tensor" (static scale and
            zero point from the calibration range, stored with the layer as `act_scale` / `act_zero`).
        sym: symmetric (signed) or asymmetric (unsigned with zero point).
        clip: fraction of the absmax (per token) kept, as DuQuant's `lac`.
    """

    bits: int = 8
    granularity: str = "per_token"
    sym: bool = True
    clip: float = 1.0

    def __post_init__(self):
        check_fields(self, ints=("bits",), reals=("clip",), bools=("sym",), strs=("granularity",))
        if not 2 <= self.bits <= 16:
            raise InputError(f"activation bits must lie in 2..16, got {self.bits}")
        if self.granularity not in ("per_token", "per_tensor"):
            raise InputError(f"activation granularity must be per_token or per_tensor, got {self.granularity!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def quantize_act(x: torch.Tensor, cfg: ActQuantConfig, static_scale: torch.Tensor | None = None,
                 static_zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The activation grid of x [..., C]: float32 integer codes (signed when symmetric, per token
    over C or with a static per-tensor scale), the scale and the zero point (None when symmetric).
    `fake_quantize_act` dequantizes them; the integer kernels multiply the codes."""
    xf = x.float()
    if cfg.sym:
        qmax = (1 << (cfg.bits - 1)) - 1
        if static_scale is None:
            s = (xf.abs().amax(dim=-1, keepdim=True) * cfg.clip / qmax).clamp(min=1e-8)
        else:
            s = static_scale.float()
        return torch.round(xf / s).clamp(-qmax - 1, qmax), s, None
    qmax = (1 << cfg.bits) - 1
    if static_scale is None:
        hi = (xf.amax(dim=-1, keepdim=True) * cfg.clip).clamp(min=0)
        lo = (xf.amin(dim=-1, keepdim=True) * cfg.clip).clamp(max=0)
        s = ((hi - lo) / qmax).clamp(min=1e-8)
        z = torch.round(-lo / s)
    else:
        s, z = static_scale.float(), static_zero.float()
    return (torch.round(xf / s) + z).clamp(0, qmax), s, z


def fake_quantize_act(x: torch.Tensor, cfg: ActQuantConfig, static_scale: torch.Tensor | None = None,
                      static_zero: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize activations x [..., C] (per token over C, or with a static per-tensor scale)."""
    if cfg.bits >= 16:
        return x
    q, s, z = quantize_act(x, cfg, static_scale, static_zero)
    return (q * s if z is None else (q - z).mul(s)).to(x.dtype)


def static_act_params(lo: float, hi: float, cfg: ActQuantConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-tensor (scale, zero) from the calibrated range [lo, hi] of a layer's input (clip applied)."""
    lo, hi = min(lo * cfg.clip, 0.0), max(hi * cfg.clip, 0.0)
    if cfg.sym:
        qmax = (1 << (cfg.bits - 1)) - 1
        return torch.tensor(max(-lo, hi) / qmax).clamp(min=1e-8), None
    scale = torch.tensor((hi - lo) / ((1 << cfg.bits) - 1)).clamp(min=1e-8)
    return scale, torch.round(-lo / scale)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    ref, approx = ref.double(), approx.double()
    noise = (ref - approx).pow(2).sum()
    return float(10 * torch.log10(ref.pow(2).sum() / noise.clamp(min=1e-300)))


@contextmanager
def single_thread():
    """Run a loop of many tiny tensor ops on one intra-op thread (restored afterwards): for
    vector-sized ops the thread hand-offs cost more than the work, 30x more on a busy CPU."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
