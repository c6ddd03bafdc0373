"""Side-by-side step times of ONNX artifacts of one checkpoint (an exporter change, A against B, or
the kernel choices of one device).

The sessions are timed in turns (rounds x reps, best of each), so the noise of a shared host falls
on all alike; prints and saves the full-step and dual-cache block-step times and each artifact's
largest logit difference from the first.

    python benchmarks/ab_steps.py OLD_ARTIFACT NEW_ARTIFACT [MORE ...] [--threads 2 --rounds 3 --out F.json]
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="+", help="two or more ONNX artifact folders built from one checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10, help="block steps per round (full steps: a fifth)")
    ap.add_argument("--out", help="JSON file for the figures")
    args = ap.parse_args(argv)
    if len(args.artifacts) < 2:
        ap.error("give two or more artifacts")
    res = time_in_turns(args.artifacts, args.threads, args.prompt, args.gen_length, args.block_length, args.rounds,
                        args.reps)
    for a, t in res["ms"].items():
        print(f"{a}: full {t['full']:.1f} ms, dual {t['dual']:.2f} ms"
              + (f" (max |logit difference| from the first: {res['max_abs_logit_diff_dual'][a]:.3g})"
                 if a in res["max_abs_logit_diff_dual"] else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


def time_in_turns(artifacts: list, threads: int = 2, prompt: int = 32, gen_length: int = 256, block_length: int = 32,
                  rounds: int = 3, reps: int = 10) -> dict:
    """Full-step and dual-cache block-step ms (best over `rounds` turns of `reps`) of each artifact, and the
    largest block-step logit difference of each from the first."""
    from roofline import step_kinds
    from dllm_export.models.layers import KVCache
    from dllm_export.runtime.ort import OrtBackend

    L, block = prompt + gen_length, block_length
    s, e = step_kinds(prompt, gen_length, block)["dual"]["window"]
    ids = torch.randint(0, 256, (1, L), generator=torch.Generator().manual_seed(0))
    backends = [OrtBackend(a, threads=threads) for a in artifacts]
    caches = []
    for be in backends:
        kv = KVCache()
        be.forward(ids, cache=kv)
        kv.window = (s, e)
        caches.append(kv)
    names = [Path(a).name for a in artifacts]  # results carry folder names, not this machine's paths
    times = {n: {"dual": [], "full": []} for n in names}
    for _ in range(rounds):
        for a, be, kv in zip(names, backends, caches):
            times[a]["dual"].append(_best_ms(lambda: be.forward(ids[:, s:e], cache=kv, rows=(0, block)), reps))
            times[a]["full"].append(_best_ms(lambda: be.forward(ids, rows=(L - block, L)), max(1, reps // 5)))
    logits = [be.forward(ids[:, s:e], cache=kv, rows=(0, block)) for be, kv in zip(backends, caches)]
    return {"threads": threads, "tokens": L, "window": [s, e],
            "ms": {a: {k: round(min(v), 2) for k, v in t.items()} for a, t in times.items()},
            "max_abs_logit_diff_dual": {a: float((lg - logits[0]).abs().max()) for a, lg in zip(names[1:], logits[1:])}}


if __name__ == "__main__":
    raise SystemExit(main())
