"""torch versus onnxruntime versus llama.cpp: per-step latency of the full-canvas forward, decoding
tokens/s and artifact sizes, measured side by side in one run: ONNX fp32 / W8A8 / W4A8 / W4A16
exports and GGUF F16 / Q8_0 / Q4_0 files of the same model.

A diffusion step runs the whole canvas (prompt + gen_length) through the model, so the
per-step latency at a canvas length L is the number that matters; tokens/s is gen_length
tokens over `steps` such forwards (one token committed per step, the reference schedule).
Weights are rounded with RTN (the graph, and so the speed, is the same for GPTQ / AWQ grids).

    python benchmarks/backend_speed.py                              # the bundled default model
    python benchmarks/backend_speed.py --shape 1b --canvas 256      # a ~1.3B random LLaDA shape (d 2048, 22 blocks, vocab 32000)
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

# name -> (target, scheme or GGUF type, export options); ONNX groups of 128 (64 / 32 where a width needs it)
VARIANTS = {
    "onnx-fp32": ("onnx", None, {}),
    "onnx-W8A8": ("onnx", "W8A8", {}),  # per-channel int8 weights x per-token uint8 activations, MatMulInteger
    "onnx-W4A8": ("onnx", "W4A8", {"group_size": 128}),  # MatMulNBits accuracy level 4 (int8 acts per block)
    "onnx-W4A16": ("onnx", "W4A16", {"group_size": 128}),  # MatMulNBits accuracy level 0 (fp32 activations)
    "onnx-W4A16-acc4": ("onnx", "W4A16", {"group_size": 128, "accuracy_level": 4}),
    "gguf-F16": ("gguf", "F16", {}),
    "gguf-Q8_0": ("gguf", "Q8_0", {}),  # RTN on the Q8_0 grid, written exactly
    "gguf-Q4_0": ("gguf", "Q4_0", {}),
}
SHAPES = {  # llada_config kwargs of the random checkpoints
    "1b": dict(d_model=2048, n_layers=22, n_heads=16, n_kv_heads=16, mlp_hidden_size=5632, vocab_size=32000,
               max_sequence_length=2048),
}


def timed(fn, reps: int) -> list[float]:
    fn()  # warm-up (first-call allocations, prepacking)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="checkpoint folder or 'default' (ignored with --shape)")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="benchmark a random checkpoint of this shape instead")
    ap.add_argument("--canvas", type=int, default=128, help="sequence length of one denoising step")
    ap.add_argument("--gen-length", type=int, default=32, help="tokens decoded for the tokens/s figure")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--workdir", default="benchmarks/results/tmp/backend_speed")
    ap.add_argument("--out", default=None, help="JSON results (default: benchmarks/results/backend_speed_<model>.json)")
    args = ap.parse_args(argv)

    from dllm_export import generate, load_model
    from dllm_export.exporter import export
    from dllm_export.exporter.gguf import BLOCK_TYPES
    from dllm_export.models.factory import make_random_checkpoint
    from dllm_export.runtime.llamacpp import LlamaCppBackend
    from dllm_export.runtime.ort import OrtBackend

    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    label = args.shape or Path(str(args.model)).name
    if args.shape:
        src = work / f"ckpt-{args.shape}"
        if not (src / "config.json").is_file():
            print(f"writing a random {args.shape} checkpoint ...", file=sys.stderr)
            make_random_checkpoint(src, family="llada", dtype=torch.bfloat16, std=0.02, tokenizer=True,
                                   max_shard_bytes=1 << 30, **SHAPES[args.shape])
    else:
        src = args.model

    g = torch.Generator().manual_seed(0)
    model = load_model(src)
    ids = torch.randint(0, min(model.config.dims.vocab_rows, 256), (1, args.canvas), generator=g)
    prompt = ids[:, : args.canvas - args.gen_length].tolist()
    results = {"model": label, "canvas": args.canvas, "gen_length": args.gen_length, "threads": args.threads,
               "reps": args.reps, "machine": {"cpu": platform.processor() or platform.machine(),
                                               "python": platform.python_version(), "torch": torch.__version__},
               "variants": {}}
    import onnxruntime

    results["machine"]["onnxruntime"] = onnxruntime.__version__

    def record(name: str, backend, size_bytes: int | None, extra: dict | None = None):
        step = timed(lambda: backend.forward(ids), args.reps)
        t0 = time.perf_counter()
        out = generate(backend, prompt, gen_length=args.gen_length, steps=args.gen_length,
                       block_length=args.gen_length)
        gen_s = time.perf_counter() - t0
        results["variants"][name] = {
            "step_ms_median": round(1000 * statistics.median(step), 2), "step_ms_min": round(1000 * min(step), 2),
            "tokens_per_s": round(args.gen_length / gen_s, 2), "nfe": out.nfe,
            "size_mib": None if size_bytes is None else round(size_bytes / 2**20, 2), **(extra or {})}
        print(f"{name:12s} step {results['variants'][name]['step_ms_median']:9.2f} ms   "
              f"{results['variants'][name]['tokens_per_s']:8.2f} tok/s   "
              f"{'' if size_bytes is None else f'{size_bytes / 2**20:9.2f} MiB'}", flush=True)

    from dllm_export.runtime.backends import TorchBackend

    torch_size = sum(p.numel() * 4 for p in model.parameters())
    dims = model.config.dims
    widths = [dims.d_model, dims.n_heads * dims.head_dim, dims.mlp_hidden]
    record("torch-fp32", TorchBackend(model), torch_size)
    del model
    for name in args.variants:
        target, scheme, opts = VARIANTS[name]
        art = work / f"{label}-{name}"
        if art.exists():
            shutil.rmtree(art)
        t0 = time.perf_counter()
        calib = {"calib": _quick_calib()}
        if target == "onnx":
            group = opts.get("group_size")
            if group:  # the largest of 128 / 64 / 32 that tiles every layer width (704 = 11 x 64)
                group = next(g for g in (group, 64, 32, 16) if all(w % g == 0 for w in widths))
            res = export(src, art, target="onnx", scheme=scheme, method="rtn" if scheme else None, group_size=group,
                         accuracy_level=opts.get("accuracy_level"), quantize_options=calib if scheme else None)
            be = OrtBackend(art, threads=args.threads)
            kernels = be.optimized_op_types()
            extra = {"kernels": {k: v for k, v in kernels.items()
                                 if k in ("MatMulNBits", "MatMulInteger", "MatMul", "DynamicQuantizeMatMul",
                                          "MatMulIntegerToFloat")},
                     "activations": sorted(set(res.manifest["layers"].values()))}
        else:
            res = export(src, art, target="gguf", quant=scheme, method="rtn" if scheme in BLOCK_TYPES else None,
                         quantize_options=calib)
            be = LlamaCppBackend(art, threads=args.threads, max_tokens=max(args.canvas, 64))
            extra = {"tensor_types": res.manifest["tensor_types"]}
        size = sum(f.stat().st_size for f in art.iterdir() if f.name.startswith("model."))
        record(name, be, size, {"export_s": round(time.perf_counter() - t0, 1), **extra})
        del be
        shutil.rmtree(art)
    if not args.shape:
        results["acc4_vs_acc0"] = accuracy_level_agreement(src, work, label)
    base = results["variants"]["torch-fp32"]["step_ms_median"]
    for v in results["variants"].values():
        v["speedup_vs_torch_fp32"] = round(base / v["step_ms_median"], 2)
    out = Path(args.out or f"benchmarks/results/backend_speed_{label}.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def accuracy_level_agreement(src, work: Path, label: str, n: int = 64) -> dict:
    """Greedy decoding of one W4A16 export at accuracy level 0 (fp32 activations) and 4 (int8 per
    block): how many generated tokens and whole answers agree, and the arithmetic exact match of each
    (onnxruntime issue 29849 reports near-tie argmax flips with level 4)."""
    from dllm_export import generate, load_tokenizer
    from dllm_export.corpus import arithmetic_test_problems, format_problem
    from dllm_export.exporter import export
    from dllm_export.runtime.ort import OrtBackend

    art = work / f"{label}-W4A16-acc"
    if art.exists():
        shutil.rmtree(art)
    export(src, art, target="onnx", bits=4, method="gptq", quantize_options={"calib": _quick_calib()})
    tok = load_tokenizer(art)
    probs = arithmetic_test_problems()[:: max(1, 1000 // n)][:n]
    prompts = [tok(f"{a}{op}{b}=", add_special_tokens=False)["input_ids"] for a, op, b in probs]
    outs = {}
    for level in (0, 4):
        be = OrtBackend(art, threads=2, accuracy_level=level)
        outs[level] = generate(be, prompts, gen_length=4, steps=4, block_length=4).generated
    same_tok = (outs[0] == outs[4]).float().mean().item()
    same_row = (outs[0] == outs[4]).all(-1).float().mean().item()

    def em(gen):
        ok = 0
        for (a, op, b), row in zip(probs, gen.tolist()):
            text = tok.decode(row)
            ans = text[: next((i for i, c in enumerate(text) if not c.isdigit()), len(text))]
            ok += ans == format_problem(a, op, b).split("=")[1]
        return ok / len(probs)

    shutil.rmtree(art)
    res = {"prompts": len(prompts), "same_tokens": round(same_tok, 4), "same_answers": round(same_row, 4),
           "arith_em_acc0": em(outs[0]), "arith_em_acc4": em(outs[4])}
    print(f"W4A16 gptq, accuracy level 4 vs 0: {res}", flush=True)
    return res


def _quick_calib():
    from dllm_export.quant import CalibConfig

    return CalibConfig(n_samples=4, seq_len=64)  # RTN needs no statistics; keep the pass short


if __name__ == "__main__":
    sys.exit(main())
