"""A batch whose rows end at different blocks (`stop_at_eos`) and finish each block at different
steps (threshold decoding): the loop drops the ended rows from the next blocks' forwards and lets a
row whose block is decoded sit out the block's next steps. Measured side by side in one run against
the loop that keeps every row in every forward (`Plan.rows_independent` patched to False), same
prompts, same tokens.

Prompts: 4 held-out-style arithmetic problems (they end in the first block) and 4 code prompts
(they fill the canvas), decoded together with the edge preset (dual cache, threshold 0.99,
refresh after 16 commits, stop at EOS), gen 128 in blocks of 32.

    python benchmarks/batch_rows.py [--model default] [--backend auto] [--threads 2] [--reps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import host_info, save_results  # noqa: E402  (same folder)

PROMPTS = ["12+34=", "7*8=", "90-45=", "3+4=", "def fibonacci(n):", "class Stack:\n    def push(self, item):",
           "import os\nimport sys\n", "def read_file(path):"]


def run(args) -> dict:
    """Best-of-reps seconds of one batched decode, ended rows kept and dropped in turns."""
    import torch

    import dllm_export as D
    from dllm_export.runtime import loop
    from dllm_export.runtime.backends import load_backend
    from dllm_export.tokenizer import encode_prompt

    torch.set_num_threads(args.threads)
    be = load_backend(args.model, backend=args.backend, threads=args.threads)
    tok = D.load_tokenizer(args.model)
    ids = [encode_prompt(tok, p) for p in PROMPTS]
    kw = dict(gen_length=args.gen_length, steps=args.gen_length, block_length=args.block_length,
              **loop.PRESETS["edge"])
    independent = loop.Plan.rows_independent
    times: dict[str, list[float]] = {"kept": [], "dropped": []}
    outs = {}
    try:
        for rep in range(args.reps + 1):  # the first round warms up
            for mode in times:
                loop.Plan.rows_independent = property(lambda self: False) if mode == "kept" else independent
                rows = []
                counting = _count_rows(be, rows)
                t = time.perf_counter()
                out = D.generate(counting, ids, **kw)
                if rep:
                    times[mode].append(time.perf_counter() - t)
                outs[mode] = (out, sum(rows))
    finally:
        loop.Plan.rows_independent = independent
    (kept, kept_rows), (dropped, dropped_rows) = outs["kept"], outs["dropped"]
    return {"model": args.model, "backend": be.name, "threads": args.threads, "host": host_info(),
            "settings": {k: v for k, v in kw.items()}, "prompts": PROMPTS, "nfe": dropped.nfe,
            "same_tokens": bool(torch.equal(kept.ids, dropped.ids)),
            "row_forwards": {"kept": kept_rows, "dropped": dropped_rows},
            "seconds": {m: round(min(v), 4) for m, v in times.items()},
            "speedup": round(min(times["kept"]) / min(times["dropped"]), 3)}


def _count_rows(backend, rows: list[int]):
    """`backend` with a forward that appends the rows of every call to `rows`."""
    class Counting:
        def __getattr__(self, name):
            return getattr(backend, name)

        def forward(self, ids, *a, **kw):
            rows.append(ids.shape[0])
            return backend.forward(ids, *a, **kw)

    return Counting()


def to_markdown(res: dict) -> str:
    h = res["host"]
    return "\n".join([
        f"# batch_rows: {res['model']} ({res['backend']}, {res['threads']} threads; {h['cpu']}, {h['cpus']} CPUs, "
        f"{' '.join(h['flags'])})", "",
        f"8 prompts in one batch (4 arithmetic, 4 code), {res['settings']['gen_length']} tokens in blocks of "
        f"{res['settings']['block_length']}, edge preset; best of the rounds, both modes in turns in one run.", "",
        "| rows done (ended, or their block decoded) | seconds | row forwards | same tokens |",
        "| --- | ---: | ---: | :---: |",
        f"| kept in every forward | {res['seconds']['kept']} | {res['row_forwards']['kept']} | |",
        f"| left out of the next forwards | {res['seconds']['dropped']} | {res['row_forwards']['dropped']} | "
        f"{'yes' if res['same_tokens'] else 'NO'} |", "",
        f"Speed-up {res['speedup']}x; {res['nfe']} steps.", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gen-length", type=int, default=128)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batch_rows"))
    args = ap.parse_args(argv)
    res = run(args)
    md = to_markdown(res)
    save_results(res, args.out, md)
    print(md)
    return 0 if res["same_tokens"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
