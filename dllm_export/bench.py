"""`dllm-export bench`: artifacts side by side: load time, per-step latency, decoding tokens/s,
peak memory, file size and (with quality on) held-out bits/token and arithmetic exact match, with
ratios and quality deltas to the first.

Each artifact is measured in a fresh Python process (`python -m dllm_export.bench --one PATH`),
so load time and peak RSS are its own and not the leftovers of the previous one.

Why one decode was not a figure: the first decode of a process pays first-call costs (allocator
growth, onnxruntime / llama.cpp shape-specialised kernels for each new window length), and on a
host whose cores are busy with other work every intra-op thread barrier waits for a descheduled
thread. On a 2-core host at load average ~13, LLaDA-default decoded at 0.8 tokens/s with torch's
default 2 threads and at 15 tokens/s with 1 thread; two identical runs differed 2.4x. So decoding
is warmed up once and timed `decode_reps` times (median, with min and max), and the thread count
and the host's load average are recorded beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import DllmExportError, InputError


@dataclass(frozen=True)
class BenchConfig:
    """What one measurement runs.

    Attributes:
        canvas: tokens of the full forward timed as one denoising step.
        reps: timed steps (after one warm-up).
        decode_reps: timed decodes (after one warm-up decode); tokens/s is their median.
        gen_length / steps / block_length / cache / threshold / refresh_tokens / refresh_blocks / stop_at_eos /
        preset:
            the decode timed for tokens/s (steps None = gen_length; `generate`'s options, None: the preset's
            for that artifact's backend, `runtime.loop.with_preset`; each row records its own as
            "decode_settings").
        threads: CPU threads of the runtime (0 = its default).
        backend: "auto" (by what the path holds) or a backend name.
        device: the torch backend's device ("cuda" for a GPU; other runtimes pick their own).
        kernel: the torch backend's kernels for quantized checkpoints ("fake" or "int", see
            quant.kernels; "int" computes in bf16 where the host has bf16 units).
        quality: also held-out bits/token over `eval_windows` windows and exact match on `problems`
            held-out 2-digit arithmetic problems (`eval.quality.quick_quality`, as build's gates).
        roofline: also the step's floor on this host (`runtime.roofline`: the larger of bytes read over
            the measured bandwidth and FLOPs over the measured GEMM rate of its kernel) and the ratio.
        profile: also one more decode under the runtime's profiler (onnxruntime's, torch.profiler):
            its time per op type, the `profile_top` largest named, the rest summed.
    """

    canvas: int = 128
    reps: int = 10
    decode_reps: int = 3
    gen_length: int = 64
    steps: int | None = None
    block_length: int | None = None  # None: 32 where it divides gen_length, else gen_length
    cache: str | None = None
    threshold: float | None = None
    refresh_tokens: int | None = None
    refresh_blocks: int | None = None
    stop_at_eos: bool | None = None
    preset: str = "reference"
    threads: int = 0
    backend: str = "auto"
    quality: bool = False
    device: str = "cpu"
    kernel: str = "fake"
    problems: int = 50
    eval_windows: int = 8
    roofline: bool = True
    profile: bool = False
    profile_top: int = 12


def _size(path: Path) -> int:
    """Bytes of the model files (weights, graph) of a checkpoint or artifact."""
    from .models.checkpoint import resolve_model_path

    if not path.exists():
        path = resolve_model_path(str(path))  # `default`, `default-dream`
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith("model"))


def measure(path: str, cfg: BenchConfig) -> dict:
    """Measure one artifact in this process (see `bench` for the side-by-side run)."""
    import torch

    from . import generate, load_tokenizer
    from .runtime.backends import backend_kind, load_backend
    from .runtime.loop import with_preset

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    # --kernel picks a torch checkpoint's kernels; the other rows of the run open as exported
    kernel = cfg.kernel if backend_kind(path, cfg.backend) == "torch" else "fake"
    be = load_backend(path, backend=cfg.backend, threads=cfg.threads, device=cfg.device, kernel=kernel)
    load_s = time.perf_counter() - t0
    if cfg.canvas > be.max_length:
        raise InputError(f"canvas {cfg.canvas} exceeds the model's context of {be.max_length} tokens")
    ids = torch.randint(0, min(be.vocab_size, 256), (1, cfg.canvas), generator=torch.Generator().manual_seed(0))
    be.forward(ids)  # warm-up: first-call allocations, weight prepacking
    steps = []
    for _ in range(cfg.reps):
        t = time.perf_counter()
        be.forward(ids)
        steps.append(time.perf_counter() - t)
    steps.sort()
    prompt = ids[:, : max(1, cfg.canvas - cfg.gen_length)].tolist()
    settings = with_preset(cfg.preset, {"cache": cfg.cache, "threshold": cfg.threshold,
                                        "refresh_tokens": cfg.refresh_tokens, "refresh_blocks": cfg.refresh_blocks,
                                        "stop_at_eos": cfg.stop_at_eos},
                           be.supports_cache)
    block = cfg.block_length or (32 if cfg.gen_length % 32 == 0 else cfg.gen_length)
    opts = dict(gen_length=cfg.gen_length, steps=cfg.steps or cfg.gen_length, block_length=block, **settings)
    load_before = os.getloadavg()[0]
    out = generate(be, prompt, **opts)  # warm-up: first-call costs of every window shape
    decode = []
    for _ in range(max(1, cfg.decode_reps)):
        t = time.perf_counter()
        out = generate(be, prompt, **opts)
        decode.append(time.perf_counter() - t)
    decode_s = statistics.median(decode)
    n_gen = out.generated.numel()
    res = {
        "path": str(path), "backend": be.name, "device": cfg.device if be.name == "torch" else "cpu",
        "family": be.spec.family, "size_mib": round(_size(Path(path)) / 2**20, 2),
        "load_s": round(load_s, 3), "step_ms_median": round(1000 * statistics.median(steps), 3),
        "step_ms_p90": round(1000 * steps[min(len(steps) - 1, int(0.9 * len(steps)))], 3),
        "tokens_per_s": round(n_gen / decode_s, 2), "tokens_per_s_min": round(n_gen / max(decode), 2),
        "tokens_per_s_max": round(n_gen / min(decode), 2), "nfe": out.nfe,
        "tokens_per_step": round(out.generated.numel() / max(out.nfe, 1), 2), "decode_settings": settings,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": torch.get_num_threads() if be.name == "torch" else getattr(be, "threads", cfg.threads),
        "host_load": round(max(load_before, os.getloadavg()[0]), 2), "host_cores": os.cpu_count(),
    }
    if getattr(be, "kernels", None):
        res["kernels"] = be.kernels
    if cfg.roofline:
        res.update(_step_cost(path, cfg.canvas))
    if cfg.profile:
        res["profile"] = op_profile(be, lambda: generate(be, prompt, **opts), cfg.profile_top)
    if cfg.quality:
        from .eval.quality import quick_quality

        res.update(quick_quality(be, load_tokenizer(path), windows=cfg.eval_windows, problems=cfg.problems))
    return res


def _step_cost(path: str, canvas: int) -> dict:
    """What one timed step of `path` reads and computes (the parent divides by the host's limits)."""
    from .models.loader import read_spec, resolve_model_path
    from .runtime.roofline import artifact_precision, step_cost

    p = Path(path)
    folder = p if p.exists() else resolve_model_path(str(p))
    folder = folder.parent if folder.suffix == ".gguf" else folder
    prec = artifact_precision(p if p.exists() else folder, "float32")
    cost = step_cost(read_spec(folder)[2], prec, rows=canvas, keys=canvas, head_rows=canvas, cached=False)
    return {"step_mb_read": round(cost.bytes / 1e6, 2), "step_gflop": round(cost.flops / 1e9, 3),
            "step_attention_gflop": round(cost.attention_flops / 1e9, 3), "compute": prec.compute,
            "attention": prec.attention}


def op_profile(be, fn, top: int = 12) -> dict:
    """`fn()`'s time per op type under the backend's profiler (`op_profile`), largest first: the
    `top` largest, the rest summed, and the time outside the runtime's ops (the loop's own work,
    feeds and copies; for torch the loop's ops are ops too). Shares are of the profiled call's wall
    time; the profiler's own cost is in it, so read the shares, not the milliseconds, as speed."""
    profiled = getattr(be, "op_profile", None)
    if profiled is None:
        return {"error": f"the {be.name} backend has no per-op profiler (onnxruntime and torch have)"}
    p = profiled(fn)
    wall = p["wall_ms"]

    def row(op: str, ms: float, calls: int | None) -> dict:
        return {"op": op, "ms": round(ms, 3), "calls": calls, "share": round(ms / wall, 4)}

    ranked = sorted(p["ops"].items(), key=lambda kv: -kv[1][0])
    rows = [row(op, ms, n) for op, (ms, n) in ranked[:top]]
    rest = ranked[top:]
    if rest:
        rows.append(row(f"({len(rest)} other op types)", sum(v[0] for _, v in rest), sum(v[1] for _, v in rest)))
    rows.append(row("(outside the runtime's ops)", max(0.0, wall - sum(v[0] for v in p["ops"].values())), None))
    return {"wall_ms": round(wall, 3), "ops": rows}


def bench(paths: list[str], cfg: BenchConfig = BenchConfig()) -> dict:
    """Measure each artifact in its own process; ratios are to the first one."""
    rows = []
    for p in paths:
        cmd = [sys.executable, "-m", "dllm_export.bench", "--one", str(p), "--config", json.dumps(asdict(cfg))]
        done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if done.returncode != 0:
            err = (done.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"path": str(p), "error": err})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    host = None
    if cfg.roofline:
        from .runtime.roofline import StepCost, floor_s, measure_host

        host = measure_host(cfg.threads or os.cpu_count() or 1, quick=True)
        for r in rows:
            if "step_mb_read" in r:
                cost = StepCost(r["step_mb_read"] * 1e6, r["step_gflop"] * 1e9, cfg.canvas, cfg.canvas, cfg.canvas,
                                attention_flops=r["step_attention_gflop"] * 1e9)
                f = floor_s(cost, host, r["compute"], r["attention"])
                r["floor_ms"] = round(1000 * f["floor_s"], 3)
                r["x_floor"] = round(r["step_ms_median"] / r["floor_ms"], 2)
                r["bound"] = f["bound"]
    base = next((r for r in rows if "error" not in r), None)
    for r in rows:
        if base is not None and "error" not in r:
            r["step_speedup"] = round(base["step_ms_median"] / r["step_ms_median"], 2)
            r["tokens_per_s_ratio"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
            r["size_ratio"] = round(r["size_mib"] / base["size_mib"], 3) if base["size_mib"] else None
            if "arith_em" in r and "arith_em" in base:  # quality deltas to the first artifact
                r["arith_em_drop"] = round(base["arith_em"] - r["arith_em"], 4)
                r["bpt_increase"] = round(r["bits_per_token"] / base["bits_per_token"] - 1, 4)
    _flag_slower_llamacpp(rows)
    return {"config": asdict(cfg), "artifacts": rows, "host": None if host is None else host.to_dict()}


def _flag_slower_llamacpp(rows: list[dict]) -> None:
    """Mark llama.cpp rows slower per step than the fastest artifact of the run with `faster`
    (that artifact and the factor): its diffusion archs keep no KV cache, so every step is a
    full forward there and the speed gap is the user's to know."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return
    best = min(ok, key=lambda r: r["step_ms_median"])
    for r in ok:
        if r["backend"] == "llama.cpp" and r is not best:
            r["faster"] = {"path": best["path"], "backend": best["backend"],
                           "x": round(r["step_ms_median"] / best["step_ms_median"], 2)}


def to_markdown(result: dict) -> str:
    """A table of `bench`'s result."""
    cols = ["path", "backend", "size_mib", "load_s", "step_ms_median", "step_ms_p90", "tokens_per_s",
            "tokens_per_s_min", "tokens_per_s_max", "nfe", "tokens_per_step", "peak_rss_mib", "threads", "host_load",
            "step_speedup"]
    if result["config"].get("roofline"):
        cols += ["floor_ms", "x_floor", "bound"]
    if result["config"]["quality"]:
        cols += ["bits_per_token", "bpt_increase", "arith_em", "arith_em_drop"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    host = result.get("host")
    if host:  # the limits the floors divide by
        rates = ", ".join(f"{k} {v}" for k, v in host["gemm_tflops"].items())
        lines.insert(0, f"host: read {host['bandwidth_gbs']} GB/s, GEMM TFLOP/s {rates}, "
                        f"{host['threads']} threads, flags {' '.join(host['flags'])}\n")
    for r in result["artifacts"]:
        if "error" in r:
            lines.append(f"| {r['path']} | error: {r['error']} |")
        else:
            lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    for r in result["artifacts"]:
        if "faster" in r:
            f = r["faster"]
            lines.append(f"\nllama.cpp ({r['path']}) is {f['x']}x slower per step than {f['path']} ({f['backend']}): "
                         "its diffusion archs keep no KV cache, so every step is a full forward (no --cache).")
    for r in result["artifacts"]:
        if "profile" in r:
            lines.append(_profile_markdown(r))
    busy = [r for r in result["artifacts"] if "error" not in r and r["host_load"] > r["host_cores"]]
    if busy:
        lines.append(f"\nnote: host load average up to {max(r['host_load'] for r in busy)} on {busy[0]['host_cores']} "
                     f"cores: other work slows these figures and spreads them (see tokens_per_s_min / _max); "
                     f"pin --threads 1 or measure on an idle host")
    return "\n".join(lines) + "\n"


def _profile_markdown(r: dict) -> str:
    """One artifact's op profile as a table (or the reason there is none)."""
    p = r["profile"]
    if "error" in p:
        return f"\nprofile of {r['path']}: {p['error']}"
    lines = [f"\nOne decode of {r['path']} ({r['backend']}) under its profiler: {p['wall_ms']} ms",
             "", "| op | ms | calls | share |", "|---|---:|---:|---:|"]
    lines += [f"| {o['op']} | {o['ms']} | {'' if o['calls'] is None else o['calls']} | {100 * o['share']:.1f} % |"
              for o in p["ops"]]
    return "\n".join(lines)


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", required=True)
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    try:
        print(json.dumps(measure(args.one, BenchConfig(**json.loads(args.config)))))
    except DllmExportError as e:  # one line, which the parent reports as this artifact's error
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
