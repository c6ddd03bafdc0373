"""Sensitivity-driven mixed precision against uniform schemes on the bundled models.

Per model: one GPTQ sensitivity scan (every block linear alone at 2/3/4/5/6/8 bits, groups of 32,
and each bit-width also at groups of 64 and 128 as options of their own; KLD on held-out
canvases), then mixed recipes allocated from it at several average-bits budgets (on groups of 32
only, and with the group-size options: "-g" cells) and uniform GPTQ schemes at groups of 32 and 64
(128 does not divide the bundled LLaDA's FFN width), all quantized with the same mask-aware
calibration and scored on the same fidelity canvases (`eval.fidelity`: t = 0.15 / 0.5 / 0.85 and
the loop's decode ratios, 16 windows of 128). Size is the packed bytes of the block linears
(`quant.mixed.weight_bytes`: codes + fp16 scales + zero points; exactly the GGUF block types'
bytes), reported as bits per weight. Each mixed recipe is compared, paired over the same canvases
(z-score), with the next uniform scheme up in size (the smallest at least as large), and the
table names the smallest uniform scheme that beats it.

Then the exports: the mixed recipes and their uniform neighbours go to ONNX (QDQ) and, for the
GGUF grid (4/5/8 bits = Q4_0/Q5_0/Q8_0), to GGUF, and each artifact is compared with its own
fake-quant model (KLD, top-1 agreement, max |logit difference|) and its file size is measured.

    OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py                 # both bundled models
    OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py --models default --quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

# (label, candidate bits, average-bits budget, group-size options): the issue's 2/3/4/8 grid at 3.5
# and 4.5, and GGUF's exact block types (4.5 bits is all-Q4_0 there, 3.5 unreachable); "-g": a layer
# may also take its bits in groups of 64 or 128 (the scan's group-size options); "-onnx": the ONNX
# target's grid (TARGET_GRIDS: 2/3/4/5/6/8 bits) with the group-size options
GROUP_CHOICES = (64, 128)
MIXED = [("mix{b}-2348", (2, 3, 4, 8), 3.5, ()), ("mix{b}-2348", (2, 3, 4, 8), 4.5, ()),
         ("mix{b}-gguf", (4, 5, 8), 5.0, ()), ("mix{b}-gguf", (4, 5, 8), 6.0, ()),
         ("mix{b}-2348-g", (2, 3, 4, 8), 3.5, GROUP_CHOICES), ("mix{b}-2348-g", (2, 3, 4, 8), 4.5, GROUP_CHOICES),
         ("mix{b}-onnx", (2, 3, 4, 5, 6, 8), 3.5, GROUP_CHOICES), ("mix{b}-onnx", (2, 3, 4, 5, 6, 8), 4.5, GROUP_CHOICES)]
UNIFORM = [(2, 32), (3, 32), (4, 32), (5, 32), (8, 32), (3, 64), (4, 64)]  # 128 does not divide LLaDA's 704
QUICK_MIXED = [MIXED[0], MIXED[1], MIXED[2], MIXED[4]]
QUICK_UNIFORM = [(3, 32), (4, 32), (5, 32), (3, 64), (4, 64)]


def host() -> dict:
    """`common.host_info()` and torch's threads."""
    from common import host_info  # same folder

    return {**host_info(), "torch_threads": torch.get_num_threads()}


def host_line() -> str:
    """`host()` as one line for a study's header: CPU, its vector flags, torch threads."""
    h = host()
    return f"{h['cpu']} ({', '.join(h['flags'])}), torch threads {h['torch_threads']}"


def _fid(res: dict) -> dict:
    s = res["summary"]
    return {k: s[k] for k in ("kld_mean", "kld_se", "kld_p99", "top1", "sqnr_db")}


def run_model(name: str, work: Path, args) -> dict:
    from dllm_export import load_model, load_tokenizer
    from dllm_export.eval.fidelity import FidelityConfig, build_reference, compare, paired_difference
    from dllm_export.eval.sensitivity import SensitivityConfig, allocate_bits, sensitivity_scan
    from dllm_export.quant import CalibConfig, QuantizeConfig, quantize

    t0 = time.perf_counter()
    model, tok = load_model(name), load_tokenizer(name)
    ref = build_reference(model, tok, FidelityConfig(windows=args.windows))
    calib = CalibConfig(n_samples=args.calib_samples)
    scan_file = work / f"{name}-scan-g{'-'.join(map(str, GROUP_CHOICES))}.json"
    if scan_file.exists():
        scan = json.loads(scan_file.read_text())
    else:
        scan = sensitivity_scan(model, tok, SensitivityConfig(
            bits=(2, 3, 4, 5, 6, 8), group_size=32, group_sizes=GROUP_CHOICES, calib=calib,
            fidelity=FidelityConfig(ratios=(0.15, 0.5, 0.85), windows=args.scan_windows, elbo=False)))
        scan_file.write_text(json.dumps(scan))
    t_scan = time.perf_counter() - t0
    cells, raw = [], {}

    def cell(label, qcfg, extra):
        out = work / f"{name}-{label}"
        if not out.exists():
            quantize(name, out, qcfg, progress=False)
        man = json.loads((out / "manifest.json").read_text())
        res = compare(load_model(out), ref)
        raw[label] = res
        alloc = man.get("allocation")
        if alloc is None:  # uniform: the same byte count, from the layers' grids
            from dllm_export.quant.load import weight_config
            from dllm_export.quant.mixed import allocation_record, linear_shapes

            shapes = linear_shapes(model)
            alloc = allocation_record({n: weight_config(man["layers"][n]["weight"]) for n in shapes}, shapes, None)
        cells.append({"label": label, **extra, "avg_bits": alloc["avg_bits"], "bytes": alloc["bytes"],
                      **_fid(res), "path": out})

    uniform = QUICK_UNIFORM if args.quick else UNIFORM
    for bits, g in uniform:
        cell(f"W{bits}g{g}", QuantizeConfig(method="gptq", scheme=f"W{bits}A16", group_size=g, calib=calib),
             {"kind": "uniform", "bits": bits, "group_size": g})
    for label, choices, budget, groups in (QUICK_MIXED if args.quick else MIXED):
        alloc = allocate_bits(scan, budget, choices, group_sizes=groups)
        label = label.format(b=budget)
        qcfg = QuantizeConfig(method="gptq", scheme="W4A16", group_size=32, layer_bits=alloc["layer_bits"],
                              avg_bits=budget, calib=calib)
        counts = {}
        for b in alloc["layer_bits"].values():
            counts[str(b)] = counts.get(str(b), 0) + 1
        cell(label, qcfg, {"kind": "mixed", "choices": list(choices), "group_choices": list(groups), "budget": budget,
                           "predicted_kld": alloc["predicted_kld"],
                           "layers_per_bits": dict(sorted(counts.items(), key=lambda kv: (len(kv[0]), kv[0])))})
    # a mixed recipe against the next uniform scheme up in size (the smallest one at least as large),
    # paired over the same canvases; and the smallest uniform scheme that is better than it
    uniforms = sorted((u for u in cells if u["kind"] == "uniform"), key=lambda u: u["bytes"])
    for c in cells:
        if c["kind"] != "mixed":
            continue
        up = next((u for u in uniforms if u["bytes"] >= c["bytes"]), None)
        c["next_uniform_up"] = None if up is None else up["label"]
        if up is not None:
            d = paired_difference(raw[c["label"]], raw[up["label"]])
            c["vs_next_uniform_up"] = {"kld_diff": d["diff"], "se": d["se"], "z": d["z"],
                                       "lower": d["diff"] < 0, "significant": d["significant"]}
        better = next((u for u in uniforms if u["kld_mean"] < c["kld_mean"]), None)
        c["smallest_better_uniform"] = None if better is None else {"label": better["label"],
                                                                    "avg_bits": better["avg_bits"]}
    exports = run_exports(name, cells, work, args)
    for c in cells:
        c.pop("path")  # no machine paths in the results
    return {"model": name, "scan_seconds": round(t_scan, 1), "seconds": round(time.perf_counter() - t0, 1),
            "scan_ranking_top5": scan["ranking"][:5], "cells": cells, "exports": exports}


def run_exports(name: str, cells: list[dict], work: Path, args) -> list[dict]:
    """Each chosen artifact against its own fake-quant model: KLD, top-1, max |logit diff|, file bytes."""
    from dllm_export import load_model, load_tokenizer
    from dllm_export.eval.fidelity import FidelityConfig, build_reference, compare
    from dllm_export.exporter.gguf import export_gguf
    from dllm_export.exporter.onnx import export_onnx
    from dllm_export.runtime.backends import load_backend

    tok = load_tokenizer(name)
    by = {c["label"]: c for c in cells}
    picks = [("onnx", lbl) for lbl in ("mix4.5-2348", "mix4.5-2348-g", "mix4.5-onnx", "W4g32", "W4g64", "mix3.5-2348",
                                       "mix3.5-2348-g", "mix3.5-onnx", "W3g32") if lbl in by]
    picks += [("gguf", lbl) for lbl in ("mix5.0-gguf", "W4g32", "W5g32") if lbl in by]
    fcfg = FidelityConfig(ratios=(0.15, 0.5, 0.85), windows=8, elbo=False)
    ids = torch.randint(0, 4000, (2, 96), generator=torch.Generator().manual_seed(0))
    out = []
    for target, lbl in picks:
        q = by[lbl]["path"]
        art = work / f"{name}-{lbl}-{target}"
        if art.exists():
            shutil.rmtree(art)
        try:
            (export_onnx if target == "onnx" else export_gguf)(q, art)
            fq = load_model(q)
            be = load_backend(art, threads=1)
            res = compare(be, build_reference(fq, tok, fcfg))
            diff = float((be.forward(ids).float() - fq(ids).float()).abs().max())
            files = [f for f in art.iterdir() if f.name.startswith("model.")]
            out.append({"target": target, "label": lbl, "kld_vs_fake_quant": res["summary"]["kld_mean"],
                        "top1_vs_fake_quant": res["summary"]["top1"], "max_abs_logit_diff": diff,
                        "model_file_bytes": sum(f.stat().st_size for f in files)})
        except Exception as e:  # noqa: BLE001  (recorded, the other artifacts still run)
            out.append({"target": target, "label": lbl, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(out[-1]), file=sys.stderr)
    return out


def to_markdown(res: dict) -> str:
    lines = ["# Mixed precision vs uniform (GPTQ, mask-aware calibration, groups of 32 unless named)", "",
             f"Host: {res['host']['cpu']} ({', '.join(res['host']['flags'])}), torch threads "
             f"{res['host']['torch_threads']}. Reproduce: `{res['command']}`", ""]
    for m in res["models"]:
        lines += [f"## {m['model']}", "", f"Most sensitive layers (2-bit scan): {', '.join(m['scan_ranking_top5'])}", "",
                  "| cell | kind | bits/weight | KLD mean +- se | KLD p99 | top-1 | layers per bits | vs next uniform up "
                  "in size: dKLD (z) | smallest uniform with lower KLD (bits/weight) |",
                  "|---|---|---:|---:|---:|---:|---|---|---|"]
        for c in sorted(m["cells"], key=lambda c: c["avg_bits"]):
            vs, sb = c.get("vs_next_uniform_up"), c.get("smallest_better_uniform")
            vs_s = "" if c["kind"] != "mixed" else ("none as large" if vs is None else
                                                    f"{c['next_uniform_up']}: {vs['kld_diff']:+.3g} (z {vs['z']:.1f})"
                                                    f"{' **lower**' if vs['lower'] and vs['significant'] else ''}")
            sb_s = "" if c["kind"] != "mixed" else ("none" if sb is None else f"{sb['label']} ({sb['avg_bits']:.3f})")
            lines.append(f"| {c['label']} | {c['kind']} | {c['avg_bits']:.3f} | {c['kld_mean']:.4g} +- "
                         f"{c['kld_se']:.2g} | {c['kld_p99']:.3g} | {c['top1']:.4f} | "
                         f"{c.get('layers_per_bits', '')} | {vs_s} | {sb_s} |")
        lines += ["", "| export | target | KLD vs its fake-quant | top-1 vs fake-quant | max abs logit diff | "
                      "model file bytes |", "|---|---|---:|---:|---:|---:|"]
        for e in m["exports"]:
            if "error" in e:
                lines.append(f"| {e['label']} | {e['target']} | error: {e['error']} | | | |")
            else:
                lines.append(f"| {e['label']} | {e['target']} | {e['kld_vs_fake_quant']:.3g} | "
                             f"{e['top1_vs_fake_quant']:.4f} | {e['max_abs_logit_diff']:.3g} | {e['model_file_bytes']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def study_parser(doc: str, out: str | None, windows: int = 16, calib_samples: int = 64) -> argparse.ArgumentParser:
    """The arguments every fidelity study over the bundled models shares: --models, --windows,
    --calib-samples, --workdir, --out (default `out`); a study adds its own."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--models", default="default,default-dream")
    p.add_argument("--windows", type=int, default=windows, help="fidelity windows per ratio set of every cell")
    p.add_argument("--calib-samples", type=int, default=calib_samples, help="calibration windows")
    p.add_argument("--workdir", help="keep the quantized checkpoints here (default: a temp folder)")
    p.add_argument("--out", default=out, help="results stem (.json and .md)")
    return p


def run_models(res: dict, args, prefix: str, run_model, to_markdown) -> None:
    """Run `run_model(name, work, args)` for each of `args.models` into res["models"], saving the JSON
    and markdown at `args.out` after each model; the work folder is `args.workdir` or a temp folder
    (removed after)."""
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.models.split(","):
            res["models"].append(run_model(name, work, args))
            Path(args.out + ".json").write_text(json.dumps(res, indent=2) + "\n")
            Path(args.out + ".md").write_text(to_markdown(res))
            print(f"{name} done", file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(to_markdown(res))


def main() -> int:
    p = study_parser(__doc__, "benchmarks/results/mixed_precision_default")
    p.add_argument("--scan-windows", type=int, default=8, help="fidelity windows per ratio of the scan")
    p.add_argument("--quick", action="store_true", help="fewer cells")
    args = p.parse_args()
    res = {"host": host(), "command": "OMP_NUM_THREADS=1 python benchmarks/mixed_precision.py"
                                      + (" --quick" if args.quick else "") + f" --models {args.models} --windows "
                                      f"{args.windows} --scan-windows {args.scan_windows} --calib-samples "
                                      f"{args.calib_samples}",
           "models": []}
    run_models(res, args, "mixed-", run_model, to_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
