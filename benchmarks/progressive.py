"""Progressive group scales (QServe) against float group scales and per-channel W4A8, on fidelity.

Grouped W4A8 is the accurate 4-bit weight-activation grid, but onnxruntime runs it on MatMulNBits
(accuracy level 4), about half the u8 x s8 GEMM's rate at 32 rows on x86 (benchmarks/roofline.py).
Progressive group scales (`--progressive`: each group scale an integer of at most 15 times one
scale per output channel) make the grouped weight an exact int8 weight, so it runs on the integer
GEMM at per-channel speed. This measures what the integer scales cost in quality: per bundled model
and method, the same W4A8 cell with per-channel weights, groups with fp16 scales, and progressive
groups, scored on the same fidelity canvases (`eval.fidelity`: KL to the float model at t = 0.15 /
0.5 / 0.85 and the loop's decode ratios), with paired differences against the fp16-scale groups.

    OMP_NUM_THREADS=1 python benchmarks/progressive.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

METHODS = ("rtn", "gptq", "smoothquant")
GRIDS = {"channel": dict(group_size=0), "groups": dict(group_size=64),
         "progressive": dict(group_size=64, progressive=True)}


def run_model(name: str, work: Path, args) -> dict:
    from dllm_export import load_model, load_tokenizer
    from dllm_export.eval.fidelity import FidelityConfig, build_reference, compare, paired_difference
    from dllm_export.quant import CalibConfig, QuantizeConfig, quantize

    t0 = time.perf_counter()
    model, tok = load_model(name), load_tokenizer(name)
    ref = build_reference(model, tok, FidelityConfig(windows=args.windows))
    rows = []
    for method in args.methods.split(","):
        raw = {}
        for grid, opts in GRIDS.items():
            out = work / f"{name}-{method}-{grid}"
            if not out.exists():
                quantize(name, out, QuantizeConfig(method=method, scheme="W4A8", sym=True,
                                                   calib=CalibConfig(n_samples=args.calib_samples), **opts),
                         progress=False)
            raw[grid] = res = compare(load_model(out), ref)
            s = res["summary"]
            row = {"model": name, "method": method, "grid": grid,
                   **{k: s[k] for k in ("kld_mean", "kld_se", "kld_p99", "top1", "elbo_diff_bits")}}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        for row in rows[-len(GRIDS):]:
            if row["grid"] != "groups":
                d = paired_difference(raw[row["grid"]], raw["groups"])
                row["vs_groups"] = {"kld_diff": d["diff"], "se": d["se"], "z": d["z"], "significant": d["significant"],
                                    "kld_ratio": row["kld_mean"] / raw["groups"]["summary"]["kld_mean"]}
    return {"model": name, "seconds": round(time.perf_counter() - t0, 1), "rows": rows}


def to_markdown(res: dict) -> str:
    lines = ["# W4A8: progressive group scales vs fp16 group scales vs per channel (fidelity to the float model)", "",
             f"Reproduce: `{res['command']}`. Host: {res['host']}. Groups of 64 (the bundled models' widths: 192, "
             "256, 704); symmetric weights, per-token 8-bit activations.", "",
             "| model | method | weights | KLD mean +- se | KLD p99 | top-1 | ELBO diff bits | vs fp16 groups: "
             "KLD x, dKLD (z) |", "|---|---|---|---:|---:|---:|---:|---|"]
    for m in res["models"]:
        for r in m["rows"]:
            vs = r.get("vs_groups")
            vs_s = "" if vs is None else (f"{vs['kld_ratio']:.3f}x, {vs['kld_diff']:+.3g} (z {vs['z']:.1f})"
                                          f"{' *' if vs['significant'] else ''}")
            lines.append(f"| {r['model']} | {r['method']} | {r['grid']} | {r['kld_mean']:.4g} +- {r['kld_se']:.2g} | "
                         f"{r['kld_p99']:.3g} | {r['top1']:.4f} | {r['elbo_diff_bits']:+.4f} | {vs_s} |")
    lines += ["", "`*`: the paired difference over the same canvases is significant at 95% (|z| > 1.96)."]
    return "\n".join(lines) + "\n"


def main() -> int:
    from mixed_precision import host_line, run_models, study_parser  # noqa: E402  (same folder)

    p = study_parser(__doc__, "benchmarks/results/progressive_default")
    p.add_argument("--methods", default=",".join(METHODS))
    args = p.parse_args()
    res = {"host": host_line(),
           "command": f"OMP_NUM_THREADS=1 python benchmarks/progressive.py --models {args.models} --methods "
                      f"{args.methods} --windows {args.windows} --calib-samples {args.calib_samples}", "models": []}
    run_models(res, args, "progressive-", run_model, to_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
