"""Mixed precision: per-layer bit-widths chosen from measured sensitivities under a size budget.

Given, for every unit u (a layer, or one role across blocks) and candidate bit-width b, the KL
divergence it adds when quantized alone (`eval.sensitivity`) and the bytes it then takes, pick one
b per unit minimising the summed KLD subject to total bytes <= the budget. This is a
multiple-choice knapsack; it is solved exactly by dynamic programming over bytes in units of the
costs' greatest common divisor (the byte counts of grids of one group size share a large one),
and by a Lagrangian relaxation (the best convex-hull allocation under the budget, then greedy
upgrades into the slack) when that table would be too large.

The budget is an average of B bits per weight over the allocated layers: B / 8 * n_weights bytes,
where a layer's bytes are its packed codes plus fp16 scales (plus zero points), `weight_bytes`:
exactly the bytes of GGUF block types (Q4_0 = 4.5 bits per weight) and of MatMulNBits.
"""

from __future__ import annotations

import dataclasses
import math
from functools import reduce

import numpy as np

from ..errors import InputError
from .kquant import grid_for_width, kquant_family_grid
from .primitives import WeightQuantConfig
from .schemes import SCHEMES

DP_MAX_CELLS = 50_000_000  # items x budget units above which the Lagrangian solver is used


def parse_option(option) -> tuple[int, int | None]:
    """(bits, group size or None for the base grid's) of a layer's option in a mixed recipe: its
    bit-width (3, "3"), or its bit-width with a group size of its own ("3g128")."""
    bits, _, group = str(option).partition("g")
    try:
        b, g = int(bits), (int(group) if group else None)
    except ValueError:
        raise InputError(f"a layer's option is its bits (2..8) or bits and group size (e.g. 3g128), "
                         f"got {option!r}") from None
    if g is not None and g < 1:
        raise InputError(f"a layer's group size must be positive, got {option!r}")
    return b, g


def option_key(bits: int, group_size: int | None = None) -> int | str:
    """The canonical option: the bits alone on the base grid's groups, else "{bits}g{group_size}"."""
    return int(bits) if group_size is None else f"{int(bits)}g{int(group_size)}"


def option_order(option) -> tuple[int, int]:
    """Sort key of options: by bits, then group size (the base grid's first)."""
    bits, group_size = parse_option(option)
    return bits, group_size or 0


def grid_for_bits(bits: int, base: WeightQuantConfig, sym: bool | None = None,
                  group_size: int | None = None) -> WeightQuantConfig:
    """The grid of a `bits`-wide layer in a mixed recipe: the base grid's group size (or
    `group_size`) and zero kind, the symmetry of scheme W{bits}A16 unless `sym` fixes it (2-bit
    grids are asymmetric)."""
    if base.super_group:  # the K-quant family: Q{bits}_K, Q8_0 for 8 bits (fallbacks: `kquant.grid_for_width`)
        if group_size is not None:
            raise InputError("the K-quant family fixes its groups: a mix's layers take bits only")
        return kquant_family_grid(bits)
    if sym is None:
        sym = SCHEMES[f"W{bits}A16"].sym if f"W{bits}A16" in SCHEMES else base.sym
    return dataclasses.replace(base, bits=bits, sym=sym, group_size=base.group_size if group_size is None
                               else group_size)


def layer_grid(base: WeightQuantConfig, in_features: int | None, option: int | str | None = None,
               sym: bool | None = None) -> WeightQuantConfig:
    """The grid a layer `in_features` wide is rounded on: `base`, or `grid_for_bits` of its option
    in a mix (`parse_option`); then a K-quant's fallback where 256 does not divide the width
    (`kquant.grid_for_width`)."""
    cfg = base
    if option is not None:
        bits, group_size = parse_option(option)
        cfg = grid_for_bits(bits, base, sym, group_size)
    return cfg if in_features is None else grid_for_width(cfg, in_features)


def weight_bytes(out_features: int, in_features: int, cfg: WeightQuantConfig) -> int:
    """Bytes of a packed [out, in] weight on grid `cfg`: codes at cfg.bits, one fp16 scale per
    group (and a cfg.bits-wide zero point or fp16 minimum for asymmetric grids); K-quants: group
    scales (and minimums) of cfg.scale_bits plus one fp16 d (and dmin) per super-block."""
    G = cfg.groups(in_features)
    if cfg.super_group:
        per_group = cfg.scale_bits * (1 if cfg.sym else 2)
        per_super = 16 * (1 if cfg.sym else 2)
        bits = out_features * (in_features * cfg.bits + G * per_group + in_features // cfg.super_group * per_super)
        return math.ceil(bits / 8)
    bits = out_features * in_features * cfg.bits + out_features * G * 16
    if not cfg.sym:
        bits += out_features * G * (16 if cfg.zero_kind == "float" else cfg.bits)
    return math.ceil(bits / 8)


FLOAT_BITS = 16  # the "keep it float" option of the embedding and head units (stored as fp16 / F16)


def least_bytes(costs: dict[str, dict]) -> int:
    """Bytes of the cheapest allocation: every unit at its cheapest option (no budget below it fits)."""
    return sum(min(c.values()) for c in costs.values())


def allocate(costs: dict[str, dict[int, int]], values: dict[str, dict[int, float]], budget: int) -> dict:
    """Choose one option per unit minimising sum(values) subject to sum(costs) <= budget.

    Args:
        costs: unit -> {option (bits, or "{bits}g{size}": `parse_option`): bytes}.
        values: unit -> {option: added KLD} (the same options).
        budget: total bytes allowed.
    Returns:
        {"choice": unit -> option, "bytes": total bytes, "value": summed values, "solver": "dp" | "lagrangian"}.
    Raises:
        InputError when even the cheapest options exceed the budget.
    """
    units = list(costs)
    opts = [sorted(costs[u], key=option_order) for u in units]
    if any(set(costs[u]) != set(values[u]) for u in units):
        raise InputError("every unit needs a cost and a value for the same options")
    least = least_bytes(costs)
    if least > budget:
        raise InputError(f"the budget of {budget} bytes is below the smallest allocation ({least} bytes)")
    unit = reduce(math.gcd, (c for u in units for c in costs[u].values()))
    cells = len(units) * (budget // unit + 1)
    if cells <= DP_MAX_CELLS:
        choice, solver = _dp(units, opts, costs, values, budget, unit), "dp"
    else:
        choice, solver = _lagrangian(units, opts, costs, values, budget), "lagrangian"
    total = sum(costs[u][choice[u]] for u in units)
    assert total <= budget
    return {"choice": choice, "bytes": total, "value": float(sum(values[u][choice[u]] for u in units)),
            "solver": solver}


def _dp(units, opts, costs, values, budget: int, unit: int) -> dict:
    """Exact multiple-choice knapsack: best[c] = least value with cost exactly <= c units."""
    B = budget // unit
    best = np.zeros(B + 1)  # no units placed yet: value 0 at any capacity
    picks = []
    for u, os_ in zip(units, opts):
        nxt = np.full(B + 1, np.inf)
        arg = np.full(B + 1, -1, dtype=np.int64)
        for j, o in enumerate(os_):
            c = costs[u][o] // unit
            if c > B:
                continue
            cand = np.full(B + 1, np.inf)
            cand[c:] = best[:B + 1 - c] + values[u][o]
            better = cand < nxt
            nxt[better], arg[better] = cand[better], j
        best = nxt
        picks.append(arg)
    c = int(np.argmin(best))  # ties: the smallest cost
    choice = {}
    for u, os_, arg in zip(reversed(units), reversed(opts), reversed(picks)):
        o = os_[int(arg[c])]
        choice[u] = o
        c -= costs[u][o] // unit
    return {u: choice[u] for u in units}


def _lagrangian(units, opts, costs, values, budget: int) -> dict:
    """min sum(v + lam * c) per unit, lam bisected to the cheapest feasible, then greedy upgrades
    (least added value per byte) while they fit."""
    def pick(lam):
        return {u: min(os_, key=lambda o: (values[u][o] + lam * costs[u][o], costs[u][o])) for u, os_ in zip(units, opts)}

    def total(ch):
        return sum(costs[u][ch[u]] for u in units)

    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget:
        hi *= 2
    if total(pick(lo)) > budget:
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if total(pick(mid)) > budget else (lo, mid)
    choice = pick(hi) if total(pick(lo)) > budget else pick(lo)
    slack = budget - total(choice)
    while True:
        best = None
        for u in units:
            for o in costs[u]:
                dc = costs[u][o] - costs[u][choice[u]]
                dv = values[u][o] - values[u][choice[u]]
                if 0 < dc <= slack and dv < 0 and (best is None or dv / dc < best[0]):
                    best = (dv / dc, u, o, dc)
        if best is None:
            return choice
        choice[best[1]] = best[2]
        slack -= best[3]


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """Full module name -> (out, in) of every block linear of a (meta or real) model."""
    spec = model.spec
    return {f"{spec.blocks}.{i}.{n}": (m.out_features, m.in_features)
            for i, block in enumerate(model.blocks) for n in spec.linears.values()
            for m in (block.get_submodule(n),)}


def embed_head_shapes(model) -> dict[str, tuple[int, int]]:
    """Module name -> (rows, width) of the embedding and of an untied LM head: the tensors a mixed
    recipe may quantize besides the block linears (a tied head is the embedding)."""
    spec, dims = model.spec, model.config.dims
    names = [spec.embedding] + ([] if dims.tied_head else [spec.head])
    return {n: (dims.vocab_rows, dims.d_model) for n in names}


def allocation_record(layer_cfgs: dict[str, WeightQuantConfig | None], shapes: dict[str, tuple[int, int]],
                      avg_bits: float | None) -> dict:
    """The manifest's "allocation": bits and bytes per layer (a None grid: kept in half precision,
    FLOAT_BITS), the realised average bits per weight (`weight_bytes` over the layers' weights) and
    the budget it was allocated for."""
    layers, total, n = {}, 0, 0
    for name, cfg in layer_cfgs.items():
        out_f, in_f = shapes[name]
        b = 2 * out_f * in_f if cfg is None else weight_bytes(out_f, in_f, cfg)
        layers[name] = {"bits": FLOAT_BITS if cfg is None else cfg.bits, "bytes": b}
        if cfg is not None and cfg.group_size and not cfg.super_group:
            layers[name]["group_size"] = cfg.group_size
        total += b
        n += out_f * in_f
    return {"avg_bits_budget": avg_bits, "avg_bits": round(8 * total / n, 6), "bytes": total, "weights": n,
            "layers": layers}
