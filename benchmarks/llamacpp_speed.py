"""llama.cpp's GGUF types against torch fp32 and bf16 on full denoising steps of the anchor shape
(the only step llama.cpp runs: its diffusion archs keep no KV cache), side by side in one process,
variants timed in turn so a busy host slows them alike. Records which CPU features the loaded
llama.cpp build uses (`llama_print_system_info`) and names the fastest variant.

    python benchmarks/llamacpp_speed.py                       # anchor: d 1536, 16 layers, vocab 8192
    python benchmarks/llamacpp_speed.py --layers 4 --reps 3   # fewer layers (time scales with them)
    LLAMA_CPP_LIB_PATH=/path/to/other/llama_cpp/lib python benchmarks/llamacpp_speed.py --label variants

Writes benchmarks/results/llamacpp_speed[_LABEL].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from torch_kernels import ANCHOR, host  # noqa: E402

QUANTS = ("F16", "Q8_0", "Q4_0", "Q4_K_M")


def artifacts(layers: int, work: Path, quants: tuple[str, ...]) -> tuple[Path, dict[str, Path]]:
    """The anchor-shaped random checkpoint (bf16 on disk) and one GGUF artifact per type (made once)."""
    from dllm_export.exporter import export
    from dllm_export.exporter.gguf import BLOCK_TYPES
    from dllm_export.models.factory import make_random_checkpoint

    src = work / f"ckpt-anchor-{layers}l"
    if not (src / "config.json").is_file():
        make_random_checkpoint(src, family="llada", dtype=torch.bfloat16, std=0.02, tokenizer=True,
                               max_shard_bytes=1 << 30, **{**ANCHOR, "n_layers": layers})
    out = {}
    for q in quants:
        dst = work / f"gguf-{layers}l-{q}"
        if not (dst / "model.gguf").is_file():
            export(src, dst, target="gguf", quant=q, method="rtn" if q in BLOCK_TYPES else None)  # F16 / Q4_K_M: no PTQ
        out[q] = dst
    return src, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=ANCHOR["n_layers"])
    ap.add_argument("--canvas", type=int, default=288, help="tokens of one full step (prompt 32 + gen 256)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quants", nargs="+", default=list(QUANTS))
    ap.add_argument("--work", default="benchmarks/results/tmp/llamacpp_speed")
    ap.add_argument("--label", help="suffix of the result files (e.g. the llama.cpp build)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import llama_cpp

    from dllm_export.runtime.backends import load_backend

    src, ggufs = artifacts(args.layers, Path(args.work), tuple(args.quants))
    backends = {"torch fp32": load_backend(src, dtype=torch.float32), "torch bf16": load_backend(src, dtype=torch.bfloat16)}
    backends.update({f"llama.cpp {q}": load_backend(p, threads=args.threads) for q, p in ggufs.items()})
    ids = torch.randint(0, ANCHOR["vocab_size"], (1, args.canvas), generator=torch.Generator().manual_seed(0))
    for be in backends.values():
        be.forward(ids)  # warm-up: allocations, llama.cpp's weight repacking
    times: dict[str, list[float]] = {k: [] for k in backends}
    for _ in range(args.reps):
        for k, be in backends.items():
            t0 = time.perf_counter()
            be.forward(ids)
            times[k].append(time.perf_counter() - t0)
    ms = {k: round(1e3 * statistics.median(v), 1) for k, v in times.items()}
    fastest = min(ms, key=ms.get)
    sizes = {k: round((p / "model.gguf").stat().st_size / 2**20, 1) for k, p in ggufs.items()}
    res = {"host": host(), "load_avg": os.getloadavg(), "layers": args.layers, "canvas": args.canvas,
           "reps": args.reps, "llama_cpp_lib": os.environ.get("LLAMA_CPP_LIB_PATH", "bundled with llama-cpp-python"),
           "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
           "full_step_ms": ms, "x_torch_fp32": {k: round(ms["torch fp32"] / v, 2) for k, v in ms.items()},
           "x_torch_bf16": {k: round(ms["torch bf16"] / v, 2) for k, v in ms.items()},
           "gguf_mib": sizes, "fastest": fastest}
    name = "llamacpp_speed" + (f"_{args.label}" if args.label else "")
    out = Path("benchmarks/results") / f"{name}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    lines = [f"Host: {res['host']['cpu']}, {args.threads} threads, flags {' '.join(res['host']['flags'])}; load "
             f"average {res['load_avg'][0]:.1f}. llama.cpp: {res['llama_cpp_system_info']}", "",
             f"Full step, {args.canvas} tokens, {args.layers} layers (median of {args.reps}, variants in turn):", "",
             "| variant | ms / step | x torch fp32 | x torch bf16 | GGUF MiB |", "|---|---:|---:|---:|---:|"]
    for k, v in ms.items():
        q = k.split(" ", 1)[1] if k.startswith("llama.cpp") else None
        lines.append(f"| {k} | {v} | {res['x_torch_fp32'][k]} | {res['x_torch_bf16'][k]} | {sizes.get(q, '')} |")
    lines += ["", f"Fastest: {fastest}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
