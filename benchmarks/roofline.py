"""Roofline: every artifact's step time against its floor on this host, side by side in one run.

Measures the host (memory read bandwidth, fp32 / bf16 / int8 GEMM rates, ISA flags), builds the
artifacts of one checkpoint (torch fp32 / bf16, ONNX fp32 / W8A8 / W4, GGUF Q4_0), times each
step kind (full forward; prefix and dual block steps with a KV cache) and divides it by its floor =
max(bytes read / bandwidth, linear FLOPs / its kernel's peak + attention FLOPs / fp32's peak
(bf16's in torch bf16)). With `--e2e` it also decodes the fixed-schedule job end to end (steps =
gen_length / 4: random weights never reach a threshold) for the x-torch-fp32 table, beside the same
job at its steps' floors; `--refresh-blocks N` adds the dual cache that starts only every N-th block
with the full forward (the others renew it from the block before: the `renew` step kind).
JSON + markdown + PNG under benchmarks/results/.

    python benchmarks/roofline.py --quick                    # ~2 min: 2 layers of the anchor shape
    python benchmarks/roofline.py --shape anchor --e2e       # the 478M LLaDA shape, end to end
    python benchmarks/roofline.py --shape anchor --e2e --refresh-blocks 8 --artifacts torch-fp32 onnx-W8A8
    python benchmarks/roofline.py --model default --e2e      # the bundled LLaDA
    python benchmarks/roofline.py --shape 8b --layers 1      # one 8B block + its head (layer level)
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, save_results  # noqa: E402  (same folder; cpu_model stays importable from here)

SHAPES = {  # llada_config kwargs of the random checkpoints
    "anchor": dict(d_model=1536, n_layers=16, n_heads=12, n_kv_heads=12, mlp_hidden_size=4096, vocab_size=8192,
                   max_sequence_length=4096),
    "1b": dict(d_model=2048, n_layers=22, n_heads=16, n_kv_heads=16, mlp_hidden_size=5632, vocab_size=32000,
               max_sequence_length=2048),
    "8b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288, vocab_size=126464,
               max_sequence_length=4096),
}
# name -> (target, export options); "torch-*" are the checkpoint itself at that dtype
ARTIFACTS = {
    "torch-fp32": ("torch", {"dtype": "float32"}),
    "torch-bf16": ("torch", {"dtype": "bfloat16"}),
    "onnx-fp32": ("onnx", {}),
    "onnx-W8A8": ("onnx", {"scheme": "W8A8"}),
    "onnx-W4A8": ("onnx", {"scheme": "W4A8", "group_size": 128}),
    "onnx-W4A16": ("onnx", {"scheme": "W4A16", "group_size": 128}),
    # the edge profile of this host class: int8 embedding and head (accuracy level 4)
    "onnx-W8A8-edge": ("onnx", {"scheme": "W8A8", "device": "x86-avx512-vnni"}),
    # groups of 128 with fp16 scales: MatMulNBits accuracy level 4 (the profile's default is progressive)
    "onnx-W4A8-edge": ("onnx", {"scheme": "W4A8", "group_size": 128, "device": "x86-avx512-vnni",
                                "quantize_options": {"progressive": False}}),
    # per-channel 4-bit codes stored as int4, widened at load for the u8 x s8 kernel
    "onnx-W4A8pc-edge": ("onnx", {"scheme": "W4A8", "group_size": 0, "device": "x86-avx512-vnni"}),
    # groups of 128 with progressive (integer) group scales, the profile's default: int4 codes in the
    # file, the u8 x s8 kernel
    "onnx-W4A8p-edge": ("onnx", {"scheme": "W4A8", "group_size": 128, "device": "x86-avx512-vnni"}),
    "gguf-Q4_0": ("gguf", {"quant": "Q4_0"}),
}
DEFAULT = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-W8A8", "onnx-W8A8-edge", "onnx-W4A8", "onnx-W4A8-edge",
           "onnx-W4A8pc-edge", "onnx-W4A8p-edge", "gguf-Q4_0")
QUICK = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-W8A8-edge", "onnx-W4A8-edge", "onnx-W4A8pc-edge",
         "onnx-W4A8p-edge")


def _timed(fn, reps: int) -> tuple[float, float]:
    """(median, best) seconds of `reps` calls after a warm-up."""
    fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out), min(out)


def step_kinds(prompt: int, gen: int, block: int, narrow: tuple[int, ...] = ()) -> dict[str, dict]:
    """The forwards of the loop: a full canvas; the prefix cache's window (a middle block to the end);
    the dual cache's window (the block); `renew`, a block start under `refresh_blocks` (the block
    before and the block, its keys/values written into the cache); `dualN`, a window of N rows of
    the block (what a step would recompute if it skipped the rows committed before it: how a block
    step's time falls with its rows). The head runs on the block's rows (`head`, the loop's `rows`,
    within the window)."""
    L = prompt + gen
    mid = prompt + (gen // block // 2) * block
    return {"full": {"window": None, "rows": L, "head": (L - block, L)},
            "prefix": {"window": (mid, L), "rows": L - mid, "head": (0, block)},
            "dual": {"window": (mid, mid + block), "rows": block, "head": (0, block)},
            "renew": {"window": (mid - block, mid + block), "rows": 2 * block, "head": (block, 2 * block),
                      "update": True},
            **{f"dual{n}": {"window": (mid, mid + n), "rows": n, "head": (0, n)} for n in narrow if 0 < n < block}}


def time_steps(be, kinds: dict, L: int, block: int, reps: int) -> dict[str, tuple[float, float]]:
    """(median, best) seconds of each step kind the backend supports."""
    from dllm_export.models.layers import KVCache

    ids = torch.randint(0, min(be.vocab_size, 256), (1, L), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, k in kinds.items():
        kw = {"rows": k["head"]} if getattr(be, "supports_rows", False) else {}
        if k["window"] is None:
            out[name] = _timed(lambda: be.forward(ids, **kw), reps)
            continue
        if not getattr(be, "supports_cache", False):
            continue
        kv = KVCache()
        be.forward(ids, cache=kv)  # fills the cache
        s, e = k["window"]
        kv.window, kv.update = (s, e), k.get("update", False)  # renewing the same tokens keeps the cache
        win = ids[:, s:e]
        out[name] = _timed(lambda: be.forward(win, cache=kv, **kw), reps)
    return out


def build(name: str, src: Path, work: Path, threads: int):
    """(backend, artifact path or None, precision) of one entry of ARTIFACTS."""
    from dllm_export import load_model
    from dllm_export.exporter import export
    from dllm_export.quant import CalibConfig
    from dllm_export.runtime.backends import TorchBackend, load_backend
    from dllm_export.runtime.roofline import artifact_precision

    target, opts = ARTIFACTS[name]
    if target == "torch":
        return TorchBackend(load_model(src, dtype=opts["dtype"])), None, artifact_precision(src, opts["dtype"])
    art = work / name
    if art.exists():
        shutil.rmtree(art)
    opts = dict(opts)
    # RTN needs no statistics: keep the calibration short
    qopts = {"calib": CalibConfig(n_samples=4, seq_len=64), **opts.pop("quantize_options", {})}
    quantized = "scheme" in opts or "quant" in opts
    export(src, art, target=target, method="rtn" if quantized else None, quantize_options=qopts if quantized else None,
           **opts)
    path = art / "model.gguf" if target == "gguf" else art
    kw = {"max_tokens": 512} if target == "gguf" else {}
    return load_backend(path, threads=threads, **kw), art, artifact_precision(path)


def e2e(be, prompt_len: int, gen: int, block: int, steps: int, cache: str, refresh_blocks: int | None = None) -> dict:
    """One fixed-schedule decode: seconds, NFE, tokens/s."""
    from dllm_export import generate

    prompt = torch.randint(0, min(be.vocab_size, 256), (1, prompt_len), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    out = generate(be, prompt.tolist(), gen_length=gen, steps=steps, block_length=block, cache=cache,
                   refresh_blocks=refresh_blocks)
    s = time.perf_counter() - t0
    return {"seconds": round(s, 3), "nfe": out.nfe, "tokens_per_s": round(gen / s, 2),
            "s_per_step": round(s / out.nfe, 4)}


def _cache_label(cache: str, refresh_blocks: int | None) -> str:
    """How a decode's cache reads in the output: "dual", or "dual, refresh_blocks 8"."""
    return cache if not refresh_blocks else f"{cache}, refresh_blocks {refresh_blocks}"


def _e2e_floor(r: dict, steps: dict, blocks: int, base_s: float | None) -> dict:
    """The job at its steps' floors: a full forward per step without a cache; with the dual cache
    one per block (it fills the cache; with `refresh_blocks` N, one per N blocks and a renewing
    window at the other block starts) and block steps for the rest."""
    full, dual, renew = steps.get("full"), steps.get("dual"), steps.get("renew")
    every = r.get("refresh_blocks") or 1
    if full is None or (r["cache"] == "dual" and dual is None) or r["cache"] not in ("none", "dual") or \
            (every > 1 and renew is None):
        return {}
    n_full = r["nfe"] if r["cache"] == "none" else -(-blocks // every)
    n_renew = 0 if r["cache"] == "none" else blocks - n_full
    s = (n_full * full["floor_ms"] + n_renew * (renew["floor_ms"] if renew else 0)
         + (r["nfe"] - n_full - n_renew) * (dual["floor_ms"] if dual else 0)) / 1000
    return {"floor_s": round(s, 3), "x_torch_fp32_at_floor": round(base_s / s, 2) if base_s else None}


def _nbits_node(K: int, N: int, bits: int, bs: int, acc: int):
    """A MatMulNBits node with random symmetric codes (zero point default) and its initializers."""
    import numpy as np
    import onnx

    rng = np.random.default_rng(0)
    G = K // bs
    codes = rng.integers(0, 1 << bits, (N, G, bs), dtype=np.uint8)
    per = 8 // bits
    packed = np.zeros((N, G, bs // per), np.uint8)
    for i in range(per):
        packed |= codes[..., i::per] << (bits * i)
    inits = [onnx.numpy_helper.from_array(packed, "b"),
             onnx.numpy_helper.from_array((rng.random((N, G), dtype=np.float32) * 0.01 + 1e-3), "s")]
    node = onnx.helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                                 block_size=bs, accuracy_level=acc)
    return node, inits


def kernel_rates(M_list: list[int], K: int, N: int, threads: int, reps: int) -> dict:
    """ms of one [M, K] x [K, N] GEMM per onnxruntime kernel the exporter can emit (and torch's), at
    each M (best of `reps`): the data the device profiles' kernel choices (block size, accuracy
    level) rest on."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    h, TP = onnx.helper, onnx.TensorProto
    rng = np.random.default_rng(0)
    w = rng.standard_normal((K, N), dtype=np.float32) * 0.02
    cases = {"MatMul-fp32": ([h.make_node("MatMul", ["a", "w"], ["y"])], [onnx.numpy_helper.from_array(w, "w")]),
             "DynamicQuantizeMatMul-s8": (
                 [h.make_node("DynamicQuantizeMatMul", ["a", "wq", "ws", "", ""], ["y"], domain="com.microsoft")],
                 [onnx.numpy_helper.from_array(rng.integers(-127, 128, (K, N), dtype=np.int8), "wq"),
                  onnx.numpy_helper.from_array(np.full(N, 1e-3, np.float32), "ws")])}
    for bits, bs, acc in ((4, 32, 0), (4, 32, 4), (4, 64, 4), (4, 128, 0), (4, 128, 4), (8, 128, 4), (8, 32, 4)):
        node, inits = _nbits_node(K, N, bits, bs, acc)
        cases[f"MatMulNBits-b{bits}-bs{bs}-acc{acc}"] = ([node], inits)
    cases["W4A8-progressive-g128"] = _progressive_nodes(w, 128)
    out: dict[str, dict] = {}
    for name, (nodes, inits) in cases.items():
        graph = h.make_graph(nodes, name, [h.make_tensor_value_info("a", TP.FLOAT, ["M", K])],
                             [h.make_tensor_value_info("y", TP.FLOAT, ["M", N])], initializer=inits)
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        out[name] = {}
        for M in M_list:
            a = rng.standard_normal((M, K), dtype=np.float32)
            out[name][str(M)] = round(1000 * _timed(lambda: sess.run(None, {"a": a}), reps)[1], 3)
    for name, dtype in (("torch-fp32", torch.float32), ("torch-bf16", torch.bfloat16)):
        wt = torch.from_numpy(w).to(dtype)
        out[name] = {}
        for M in M_list:
            a = torch.randn(M, K).to(dtype)
            out[name][str(M)] = round(1000 * _timed(lambda: a @ wt, reps)[1], 3)
    return out


def _progressive_nodes(w, group: int) -> tuple[list, list]:
    """The exporter's own nodes for one W4A8 layer with progressive groups (`w` [K, N]): per-token
    codes by QuantizeLinear, the int8 weight rebuilt from int4 codes x group integers (folded at
    load), MatMulIntegerToFloat, the token scale."""
    import tempfile

    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    from dllm_export.exporter.onnx import DATA_FILE, OnnxExportConfig, _Builder, _Graph
    from dllm_export.quant.primitives import ActQuantConfig, WeightQuantConfig, quantize_weight

    cfg = WeightQuantConfig(4, group, True, scale_dtype=torch.float32, progressive=True)
    qw = quantize_weight(torch.from_numpy(w).T.contiguous(), cfg)
    with tempfile.TemporaryDirectory() as tmp:
        g = _Graph(Path(tmp) / DATA_FILE)
        y = _Builder(g, OnnxExportConfig()).integer_matmul("a", qw, ActQuantConfig(8), "layer")
        g.close()
        for t in g.initializers:  # inline the streamed weights: the table builds its sessions from bytes
            if t.data_location == onnx.TensorProto.EXTERNAL:
                load_external_data_for_tensor(t, tmp)
                t.data_location = onnx.TensorProto.DEFAULT
                del t.external_data[:]
        return [*g.nodes, onnx.helper.make_node("Identity", [y], ["y"])], list(g.initializers)


def to_markdown(res: dict) -> str:
    """Host limits, then one row per artifact x step kind, then the end-to-end table."""
    h = res["host"]
    lines = [f"# Roofline: {res['model']} ({res['layers']} layers), {res['threads']} threads", "",
             f"Load average at start / end: {res['machine']['load_avg_start'][0]:.1f} / "
             f"{res['machine'].get('load_avg_end', [0])[0]:.1f} (other processes share the cores)", "",
             f"Host: {res['machine']['cpu_model']}; flags {' '.join(h['flags'])}; read bandwidth "
             f"{h['bandwidth_gbs']} GB/s; GEMM {h['gemm_shape']} TFLOP/s: "
             + ", ".join(f"{k} {v}" for k, v in h["gemm_tflops"].items()), "",
             f"Step ms: best of {res['reps']} (median beside it); x floor = best / floor.", "",
             "| artifact | step | rows | ms | median ms | floor ms | bound | x floor | MB read | GFLOP | of which attention |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for name, a in res["artifacts"].items():
        for kind, s in a["steps"].items():
            lines.append(f"| {name} | {kind} | {s['rows']} | {s['ms']} | {s['ms_median']} | {s['floor_ms']} | {s['bound']} | "
                         f"{s['x_floor']} | {s['mb_read']} | {s['gflop']} | {s['attention_gflop']} "
                         f"({a['precision']['attention']}) |")
    if res.get("kernels"):
        kn = res["kernels"]
        ms = list(next(iter(kn["ms"].values())))
        lines += ["", f"One GEMM [M, {kn['K']}] x [{kn['K']}, {kn['N']}], ms (best of {res['reps']}):", "",
                  "| kernel | " + " | ".join(f"M={m}" for m in ms) + " |", "|---|" + "---:|" * len(ms)]
        lines += [f"| {k} | " + " | ".join(str(v[m]) for m in ms) + " |" for k, v in kn["ms"].items()]
    if res.get("e2e"):
        lines += ["", f"End to end: prompt {res['prompt']}, gen {res['e2e_gen_length']}, block {res['block_length']}, "
                  f"{res['steps']} steps (fixed schedule)", "",
                  "| artifact | cache | s | s/step | tok/s | x torch fp32 | s at the floors | x torch fp32 at the floors |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for key, r in res["e2e"].items():
            lines.append(f"| {r['artifact']} | {_cache_label(r['cache'], r.get('refresh_blocks'))} | {r['seconds']} | {r['s_per_step']} | "
                         f"{r['tokens_per_s']} | {r.get('x_torch_fp32', '')} | {r.get('floor_s', '')} | "
                         f"{r.get('x_torch_fp32_at_floor', '')} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> bool:
    """Step time and floor per artifact x step kind (log scale); False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels, ms, floor = [], [], []
    for name, a in res["artifacts"].items():
        for kind, s in a["steps"].items():
            labels.append(f"{name}\n{kind}")
            ms.append(s["ms"])
            floor.append(s["floor_ms"])
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(labels)), 4.5))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], ms, 0.4, label="measured")
    ax.bar([i + 0.2 for i in x], floor, 0.4, label="floor")
    ax.set_yscale("log")
    ax.set_ylabel("ms per step")
    ax.set_xticks(list(x), labels, rotation=90, fontsize=7)
    ax.set_title(f"{res['model']}: step time vs floor ({res['threads']} threads)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), help="a random LLaDA checkpoint of this shape")
    ap.add_argument("--model", default="default", help="checkpoint folder or a bundled model (without --shape)")
    ap.add_argument("--layers", type=int, help="build only this many blocks (layer-level figures of a big shape)")
    ap.add_argument("--artifacts", nargs="+", choices=list(ARTIFACTS), help=f"default: {' '.join(DEFAULT)} "
                    f"(--quick: {' '.join(QUICK)})")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64, help="decoding steps of the end-to-end job")
    ap.add_argument("--e2e-gen-length", type=int, help="gen length of the end-to-end job (default: --gen-length; "
                    "a shorter job keeps the torch fp32 reference loop affordable on a loaded host)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--e2e", action="store_true", help="also decode end to end (full and dual cache)")
    ap.add_argument("--refresh-blocks", type=int, nargs="*", default=[], metavar="N",
                    help="with --e2e: also the dual cache with refresh_blocks N (a full forward every N blocks)")
    ap.add_argument("--window-rows", type=int, nargs="*", default=[], metavar="N",
                    help="also time block steps of N rows of the block (e.g. 24 16 8 4)")
    ap.add_argument("--quick", action="store_true", help="2 layers of the anchor shape, a subset, 2 reps")
    ap.add_argument("--no-kernels", action="store_true", help="skip the single-GEMM kernel table")
    ap.add_argument("--workdir", default="benchmarks/results/tmp/roofline")
    ap.add_argument("--out", help="output stem (default: benchmarks/results/roofline_<model>)")
    args = ap.parse_args(argv)

    from dllm_export.models.factory import make_random_checkpoint
    from dllm_export.models.loader import read_spec, resolve_model_path
    from dllm_export.runtime.roofline import HostLimits, StepCost, floor_s, measure_host, step_cost

    if args.quick:
        args.shape, args.layers = args.shape or "anchor", args.layers or 2
        args.artifacts, args.reps = args.artifacts or list(QUICK), min(args.reps, 3)
    torch.set_num_threads(args.threads)
    host = measure_host(args.threads, quick=args.quick)
    print(f"host: {host}", flush=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.shape:
        shape = dict(SHAPES[args.shape])
        if args.layers:
            shape["n_layers"] = args.layers
        label = args.shape + (f"-{args.layers}l" if args.layers else "")
        src = work / f"ckpt-{label}"
        if not (src / "config.json").is_file():
            print(f"writing a random {label} checkpoint ...", flush=True)
            make_random_checkpoint(src, family="llada", dtype=torch.bfloat16, std=0.02, tokenizer=True,
                                   max_shard_bytes=1 << 30, **shape)
    else:
        src, label = resolve_model_path(args.model), Path(str(args.model)).name
    _, _, dims = read_spec(src)
    L = args.prompt + args.gen_length
    kinds = step_kinds(args.prompt, args.gen_length, args.block_length, tuple(args.window_rows))
    res = {"model": label, "layers": dims.n_layers, "threads": args.threads, "prompt": args.prompt,
           "gen_length": args.gen_length, "block_length": args.block_length, "steps": args.steps,
           "e2e_gen_length": args.e2e_gen_length or args.gen_length,
           "reps": args.reps, "host": host.to_dict(),
           "machine": {"cpu_model": cpu_model(), "torch": torch.__version__, "load_avg_start": os.getloadavg()},
           "artifacts": {}, "e2e": {}}
    if not args.no_kernels:  # the up-projection's GEMM at block and canvas rows
        res["kernels"] = {"K": dims.d_model, "N": dims.mlp_hidden,
                          "ms": kernel_rates([args.block_length, L], dims.d_model, dims.mlp_hidden, args.threads,
                                             args.reps)}
        for k, v in res["kernels"]["ms"].items():
            print(f"kernel {k:28s} " + "  ".join(f"M={m}: {t} ms" for m, t in v.items()), flush=True)
    for name in args.artifacts or list(DEFAULT):
        t0 = time.perf_counter()
        be, art, prec = build(name, src, work, args.threads)
        build_s = time.perf_counter() - t0
        times = time_steps(be, kinds, L, args.block_length, args.reps)
        if ARTIFACTS[name][0] == "onnx":  # the threading choice of the device profiles, measured
            from dllm_export.runtime.ort import OrtBackend

            quiet = OrtBackend(art, threads=args.threads, spinning=False)
            times["dual-nospin"] = time_steps(quiet, {"dual": kinds["dual"]}, L, args.block_length, args.reps)["dual"]
            del quiet
        size = None if art is None else sum(f.stat().st_size for f in art.rglob("model*") if f.is_file())
        entry = {"precision": prec.__dict__, "build_s": round(build_s, 1),
                 "size_mib": None if size is None else round(size / 2**20, 1), "steps": {}}
        for kind, (med, sec) in times.items():
            k = kinds[kind.split("-")[0]]
            # the rows the loop reads (llama.cpp's encoder path outputs every token, though)
            head_rows = min(args.block_length, k["rows"]) if getattr(be, "supports_rows", False) else k["rows"]
            cost = step_cost(dims, prec, rows=k["rows"], keys=L, head_rows=head_rows,
                             cached=k["window"] is not None)
            f = floor_s(cost, host, prec.compute, prec.attention)
            entry["steps"][kind] = {"rows": k["rows"], "ms": round(1000 * sec, 2), "ms_median": round(1000 * med, 2),
                                    "floor_ms": round(1000 * f["floor_s"], 2), "bound": f["bound"],
                                    "x_floor": round(sec / f["floor_s"], 2), "mb_read": round(cost.bytes / 1e6, 1),
                                    "gflop": round(cost.flops / 1e9, 2),
                                    "attention_gflop": round(cost.attention_flops / 1e9, 3)}
            print(f"{name:12s} {kind:7s} {1000 * sec:9.2f} ms  floor {1000 * f['floor_s']:8.2f} ms ({f['bound']})  "
                  f"x{sec / f['floor_s']:.2f}", flush=True)
        if args.e2e:  # the reference loop for torch fp32 (the baseline), each artifact's fastest mode
            caches = ("none",) if not getattr(be, "supports_cache", False) else \
                ("none", "dual") if name == "torch-fp32" else ("dual",)
            runs = [(cache, None) for cache in caches]
            runs += [("dual", n) for n in args.refresh_blocks if "dual" in caches and n > 1]
            for cache, every in runs:
                r = e2e(be, args.prompt, args.e2e_gen_length or args.gen_length, args.block_length, args.steps, cache,
                        every)
                label = _cache_label(cache, every)
                res["e2e"][f"{name}:{cache}" + (f"+rb{every}" if every else "")] = {
                    "artifact": name, "cache": cache, "refresh_blocks": every, **r}
                print(f"{name:12s} e2e cache={label:5s} {r['seconds']:8.2f} s  {r['tokens_per_s']} tok/s", flush=True)
        res["artifacts"][name] = entry
        del be
        if art is not None:
            shutil.rmtree(art)
    res["machine"]["load_avg_end"] = os.getloadavg()  # other processes on the host skew every figure
    # the peaks again at the end, and the floors against the better of both (a floor must bound
    # every step; on a shared host the start's measurement can fall below what the steps reach)
    end = measure_host(args.threads, quick=args.quick)
    res["host_end"] = end.to_dict()
    best = HostLimits(max(host.bandwidth_gbs, end.bandwidth_gbs),
                      {k: max(v, end.gemm_tflops.get(k, 0)) for k, v in host.gemm_tflops.items()},
                      host.gemm_shape, host.flags, host.threads)
    res["host"] = best.to_dict()
    for name, a in res["artifacts"].items():
        for s in a["steps"].values():
            cost = StepCost(s["mb_read"] * 1e6, s["gflop"] * 1e9, s["rows"], 0, 0,
                            attention_flops=s["attention_gflop"] * 1e9)
            f = floor_s(cost, best, a["precision"]["compute"], a["precision"]["attention"])
            s.update(floor_ms=round(1000 * f["floor_s"], 2), bound=f["bound"],
                     x_floor=round(s["ms"] / 1000 / f["floor_s"], 2))
    base = res["e2e"].get("torch-fp32:none", {}).get("seconds")
    for r in res["e2e"].values():
        if base:
            r["x_torch_fp32"] = round(base / r["seconds"], 2)
        if (args.e2e_gen_length or args.gen_length) == args.gen_length:  # the timed steps are the job's
            r.update(_e2e_floor(r, res["artifacts"][r["artifact"]]["steps"], args.gen_length // args.block_length,
                                base))
    stem = Path(args.out or f"benchmarks/results/roofline_{label}{'_quick' if args.quick else ''}")
    wrote = save_results(res, stem, to_markdown(res))
    if plot(res, stem.with_suffix(".png")):
        wrote.append(stem.with_suffix(".png"))
    print("wrote " + ", ".join(map(str, wrote)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
