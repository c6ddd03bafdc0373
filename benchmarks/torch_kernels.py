"""torch's integer kernels (`--kernel int`, dllm_export/quant/kernels.py) against torch fp32 and
bf16 on the anchor shape: the layer GEMMs (32 rows = a dual-cache block step, 288 = a full step of
prompt 32 + gen 256) and whole model steps (full forward, dual-cache block forward), with the
logits' agreement to fake-quant. Variants run interleaved, one repetition of each in turn, so a
busy host slows them alike; medians are reported.

    python benchmarks/torch_kernels.py                 # anchor: d 1536, 16 layers, mlp 4096, vocab 8192
    python benchmarks/torch_kernels.py --layers 4      # fewer layers (the step time scales with them)

Writes benchmarks/results/torch_kernels.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ANCHOR = dict(d_model=1536, n_layers=16, n_heads=12, n_kv_heads=12, mlp_hidden_size=4096, vocab_size=8192,
              max_sequence_length=2048)
# weight grids of the int variants (RTN): name -> (bits, group size, activation bits or None, progressive)
GRIDS = {"W4A16 g128 (int4)": (4, 128, None, False), "W8A16 per-channel (int8)": (8, 0, None, False),
         "W8A8 (int_mm)": (8, 0, 8, False),
         # grouped W4A8: fp16 group scales take the int4 kernel after fake-quant activations; progressive
         # (integer) group scales make the weight int8, on the integer GEMM
         "W4A8 g128 (int4, fake-quant act)": (4, 128, 8, False), "W4A8 g128 progressive (int_mm)": (4, 128, 8, True)}


def host() -> dict:
    """`common.host_info()`, torch's threads, version and CPU capability."""
    from common import host_info  # same folder

    return {**host_info(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability()}


def interleaved(fns: dict, reps: int) -> dict[str, float]:
    """Median seconds of each callable, timed in turn `reps` times after two warm-ups."""
    for f in fns.values():
        f(), f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def int_layer(W: torch.Tensor, grid: tuple, dtype: torch.dtype):
    from dllm_export.quant.kernels import IntLinear
    from dllm_export.quant.primitives import ActQuantConfig, WeightQuantConfig, quantize_weight

    bits, g, a, progressive = grid
    scale_dtype = torch.float32 if progressive else torch.float16
    qw = quantize_weight(W, WeightQuantConfig(bits=bits, group_size=g, sym=True, scale_dtype=scale_dtype,
                                              progressive=progressive))
    return IntLinear(qw, None, ActQuantConfig(bits=a) if a else None, None, dtype), qw


def gemms(rows: tuple[int, ...], reps: int) -> list[dict]:
    """One row per (M, K, N): ms of fp32, bf16 and each int grid, plus GB/s of weights read."""
    out = []
    d, f = ANCHOR["d_model"], ANCHOR["mlp_hidden_size"]
    g = torch.Generator().manual_seed(0)
    for K, N in ((d, d), (d, f), (f, d)):
        W = torch.randn(N, K, generator=g) * 0.02
        Wb = W.bfloat16()
        layers = {name: int_layer(W, grid, torch.bfloat16)[0] for name, grid in GRIDS.items()}
        for M in rows:
            x = torch.randn(M, K, generator=g)
            xb = x.bfloat16()
            fns = {"fp32": lambda: F.linear(x, W), "bf16": lambda: F.linear(xb, Wb)}
            fns.update({k: (lambda m=m: m(xb)) for k, m in layers.items()})
            with torch.inference_mode():
                t = interleaved(fns, reps)
            out.append({"M": M, "K": K, "N": N, "ms": {k: round(v * 1e3, 3) for k, v in t.items()},
                        "x_fp32": {k: round(t["fp32"] / v, 2) for k, v in t.items()}})
            print(json.dumps(out[-1]), flush=True)
    return out


def build(layers: int, dtype: torch.dtype, grid: tuple | None, kernel: str):
    """The anchor-shaped random LLaDA in `dtype`; with a grid, its block linears RTN-quantized on
    `kernel` ("fake": QLinear, "int": IntLinear)."""
    from dllm_export.models.factory import llada_config
    from dllm_export.models.loader import build_model
    from dllm_export.quant.base import linear_names, set_module
    from dllm_export.quant.primitives import ActQuantConfig
    from dllm_export.quant.qlinear import QLinear

    torch.manual_seed(0)
    cfg = llada_config(**{**ANCHOR, "n_layers": layers})
    model = build_model(cfg, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model = model.to(dtype).eval()
    if grid is not None:
        for block in model.blocks:
            for name in linear_names(model.spec):
                W = block.get_submodule(name).weight.detach().float()
                m, qw = int_layer(W, grid, dtype)
                if kernel == "fake":
                    m = QLinear(qw, None, ActQuantConfig(bits=grid[2]) if grid[2] else None, dtype=dtype)
                set_module(block, name, m)
    return model


def steps(layers: int, reps: int, prompt: int = 32, gen: int = 256, block: int = 32) -> dict:
    """ms of a full forward (prompt + gen tokens) and of a dual-cache block forward, per variant
    (all held at once and timed in turn), and the int variants' logits against fake-quant in the
    same dtype (max error relative to the largest logit, top-1 agreement)."""
    from dllm_export.models.layers import KVCache

    L = prompt + gen
    ids = torch.randint(0, ANCHOR["vocab_size"], (1, L), generator=torch.Generator().manual_seed(1))
    variants = {"torch fp32": (torch.float32, None), "torch bf16": (torch.bfloat16, None)}
    variants.update({f"int {k}": (torch.bfloat16, grid) for k, grid in GRIDS.items()})
    models = {k: build(layers, dtype, grid, "int") for k, (dtype, grid) in variants.items()}
    caches = {k: KVCache() for k in models}
    fns, logits = {}, {}
    with torch.inference_mode():
        for k, model in models.items():
            logits[k] = model(ids, cache=caches[k]).float()

            def dual(model=model, kv=caches[k]):
                kv.window = (prompt, prompt + block)
                model(ids[:, prompt:prompt + block], cache=kv, rows=(0, block))
                kv.window = None
            fns[f"{k}|full"], fns[f"{k}|dual"] = (lambda model=model: model(ids)), dual
        t = interleaved(fns, reps)
    del models, caches
    res = {k: {"full": round(t[f"{k}|full"] * 1e3, 2), "dual": round(t[f"{k}|dual"] * 1e3, 2)} for k in variants}
    # against the evaluation reference, fake-quant in fp32; fake-quant in bf16 beside it is the
    # error bf16 rounding alone brings
    agree = {}
    for k, (dtype, grid) in variants.items():
        if grid is None:
            continue
        with torch.inference_mode():
            ref = build(layers, torch.float32, grid, "fake")(ids).float()
            bf = build(layers, torch.bfloat16, grid, "fake")(ids).float()
        for name, y in ((k, logits[k]), (k.replace("int ", "fake-quant bf16 "), bf)):
            agree[name] = {"max_rel_err": round(float((y - ref).abs().max() / ref.abs().max()), 5),
                           "top1": round(float((y.argmax(-1) == ref.argmax(-1)).float().mean()), 4)}
    base = res["torch fp32"]["full"]
    for r in res.values():
        r["full_x_fp32"], r["dual_x_fp32_full"] = round(base / r["full"], 2), round(base / r["dual"], 2)
    print(json.dumps({"ms": res, "vs_fake_quant": agree}), flush=True)
    return {"layers": layers, "prompt": prompt, "gen": gen, "block": block, "ms": res, "vs_fake_quant": agree}


def to_markdown(r: dict) -> str:
    lines = [f"Host: {r['host']['cpu']}, {r['host']['threads']} threads, flags {' '.join(r['host']['flags'])}, "
             f"torch {r['host']['torch']}; load average {r['load_avg_start'][0]:.1f} at the start, "
             f"{r['load_avg_end'][0]:.1f} at the end.", "", "| M x K x N | " + " | ".join(r["gemm"][0]["ms"]) + " |",
             "|---|" + "---:|" * len(r["gemm"][0]["ms"])]
    for g in r["gemm"]:
        lines.append(f"| {g['M']}x{g['K']}x{g['N']} | " + " | ".join(
            f"{v} ms ({g['x_fp32'][k]}x)" for k, v in g["ms"].items()) + " |")
    s = r["steps"]
    lines += ["", f"Model steps ({s['layers']} layers; full = {s['prompt'] + s['gen']} tokens, dual = one "
              f"{s['block']}-token block on the cache):", "", "| variant | full ms | x fp32 | dual ms | x fp32 full |"
              " logits vs fake-quant fp32 | fake-quant bf16 vs fp32 |", "|---|---:|---:|---:|---:|---|---|"]
    fmt = lambda a: f"max rel {a['max_rel_err']}, top-1 {a['top1']}" if a else ""  # noqa: E731
    for k, v in s["ms"].items():
        a, b = s["vs_fake_quant"].get(k), s["vs_fake_quant"].get(k.replace("int ", "fake-quant bf16 "))
        lines.append(f"| {k} | {v['full']} | {v['full_x_fp32']} | {v['dual']} | {v['dual_x_fp32_full']} | {fmt(a)} "
                     f"| {fmt(b)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=ANCHOR["n_layers"])
    ap.add_argument("--reps", type=int, default=15, help="GEMM repetitions (model steps: a third)")
    ap.add_argument("--rows", type=int, nargs="+", default=[32, 288])
    ap.add_argument("--out", default="benchmarks/results/torch_kernels.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = {"host": host(), "load_avg_start": os.getloadavg(), "gemm": gemms(tuple(args.rows), args.reps), "steps": steps(args.layers, max(3, args.reps // 3))}
    r["load_avg_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(r))
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
