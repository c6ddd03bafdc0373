"""Mixed precision with the embedding and LM head in the budget, on the GGUF or ONNX grid, by file bytes.

On a small model the embedding and head are a large share of the weights (2 x 4096 x 256 of the
bundled LLaDA's 6.1M), and llama.cpp users choose their types too (`token_embd`, `output`). Here
they join the allocation (`--mix-embed-head`): one GPTQ sensitivity scan on the GGUF grid (every
block linear alone at Q4_0 / Q5_0 / Q8_0; the embedding with RTN and the head with GPTQ at the same
types, or kept F16), then mixed recipes at several budgets (average bits over all these weights),
against "uniform" files: block linears at one type x embedding and head at one type (F16, as the
exporter writes them by default, Q8_0 or Q4_0). Every cell is quantized with the same mask-aware
calibration, exported to GGUF (size = the measured bytes of model.gguf) and scored on the same
fidelity canvases (`eval.fidelity`, its fake-quant model: the GGUF file holds the same weights,
`tests/test_sensitivity.py::test_embedding_and_head_in_the_mix`). Each mixed file is compared,
paired over the same canvases (z), with the uniform file nearest in size at least as large, and
the table lists the uniform files at least as large that it beats.

`--target onnx` does the same on the ONNX grid: 2/3/4/8-bit groups of 32 (2/3-bit codes stored as
dense bit planes), the embedding and head quantized or kept in fp32 (what the ONNX writer stores
for a float tensor, so the allocation counts 32 bits for that option), size = model.onnx + its
data file; there each bit-width is also scanned in groups of 64 and 128, and the "-g" mixes may
give a layer those (uniform files with 64-groups beside them; 128 does not divide LLaDA's FFN
width, so its FFN output layers have no 128 option).

    OMP_NUM_THREADS=1 python benchmarks/mixed_embed_head.py                   # both bundled models
    OMP_NUM_THREADS=1 python benchmarks/mixed_embed_head.py --models default --windows 8
    OMP_NUM_THREADS=1 python benchmarks/mixed_embed_head.py --target onnx
    OMP_NUM_THREADS=1 python benchmarks/mixed_embed_head.py --target gguf-k   # K-quants (Q2_K .. Q6_K, Q8_0)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixed_precision import host, run_models, study_parser  # noqa: E402

# per target (its bit-widths, float cost and K-quant family: eval.sensitivity.TARGET_GRIDS): the names of
# the bit-widths (16 = the float option), the uniform files (block linears, embedding + head), the budgets
# (average bits per weight over block linears + embedding + head) and the file(s) measured
GRIDS = {
    "gguf": {"types": {4: "Q4_0", 5: "Q5_0", 8: "Q8_0", 16: "F16"},
             "uniform": [(b, eh) for b in (4, 5, 8) for eh in (4, 8, 16)], "budgets": (4.5, 5.0, 5.5, 6.0, 7.0),
             "files": ("model.gguf",)},
    "onnx": {"types": {2: "W2", 3: "W3", 4: "W4", 5: "W5", 6: "W6", 8: "W8", 16: "fp32"},
             "uniform": [(b, eh) for b in (2, 3, 4, 5, 6, 8) for eh in (4, 5, 6, 8, 16)] + [("3g64", 4), ("4g64", 4)],
             "budgets": (3.5, 4.0, 4.5, 5.0, 6.0), "files": ("model.onnx", "model.onnx.data"),
             "group_choices": (64, 128)},
    # llama.cpp's K-quants (each layer on its type's fallback where 256 does not divide its width)
    "gguf-k": {"types": {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0", 16: "F16"},
               "uniform": [(b, eh) for b in (3, 4, 5, 6) for eh in (3, 4, 6, 16)],
               "budgets": (3.5, 4.0, 4.5, 5.0, 5.5, 6.0), "files": ("model.gguf",)},
}


def run_model(name: str, work: Path, args) -> dict:
    from dllm_export import load_model, load_tokenizer
    from dllm_export.eval.fidelity import FidelityConfig, build_reference, compare, paired_difference
    from dllm_export.eval.sensitivity import TARGET_GRIDS, SensitivityConfig, allocate_bits, sensitivity_scan
    from dllm_export.exporter.gguf import GgufExportConfig, export_gguf
    from dllm_export.exporter.onnx import export_onnx
    from dllm_export.quant import CalibConfig, QuantizeConfig, quantize
    from dllm_export.errors import InputError
    from dllm_export.quant.mixed import embed_head_shapes, linear_shapes, parse_option

    grid, target = GRIDS[args.target], TARGET_GRIDS[args.target]
    TYPES, kquant, groups = grid["types"], bool(target.get("kquant")), grid.get("group_choices", ())

    def type_name(option) -> str:  # "W3", or "W3g128" for an option with its own group size
        b, g = parse_option(option)
        return TYPES[b] + (f"g{g}" if g else "")
    t0 = time.perf_counter()
    model, tok = load_model(name), load_tokenizer(name)
    extra = list(embed_head_shapes(model))
    ref = build_reference(model, tok, FidelityConfig(windows=args.windows))
    calib = CalibConfig(n_samples=args.calib_samples)
    scan_file = work / f"{name}-scan-eh-{args.target}{''.join(f'-g{g}' for g in groups)}.json"
    if scan_file.exists():
        scan = json.loads(scan_file.read_text())
    else:
        grid_kw = {"kquant": True} if kquant else {"group_size": 32, "sym": True}
        scan = sensitivity_scan(model, tok, SensitivityConfig(
            bits=target["bits"], calib=calib, embed_head=True, group_sizes=groups, **grid_kw,
            fidelity=FidelityConfig(ratios=(0.15, 0.5, 0.85), windows=args.scan_windows, elbo=False)))
        scan_file.write_text(json.dumps(scan))
    t_scan = time.perf_counter() - t0
    cells, raw = [], {}

    def cell(label: str, qcfg, info: dict) -> None:
        q, art = work / f"{name}-{label}", work / f"{name}-{label}-{args.target}"
        if not q.exists():
            quantize(name, q, qcfg, progress=False)
        if not art.exists():
            if args.target != "onnx":  # a float embedding / head as F16, as the exporter writes it by default
                export_gguf(q, art, GgufExportConfig(embed_type="F16", head_type="F16"))
            else:
                export_onnx(q, art)
        res = compare(load_model(q), ref)
        raw[label] = res
        s = res["summary"]
        cells.append({"label": label, **info, "file_bytes": sum((art / f).stat().st_size for f in grid["files"]),
                      **{k: s[k] for k in ("kld_mean", "kld_se", "kld_p99", "top1")}})
        print(json.dumps(cells[-1]), file=sys.stderr)

    base = dict(method="gptq", scheme="W4A16", calib=calib,
                **({"kquant": "Q4_K"} if kquant else {"group_size": 32, "sym": True}))
    for bits, eh in grid["uniform"]:
        layer_bits = {n: bits for n in linear_shapes(model)}
        layer_bits.update({n: eh for n in extra if eh != 16})
        qcfg = QuantizeConfig(**base, layer_bits=layer_bits)
        cell(f"{type_name(bits)}+{TYPES[eh]}", qcfg, {"kind": "uniform", "blocks": type_name(bits),
                                                     "embed_head": TYPES[eh]})
    infeasible = []
    for budget, group_sizes in [(b, ()) for b in grid["budgets"]] + [(b, groups) for b in grid["budgets"] if groups]:
        label = f"mix{budget}" + ("-g" if group_sizes else "")
        try:
            alloc = allocate_bits(scan, budget, float_bits=target["float_bits"], group_sizes=group_sizes)
        except InputError as e:  # e.g. Dream on K-quants: 192-wide layers fall back to 4.5-bit types
            infeasible.append({"budget": budget, "label": label, "why": str(e)})
            continue
        qcfg = QuantizeConfig(**base, layer_bits=alloc["layer_bits"], avg_bits=budget, mix_embed_head=True)
        counts: dict = {}
        for u, b in alloc["unit_bits"].items():
            if u not in ("embedding", "head"):
                counts[type_name(b)] = counts.get(type_name(b), 0) + 1
        cell(label, qcfg, {"kind": "mixed", "budget": budget, "predicted_kld": alloc["predicted_kld"],
                           "embedding": type_name(alloc["unit_bits"]["embedding"]),
                           "head": type_name(alloc["unit_bits"].get("head", 16)),
                           "blocks": dict(sorted(counts.items()))})
    uniforms = sorted((c for c in cells if c["kind"] == "uniform"), key=lambda c: c["file_bytes"])
    for c in cells:
        if c["kind"] != "mixed":
            continue
        larger = [u for u in uniforms if u["file_bytes"] >= c["file_bytes"]]
        c["beats_larger_uniform"] = [u["label"] for u in larger if u["kld_mean"] > c["kld_mean"]]
        c["larger_uniform_better"] = [u["label"] for u in larger if u["kld_mean"] <= c["kld_mean"]]
        if larger:
            d = paired_difference(raw[c["label"]], raw[larger[0]["label"]])
            c["vs_nearest_larger"] = {"label": larger[0]["label"], "kld_diff": d["diff"], "z": d["z"],
                                      "significant": d["significant"]}
    return {"model": name, "scan_seconds": round(t_scan, 1), "seconds": round(time.perf_counter() - t0, 1),
            "weights": scan["weights"], "cells": cells, "infeasible_budgets": infeasible}


def _first_better(c: dict, size: dict) -> str:
    """The smallest uniform file at least as large as mix `c` with lower KLD, and its size ratio."""
    better = c.get("larger_uniform_better") if c["kind"] == "mixed" else None
    if better is None:
        return ""
    return f"{better[0]} ({size[better[0]] / c['file_bytes']:.2f}x)" if better else "none"


def to_markdown(res: dict) -> str:
    target = res.get("target", "gguf")
    file = " + ".join(GRIDS[target]["files"])
    lines = [f"# Mixed precision with the embedding and head in the budget ({target.upper()} grid, GPTQ, mask-aware "
             f"calibration)",
             *([""] + ["Types name the K-quant family; a layer whose width 256 does not divide is written in llama.cpp's "
                       "fallback (Q2_K / Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0)."]
               if target == "gguf-k" else []),
             "", f"Host: {res['host']['cpu']} ({', '.join(res['host']['flags'])}), torch threads "
             f"{res['host']['torch_threads']}. Reproduce: `{res['command']}`", ""]
    for m in res["models"]:
        lines += [f"## {m['model']}", ""]
        lines += [f"Budget {f['budget']} bits: no allocation fits ({f['why']}).\n" for f in m.get("infeasible_budgets", [])]
        lines += [f"| file | kind | {file} bytes | KLD mean +- se | KLD p99 | top-1 | embedding / head | block linears "
                  "| vs nearest uniform at least as large: dKLD (z) | larger uniform files it beats "
                  "| smallest larger uniform with lower KLD (its size / this) |",
                  "|---|---|---:|---:|---:|---:|---|---|---|---|---|"]
        size = {c["label"]: c["file_bytes"] for c in m["cells"]}
        for c in sorted(m["cells"], key=lambda c: c["file_bytes"]):
            mixed = c["kind"] == "mixed"
            eh = f"{c['embedding']} / {c['head']}" if mixed else c["embed_head"]
            vs = c.get("vs_nearest_larger")
            vs_s = "" if not mixed else ("none as large" if vs is None else
                                         f"{vs['label']}: {vs['kld_diff']:+.3g} (z {vs['z']:.1f})"
                                         f"{' **lower**' if vs['kld_diff'] < 0 and vs['significant'] else ''}")
            lines.append(f"| {c['label']} | {c['kind']} | {c['file_bytes']} | {c['kld_mean']:.4g} +- {c['kld_se']:.2g} "
                         f"| {c['kld_p99']:.3g} | {c['top1']:.4f} | {eh} | {c['blocks']} | {vs_s} | "
                         f"{', '.join(c.get('beats_larger_uniform', [])) if mixed else ''} | {_first_better(c, size)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = study_parser(__doc__, None, windows=12, calib_samples=32)  # --out default: per target, below
    p.add_argument("--target", choices=list(GRIDS), default="gguf")
    p.add_argument("--scan-windows", type=int, default=6, help="fidelity windows per ratio of the scan")
    args = p.parse_args()
    suffix = {"gguf": "", "onnx": "_onnx", "gguf-k": "_kquants"}[args.target]
    args.out = args.out or f"benchmarks/results/mixed_embed_head{suffix}_default"
    res = {"host": host(), "command": f"OMP_NUM_THREADS=1 python benchmarks/mixed_embed_head.py --models {args.models} "
                                      f"--target {args.target} --windows {args.windows} --scan-windows "
                                      f"{args.scan_windows} --calib-samples {args.calib_samples}",
           "target": args.target, "budgets": list(GRIDS[args.target]["budgets"]), "models": []}
    run_models(res, args, "mixed-eh-", run_model, to_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
