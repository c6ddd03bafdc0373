"""Side-by-side step times of two ONNX artifacts of one checkpoint (an exporter change, A against B).

The two sessions are timed in turns (rounds x reps, best of each), so the noise of a shared host
falls on both alike; prints and saves the full-step and dual-cache block-step times and the largest
logit difference between the two.

    python benchmarks/ab_steps.py OLD_ARTIFACT NEW_ARTIFACT [--threads 2 --rounds 3 --out F.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _best_ms(fn, reps: int) -> float:
    from roofline import _timed

    return 1000 * _timed(fn, reps)[1]


def main(argv: list[str] | None = None) -> int:
    from roofline import step_kinds
    from dllm_export.models.layers import KVCache
    from dllm_export.runtime.ort import OrtBackend

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs=2, help="two ONNX artifact folders built from one checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10, help="block steps per round (full steps: a fifth)")
    ap.add_argument("--out", help="JSON file for the figures")
    args = ap.parse_args(argv)

    L, block = args.prompt + args.gen_length, args.block_length
    s, e = step_kinds(args.prompt, args.gen_length, block)["dual"]["window"]
    ids = torch.randint(0, 256, (1, L), generator=torch.Generator().manual_seed(0))
    backends = [OrtBackend(a, threads=args.threads) for a in args.artifacts]
    caches = []
    for be in backends:
        kv = KVCache()
        be.forward(ids, cache=kv)
        kv.window = (s, e)
        caches.append(kv)
    names = [Path(a).name for a in args.artifacts]  # results carry folder names, not this machine's paths
    times = {n: {"dual": [], "full": []} for n in names}
    for _ in range(args.rounds):
        for a, be, kv in zip(names, backends, caches):
            times[a]["dual"].append(_best_ms(lambda: be.forward(ids[:, s:e], cache=kv, rows=(0, block)), args.reps))
            times[a]["full"].append(_best_ms(lambda: be.forward(ids, rows=(L - block, L)), max(1, args.reps // 5)))
    logits = [be.forward(ids[:, s:e], cache=kv, rows=(0, block)) for be, kv in zip(backends, caches)]
    res = {"threads": args.threads, "tokens": L, "window": [s, e],
           "ms": {a: {k: round(min(v), 2) for k, v in t.items()} for a, t in times.items()},
           "max_abs_logit_diff_dual": float((logits[0] - logits[1]).abs().max())}
    for a in names:
        print(f"{a}: full {res['ms'][a]['full']:.1f} ms, dual {res['ms'][a]['dual']:.2f} ms")
    print(f"max |logit difference| on the block step: {res['max_abs_logit_diff_dual']:.3g}")
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
