"""Continuous batching's padding: rows that join a running decoding at block boundaries sit on the
grid of block columns the batch shares, padded on both sides (a late row's prompt left of the older
rows' blocks, its masks right of theirs). The loop runs a block's full forward once per admission
over the columns its rows span (`_StepLogits.groups`). Measured side by side in one run, in turns,
against the shared-grid forward (`groups` patched to None): the same seeded arrivals, the padding
share of the full forwards' cells, the seconds of the whole schedule, and whether every row got the
same tokens.

Arrivals: the bundled model's code and arithmetic prompts, admitted at block boundaries (each
boundary admits one more with probability 0.7 while fewer than --rows decode) until --requests
rows came, each generating --gen-length tokens in blocks of --block-length, as a saturated server
decodes them; rows are retired once ended.

    python benchmarks/join_padding.py [--model default] [--presets dual,edge,reference] [--threads 1]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import host_info, save_results  # noqa: E402  (same folder)

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item):", "import os\nimport sys\n", "12+34=",
           "7*8=", "x = [1, 2, 3]\nfor i in x:"]


def counting(backend):
    """`backend` with a tally of its full forwards' cells and of the real tokens among them."""
    tally = {"cells": 0, "real": 0}
    inner = backend.forward

    def forward(ids, attention_mask=None, cache=None, rows=None):
        window = None if cache is None else cache.window
        if window is None or cache.fill:
            s, e = (0, ids.shape[1]) if window is None or not cache.fill else window
            tally["cells"] += ids.numel()
            tally["real"] += ids.numel() if attention_mask is None else int(attention_mask[:, s:e].sum())
        kw = {} if cache is None else {"cache": cache}
        return inner(ids, attention_mask, rows=rows, **kw)

    backend.forward = forward
    return tally


def schedule(backend, settings: dict, texts: list[list[int]], args) -> dict:
    """Decode the seeded arrivals; seconds, cells and every row's generated ids."""
    from dllm_export.runtime.loop import Decoding

    tally = counting(backend)
    dec = Decoding.create(backend, gen_length=args.gen_length, block_length=args.block_length, **settings)
    rng, owners, done, k = random.Random(args.seed), [], {}, 0
    t0 = time.perf_counter()
    while k < args.requests or owners:
        while k < args.requests and len(owners) < args.rows and (not owners or rng.random() < 0.7):
            dec.admit([texts[k % len(texts)]])
            owners.append(k)
            k += 1
        dec.run_block()
        keep = ~dec.ended
        for r in (~keep).nonzero().flatten().tolist():
            done[owners[r]] = dec.generated[r].tolist()
        if not bool(keep.all()):
            dec.retire(keep)
            owners = [o for o, kept in zip(owners, keep.tolist()) if kept]
    seconds = time.perf_counter() - t0
    del backend.forward  # the class's own again
    return {"seconds": seconds, "nfe": dec.nfe, "padding_share": round(1 - tally["real"] / tally["cells"], 3),
            "cells": tally["cells"], "tokens": [done[i] for i in range(args.requests)]}


def run(args) -> dict:
    """Each preset, per-admission and shared-grid forwards in turns, `reps` times."""
    import dllm_export as D
    from dllm_export.runtime.backends import TorchBackend
    from dllm_export.runtime.loop import PRESETS, _StepLogits

    torch.set_num_threads(args.threads)
    backend, tok = TorchBackend(D.load_model(args.model)), D.load_tokenizer(args.model)
    texts = [tok(t, add_special_tokens=False)["input_ids"] for t in PROMPTS]
    presets = {"reference": {"steps": args.gen_length}, "dual": {"cache": "dual", "steps": args.gen_length},
               "edge": dict(PRESETS["edge"])}
    res = {"model": args.model, "host": host_info(), "threads": args.threads, "rows": args.rows,
           "requests": args.requests, "gen_length": args.gen_length, "block_length": args.block_length,
           "seed": args.seed, "reps": args.reps, "presets": {}}
    for name in args.presets.split(","):
        runs = {"per_admission": [], "shared_grid": []}
        for _ in range(args.reps):
            for mode in runs:
                if mode == "shared_grid":
                    with mock.patch.object(_StepLogits, "groups", lambda self: None):
                        runs[mode].append(schedule(backend, presets[name], texts, args))
                else:
                    runs[mode].append(schedule(backend, presets[name], texts, args))
        best = {m: min(r, key=lambda x: x["seconds"]) for m, r in runs.items()}
        equal = sum(a == b for a, b in zip(best["per_admission"]["tokens"], best["shared_grid"]["tokens"]))
        res["presets"][name] = {"settings": presets[name], "rows_with_equal_tokens": equal,
                                **{m: {"seconds": round(b["seconds"], 2), "seconds_runs": [round(x["seconds"], 2)
                                                                                           for x in runs[m]],
                                       "nfe": b["nfe"], "padding_share": b["padding_share"], "cells": b["cells"]}
                                   for m, b in best.items()}}
        r = res["presets"][name]
        a, b = r["per_admission"], r["shared_grid"]
        print(f"{name:9s} per admission {a['seconds']:7.2f} s (padding {a['padding_share']:.2f})  shared grid "
              f"{b['seconds']:7.2f} s (padding {b['padding_share']:.2f})  equal tokens {equal}/{args.requests}", flush=True)
    return res


def to_markdown(res: dict) -> str:
    h = res["host"]
    lines = [f"# join_padding: {res['model']} ({h['cpu']}, {res['threads']} torch thread(s))", "",
             f"{res['requests']} rows, up to {res['rows']} at once, gen {res['gen_length']} in blocks of "
             f"{res['block_length']}, seeded arrivals ({res['seed']}); best of {res['reps']} in turns.", "",
             "| preset | per admission s | its padding share | shared grid s | its padding share | speed-up "
             "| rows with equal tokens |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in res["presets"].items():
        a, b = r["per_admission"], r["shared_grid"]
        lines.append(f"| {name} | {a['seconds']} | {a['padding_share']} | {b['seconds']} | {b['padding_share']} | "
                     f"{b['seconds'] / a['seconds']:.2f}x | {r['rows_with_equal_tokens']}/{res['requests']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--presets", default="dual,edge,reference")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the server's default: 1)")
    ap.add_argument("--rows", type=int, default=8, help="rows decoding at once, at most")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "join_padding"))
    args = ap.parse_args(argv)
    res = run(args)
    for p in save_results(res, args.out, to_markdown(res)):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
