"""Time and peak RSS of the layer-streamed quantizer on large random LLaDA shapes.

Writes a random-init checkpoint in the released layout (bf16, sharded) with the tiny-model
factory, then runs `dllm-export quantize` on it in a child process and reads the child's peak
RSS (ru_maxrss). Shapes:
  - 1b: d 2048, 16 layers, FFN 5632, vocab 126464 (~1.3B parameters);
  - 8b: LLaDA-8B (d 4096, FFN 12288, 32 heads, vocab 126464), all 32 layers or `--layers N`
    of them: the streamed driver holds one block at a time, so peak memory does not depend on
    the layer count and time per block is constant (the total is extrapolated and labelled so).

    python benchmarks/quantize_memory.py --shape 1b
    python benchmarks/quantize_memory.py --shape 8b --layers 4
    python benchmarks/quantize_memory.py --shape 8b --torch-device cuda --out benchmarks/results/quantize_8b_cuda.json

With `--torch-device cuda` the blocks are calibrated and rounded on the GPU (peak GPU memory is
read from torch in the child and reported); the weights still stream from and to host memory.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "1b": dict(d_model=2048, n_layers=16, n_heads=16, mlp_hidden_size=5632, vocab_size=126464),
    "8b": dict(d_model=4096, n_layers=32, n_heads=32, mlp_hidden_size=12288, vocab_size=126464),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--layers", type=int, help="write only this many layers (per-block cost is unchanged)")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--scheme", default="W4A16")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--torch-device", default="cpu", help="cpu or cuda: where blocks are calibrated and rounded")
    ap.add_argument("--workdir", help="where to write the checkpoints (default: a temp dir, removed after)")
    ap.add_argument("--out", default=None, help="JSON results (default: benchmarks/results/quantize_<shape>.json)")
    args = ap.parse_args(argv)

    from dllm_export.models.factory import make_random_checkpoint

    shape = dict(SHAPES[args.shape])
    full_layers = shape["n_layers"]
    if args.layers:
        shape["n_layers"] = args.layers
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = Path(tmp) / "src"
        t0 = time.perf_counter()
        make_random_checkpoint(src, "llada", dtype="bfloat16", std=0.02, tokenizer=True, max_sequence_length=4096,
                               max_shard_bytes=2 << 30, **shape)
        write_s = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "dllm_export.cli", "quantize", "--model", str(src), "--method", args.method,
               "--scheme", args.scheme, "--group-size", str(args.group_size), "--calib", "default",
               "--calib-samples", str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len),
               "--out", str(Path(tmp) / "q"), "--no-progress", "--torch-device", args.torch_device]
        if args.torch_device != "cpu":  # report the child's peak GPU memory
            cmd = [sys.executable, "-c", "import json, sys, torch; from dllm_export.cli import main; "
                   "code = main(sys.argv[1:]); "
                   "print(json.dumps({'peak_gpu_bytes': torch.cuda.max_memory_allocated()})); sys.exit(code)",
                   *cmd[3:]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return 1
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        gpu = [json.loads(line)["peak_gpu_bytes"] for line in proc.stdout.splitlines() if "peak_gpu_bytes" in line]
        manifest = json.loads((Path(tmp) / "q" / "manifest.json").read_text())
        src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        out_bytes = sum(f.stat().st_size for f in (Path(tmp) / "q").glob("*.safetensors"))
    n_params = (shape["vocab_size"] * shape["d_model"] * 2
                + shape["n_layers"] * (4 * shape["d_model"] ** 2 + 3 * shape["d_model"] * shape["mlp_hidden_size"]))
    driver_s = float(re.search(r"quantized in ([0-9.]+) s", proc.stdout).group(1))  # the CLI's own timing
    per_block = driver_s / shape["n_layers"]
    res = {
        "shape": args.shape, "layers_written": shape["n_layers"], "layers_full": full_layers, "params": n_params,
        "method": args.method, "scheme": args.scheme, "group_size": args.group_size,
        "calibration": manifest["calibration"], "write_s": round(write_s, 1), "quantize_wall_s": round(wall, 1),
        "driver_s": driver_s, "s_per_block": round(per_block, 1),
        "extrapolated_full_s": round(per_block * full_layers, 1), "peak_rss_gib": round(peak / 2**30, 2),
        "src_gib": round(src_bytes / 2**30, 2), "out_gib": round(out_bytes / 2**30, 2),
        "torch_device": args.torch_device, "peak_gpu_gib": round(gpu[0] / 2**30, 2) if gpu else None,
        "out_rel_err_max": max(b["out_rel_err"] for b in manifest["blocks"]),
    }
    print(json.dumps(res, indent=2))
    out = Path(args.out or f"benchmarks/results/quantize_{args.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
