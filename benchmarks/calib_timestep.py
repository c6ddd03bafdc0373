"""Timestep-aware calibration against uniform-t and plain-text calibration, on fidelity metrics.

Per bundled model and PTQ cell, the same method is calibrated four ways (windows of 256 tokens
from the bundled corpus, same windows and seed):

* none: plain text (earlier PTQ studies);
* uniform: mask ratio t ~ stratified U(0, 1) after a visible prefix (the default);
* decode: canvases laid out as decoding feeds them (visible prompt, later blocks masked, the
  current block partly) at the mask ratios the reference loop visits (one token per step),
  measured from its commit steps on held-out prompts;
* decode-edge: the same at the ratios of the edge loop (Fast-dLLM threshold 0.9, which commits
  several tokens a step, so it spends fewer steps at high mask ratios).

Each quantized model is scored on the same fidelity canvases (t = 0.15 / 0.5 / 0.85 and the
loop's decode ratios, `eval.fidelity`), and compared pairwise with the uniform calibration.

    OMP_NUM_THREADS=1 python benchmarks/calib_timestep.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CELLS = [("gptq", "W3A16"), ("gptq", "W4A16"), ("smoothquant", "W4A8")]
CALIBS = ("none", "uniform", "decode", "decode-edge")


def run_model(name: str, work: Path, args) -> dict:
    from dllm_export import load_model, load_tokenizer
    from dllm_export.eval.fidelity import (DECODE, FidelityConfig, build_reference, calibration_decode_ratios,
                                           compare, paired_difference)
    from dllm_export.quant import CalibConfig, QuantizeConfig, quantize

    t0 = time.perf_counter()
    model, tok = load_model(name), load_tokenizer(name)
    ref = build_reference(model, tok, FidelityConfig(windows=args.windows))
    ratios = {"decode": calibration_decode_ratios(model, tok),
              "decode-edge": calibration_decode_ratios(model, tok, threshold=0.9)}
    rows = []
    for method, scheme in CELLS[:args.cells]:
        raw = {}
        for calib in CALIBS:
            mask = "decode" if calib.startswith("decode") else calib
            ccfg = CalibConfig(mask=mask, n_samples=args.calib_samples, decode_ratios=tuple(ratios.get(calib, ())))
            out = work / f"{name}-{method}-{scheme}-{calib}"
            if not out.exists():
                quantize(name, out, QuantizeConfig(method=method, scheme=scheme, calib=ccfg), progress=False)
            res = compare(load_model(out), ref)
            raw[calib] = res
            s = res["summary"]
            row = {"model": name, "method": method, "scheme": scheme, "calib": calib,
                   **{k: s[k] for k in ("kld_mean", "kld_se", "kld_p99", "top1", "elbo_diff_bits", "elbo_diff_se_bits")},
                   "kld_decode_set": res["sets"][DECODE]["kld_mean"]}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        for row in rows[-len(CALIBS):]:
            if row["calib"] != "uniform":
                d = paired_difference(raw[row["calib"]], raw["uniform"])
                dd = paired_difference(raw[row["calib"]], raw["uniform"], DECODE)
                row["vs_uniform"] = {"kld_diff": d["diff"], "se": d["se"], "z": d["z"], "significant": d["significant"],
                                     "decode_set_diff": dd["diff"], "decode_set_z": dd["z"]}
    return {"model": name, "seconds": round(time.perf_counter() - t0, 1), "rows": rows,
            "decode_ratio_mean": {k: sum(v) / len(v) for k, v in ratios.items()}}


def to_markdown(res: dict) -> str:
    lines = ["# Timestep-aware calibration (decode) vs uniform-t and plain text: fidelity to the float model", "",
             f"Reproduce: `{res['command']}`. Host: {res['host']}.", "",
             "| model | method | scheme | calib | KLD mean +- se | KLD p99 | top-1 | KLD decode set | ELBO diff bits | "
             "vs uniform: dKLD (z) |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for m in res["models"]:
        for r in m["rows"]:
            vs = r.get("vs_uniform")
            vs_s = "" if vs is None else f"{vs['kld_diff']:+.3g} (z {vs['z']:.1f}){' *' if vs['significant'] else ''}"
            lines.append(f"| {r['model']} | {r['method']} | {r['scheme']} | {r['calib']} | {r['kld_mean']:.4g} +- "
                         f"{r['kld_se']:.2g} | {r['kld_p99']:.3g} | {r['top1']:.4f} | {r['kld_decode_set']:.4g} | "
                         f"{r['elbo_diff_bits']:+.4f} +- {r['elbo_diff_se_bits']:.4f} | {vs_s} |")
    lines += ["", "`*`: the paired difference over the same canvases is significant at 95% (|z| > 1.96).",
              "Mean decode mask ratio the calibration canvases were drawn at: " + "; ".join(
                  f"{m['model']} {', '.join(f'{k} {v:.3f}' for k, v in m['decode_ratio_mean'].items())}"
                  for m in res["models"])]
    return "\n".join(lines) + "\n"


def main() -> int:
    from mixed_precision import host_line, run_models, study_parser  # noqa: E402  (same folder)

    p = study_parser(__doc__, "benchmarks/results/calib_timestep_default")
    p.add_argument("--cells", type=int, default=len(CELLS), help="the first N cells of CELLS")
    args = p.parse_args()
    res = {"host": host_line(),
           "command": f"OMP_NUM_THREADS=1 python benchmarks/calib_timestep.py --models {args.models} --windows "
                      f"{args.windows} --cells {args.cells} --calib-samples {args.calib_samples}", "models": []}
    run_models(res, args, "calib-", run_model, to_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
