"""PTQ quality on the bundled models: ELBO bits/token on held-out stdlib code and arithmetic
exact match, per method x scheme, with mask-aware against plain-text calibration.

Every cell quantizes the model with `dllm_export.quant.quantize` (cached under --workdir), then
scores it with the same seeded estimator as the fp baseline (paired masks, so differences between
cells are far less noisy than each number's own standard error).

    python benchmarks/ptq_default.py                          # both bundled models, the full grid
    python benchmarks/ptq_default.py --models default --grid quick   # a few cells
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

GRID = [("rtn", "W8A16"), ("gptq", "W8A16"), ("awq", "W8A16"),
        ("rtn", "W4A16"), ("gptq", "W4A16"), ("awq", "W4A16"),
        ("rtn", "W3A16"), ("gptq", "W3A16"), ("awq", "W3A16"),
        ("smoothquant", "W8A8"), ("quarot", "W8A8"), ("duquant", "W8A8"),
        ("smoothquant", "W4A8"), ("quarot", "W4A8"), ("duquant", "W4A8"),
        ("smoothquant", "W4A4"), ("quarot", "W4A4"), ("duquant", "W4A4")]
LEAN = [("rtn", "W4A16"), ("gptq", "W4A16"), ("awq", "W4A16"),
        ("rtn", "W3A16"), ("gptq", "W3A16"), ("awq", "W3A16"),
        ("smoothquant", "W8A8"), ("quarot", "W8A8"), ("duquant", "W8A8"),
        ("smoothquant", "W4A4"), ("quarot", "W4A4"), ("duquant", "W4A4")]
QUICK = [("rtn", "W4A16"), ("gptq", "W4A16"), ("gptq", "W3A16"), ("smoothquant", "W4A4"), ("quarot", "W4A4")]
# cells also run with plain-text calibration (the comparison)
PLAIN_CALIB = {"W4A4", "W3A16"}


def arithmetic_em(model, tok, n: int = 200) -> float:
    """Exact match on the first n held-out 2-digit +/- problems (greedy, 4 tokens, one block)."""
    from dllm_export import generate
    from dllm_export.corpus import arithmetic_test_problems, format_problem

    probs = arithmetic_test_problems()[:n]
    prompts = [tok(f"{a}{op}{b}=", add_special_tokens=False)["input_ids"] for a, op, b in probs]
    out = generate(model, prompts, gen_length=4, steps=4, block_length=4)
    ok = 0
    for (a, op, b), row in zip(probs, out.generated.tolist()):
        text = tok.decode(row)
        ans = ""
        for c in text:
            if not c.isdigit():
                break
            ans += c
        ok += ans == format_problem(a, op, b).split("=")[1]
    return ok / len(probs)


def score(model, tok, texts, args) -> dict:
    from dllm_export.eval.likelihood import text_bits_per_token

    t0 = time.perf_counter()
    r = text_bits_per_token(model, tok, texts, window=args.window, max_windows=args.windows, mc=args.mc,
                            batch=args.mc_batch, seed=0)
    return {"bits_per_token": r["bits_per_token"], "stderr_bits": r["stderr_bits"],
            "arith_em": arithmetic_em(model, tok, args.arith), "eval_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="default,default-dream")
    ap.add_argument("--grid", choices=["full", "lean", "quick"], default="full",
                    help="full: every method at W8/W4/W3 (weight-only) and W8A8/W4A8/W4A4; lean: W4/W3 and "
                         "W8A8/W4A4; quick: five cells")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--mc", type=int, default=32)
    ap.add_argument("--mc-batch", type=int, default=16)
    ap.add_argument("--group-size", type=int, default=64,
                    help="weight-only group size (the bundled models' FFN width 704 is not a multiple of 128)")
    ap.add_argument("--arith", type=int, default=200)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--workdir", default="runs/ptq")
    ap.add_argument("--out", default="benchmarks/results/ptq_default")
    args = ap.parse_args(argv)

    import dllm_export as D
    from dllm_export.corpus import code_texts
    from dllm_export.quant import CalibConfig, QuantizeConfig, quantize

    torch.manual_seed(0)
    texts = [t for _, t in code_texts(held_out=True)]
    rows = []
    for name in args.models.split(","):
        model, tok = D.load_model(name), D.load_tokenizer(name)
        base = score(model, tok, texts, args)
        rows.append({"model": name, "method": "fp", "scheme": "bf16", "calib": "-", **base})
        print(json.dumps(rows[-1]), flush=True)
        cells = [(m, s, "uniform") for m, s in {"full": GRID, "lean": LEAN, "quick": QUICK}[args.grid]]
        cells += [(m, s, "none") for m, s, _ in list(cells) if s in PLAIN_CALIB]
        for method, scheme, mask in cells:
            out = Path(args.workdir) / f"{name}-{method}-{scheme}-{mask}"
            if not (out / "manifest.json").is_file():
                gs = args.group_size if scheme.endswith("A16") else None
                qcfg = QuantizeConfig(method=method, scheme=scheme, weight_method="gptq", group_size=gs,
                                      calib=CalibConfig(n_samples=args.calib_samples, seq_len=128, mask=mask))
                quantize(name, out, qcfg, progress=False)
            manifest = json.loads((out / "manifest.json").read_text())
            r = score(D.load_model(out), tok, texts, args)
            rows.append({"model": name, "method": method, "scheme": scheme, "calib": mask,
                         "quantize_s": manifest["seconds"], **r,
                         "delta_bits": r["bits_per_token"] - base["bits_per_token"],
                         "delta_arith": r["arith_em"] - base["arith_em"]})
            print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    cmd = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    lines = [f"Command: `python benchmarks/ptq_default.py {cmd}`",
             "", f"Weight-only schemes use groups of {args.group_size}; weight-activation schemes per-channel weights.",
             "", f"ELBO bits/token on held-out stdlib modules ({args.windows} windows of {args.window} tokens, "
             f"LLaDA MC estimator, mc={args.mc}, seed 0, paired masks) and 2-digit +/- exact match ({args.arith} problems).",
             "", "| model | method | scheme | calibration | bits/token | delta | arith EM | delta |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['scheme']} | {r['calib']} | {r['bits_per_token']:.3f} | "
                     f"{r.get('delta_bits', 0):+.3f} | {r['arith_em']:.3f} | {r.get('delta_arith', 0):+.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
