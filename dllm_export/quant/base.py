"""What every PTQ pass shares: its config, the method interface, and block-level helpers
(running a block over calibration activations, capturing linear inputs with hooks, swapping
a linear for its quantized version)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn

from ..checks import check_fields
from ..errors import InputError
from ..models.spec import ModelSpec
from .calibrate import CalibConfig
from .gptq import HessianStats, gptq_quantize
from .primitives import ActQuantConfig, QuantizedWeight, WeightQuantConfig, sqnr_db
from .qlinear import QLinear
from .rtn import rtn_quantize
from .schemes import Scheme, get_scheme

# Sequential order in which a block's linears are quantized (GPTQ's "true sequential"): each
# group sees the inputs produced by the already-quantized groups before it.
GROUPS: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of one quantization run (written to the manifest).

    Attributes:
        method: rtn | gptq | awq | smoothquant | quarot | duquant.
        scheme: W8A16 | W6A16 | W5A16 | W4A16 | W3A16 | W2A16 | W8A8 | W4A8 | W4A4.
        bits: override of the scheme's weight bits (2..8).
        group_size: override of the scheme's group size (0 = per channel).
        sym: override of the scheme's symmetry.
        zero_kind: "int" zero points or "float" minimums for asymmetric grids.
        mse_clip: RTN/GPTQ grid clip search (QuaRot's w_clip).
        act_order, percdamp, block_size: GPTQ options.
        alpha: SmoothQuant migration strength.
        weight_method: how smoothquant/quarot/duquant round their weights ("rtn" or "gptq").
        act_sym: symmetric activation quantization (default per method).
        act_granularity: "per_token" (dynamic) or "per_tensor" (static, calibrated per layer).
        calib: calibration recipe.
        batch_size: sequences per calibration forward.
        seed: seeds the method's own randomness (rotations).
        layer_bits: mixed precision: ((layer name, bits), ...) overriding the weight bits of those
            layers (grid: `mixed.grid_for_bits`); RTN and GPTQ, weight-only schemes.
        avg_bits: the average-bits budget `layer_bits` was allocated for (recorded, not enforced here).
        mix_embed_head: that budget covered the embedding and (untied) LM head too: `layer_bits` may
            name them (RTN for the embedding, `method` for the head); those it leaves out stay in
            half precision and count as 16 bits per weight in the manifest's allocation.
        kquant: a llama.cpp K-quant (Q2_K .. Q6_K, `quant.kquant`) whose grid replaces the scheme's
            (weight-only schemes, methods rtn / gptq / awq); layers whose width is not a multiple of
            256 take the type's fallback block grid.
        progressive: QServe's progressive group scales (`WeightQuantConfig.progressive`): a grouped
            symmetric grid of <= 4 bits whose group scales are integers x one channel scale, so
            grouped W4A8 runs on the int8 GEMMs exactly (ONNX MatMulIntegerToFloat, torch _int_mm).
    """

    method: str = "gptq"
    scheme: str = "W4A16"
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    zero_kind: str = "int"
    mse_clip: bool = False
    act_order: bool = False
    percdamp: float = 0.01
    block_size: int = 128
    alpha: float = 0.5
    weight_method: str = "gptq"
    act_sym: bool | None = None
    act_granularity: str = "per_token"
    calib: CalibConfig = field(default_factory=CalibConfig)
    batch_size: int = 8
    seed: int = 0
    layer_bits: tuple[tuple[str, int], ...] = ()
    avg_bits: float | None = None
    mix_embed_head: bool = False
    kquant: str | None = None
    progressive: bool = False

    def __post_init__(self):
        check_fields(self, ints=("bits", "group_size", "block_size", "batch_size", "seed"),
                     reals=("percdamp", "alpha", "avg_bits"),
                     bools=("sym", "mse_clip", "act_order", "act_sym", "mix_embed_head", "progressive"),
                     strs=("method", "scheme", "zero_kind", "weight_method", "act_granularity", "kquant"))
        if not isinstance(self.calib, CalibConfig):
            raise InputError(f"calib must be a CalibConfig, got {type(self.calib).__name__}")
        if self.batch_size < 1 or self.block_size < 1:
            raise InputError(f"batch_size and block_size must be >= 1, got {self.batch_size}, {self.block_size}")
        if not (math.isfinite(self.percdamp) and self.percdamp > 0):  # GPTQ's damping of the Hessian's diagonal
            raise InputError(f"percdamp must be > 0 and finite, got {self.percdamp}")
        get_scheme(self.scheme)
        get_method(self.method)
        self._check_method_reads()
        if self.weight_method not in ("rtn", "gptq"):
            raise InputError(f"weight_method must be rtn or gptq, got {self.weight_method!r}")
        if self.act_granularity not in ("per_token", "per_tensor"):
            raise InputError(f"act_granularity must be per_token or per_tensor, got {self.act_granularity!r}")
        if not 0 < self.alpha < 1:
            raise InputError(f"alpha must lie in (0, 1), got {self.alpha}")
        if self.progressive and (self.kquant is not None or self.layer_bits):
            raise InputError("progressive group scales apply to one uniform grid: not with K-quants or "
                             "per-layer bit-widths")
        if self.kquant is not None:
            if self.method not in ("rtn", "gptq", "awq") or not self.scheme_.weight_only:
                raise InputError(f"K-quant grids need method rtn, gptq or awq and a weight-only scheme "
                                 f"(got {self.method} {self.scheme})")
            if self.bits is not None or self.sym is not None or self.group_size not in (None, 0):
                raise InputError(f"{self.kquant} fixes the bits, groups and symmetry of every layer "
                                 f"(a mix: layer_bits from 2, 3, 4, 5, 6, 8)")
        if self.weight_config().sym and self.zero_kind != "int":  # validates bits / group size / zero kind too
            raise InputError(f"zero_kind {self.zero_kind} sets an asymmetric grid's zero point; this grid is "
                             f"symmetric (no zero point)")
        from .mixed import option_key, parse_option

        pairs = list(self.layer_bits.items()) if isinstance(self.layer_bits, dict) else self.layer_bits
        if not isinstance(pairs, (list, tuple)) or any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in pairs):
            raise InputError(f"layer_bits maps layer names to bits (a dict, or (name, bits) pairs), "
                             f"got {self.layer_bits!r:.60}")
        # JSON lists -> pairs; each layer's option canonical: bits, or "{bits}g{group}" (mixed.parse_option)
        object.__setattr__(self, "layer_bits", tuple((str(n), option_key(*parse_option(b))) for n, b in pairs))
        if self.layer_bits:
            if self.method not in ("rtn", "gptq") or not self.scheme_.weight_only:
                raise InputError(f"per-layer bit-widths need method rtn or gptq and a weight-only scheme "
                                 f"(got {self.method} {self.scheme})")
            for name, option in self.layer_bits:
                b, g = parse_option(option)
                if not 2 <= b <= 8 or (self.kquant is not None and (b == 7 or g is not None)):
                    raise InputError(f"layer {name}: weight bits must lie in 2..8 (no 7 and no group sizes in a "
                                     f"K-quant mix), got {option}")

    def _check_method_reads(self) -> None:
        """Refuse options the run would drop without a word: a method's own (alpha, weight_method) given
        to another method, GPTQ's (act_order, percdamp, block_size) or the RTN / GPTQ clip search
        (mse_clip) where the weights are not rounded that way, static activations without any."""
        method = METHODS[self.method]
        for name, unset in (("alpha", 0.5), ("weight_method", "gptq")):
            if getattr(self, name) != unset and name not in method.options:
                readers = ", ".join(m for m, c in sorted(METHODS.items()) if name in c.options)
                raise InputError(f"{name} is an option of {readers}; method {self.method} does not read it")
        rounding = method.rounding(self)
        how = f"method {self.method}" + (f" with weight_method {self.weight_method}" if "weight_method" in
                                         method.options else "")
        gptq = [n for n, unset in (("act_order", False), ("percdamp", 0.01), ("block_size", 128))
                if getattr(self, n) != unset]
        if gptq and rounding != "gptq":
            what = f"{gptq[0]} is a GPTQ option" if len(gptq) == 1 else f"{', '.join(gptq)} are GPTQ options"
            raise InputError(f"{what}; {how} does not round with GPTQ")
        if self.mse_clip and rounding not in ("rtn", "gptq"):
            raise InputError(f"mse_clip is the RTN / GPTQ grid's clip search; {how} rounds with a clip of its own")
        if self.act_granularity != "per_token" and self.scheme_.weight_only:
            raise InputError(f"act_granularity {self.act_granularity} sets the activation grid; scheme {self.scheme} "
                             f"quantizes no activations")
        if self.act_sym is not None and self.scheme_.weight_only:
            raise InputError(f"act_sym sets the activation grid; scheme {self.scheme} quantizes no activations")

    @property
    def scheme_(self) -> Scheme:
        return get_scheme(self.scheme)

    def weight_config(self) -> WeightQuantConfig:
        """The weight grid of this run, resolved once for every method: the scheme's, with `bits`,
        `group_size` and `sym` overridden where set (`sym` unset: the method's default, else the scheme's)."""
        if self.kquant is not None:
            from .kquant import kquant_grid

            return kquant_grid(self.kquant)
        sym = METHODS[self.method].default_weight_sym if self.sym is None else self.sym
        if self.progressive and self.sym is None:  # progressive grids are symmetric: the method's default yields
            sym = True
        cfg = self.scheme_.weight_config(self.group_size, sym, self.zero_kind)
        if self.bits is not None:
            cfg = dataclasses.replace(cfg, bits=self.bits)
        if self.progressive:
            cfg = dataclasses.replace(cfg, progressive=True, scale_dtype=torch.float32)
        return cfg

    def act_config(self, clip: float = 1.0) -> ActQuantConfig | None:
        """The activation grid of this run (None for weight-only schemes): symmetric per `act_sym`,
        else the method's default; `clip` shrinks the range (DuQuant's lac)."""
        sym = METHODS[self.method].default_act_sym if self.act_sym is None else self.act_sym
        return self.scheme_.act_config(granularity=self.act_granularity, clip=clip, sym=sym)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["calib"] = self.calib.to_dict()
        d["layer_bits"] = dict(self.layer_bits)
        return d


class QuantMethod:
    """A PTQ method: exact transforms plus rounding, applied block by block by the driver.

    Subclasses implement `process_block`, which must replace every linear of the block by a
    `QLinear` (or leave it high precision) and return per-layer info for the manifest. Methods
    that rotate the residual stream also override `transform_embedding` / `transform_head`.
    """

    name = "base"
    default_act_sym = True
    default_weight_sym: bool | None = None  # None: the scheme's
    options: frozenset[str] = frozenset()  # QuantizeConfig fields of its own that it reads (alpha, weight_method)
    calibrated_transforms = True  # its transforms or searches read the calibration activations (smoothing, AWQ)

    @classmethod
    def rounding(cls, qcfg: QuantizeConfig) -> str | None:
        """How it rounds the weights: "rtn" / "gptq" (`round_weight`: the clip search, GPTQ's
        options), or None for a rounding of its own; a method that reads `weight_method` rounds by it."""
        return qcfg.weight_method if "weight_method" in cls.options else None

    def __init__(self, qcfg: QuantizeConfig, spec: ModelSpec, model_config):
        self.qcfg = qcfg
        self.spec = spec
        self.model_config = model_config
        self.wcfg = qcfg.weight_config()
        self.acfg = qcfg.act_config()

    def reads_calibration(self) -> bool:
        """Whether the weights or grids it writes depend on the calibration activations: its own
        transforms, GPTQ's Hessians, static activation ranges. Where none do (RTN, QuaRot with RTN,
        dynamic activations) the driver runs only the few sequences its error figures read."""
        static_acts = self.acfg is not None and self.acfg.granularity == "per_tensor"
        return self.calibrated_transforms or self.rounding(self.qcfg) == "gptq" or static_acts

    def layer_wcfg(self, name: str | None, in_features: int | None = None) -> WeightQuantConfig:
        """The grid of layer `name` (full module name; None: any layer) `in_features` wide: its
        `layer_bits` entry's, else the scheme's; a K-quant's fallback where its super-blocks do not
        tile the width."""
        from .mixed import layer_grid

        return layer_grid(self.wcfg, in_features, dict(self.qcfg.layer_bits).get(name), self.qcfg.sym)

    def transform_embedding(self, W: torch.Tensor) -> torch.Tensor:
        return W

    def transform_head(self, norm_w: torch.Tensor, head_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return norm_w, head_w

    def prepare_block(self, block: nn.Module, index: int) -> None:
        """Exact transforms that need no calibration data (applied before the block's reference output)."""

    def process_block(self, block: nn.Module, X: torch.Tensor, ctx: tuple, index: int) -> dict[str, dict]:
        """Transform and round the block (replacing its linears); return per-layer manifest info."""
        raise NotImplementedError


METHODS: dict[str, type[QuantMethod]] = {}


def get_method(name: str) -> type[QuantMethod]:
    """The method called `name`, or a clear error listing the registered ones."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r} (choose from {', '.join(sorted(METHODS))})")
    return METHODS[name]


def register_method(cls):
    """Class decorator: make a method available by its `name`."""
    METHODS[cls.name] = cls
    return cls


# ---- block helpers --------------------------------------------------------------------------------

def linear_names(spec: ModelSpec, roles: tuple[str, ...] | None = None) -> list[str]:
    """Module names (relative to a block) of the linears with the given roles, in GROUPS order."""
    roles = roles or tuple(r for g in GROUPS for r in g)
    return [spec.linears[r] for r in roles]


@torch.no_grad()
def forward_block(block: nn.Module, X: torch.Tensor, ctx: tuple, batch_size: int = 8) -> torch.Tensor:
    """block(X) over calibration activations X [N, L, d], in batches of sequences."""
    return torch.cat([block(X[i:i + batch_size], *ctx) for i in range(0, X.shape[0], batch_size)])


class _InputsTaken(Exception):
    """Raised by `collect_inputs`' hook once a batch has shown it every input it asked for."""


@torch.no_grad()
def collect_inputs(block: nn.Module, X: torch.Tensor, ctx: tuple, names: list[str],
                   fn: Callable[[str, torch.Tensor], None], batch_size: int = 8) -> None:
    """Call fn(name, x) with the input of each named submodule of `block` over calibration activations
    X [N, L, d], in batches of sequences. Each batch runs only until the last of those inputs is taken:
    what follows cannot change them, so the inputs of a layer early in the block cost a fraction of a
    forward (GPTQ's q/k/v Hessians need the attention norm only)."""
    seen: set[str] = set()

    def take(name: str, x: torch.Tensor) -> None:
        fn(name, x.detach())
        seen.add(name)
        if len(seen) == len(set(names)):
            raise _InputsTaken

    handles = [block.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: take(n, args[0]))
               for n in names]
    try:
        for i in range(0, X.shape[0], batch_size):
            seen.clear()
            try:
                block(X[i:i + batch_size], *ctx)
            except _InputsTaken:
                pass
    finally:
        for h in handles:
            h.remove()


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def install_qlinear(block: nn.Module, name: str, qw: QuantizedWeight, act: ActQuantConfig | None,
                    W_ref: torch.Tensor, input_transform: nn.Module | None = None, **info) -> dict:
    """Replace block.<name> by a QLinear; return the layer's manifest info (grid, SQNR vs W_ref)."""
    lin = block.get_submodule(name)
    bias = lin.bias if isinstance(lin, nn.Linear) else getattr(lin, "bias", None)
    set_module(block, name, QLinear(qw, bias, act, input_transform, dtype=W_ref.dtype))
    out = {"sqnr_db": round(sqnr_db(W_ref, qw.dequantize()), 3)}
    out.update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in info.items()})
    return out


def hessians(block: nn.Module, X: torch.Tensor, ctx: tuple, names: list[str], batch_size: int) -> dict:
    """GPTQ Hessians of the inputs of `names` (layers sharing an input share one accumulator)."""
    stats: dict[str, HessianStats] = {}

    def add(n, x):
        if n not in stats:
            stats[n] = HessianStats(x.shape[-1])
        stats[n].update(x)

    collect_inputs(block, X, ctx, names, add, batch_size)
    return stats


SAMPLE_ROWS = 256  # input rows a layer's output error is measured on (HessianStats.sample keeps as many)


@torch.no_grad()
def input_sample(block: nn.Module, X: torch.Tensor, ctx: tuple, name: str, batch_size: int,
                 keep: int = SAMPLE_ROWS) -> torch.Tensor:
    """The first `keep` input rows [keep, in] of block.<name> (the rows HessianStats.sample keeps),
    from a forward over only as many calibration sequences as they need."""
    rows: list[torch.Tensor] = []
    n_seq = -(-keep // X.shape[1])
    collect_inputs(block, X[:n_seq], ctx, [name], lambda n, x: rows.append(x.reshape(-1, x.shape[-1]).float()),
                   batch_size)
    return torch.cat(rows)[:keep]


def output_rel_err(W: torch.Tensor, qw: QuantizedWeight, X: torch.Tensor) -> float:
    """Relative output error ||X (W - Q)^T||^2 / ||X W^T||^2 on sample inputs X [T, in]."""
    W = W.float()
    y = X @ W.T
    return float((X @ qw.dequantize(torch.float32).T - y).pow(2).sum() / y.pow(2).sum().clamp(min=1e-30))


def round_weight(W: torch.Tensor, H: torch.Tensor | None, qcfg: QuantizeConfig, wcfg: WeightQuantConfig,
                 method: str, X_sample: torch.Tensor | None = None, name: str = "weight",
                 n_tokens: int | None = None) -> tuple[QuantizedWeight, dict]:
    """Round W with RTN or GPTQ (GPTQ needs the Hessian H); returns the weight and manifest info
    (the output error on `X_sample` when given)."""
    info = {}
    if method == "gptq":
        qw, info["gptq_loss"] = gptq_quantize(W, H, wcfg, block_size=qcfg.block_size, percdamp=qcfg.percdamp,
                                              act_order=qcfg.act_order, mse_clip=qcfg.mse_clip,
                                              name=name, n_tokens=n_tokens)
    else:
        qw = rtn_quantize(W, wcfg, mse_clip=qcfg.mse_clip)
    if X_sample is not None and X_sample.numel():
        info["out_rel_err"] = output_rel_err(W, qw, X_sample)
    return qw, info


def sequential_quantize(method: QuantMethod, block: nn.Module, X: torch.Tensor, ctx: tuple, rounding: str,
                        transforms: dict[str, nn.Module] | None = None, index: int | None = None) -> dict[str, dict]:
    """Quantize a block's linears group by group (GROUPS order), each group's Hessian (GPTQ) or
    input sample (RTN: for the output error only) taken on the inputs produced by the
    already-quantized groups; linears of a group share their input. With the block's `index`,
    each layer gets its own grid (`QuantMethod.layer_wcfg`: mixed precision)."""
    info: dict[str, dict] = {}
    transforms = transforms or {}
    for roles in GROUPS:
        names = linear_names(method.spec, roles)
        H, n_tokens = None, None
        if rounding == "gptq":
            stats = hessians(block, X, ctx, names[:1], method.qcfg.batch_size)[names[0]]
            H, X_s, n_tokens = stats.H, stats.sample, stats.n
            if names[0] in transforms:  # the layer will see T(x): H_T = T^T H T
                T = transforms[names[0]].matrix(H.shape[0]).to(H.dtype)
                H = T.T @ H @ T
        else:
            X_s = input_sample(block, X, ctx, names[0], method.qcfg.batch_size)
        if names[0] in transforms:
            X_s = transforms[names[0]](X_s)
        for n in names:
            W = block.get_submodule(n).weight.data.float()
            wcfg = method.layer_wcfg(None if index is None else f"{method.spec.blocks}.{index}.{n}", W.shape[1])
            qw, extra = round_weight(W, H, method.qcfg, wcfg, rounding, X_s, name=n, n_tokens=n_tokens)
            info[n] = install_qlinear(block, n, qw, method.acfg, W, transforms.get(n), **extra)
        calibrate_static_acts(block, names, X, ctx, method.qcfg.batch_size)
    return info


@torch.no_grad()
def calibrate_static_acts(block: nn.Module, names: list[str], X: torch.Tensor, ctx: tuple, batch_size: int) -> None:
    """Fix the static (per-tensor) activation grids of the named QLinears from one calibration pass;
    a no-op for dynamic (per-token) activations."""
    layers = [block.get_submodule(n) for n in names]
    layers = [m for m in layers if isinstance(m, QLinear) and m.act is not None and m.act.granularity == "per_tensor"]
    if not layers:
        return
    for m in layers:
        m.observe()
    forward_block(block, X, ctx, batch_size)
    for m in layers:
        m.calibrate()
