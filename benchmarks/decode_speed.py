"""Fast decoding: end-to-end tokens/s and task accuracy of the reference loop (a full forward per
step, LLaDA's semantics) against Fast-dLLM's prefix / dual caches, threshold and factor parallel
decoding, and their combinations, side by side in one run, with ratios and a time split
(model forward versus the loop's own work: sampling, softmax, bookkeeping).

    python benchmarks/decode_speed.py                        # bundled default model, gen 256, block 32
    python benchmarks/decode_speed.py --shape 1b --gen-length 64 --problems 0   # ~1.3B random LLaDA shape
    python benchmarks/decode_speed.py --variants reference dual dual+blocks4 dual+blocks8 edge edge+blocks8 \
        --problems 100 --code-prompts 4 --no-profile       # the cache across blocks (refresh_blocks), quality

Quality beside every speed: arithmetic exact match on held-out problems, and for the code prompts
the tokens equal to the first variant's and the share of the generated lines (up to the first end
token) that parse alone as Python (`eval_default.line_kinds`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dllm_export.runtime.loop import PRESETS

# name -> generate() options (on top of gen_length / block_length; steps = gen_length)
VARIANTS = {
    "reference": {},
    "prefix": {"cache": "prefix"},
    "dual": {"cache": "dual"},
    "threshold0.9": {"threshold": 0.9},
    "factor1": {"factor": 1.0},
    "prefix+threshold0.9": {"cache": "prefix", "threshold": 0.9},
    "dual+threshold0.9": {"cache": "dual", "threshold": 0.9},
    "dual+factor1": {"cache": "dual", "factor": 1.0},
    "dual+threshold0.99": {"cache": "dual", "threshold": 0.99},
    "threshold0.99": {"threshold": 0.99},
    "dual+threshold0.99+refresh16": {"cache": "dual", "threshold": 0.99, "refresh_tokens": 16},
    "fast-dllm+eos": {"cache": "dual", "threshold": 0.9, "stop_at_eos": True},  # Fast-dLLM dual + 0.9 (the earlier edge preset)
    "edge": PRESETS["edge"],  # the loop's edge preset
    # the cache lives across blocks: a full forward every 4th / 8th block, the others renew it (refresh_blocks)
    "dual+blocks4": {"cache": "dual", "refresh_blocks": 4},
    "dual+blocks8": {"cache": "dual", "refresh_blocks": 8},
    "edge+blocks8": {**PRESETS["edge"], "refresh_blocks": 8},
}
CODE_PROMPTS = ("def fibonacci(n):", "class Stack:", "def read_config(path):", "for i in range(10):")


class TimedBackend:
    """Wraps a backend and accumulates the seconds spent in forward()."""

    def __init__(self, inner):
        self.inner = inner
        self.spec, self.vocab_size, self.max_length = inner.spec, inner.vocab_size, inner.max_length
        self.name = inner.name
        self.supports_cache = getattr(inner, "supports_cache", False)
        self.supports_rows = getattr(inner, "supports_rows", False)
        self.forward_s = 0.0
        self.forward_tokens = 0

    def forward(self, ids, attention_mask=None, **kw):
        t0 = time.perf_counter()
        out = self.inner.forward(ids, attention_mask, **kw)
        self.forward_s += time.perf_counter() - t0
        self.forward_tokens += ids.numel()
        return out


def profile_step(model, gen_length: int, block_length: int, reps: int = 5) -> dict:
    """Where one step's time goes (torch.profiler, self CPU time): attention, the block linears, the
    LM head, everything else in the forward, for a full forward and for a dual-cache block forward."""
    from torch.profiler import ProfilerActivity, profile

    from dllm_export.models.layers import KVCache

    V = model.config.dims.vocab_rows
    ids = torch.randint(0, min(V, 256), (1, 16 + gen_length), generator=torch.Generator().manual_seed(0))
    out = {}
    for name in ("full", "dual_block"):
        kv = KVCache()
        with torch.inference_mode():
            model(ids, cache=kv)
            run = (lambda: model(ids)) if name == "full" else (lambda: model(ids[:, 16:16 + block_length], cache=kv))
            if name != "full":
                kv.window = (16, 16 + block_length)
            run()
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                for _ in range(reps):
                    run()
        groups = {"attention": 0.0, "linears": 0.0, "head": 0.0, "other": 0.0}
        for ev in prof.key_averages(group_by_input_shape=True):
            us = ev.self_cpu_time_total / reps
            if "scaled_dot_product" in ev.key or "_flash_attention" in ev.key or "bmm" in ev.key:
                groups["attention"] += us
            elif ev.key in ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul"):
                shapes = str(ev.input_shapes)
                groups["head" if str(V) in shapes else "linears"] += us
            else:
                groups["other"] += us
        out[name] = {k: round(v / 1000, 3) for k, v in groups.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--shape", help="a random checkpoint shape from benchmarks/backend_speed.py (e.g. 1b)")
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", type=int, help="denoising steps (default: --gen-length; threshold decoding reads none)")
    ap.add_argument("--problems", type=int, default=16, help="held-out arithmetic problems for accuracy (0 = none)")
    ap.add_argument("--code-prompts", type=int, default=1,
                    help="also decode this many code prompts (speed on text; CODE_PROMPTS in turn)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--artifact", action="append", default=[],
                    help="also run these exported artifacts (e.g. an ONNX W8A8 folder) with --artifact-variants")
    ap.add_argument("--artifact-variants", nargs="+", default=["threshold0.99", "dual+threshold0.9"],
                    choices=list(VARIANTS))
    ap.add_argument("--no-profile", action="store_true", help="skip the per-step torch profile")
    ap.add_argument("--out", help="JSON (default: benchmarks/results/decode_speed_<model>.json)")
    args = ap.parse_args(argv)

    from dllm_export import generate, load_model, load_tokenizer
    from dllm_export.corpus import arithmetic_test_problems, format_problem
    from dllm_export.eval.tasks import answer_digits
    from dllm_export.runtime.backends import TorchBackend

    sys.path.insert(0, str(Path(__file__).parent))
    from eval_default import line_kinds

    torch.set_num_threads(args.threads)
    if args.shape:
        from backend_speed import SHAPES

        from dllm_export.models.factory import make_random_checkpoint

        src = Path("benchmarks/results/tmp/backend_speed") / f"ckpt-{args.shape}"
        if not (src / "config.json").is_file():
            make_random_checkpoint(src, family="llada", dtype=torch.bfloat16, std=0.02, tokenizer=True,
                                   max_shard_bytes=1 << 30, **SHAPES[args.shape])
        label = args.shape
    else:
        src, label = args.model, Path(str(args.model)).name
    model = load_model(src, device=args.device)
    tok = load_tokenizer(src)
    prompts, answers = [], []
    if args.problems:
        for a, op, b in arithmetic_test_problems()[:: max(1, 1000 // args.problems)][: args.problems]:
            prompts.append(tok(f"{a}{op}{b}=", add_special_tokens=False)["input_ids"])
            answers.append(format_problem(a, op, b).split("=")[1])
    code = [tok(CODE_PROMPTS[i % len(CODE_PROMPTS)], add_special_tokens=False)["input_ids"]
            for i in range(args.code_prompts)]
    results = {"model": label, "gen_length": args.gen_length, "steps": args.steps or args.gen_length,
               "block_length": args.block_length,
               "threads": args.threads, "device": args.device, "problems": len(prompts), "variants": {}}
    if args.device != "cpu":
        results["gpu"] = torch.cuda.get_device_name()
    from dllm_export.runtime.backends import load_backend

    runs = [(name, VARIANTS[name], lambda: TorchBackend(model)) for name in args.variants]
    runs += [(f"{Path(a).name}:{v}", VARIANTS[v], lambda a=a: load_backend(a, threads=args.threads))
             for a in args.artifact for v in args.artifact_variants]
    ref_tokens: dict[int, list[int]] = {}  # the reference loop's tokens per prompt (first variant)
    for name, opts, make in runs:
        be = TimedBackend(make())
        t0 = time.perf_counter()
        n_tok, nfe, correct = 0, 0, 0
        kinds = {"arith": [0.0, 0, 0], "code": [0.0, 0, 0]}  # seconds, tokens, tokens equal to the reference
        lines = {"code": 0, "comment": 0, "other": 0}
        for j, (p, want) in enumerate(list(zip(prompts, answers)) + [(c, None) for c in code]):  # one at a time
            t1 = time.perf_counter()
            out = generate(be, [p], gen_length=args.gen_length, steps=args.steps or args.gen_length,
                           block_length=args.block_length, **opts)
            k = kinds["arith" if want is not None else "code"]
            k[0] += time.perf_counter() - t1
            gen = out.generated[0].tolist()
            k[1] += len(gen)
            ref_tokens.setdefault(j, gen)
            k[2] += sum(a == b for a, b in zip(gen, ref_tokens[j]))
            n_tok += out.generated.numel()
            nfe += out.nfe
            if want is not None:
                correct += answer_digits(tok.decode(gen)) == want
            else:
                for kind, n in line_kinds(tok.decode(gen).split(tok.eos_token or "\0")[0]).items():
                    lines[kind] += n
        total = time.perf_counter() - t0
        res = {"options": opts, "seconds": round(total, 3), "tokens_per_s": round(n_tok / total, 2),
               "nfe": nfe, "tokens_per_step": round(n_tok / nfe, 2),
               "forward_share": round(be.forward_s / total, 3),
               "forward_tokens_per_step": round(be.forward_tokens / nfe, 1),
               "arith_em": None if not prompts else round(correct / len(prompts), 4),
               "code_lines": lines, "code_lines_parse": round(lines["code"] / max(sum(lines.values()), 1), 3)}
        for kind, (sec, toks, same) in kinds.items():  # speed per prompt kind, with tokens equal to the first variant
            if toks:
                res[kind] = {"seconds": round(sec, 3), "tokens_per_s": round(toks / sec, 2),
                             "same_tokens": round(same / toks, 4)}
        results["variants"][name] = res
        print(f"{name:22s} {res['tokens_per_s']:9.2f} tok/s  {res['tokens_per_step']:5.2f} tok/step  "
              f"forward {100 * res['forward_share']:4.1f}% of time, {res['forward_tokens_per_step']:7.1f} "
              f"tokens/forward  EM {res['arith_em']}  lines parse {res['code_lines_parse']}  " + "  ".join(
                  f"{k} {v['tokens_per_s']} tok/s ({100 * v['same_tokens']:.0f}% = ref)"
                  for k, v in res.items() if k in kinds), flush=True)
    # the CPU profile splits CPU time by op; on a GPU the ops run asynchronously, so it is skipped
    results["profile"] = (profile_step(model, args.gen_length, args.block_length)
                          if args.device == "cpu" and not args.no_profile else None)
    print(f"per-step profile (ms): {results['profile']}", flush=True)
    ref = results["variants"].get("reference", {})
    if ref.get("tokens_per_s"):
        for v in results["variants"].values():
            v["speedup"] = round(v["tokens_per_s"] / ref["tokens_per_s"], 2)
            for kind in ("arith", "code"):
                if kind in v and kind in ref:
                    v[kind]["speedup"] = round(v[kind]["tokens_per_s"] / ref[kind]["tokens_per_s"], 2)
    out = Path(args.out or f"benchmarks/results/decode_speed_{label}.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
