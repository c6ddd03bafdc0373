"""Our K-quant PTQ (RTN and GPTQ on the Q{b}_K grids) against llama.cpp's own K-quant quantizer.

The same GGML types, two rounding algorithms: llama.cpp's `llama_model_quantize` (its search over
group scales and minimums, `pure`: every tensor of the type, no importance matrix) on an F16 file
of the bundled model, read back with gguf.quants; ours from `quantize(..., kquant=...)` with
mask-aware calibration. Only the block linears are compared (the embedding and head stay float in
both) on the same fidelity canvases, paired over windows.

    OMP_NUM_THREADS=1 python benchmarks/kquant_vs_llamacpp.py          # bundled LLaDA (rows of 256)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mixed_precision import host  # noqa: E402

# type -> llama_ftype of the recipe whose `pure` form is that type everywhere
FTYPES = {"Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18}


def llamacpp_weights(model, ftype: int, work: Path) -> dict[str, torch.Tensor]:
    """The block linears as llama.cpp's quantizer rounds them (dequantized, in HF row order)."""
    import gguf
    import llama_cpp

    from dllm_export.exporter.gguf import _ROLE_NAMES, GgufExportConfig, _permute_rope_rows, export_gguf

    f16 = work / f"f16-{model.spec.family}"
    if not (f16 / "model.gguf").is_file():
        export_gguf("default" if model.spec.family == "llada" else "default-dream", f16, GgufExportConfig(quant="F16"))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure = ftype, True
    out = work / f"q{ftype}.gguf"
    assert llama_cpp.llama_model_quantize(str(f16 / "model.gguf").encode(), str(out).encode(), params) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    spec, dims = model.spec, model.config.dims
    weights = {}
    for i in range(dims.n_layers):
        for role, hf in spec.linears.items():
            t = tensors[f"blk.{i}.{_ROLE_NAMES[role]}.weight"]
            w = gguf.quants.dequantize(t.data, t.tensor_type)
            heads = {"q": dims.n_heads, "k": dims.n_kv_heads}.get(role) if spec.gguf_rope_permute else None
            if heads:
                w = w[_permute_rope_rows(np.arange(w.shape[0]), heads).argsort()]
            weights[f"{spec.blocks}.{i}.{hf}"] = (torch.from_numpy(np.ascontiguousarray(w)), t.tensor_type.name)
    return weights


def run(name: str, types: list[str], args, work: Path) -> dict:
    from dllm_export import load_model, load_tokenizer
    from dllm_export.eval.fidelity import FidelityConfig, build_reference, compare, paired_difference
    from dllm_export.quant import CalibConfig, QuantizeConfig, quantize

    model, tok = load_model(name), load_tokenizer(name)
    ref = build_reference(model, tok, FidelityConfig(windows=args.windows))
    rows = []
    for qt in types:
        raw = {}
        theirs = llamacpp_weights(model, FTYPES[qt], work)
        m = load_model(name)
        for n, (w, _) in theirs.items():
            m.get_submodule(n).weight.data.copy_(w.to(m.get_submodule(n).weight.dtype))
        raw["llama.cpp"] = compare(m, ref)
        kinds = sorted({k for _, k in theirs.values()})
        for method in ("rtn", "gptq"):
            q = quantize(name, work / f"{name}-{qt}-{method}", QuantizeConfig(
                method=method, scheme="W4A16", kquant=qt, calib=CalibConfig(n_samples=args.calib_samples)),
                progress=False)
            raw[method] = compare(load_model(q), ref)
        for who, res in raw.items():
            s = res["summary"]
            d = None if who == "llama.cpp" else paired_difference(res, raw["llama.cpp"])
            rows.append({"type": qt, "quantizer": who, "tensor_types": kinds if who == "llama.cpp" else None,
                         "kld_mean": s["kld_mean"], "kld_se": s["kld_se"], "top1": s["top1"],
                         "vs_llamacpp": d and {"kld_diff": d["diff"], "z": d["z"], "significant": d["significant"]}})
            print(json.dumps(rows[-1]), file=sys.stderr)
    return {"model": name, "rows": rows}


def to_markdown(res: dict) -> str:
    lines = ["# K-quants: our PTQ against llama.cpp's quantizer (block linears; embedding and head float)", "",
             f"Host: {res['host']['cpu']}, torch threads {res['host']['torch_threads']}. Reproduce: `{res['command']}`",
             ""]
    for m in res["models"]:
        lines += [f"## {m['model']}", "", "| type | quantizer | KLD mean +- se | top-1 | vs llama.cpp's: dKLD (z) |",
                  "|---|---|---:|---:|---|"]
        for r in m["rows"]:
            v = r["vs_llamacpp"]
            vs = "" if v is None else f"{v['kld_diff']:+.3g} (z {v['z']:.1f}){' **lower**' if v['kld_diff'] < 0 and v['significant'] else ''}"
            who = r["quantizer"] if r["quantizer"] == "llama.cpp" else f"ours, {r['quantizer'].upper()}"
            lines.append(f"| {r['type']} | {who} | {r['kld_mean']:.4g} +- {r['kld_se']:.2g} | {r['top1']:.4f} | {vs} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="default")
    p.add_argument("--types", default="Q3_K,Q4_K,Q5_K,Q6_K")
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--out", default="benchmarks/results/kquant_vs_llamacpp_default")
    args = p.parse_args()
    t0 = time.perf_counter()
    res = {"host": host(), "command": f"OMP_NUM_THREADS=1 python benchmarks/kquant_vs_llamacpp.py --models {args.models} "
                                      f"--types {args.types} --windows {args.windows} --calib-samples {args.calib_samples}",
           "models": []}
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            res["models"].append(run(name, args.types.split(","), args, Path(d)))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out + ".json").write_text(json.dumps(res, indent=2) + "\n")
    Path(args.out + ".md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
