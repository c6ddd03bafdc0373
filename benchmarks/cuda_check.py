"""The torch CUDA backend against the CPU: logits, greedy traces, and GPTQ rounded on the GPU.

For each bundled model: fp32 logits on CUDA (TF32 off) against the CPU's, bf16 on CUDA against
fp32, greedy generation on both (token agreement), and a GPTQ W4A16 quantization run with the
blocks on the GPU (`quantize(..., device=device)`) against the same run on the CPU: share of
identical integer codes and each run's block output error.

    PYTHONPATH=. python benchmarks/cuda_check.py --out benchmarks/results/cuda_check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


def _scale_diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double(), b.double()
    return {"max_abs": float((a - b).abs().max()), "rel_to_std": float((a - b).abs().max() / a.std())}


def _codes(path: Path) -> dict[str, torch.Tensor]:
    """Integer codes of every quantized layer of a quantized checkpoint."""
    from dllm_export.models.checkpoint import open_shards
    from dllm_export.quant.load import read_linear, read_manifest

    handles = open_shards(path)
    return {n: read_linear(handles, n, e, path).qweight.codes for n, e in read_manifest(path)["layers"].items()}


def check_model(name: str, device: str = "cuda") -> dict:
    import dllm_export as D
    from dllm_export.eval.tasks import run_task
    from dllm_export.quant import CalibConfig, QuantizeConfig, quantize

    tok = D.load_tokenizer(name)
    cpu = D.load_model(name)
    gpu = D.load_model(name, device=device)
    gpu_bf16 = D.load_model(name, dtype=torch.bfloat16, device=device)
    ids = torch.randint(0, cpu.config.dims.vocab_rows, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = cpu(ids).float()
        res = {"logits_fp32": _scale_diff(ref, gpu(ids.to(device)).float().cpu()),
               "logits_bf16": _scale_diff(ref, gpu_bf16(ids.to(device)).float().cpu())}
    prompt = tok("def fibonacci(n):", add_special_tokens=False)["input_ids"]
    a = D.generate(cpu, [prompt], gen_length=64, steps=64, block_length=16).generated
    b = D.generate(gpu, [prompt], gen_length=64, steps=64, block_length=16).generated
    c = D.generate(gpu, [prompt], gen_length=64, steps=64, block_length=16, cache="dual").generated
    res["greedy_token_agreement_fp32"] = float((a == b).double().mean())
    res["greedy_dual_cache_agreement_gpu_vs_cpu_reference"] = float((a == c).double().mean())
    qcfg = QuantizeConfig(method="gptq", scheme="W4A16", calib=CalibConfig(n_samples=32, seq_len=128))
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for label, dev in (("cpu", "cpu"), ("device", device)):
            t0 = time.perf_counter()
            out = quantize(name, Path(tmp) / label, qcfg, progress=False, device=dev)
            runs[label] = {"seconds": round(time.perf_counter() - t0, 2),
                         "manifest": json.loads((out / "manifest.json").read_text()),
                         "layers": _codes(out)}
        same = total = 0
        for n, q in runs["cpu"]["layers"].items():
            same += int((q == runs["device"]["layers"][n]).sum())
            total += q.numel()
        res["gptq_w4a16"] = {
            "identical_codes": same / total,
            **{f"{label}_seconds": runs[label]["seconds"] for label in runs},
            **{f"{label}_block_out_rel_err": [b["out_rel_err"] for b in runs[label]["manifest"]["blocks"]]
               for label in runs},
        }
        em = {label: run_task(D.load_model(Path(tmp) / label, device=device), tok, "arithmetic", 100)["score"]
              for label in runs}
        res["gptq_w4a16"]["arith_em_on_device"] = em
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["default", "default-dream"])
    ap.add_argument("--out", default="benchmarks/results/cuda_check.json")
    ap.add_argument("--device", default="cuda", help="cuda; cpu runs the same script as a dry run")
    args = ap.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the comparison
    torch.backends.cudnn.allow_tf32 = False
    out = {"gpu": torch.cuda.get_device_name() if args.device != "cpu" else None, "torch": torch.__version__,
           "python": platform.python_version(), "models": {}}
    for name in args.models:
        out["models"][name] = check_model(name, args.device)
        print(name, json.dumps(out["models"][name]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
