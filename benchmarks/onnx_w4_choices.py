"""The 4-bit ONNX artifacts one command line builds for a host, side by side on speed and quality.

`dllm-export --target onnx --bits 4` alone writes a portable artifact (weight-only 4-bit on
MatMulNBits at fp32 compute, the same numbers on every host). `--device auto` lets this host's
profile fill what was left open, and `--scheme W4A8` moves the weights onto the int8 GEMM. Each
choice trades speed for fidelity; this measures both, so the profile's choice rests on numbers:

- speed: RTN artifacts of one checkpoint (a random LLaDA of the anchor shape by default), full
  step and dual-cache block step timed in turns (`ab_steps.time_in_turns`);
- quality: `--method` artifacts of the bundled models, KL divergence to the float model through
  onnxruntime on the fidelity canvases (`eval.fidelity`), with paired differences against the
  portable artifact.

    python benchmarks/onnx_w4_choices.py [--shape anchor] [--models default,default-dream] [--method gptq]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# name -> (export options, the command-line flags that build it): what the flags build is the
# host's profile's choice (x86-avx512-vnni: W4A8 in progressive groups unless per channel is asked)
CHOICES = {
    "portable": ({"bits": 4}, "--bits 4"),
    "profile": ({"bits": 4, "device": "auto"}, "--bits 4 --device auto"),
    "w4a8": ({"scheme": "W4A8", "device": "auto"}, "--scheme W4A8 --device auto"),
    "w4a8-channel": ({"scheme": "W4A8", "group_size": 0, "device": "auto"},
                     "--scheme W4A8 --group-size 0 --device auto"),
}


def build(src, out: Path, choice: str, method: str) -> Path:
    """Export `choice` of checkpoint `src` into `out` (replaced when present)."""
    from dllm_export.exporter import export

    if out.exists():
        shutil.rmtree(out)
    export(src, out, target="onnx", method=method, **CHOICES[choice][0])
    return out


def speed(src: Path, work: Path, args) -> dict:
    """Sizes and step times of each choice's RTN artifact of `src`."""
    from ab_steps import time_in_turns
    from dllm_export.exporter import _widths
    from dllm_export.quant import get_scheme
    from dllm_export.quant.schemes import fit_group

    arts = {c: build(src, work / f"speed-{c}", c, "rtn") for c in CHOICES}
    res = time_in_turns([str(a) for a in arts.values()], threads=args.threads, rounds=args.rounds, reps=args.reps)
    out = {}
    for c, a in arts.items():
        size = sum(f.stat().st_size for f in a.iterdir() if f.name.startswith("model."))
        m = json.loads((a / "manifest.json").read_text())
        grid = m["quantize_settings"]
        group, default = grid["group_size"], get_scheme(m["scheme"]).group_size
        if group is None:  # the scheme's, fitted to the widths as the driver does
            group = fit_group(default, _widths(src)) if default else 0
        scheme = f"{m['scheme']} " + (f"g{group}" if group else "per channel") + (
            ", progressive" if grid["progressive"] else "")
        out[c] = {**res["ms"][a.name], "size_mib": round(size / 2**20, 2), "scheme": scheme,
                  "kernels": sorted(set(m["layers"].values())), "accuracy_level": m["accuracy_level"]}
    return out


def quality(model: str, work: Path, args) -> dict:
    """Fidelity of each choice's `--method` artifact of a bundled model, and its paired difference
    from the portable one."""
    from dllm_export import load_model, load_tokenizer
    from dllm_export.eval.fidelity import FidelityConfig, build_reference, compare, paired_difference
    from dllm_export.runtime.backends import load_backend

    ref = build_reference(load_model(model), load_tokenizer(model), FidelityConfig(windows=args.windows))
    raw, out = {}, {}
    for c in CHOICES:
        art = build(model, work / f"{model}-{c}", c, args.method)
        raw[c] = compare(load_backend(art, threads=args.threads), ref)
        s = raw[c]["summary"]
        out[c] = {k: s[k] for k in ("kld_mean", "kld_se", "top1")}
        if c != "portable":
            d = paired_difference(raw[c], raw["portable"])
            out[c]["vs_portable"] = {"kld_ratio": round(s["kld_mean"] / raw["portable"]["summary"]["kld_mean"], 3),
                                     "z": d["z"], "significant": d["significant"]}
        print(json.dumps({"model": model, "choice": c, **out[c]}), file=sys.stderr, flush=True)
    return out


def to_markdown(res: dict) -> str:
    models = list(res["quality"])
    lines = ["# 4-bit ONNX artifacts on one host: the command line's choices, speed and fidelity", "",
             f"Reproduce: `{res['command']}`. Host: {res['host']}; {res['threads']} threads. Speed: RTN artifacts "
             f"of a random LLaDA of the {res['shape']} shape, best step ms over turns (prompt 32 + gen 256, "
             f"block 32). Fidelity: {res['method']} artifacts of the bundled models through onnxruntime, KL to "
             "the float model (x the portable artifact's; * significant at 95 %).", "",
             "| choice | flags (with `--target onnx`) | scheme, kernels | size MiB | full step ms | dual step ms | "
             + " | ".join(f"KLD {m}" for m in models) + " |",
             "| --- | --- | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in models) + " |"]
    for c, (_, flags) in CHOICES.items():
        sp = res["speed"][c]
        cells = []
        for m in models:
            q = res["quality"][m][c]
            v = q.get("vs_portable")
            cells.append(f"{q['kld_mean']:.3g}" + (f" ({v['kld_ratio']:.2f}x{' *' if v['significant'] else ''})"
                                                  if v else ""))
        kern = f"{sp['scheme']}, {' / '.join(sp['kernels'])}" + (", acc 4" if sp["accuracy_level"] == 4 else "")
        lines.append(f"| {c} | `{flags}` | {kern} | {sp['size_mib']} | {sp['full']} | {sp['dual']} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from dllm_export.models.factory import make_random_checkpoint
    from dllm_export.targets import detect, host_flags
    from common import cpu_model, save_results
    from roofline import SHAPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="anchor", help="random LLaDA for the speed columns")
    ap.add_argument("--checkpoint", help="a checkpoint folder for the speed columns instead of --shape")
    ap.add_argument("--models", default="default,default-dream", help="bundled models for the fidelity columns")
    ap.add_argument("--method", default="gptq", help="PTQ method of the fidelity artifacts")
    ap.add_argument("--windows", type=int, default=16, help="fidelity windows per mask ratio")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--workdir", default="benchmarks/results/tmp/w4_choices")
    ap.add_argument("--out", default="benchmarks/results/onnx_w4_choices")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    quality_res = {m: quality(m, work, args) for m in args.models.split(",")}
    src = Path(args.checkpoint) if args.checkpoint else work / f"ckpt-{args.shape}"
    if not (src / "config.json").is_file():
        make_random_checkpoint(src, family="llada", dtype=torch.bfloat16, std=0.02, tokenizer=True,
                               max_shard_bytes=1 << 30, **SHAPES[args.shape])
    load0 = os.getloadavg()[0]
    speed_res = speed(src, work, args)
    flags = sorted(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimddp",
                               "i8mm") if f in host_flags())
    res = {"command": "python benchmarks/onnx_w4_choices.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "host": f"{cpu_model()} ({', '.join(flags)}; profile {detect().name}; load {load0:.1f} before timing)",
           "threads": args.threads, "shape": src.name if args.checkpoint else args.shape, "method": args.method,
           "speed": speed_res,
           "quality": quality_res, "seconds": round(time.perf_counter() - t0, 1)}
    save_results(res, args.out, to_markdown(res))
    print(to_markdown(res), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
