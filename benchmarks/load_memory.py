"""Load time and peak memory of `load_model` on a large random checkpoint, against a naive loader.

Writes a random LLaDA-shaped checkpoint (default ~1.2B parameters, bf16, sharded like the 8B
release) with the tiny-model factory, then loads it in fresh subprocesses, one per variant:
  - ours: `dllm_export.load_model` (meta-device build, tensors filled shard by shard);
  - naive: build the model in memory (random init), read every shard with safetensors'
    `load_file`, then `load_state_dict` (the usual pattern: two copies of the weights at the peak).
Peak RSS is the subprocess's ru_maxrss. Prints a table and saves JSON.

    python benchmarks/load_memory.py                      # ~1.2B, bf16 on disk
    python benchmarks/load_memory.py --d-model 512 --layers 4   # quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import resource, sys, time, json
import torch
mode, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
t0 = time.perf_counter()
if mode == "ours":
    from dllm_export import load_model
    model = load_model(path, dtype=dtype)
else:
    import glob
    from safetensors.torch import load_file
    from dllm_export.models.checkpoint import read_config
    from dllm_export.models.loader import build_model
    from pathlib import Path
    model = build_model(read_config(Path(path)), dtype=dtype, device="cpu")
    state = {}
    for f in sorted(glob.glob(path + "/*.safetensors")):
        state.update(load_file(f))
    model.load_state_dict(state)
    del state
dt = time.perf_counter() - t0
n = sum(p.numel() for p in model.parameters())
logits = model(torch.tensor([[1, 2, 3, 4]]))
print(json.dumps({"mode": mode, "dtype": sys.argv[3], "load_s": dt, "params": n,
                  "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--mlp", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=126464)
    ap.add_argument("--disk-dtype", default="bfloat16")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--shard-mb", type=int, default=1000)
    ap.add_argument("--out", default="benchmarks/results/load_memory.json")
    ap.add_argument("--workdir", help="where to write the checkpoint (default: a temp dir, removed after)")
    args = ap.parse_args(argv)

    from dllm_export.models.factory import make_random_checkpoint

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        ckpt = Path(tmp) / "ckpt"
        t0 = time.perf_counter()
        make_random_checkpoint(ckpt, "llada", dtype=args.disk_dtype, std=0.02, d_model=args.d_model,
                               n_layers=args.layers, n_heads=args.d_model // 128, mlp_hidden_size=args.mlp,
                               vocab_size=args.vocab, max_sequence_length=4096,
                               max_shard_bytes=args.shard_mb * 2**20)
        write_s = time.perf_counter() - t0
        disk = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        rows = []
        for dtype in args.dtypes.split(","):
            for mode in ("ours", "naive"):
                proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(ckpt), dtype],
                                      capture_output=True, text=True)
                if proc.returncode:
                    print(proc.stderr, file=sys.stderr)
                    return 1
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"checkpoint: {rows[0]['params'] / 1e9:.2f}B params, {disk / 2**30:.2f} GiB on disk ({args.disk_dtype}), "
          f"written in {write_s:.1f} s")
    print(f"{'loader':8s} {'dtype':9s} {'load s':>7s} {'weights GiB':>12s} {'peak RSS GiB':>13s} {'peak/weights':>13s}")
    for r in rows:
        r["peak_over_weights"] = r["peak_rss_bytes"] / r["weights_bytes"]
        print(f"{r['mode']:8s} {r['dtype']:9s} {r['load_s']:7.2f} {r['weights_bytes'] / 2**30:12.2f} "
              f"{r['peak_rss_bytes'] / 2**30:13.2f} {r['peak_over_weights']:13.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "disk_bytes": disk, "write_s": write_s, "rows": rows}, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
