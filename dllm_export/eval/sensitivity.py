"""Layer sensitivity: the KL divergence one layer (or one role across blocks) adds when it alone is
quantized, per bit-width, and the mixed-precision allocation it drives.

Each unit is rounded with RTN, or with GPTQ on Hessians of the float model's inputs to that layer
(mask-aware calibration canvases by default), and its fake-quant weight replaces the float one in
an otherwise float model; the fidelity canvases (`eval.fidelity`) then give the KLD it adds,
mean +- standard error. Summed over units this is the usual additive proxy for the KLD of the
whole mixed model (HAWQ, Quant-dLLM): `allocate_bits` minimises it under a bytes budget
(`quant.mixed.allocate`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..checks import check_fields
from ..errors import InputError
from ..quant.base import QuantizeConfig, round_weight
from ..quant.calibrate import CalibConfig, calibration_ids
from ..quant.driver import fit_group_size
from ..quant.mixed import (FLOAT_BITS, allocate, embed_head_shapes, layer_grid, least_bytes, linear_shapes,
                           option_key, option_order, parse_option, weight_bytes)
from .fidelity import FidelityConfig, build_reference, compare

GRANULARITIES = ("layer", "role")


@dataclass(frozen=True)
class SensitivityConfig:
    """What the scan measures.

    Attributes:
        bits: candidate bit-widths of the allocation (2..8).
        granularity: "layer" (every block linear alone) or "role" (q, k, ... across all blocks at once).
        method: rounding of the scanned unit: "gptq" (Hessians of the float model) or "rtn".
        group_size: the grid's group size (None: the scheme's, fitted to the layer widths; 32 for GGUF).
        group_sizes: other group sizes every bit-width is also scanned at, as options "{bits}g{size}"
            of their own (a layer may then take 3 bits in groups of 128, or 4 in groups of 32): where a
            group size does not divide a unit's widths, that unit lacks the option. Not with kquant.
        sym: fix the symmetry of every grid (None: W{b}A16's; GGUF's block types need True).
        calib: calibration canvases for the GPTQ Hessians (mask-aware by default).
        fidelity: the canvases the added KLD is measured on.
        embed_head: scan the embedding and the (untied) LM head too, as units "embedding" and
            "head" with one more option, FLOAT_BITS (kept in half precision, adds nothing), so the
            allocation spends the budget on them as well (the embedding is rounded with RTN).
        kquant: the K-quant family instead (GGUF): b bits = Q{b}_K (8 = Q8_0), each layer on
            llama.cpp's fallback type where 256 does not divide its width (`quant.kquant`);
            group_size and sym must be left unset.
    """

    bits: tuple[int, ...] = (2, 3, 4, 8)
    granularity: str = "layer"
    method: str = "gptq"
    group_size: int | None = None
    group_sizes: tuple[int, ...] = ()
    sym: bool | None = None
    calib: CalibConfig = field(default_factory=lambda: CalibConfig(n_samples=32, seq_len=128))
    fidelity: FidelityConfig = field(default_factory=lambda: FidelityConfig(ratios=(0.15, 0.5, 0.85), windows=8,
                                                                            elbo=False))
    embed_head: bool = False
    kquant: bool = False

    def __post_init__(self):
        check_fields(self, ints=("group_size",), bools=("sym", "embed_head", "kquant"), strs=("granularity", "method"),
                     int_seqs=("bits", "group_sizes"))
        for name, cls in (("calib", CalibConfig), ("fidelity", FidelityConfig)):
            if not isinstance(getattr(self, name), cls):
                raise InputError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        object.__setattr__(self, "group_sizes", tuple(int(g) for g in self.group_sizes))  # JSON lists -> tuple
        if self.kquant and (self.group_size is not None or self.sym is not None or 7 in self.bits or self.group_sizes):
            raise InputError("the K-quant family fixes groups and symmetry, and has 2, 3, 4, 5, 6 and 8-bit types")
        if any(g < 1 for g in self.group_sizes):
            raise InputError(f"sensitivity group sizes must be positive, got {self.group_sizes}")
        if self.granularity not in GRANULARITIES:
            raise InputError(f"sensitivity granularity must be one of {', '.join(GRANULARITIES)}, "
                             f"got {self.granularity!r}")
        if self.method not in ("rtn", "gptq"):
            raise InputError(f"sensitivity method must be rtn or gptq, got {self.method!r}")
        if not self.bits or any(not 2 <= b <= 8 for b in self.bits):
            raise InputError(f"sensitivity bit-widths must lie in 2..8, got {self.bits}")

    def quantize_config(self) -> QuantizeConfig:
        """The QuantizeConfig whose grids the scan rounds with (and the allocation is quantized with)."""
        if self.kquant:
            return QuantizeConfig(method=self.method, scheme="W4A16", kquant="Q4_K", calib=self.calib)
        return QuantizeConfig(method=self.method, scheme="W4A16", group_size=self.group_size, sym=self.sym,
                              calib=self.calib)


def _units(model, granularity: str, embed_head: bool = False) -> dict[str, list[str]]:
    """unit name -> the full names of its layers."""
    spec = model.spec
    if granularity == "layer":
        units = {n: [n] for n in linear_shapes(model)}
    else:
        units = {role: [f"{spec.blocks}.{i}.{hf}" for i in range(len(model.blocks))]
                 for role, hf in spec.linears.items()}
    if embed_head:
        units.update({"embedding" if n == spec.embedding else "head": [n] for n in embed_head_shapes(model)})
    return units


@torch.no_grad()
def _hessians(model, ids: torch.Tensor, names: list[str], batch: int = 8) -> dict:
    """GPTQ Hessians of the inputs of the named linears, over a float forward of `ids`."""
    from ..quant.gptq import HessianStats

    stats: dict[str, HessianStats] = {}
    handles = []
    for n in names:
        mod = model.get_submodule(n)
        stats[n] = HessianStats(mod.in_features)
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=n: stats[n].update(a[0].detach())))
    try:
        for i in range(0, ids.shape[0], batch):
            model(ids[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    return stats


def scan_plan(model, cfg: SensitivityConfig) -> tuple[dict, QuantizeConfig]:
    """What a scan will measure, from the shapes alone: {unit: {"layers", "weights", "grids":
    {option: {layer: grid}}, "bytes": {option: packed bytes}}} (an option whose groups do not tile
    a unit's widths is left out; the embedding and head units add FLOAT_BITS at 2 bytes a weight),
    and the QuantizeConfig fitted to the layer widths. `auto_recipe` checks a budget on it before
    the scan's minutes."""
    shapes = linear_shapes(model)
    qcfg = fit_group_size(cfg.quantize_config(), sorted({s[1] for s in shapes.values()}))
    base = qcfg.weight_config()
    extra = embed_head_shapes(model) if cfg.embed_head else {}
    shapes.update(extra)
    options = [option_key(b, g) for b in sorted(cfg.bits) for g in (None, *cfg.group_sizes)
               if g is None or g != base.group_size]
    plan = {}
    for unit, names in _units(model, cfg.granularity, cfg.embed_head).items():
        grids = {b: {n: layer_grid(base, shapes[n][1], b, cfg.sym) for n in names} for b in options
                 if parse_option(b)[1] is None or not any(shapes[n][1] % parse_option(b)[1] for n in names)}
        nbytes = {b: sum(weight_bytes(*shapes[n], g[n]) for n in names) for b, g in grids.items()}
        if any(n in extra for n in names):
            grids[FLOAT_BITS], nbytes[FLOAT_BITS] = {}, sum(2 * shapes[n][0] * shapes[n][1] for n in names)
        plan[unit] = {"layers": names, "weights": sum(shapes[n][0] * shapes[n][1] for n in names),
                      "grids": grids, "bytes": nbytes}
    for g in cfg.group_sizes:
        if g != base.group_size and not any(parse_option(b)[1] == g for e in plan.values() for b in e["grids"]):
            raise InputError(f"group size {g} tiles no scanned unit's input widths "
                             f"({', '.join(map(str, sorted({w for _, w in shapes.values()})))})")
    return plan, qcfg


@torch.no_grad()
def sensitivity_scan(model, tokenizer, cfg: SensitivityConfig = SensitivityConfig(), progress: bool = False) -> dict:
    """KLD added by quantizing each unit alone at each candidate bit-width.

    Args:
        model: the float model (in memory; its weights are restored after each measurement).
        tokenizer: its tokenizer (held-out canvases, calibration text).
    Returns:
        JSON-ready {"units": {unit: {"layers", "weights", "bits": {b: {"kld", "kld_se", "top1", "bytes"}}}},
        "ranking": units by KLD at the lowest bit-width, "config", "grid"}.
    """
    plan, qcfg = scan_plan(model, cfg)
    ref = build_reference(model, tokenizer, cfg.fidelity)
    H = {}
    if cfg.method == "gptq":  # the embedding is a lookup: no Hessian, RTN
        ids, _ = calibration_ids(tokenizer, model.spec, cfg.calib, model.config.dims.context)
        H = _hessians(model, ids, [n for e in plan.values() for n in e["layers"] if n != model.spec.embedding])
    out: dict = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(e["grids"]) - (FLOAT_BITS in e["grids"]) for e in plan.values()), desc="sensitivity",
                   unit="scan", leave=False)
    for unit, e in plan.items():
        names = e["layers"]
        entry = {"layers": names, "weights": e["weights"], "bits": {}}
        originals = {n: model.get_submodule(n).weight.data.clone() for n in names}
        for b, grids in e["grids"].items():
            if b == FLOAT_BITS:  # kept in half precision: adds nothing
                entry["bits"][b] = {"kld": 0.0, "kld_se": 0.0, "top1": 1.0, "bytes": e["bytes"][b]}
                continue
            for n in names:
                W = originals[n].float()
                h = H.get(n)
                qw, _ = round_weight(W, None if h is None else h.H, qcfg, grids[n],
                                     cfg.method if h is not None else "rtn", name=n, n_tokens=None if h is None else h.n)
                model.get_submodule(n).weight.data.copy_(qw.dequantize(originals[n].dtype))
            s = compare(model, ref)["summary"]
            entry["bits"][b] = {"kld": s["kld_mean"], "kld_se": s["kld_se"], "top1": s["top1"], "bytes": e["bytes"][b]}
            for n in names:
                model.get_submodule(n).weight.data.copy_(originals[n])
            if bar is not None:
                bar.update(1)
        out[unit] = entry
    if bar is not None:
        bar.close()
    low = min(cfg.bits)
    ranking = sorted(out, key=lambda u: -out[u]["bits"][low]["kld"])  # most sensitive first
    cfg_d = dataclasses.asdict(cfg)
    cfg_d["fidelity"]["ratios"] = list(cfg.fidelity.ratios)
    return {"units": out, "ranking": ranking, "config": cfg_d, "grid": qcfg.weight_config().to_dict(),
            "weights": sum(e["weights"] for e in out.values())}


def allocate_bits(scan: dict, avg_bits: float, bits: tuple[int, ...] | None = None,
                  float_bits: int = FLOAT_BITS, group_sizes: tuple[int, ...] | None = None) -> dict:
    """Per-layer bit-widths from a scan minimising the summed added KLD with at most `avg_bits`
    bits per weight (bytes as `quant.mixed.weight_bytes`) over the scanned layers.

    Args:
        scan: a `sensitivity_scan` result (or its JSON).
        avg_bits: the budget, bits per weight including scales.
        bits: the candidate bit-widths (default: all the scan measured; the embedding and head
            keep their FLOAT_BITS option in any case).
        float_bits: what that float option costs in the target's file (16: fp16 / F16; ONNX
            writes float tensors in fp32, 32).
        group_sizes: of the scan's "{bits}g{size}" options, those with these sizes (default: all).
    Returns:
        {"layer_bits": {layer: option} (bits, or "{bits}g{size}"; layers left in float are not listed),
        "unit_bits", "bytes", "budget_bytes", "avg_bits", "avg_bits_budget", "predicted_kld", "solver"}.
    """
    if not (math.isfinite(avg_bits) and 0 < avg_bits <= 32):  # 32: every weight in fp32, the most a budget buys
        raise InputError(f"--avg-bits must be a number of bits per weight in (0, 32], got {avg_bits}")
    units = scan["units"]
    if not units:
        raise InputError("the sensitivity scan holds no units")

    def opts(e):  # option (bits, or "{bits}g{size}": quant.mixed.parse_option) -> its measurement
        out = {}
        for k, v in e["bits"].items():
            b, g = parse_option(k)
            if (b == FLOAT_BITS or bits is None or b in bits) and (g is None or group_sizes is None or g in group_sizes):
                out[option_key(b, g)] = v
        return out

    def cost(e, b, v):
        return e["weights"] * float_bits // 8 if b == FLOAT_BITS else v["bytes"]

    costs = {u: {b: cost(e, b, v) for b, v in opts(e).items()} for u, e in units.items()}
    values = {u: {b: v["kld"] for b, v in opts(e).items()} for u, e in units.items()}
    if any(not c for c in costs.values()):
        raise InputError(f"the scan measured none of the bit-widths {bits}")
    n = scan["weights"]
    budget = int(avg_bits * n // 8)
    least = least_bytes(costs)
    if least > budget:  # said in the user's unit; `allocate` would say it in bytes
        raise InputError(f"--avg-bits {avg_bits}: the smallest allocation of these options takes "
                         f"{8 * least / n:.3f} bits per weight")
    res = allocate(costs, values, budget)
    layer_bits = {layer: res["choice"][u] for u, e in units.items() for layer in e["layers"]
                  if res["choice"][u] != FLOAT_BITS}
    return {"layer_bits": layer_bits, "unit_bits": res["choice"], "bytes": res["bytes"], "budget_bytes": budget,
            "avg_bits": 8 * res["bytes"] / n, "avg_bits_budget": avg_bits, "predicted_kld": res["value"],
            "solver": res["solver"]}


def to_markdown(scan: dict, top: int = 20) -> str:
    """The scan as a table: units by sensitivity, KLD +- se per bit-width."""
    bits = sorted({option_key(*parse_option(b)) for e in scan["units"].values() for b in e["bits"]},
                  key=option_order)
    lines = ["| unit | weights | " + " | ".join(f"KLD @ {b} bits" for b in bits) + " |",
             "|---|---:|" + "---:|" * len(bits)]
    for u in scan["ranking"][:top]:
        e = scan["units"][u]
        by = {option_key(*parse_option(k)): v for k, v in e["bits"].items()}  # JSON keys are strings
        cells = [f"{by[b]['kld']:.4g} +- {by[b]['kld_se']:.2g}" if b in by else "" for b in bits]
        lines.append(f"| {u} | {e['weights']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# GGUF stores a layer exactly only as a symmetric group-32 block type: Q4_0 / Q5_0 / Q8_0; a float
# embedding / head costs 16 bits a weight in a checkpoint or GGUF (F16), 32 in ONNX (fp32)
# "gguf-k": llama.cpp's K-quants, Q2_K .. Q6_K and Q8_0, with its fallbacks (`quant.kquant`)
TARGET_GRIDS = {None: {"bits": (2, 3, 4, 8), "group_size": None, "sym": None, "float_bits": 16},
                "onnx": {"bits": (2, 3, 4, 5, 6, 8), "group_size": None, "sym": None, "float_bits": 32},
                "gguf": {"bits": (4, 5, 8), "group_size": 32, "sym": True, "float_bits": 16},
                "gguf-k": {"bits": (2, 3, 4, 5, 6, 8), "group_size": None, "sym": None, "float_bits": 16,
                           "kquant": True}}


def _unmeasured(plan: dict) -> dict:
    """A scan of `plan` with every KLD 0: what `allocate_bits` needs to check a budget."""
    return {"weights": sum(e["weights"] for e in plan.values()),
            "units": {u: {"layers": e["layers"], "weights": e["weights"],
                          "bits": {b: {"bytes": c, "kld": 0.0} for b, c in e["bytes"].items()}}
                      for u, e in plan.items()}}


def read_scan(path) -> dict:
    """A sensitivity scan written by `analyze --sensitivity` (sensitivity.json), its structure checked:
    InputError naming the file and what is wrong, never a KeyError half-way through an allocation."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise InputError(f"sensitivity file not found: {path}")
    try:
        scan = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a JSON sensitivity scan ({e})") from None

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise InputError(f"{path}: not a sensitivity scan of `dllm-export analyze --sensitivity` ({what})")

    need(isinstance(scan, dict), "expected a JSON object")
    for key, kind in (("config", dict), ("grid", dict), ("units", dict), ("weights", int)):
        need(isinstance(scan.get(key), kind), f"no {key!r} {kind.__name__}")
    need(all(k in scan["config"] for k in ("method", "sym")) and "group_size" in scan["grid"],
         "its config lacks method / sym / group_size")
    for name, unit in scan["units"].items():
        need(isinstance(unit, dict) and isinstance(unit.get("layers"), list) and isinstance(unit.get("weights"), int)
             and isinstance(unit.get("bits"), dict), f"unit {name!r} lacks layers / weights / bits")
        need(all(isinstance(v, dict) and {"kld", "bytes"} <= set(v) for v in unit["bits"].values()),
             f"unit {name!r}: a bit-width without kld / bytes")
    return scan


def auto_recipe(model, avg_bits: float, *, target: str | None = None, bits: tuple[int, ...] | None = None,
                scan: dict | None = None, method: str = "gptq", granularity: str = "layer",
                group_size: int | None = None, group_sizes: tuple[int, ...] = (), embed_head: bool = False,
                progress: bool = False) -> tuple[dict, dict]:
    """`--scheme auto --avg-bits B`: scan (unless `scan` is given), allocate, and return the
    quantize options of the mixed recipe plus the allocation and the scan.

    Args:
        model: checkpoint folder or `default` / `default-dream` (the float source).
        target: None (a quantized checkpoint), "onnx", "gguf" or "gguf-k" (its grids: see TARGET_GRIDS).
        bits: candidate bit-widths (default: the target's).
        group_size: the grids' group size (default: the target's; GGUF: 32).
        group_sizes: other group sizes a layer may take (SensitivityConfig.group_sizes; ONNX only).
        embed_head: the embedding and LM head share the budget (SensitivityConfig.embed_head).
    Returns:
        ({"method", "scheme", "group_size", "sym", "kquant", "layer_bits", "avg_bits", "mix_embed_head"},
        {"allocation", "scan"}).
    """
    from .. import load_model, load_tokenizer
    from ..models.checkpoint import resolve_float_checkpoint

    if target not in TARGET_GRIDS:
        raise InputError(f"--scheme auto: unknown target {target!r}")
    resolve_float_checkpoint(model, "--scheme auto")  # before a scan's minutes
    grid = dict(TARGET_GRIDS[target])
    kquant = bool(grid.get("kquant"))
    if group_size is not None and (kquant or grid["group_size"] not in (None, group_size)):
        raise InputError(f"{target} stores groups of {grid['group_size'] or 'its types'} weights, not {group_size}")
    grid["group_size"] = grid["group_size"] or group_size
    bits = tuple(bits or grid["bits"])
    if target in ("gguf", "gguf-k") and any(b not in grid["bits"] for b in bits):
        raise InputError(f"{target} stores mixed layers exactly at bit-widths {', '.join(map(str, grid['bits']))} "
                         f"(got {bits})")
    # group-size options: those asked for, else all the scan holds; none in GGUF (a block type fixes its groups)
    groups = () if target in ("gguf", "gguf-k") else tuple(group_sizes) or None
    if scan is None:
        if group_sizes and target in ("gguf", "gguf-k"):
            raise InputError(f"{target} stores a layer's groups in its block type: no group-size choices")
        cfg = SensitivityConfig(bits=bits, granularity=granularity, method=method, group_size=grid["group_size"],
                                group_sizes=tuple(group_sizes), sym=grid["sym"], embed_head=embed_head, kquant=kquant)
        float_model = load_model(model)
        # a budget no allocation fits fails now, not after the scan's minutes
        allocate_bits(_unmeasured(scan_plan(float_model, cfg)[0]), avg_bits, bits, grid["float_bits"], groups)
        scan = sensitivity_scan(float_model, load_tokenizer(model), cfg, progress=progress)
    if bool(scan["config"].get("kquant")) != kquant:
        raise InputError(f"the sensitivity scan {'used' if not kquant else 'did not use'} the K-quant family the "
                         f"{target} recipe needs (scan again with --grid {target})")
    if grid["group_size"] and scan["grid"]["group_size"] != grid["group_size"]:
        raise InputError(f"the sensitivity scan used groups of {scan['grid']['group_size']}; this recipe needs "
                         f"{grid['group_size']} (scan again with that grid)")
    alloc = allocate_bits(scan, avg_bits, bits, grid["float_bits"], groups)
    opts = {"method": scan["config"]["method"], "scheme": "W4A16",
            "group_size": None if kquant else scan["grid"]["group_size"], "sym": scan["config"]["sym"],
            "kquant": "Q4_K" if kquant else None, "layer_bits": alloc["layer_bits"], "avg_bits": avg_bits,
            "mix_embed_head": bool(scan["config"].get("embed_head"))}
    return opts, {"allocation": alloc, "scan": scan}
