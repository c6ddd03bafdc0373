"""The `dllm-export` command line: a thin shell over the library; each subcommand is one library call.

    dllm-export generate --model default --prompt "def fibonacci(n):"
    dllm-export info --model DIR
    dllm-export --target onnx --bits 4 [--method gptq] [--scheme W4A8] [--format qdq|matmulnbits] [--out DIR]
    dllm-export export --target gguf --quant Q4_0     (the same as a subcommand)
    dllm-export --target gguf --quant Q4_K --method gptq      (GPTQ on llama.cpp's K-quant grid)
    dllm-export --target gguf --scheme auto --avg-bits 3.5 --kquants    (a K-quant mix from a sensitivity scan)
    dllm-export generate --model DIR          (a checkpoint folder or an exported ONNX artifact)
    dllm-export lm-eval --model DIR --tasks arc_easy,gsm8k [--model-args mc_num=128,gen_length=256]
    dllm-export serve MODEL_OR_ARTIFACT [--port 8000] [--max-batch 8] [--api-key KEY]   (OpenAI-compatible HTTP)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from .errors import DllmExportError, InputError


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors end as every other bad input: one line, exit code 2."""

    def error(self, message: str):
        raise UsageError(message)


class UsageError(DllmExportError):
    """A command line argparse rejects (unknown option, invalid choice, conflicting flags)."""


def _choices(names) -> str:
    return "{" + ",".join(names) + "}"


def _lookup(get):
    """An argparse `type` from a registry's getter: its own error message, one line; the name it returns."""
    def convert(value: str) -> str:
        try:
            found = get(value)
        except DllmExportError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return getattr(found, "name", value)
    return convert


def _scheme_or_auto(name: str):
    """A scheme of SCHEMES by name, or `auto` (mixed precision, resolved from a sensitivity scan)."""
    from .quant import get_scheme

    return "auto" if name.lower() == "auto" else get_scheme(name)


def _add_model_arg(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    p.add_argument("--model", default="default",
                   help="checkpoint folder (config.json + safetensors), or 'default' / 'default-dream' "
                        "for the bundled models (default: %(default)s)")
    if dtype:
        p.add_argument("--dtype", help="float32 | bfloat16 | float16 | auto (default: float32; with --kernel int, "
                                       "bfloat16 where the host has bf16 units)")


def _add_executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", default="local", help="where the cells run: local (this process, default) | ray "
                                                      "(one Ray task per cell; pip install 'dllm-export[ray]')")
    p.add_argument("--address", help="ray: the cluster, auto (running on this node) or ray://HOST:10001 "
                                     "(default: join one on this node or start a local one)")
    p.add_argument("--cell-resources", help='ray: task options of each cell as JSON, e.g. \'{"num_gpus": 1}\'')


def _add_auto_args(p) -> None:
    p.add_argument("--avg-bits", type=float, help="--scheme auto: average bits per weight (codes + scales) of the "
                                                  "block linears, e.g. 3.5 or 4.5")
    p.add_argument("--bits-choices", help="--scheme auto: candidate bit-widths (default: the scan's; a fresh "
                                          "scan: onnx 2,3,4,5,6,8, a checkpoint 2,3,4,8, gguf 4,5,8)")
    p.add_argument("--group-choices", help="--scheme auto, ONNX: other group sizes a layer may take beside the "
                                           "grid's, e.g. 64,128 (each bit-width is scanned at each)")
    p.add_argument("--sensitivity", dest="sensitivity_json",
                   help="--scheme auto: a sensitivity.json from `analyze --sensitivity` (default: scan now)")
    p.add_argument("--mix-embed-head", action="store_true",
                   help="--scheme auto: the embedding and LM head join the allocation (quantized, or kept in "
                        "half precision, whichever the budget favours); the budget then covers them too")
    p.add_argument("--kquants", action="store_true",
                   help="--scheme auto with --target gguf: mix llama.cpp's K-quants (Q2_K..Q6_K, Q8_0; bits "
                        "2,3,4,5,6,8) instead of Q4_0 / Q5_0 / Q8_0")


# _add_auto_args' options (dest, flag): read by --scheme auto alone, dropped without a word elsewhere
AUTO_ARGS = (("avg_bits", "--avg-bits"), ("bits_choices", "--bits-choices"), ("group_choices", "--group-choices"),
             ("sensitivity_json", "--sensitivity"), ("mix_embed_head", "--mix-embed-head"), ("kquants", "--kquants"))


def _refuse_auto_args(args) -> None:
    """DllmExportError naming the --scheme auto options given without --scheme auto."""
    given = [flag for dest, flag in AUTO_ARGS if getattr(args, dest, None) not in (None, False)]
    if given:
        raise DllmExportError(f"{', '.join(given)} {'goes' if len(given) == 1 else 'go'} with --scheme auto")


def _auto_recipe(args, target: str | None, method: str, group_size: int | None = None) -> tuple[dict, dict]:
    """The mixed recipe of `--scheme auto --avg-bits B`: per-layer bits from a scan (run or read)."""
    from collections import Counter

    from .eval.sensitivity import auto_recipe, read_scan

    if args.avg_bits is None:
        raise DllmExportError("--scheme auto needs --avg-bits (e.g. --avg-bits 4.5)")
    scan = read_scan(args.sensitivity_json) if args.sensitivity_json else None
    bits = _int_list(args.bits_choices) if args.bits_choices else None
    if getattr(args, "kquants", False):
        if target != "gguf":
            raise DllmExportError("--kquants mixes GGUF K-quants: use it with --target gguf")
        target = "gguf-k"
    groups = _int_list(args.group_choices) if args.group_choices else ()
    opts, rec = auto_recipe(args.model, args.avg_bits, target=target, bits=bits, scan=scan, method=method,
                            group_size=group_size, group_sizes=groups, embed_head=args.mix_embed_head,
                            progress=not args.no_progress and sys.stderr.isatty())
    a = rec["allocation"]
    print(f"allocation: {a['avg_bits']:.4f} bits per weight (budget {a['avg_bits_budget']}), predicted KLD "
          f"{a['predicted_kld']:.4g} ({a['solver']}); layers per bit-width "
          f"{dict(sorted(Counter(str(o) for o in a['layer_bits'].values()).items()))}", file=sys.stderr)
    return opts, rec


def _at_least(lo: int, kind: type = int):
    """An argparse `type`: a number of `kind` >= `lo` (a one-line usage error otherwise)."""
    def convert(text: str):
        try:
            n = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(n):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if n < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {n}")
        return n
    return convert


def _threads(text: str) -> int:
    """An argparse `type` for --threads: `targets.check_threads` of an integer."""
    from .targets import check_threads

    try:
        return check_threads(_at_least(0)(text))
    except DllmExportError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise DllmExportError(f"expected comma-separated integers, got {text!r}") from None


def _executor(args):
    from .executors import get_executor

    return get_executor(args.executor, address=args.address, resources=args.cell_resources)


def _add_export_args(x) -> None:
    """The export options: on the root parser (`dllm-export --target onnx --bits 4`) and on `export`."""
    from .exporter.gguf import QUANT_TYPES
    from .exporter.onnx import ACT_KERNELS, WEIGHT_FORMATS
    from .quant import METHODS, SCHEMES
    from .quant.base import get_method
    from .targets import PROFILES

    x.add_argument("--target", help="export target: onnx | gguf")
    x.add_argument("--bits", type=int, help="weight bits (scheme W{bits}A16, or with --scheme its weight bits); "
                                         "16/32 or none = float")
    x.add_argument("--model", default="default", help="checkpoint folder, 'default' / 'default-dream', or a "
                                                       "quantized checkpoint (exported as is) (default: %(default)s)")
    x.add_argument("--method", type=_lookup(get_method), choices=sorted(METHODS),
                   help="PTQ method of a quantized export (default: gptq)")
    x.add_argument("--scheme", type=_lookup(_scheme_or_auto), choices=[*SCHEMES, "auto"],
                   metavar=_choices([*SCHEMES, "auto"]),
                   help="quantization scheme; auto: mixed precision, per-layer bits from a sensitivity scan under "
                        "--avg-bits (default: W{bits}A16)")
    _add_auto_args(x)
    x.add_argument("--group-size", type=int, help="weight group size (0 = per channel; default: the scheme's, or "
                                                  "the device profile's where it measured groups faster or better)")
    x.add_argument("--progressive", action=argparse.BooleanOptionalAction,
                   help="onnx: QServe's progressive group scales (integers x a channel scale): grouped W4A8 runs on "
                        "the int8 GEMM exactly (with --scheme W4A8 --group-size 128; default: the device profile's)")
    x.add_argument("--device", choices=["auto", *PROFILES],
                   help="device profile that fills the choices left open (auto: this host)")
    x.add_argument("--format", dest="weight_format", choices=WEIGHT_FORMATS,
                   help="onnx weights: qdq (DequantizeLinear -> MatMul, default) or matmulnbits")
    x.add_argument("--accuracy-level", type=int, choices=range(5), metavar="{0..4}",
                   help="onnx MatMulNBits accuracy level of weight-only layers: 0 fp32 (default), 4 int8")
    x.add_argument("--act-kernel", default="auto", choices=ACT_KERNELS, help="onnx per-token activations")
    x.add_argument("--embed-head", choices=("fp32", "int8"),
                   help="onnx embedding and LM head: fp32 (default without --device) | int8 (8-bit rows, blocks of "
                        "32: most of the bytes of big vocabularies; the edge profiles' default)")
    x.add_argument("--quant", type=str.upper, choices=QUANT_TYPES, metavar="GGUF_TYPE",
                   help=f"gguf type (default: Q4_0 for --bits 4, Q8_0 for 8; Q2_K..Q6_K: --method on the K-quant grid; "
                        f"Q4_K_M and other recipes: llama.cpp's quantizer): "
                        f"{', '.join(QUANT_TYPES)}")
    x.add_argument("--out", help="artifact folder (default: out/<model>-<target>-<scheme>-<method>, or "
                                 "out/<model>-<target>-float)")
    x.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_generate(sub) -> None:
    from .runtime.backends import BACKENDS
    from .quant.kernels import KERNELS
    from .runtime.loop import CACHES, PRESETS

    g = sub.add_parser("generate", help="decode text from a prompt by iterative unmasking")
    _add_model_arg(g)
    g.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto (by what --model holds) | torch | onnxruntime | llama.cpp")
    g.add_argument("--threads", type=_threads, default=0, help="CPU threads (default: one per physical core)")
    g.add_argument("--kernel", choices=KERNELS, default="fake",
                   help="torch backend, quantized checkpoints: fake (dequantized weights, the reference) | int "
                        "(int4/int8 CPU kernels on the packed codes) (default: %(default)s)")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--suffix", action="append",
                   help="infilling: text after the generated tokens (once: every prompt's; or once per --prompt)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the instruct chat template")
    g.add_argument("--gen-length", type=int, default=64, help="tokens to generate (default: %(default)s)")
    g.add_argument("--steps", type=int, help="denoising steps (default: gen-length); threshold / factor decoding "
                                             "runs each block until it is decoded, as Fast-dLLM's loops do")
    g.add_argument("--block-length", type=int, help="semi-autoregressive block size (default: gen-length)")
    g.add_argument("--sampler", help="low_confidence | random | origin | maskgit_plus | topk_margin | entropy "
                                     "(default: the model family's)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--alg-temp", type=float, help="Dream: sample positions by softmax(confidence / alg_temp)")
    g.add_argument("--threshold", type=float, help="Fast-dLLM parallel decoding confidence threshold")
    g.add_argument("--factor", type=float, help="Fast-dLLM factor rule for parallel decoding (instead of --threshold)")
    g.add_argument("--cache", choices=CACHES, help="block KV cache (default: none; dual = Fast-dLLM's)")
    g.add_argument("--refresh", type=int, help="with a cache: also a full forward every N steps inside a block")
    g.add_argument("--refresh-tokens", type=int,
                   help="with a cache: a full forward once N tokens were committed since the cache was filled")
    g.add_argument("--refresh-blocks", type=int,
                   help="with a cache: a full forward starts only every N-th block; the others start by renewing the "
                        "cache from the block before's start (dLLM-Cache's long-interval prompt cache; other tokens)")
    g.add_argument("--stop-at-eos", action="store_true", default=None,
                   help="stop once a decoded block holds an end token; fill the rest with EOS")
    g.add_argument("--preset", choices=sorted(PRESETS), default="reference",
                   help="defaults for --cache/--threshold/--refresh-tokens/--stop-at-eos: reference (the released "
                        "loops) | edge (dual cache refreshed after 16 commits, threshold 0.99, stop at EOS; no cache "
                        "where the backend has none) (default: %(default)s)")
    g.add_argument("--seed", type=int, help="random seed (for temperature > 0 or random samplers)")
    g.add_argument("--json", action="store_true", help="print ids, commit steps and timings as JSON")
    g.add_argument("--logprobs", type=int, metavar="K",
                   help="with --json: each generated token's log-probability under the step that committed it, "
                        "and that step's top K tokens (0..20)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_quantize(sub) -> None:
    from .quant import METHODS, SCHEMES
    from .quant.base import get_method

    q = sub.add_parser("quantize", help="post-training quantization into a quantized checkpoint folder")
    q.add_argument("--model", default="default", help="checkpoint folder or 'default' (default: %(default)s)")
    q.add_argument("--method", default="gptq", type=_lookup(get_method), choices=sorted(METHODS),
                   help="PTQ method (default: %(default)s)")
    q.add_argument("--scheme", default="W4A16", type=_lookup(_scheme_or_auto), choices=[*SCHEMES, "auto"],
                   metavar=_choices([*SCHEMES, "auto"]),
                   help="quantization scheme; auto: per-layer bits under --avg-bits (default: %(default)s)")
    _add_auto_args(q)
    q.add_argument("--bits", type=int, dest="w_bits", help="override the scheme's weight bits (2..8)")
    q.add_argument("--group-size", type=int, help="weight group size (0 = per channel; default: the scheme's)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_const", const=True, help="symmetric weight grid")
    sym.add_argument("--asym", dest="sym", action="store_const", const=False,
                     help="asymmetric weight grid (default of both: the method's, else the scheme's)")
    q.add_argument("--zero-kind", default="int", choices=("int", "float"),
                   help="asymmetric zero as 'int' zero point or 'float' minimum")
    q.add_argument("--mse-clip", action="store_true", help="MSE clip search of the weight grid (RTN/GPTQ)")
    q.add_argument("--act-order", action="store_true", help="GPTQ act-order (static groups)")
    q.add_argument("--progressive", action="store_true",
                   help="QServe's progressive group scales: integers x one channel scale, so a grouped symmetric "
                        "grid of <= 4 bits runs on the int8 GEMMs exactly (ONNX and the torch int kernels)")
    q.add_argument("--act-granularity", default="per_token", choices=("per_token", "per_tensor"),
                   help="activations: per_token (dynamic, default) or per_tensor (static, calibrated)")
    q.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (default: %(default)s)")
    q.add_argument("--weight-method", default="gptq", choices=("rtn", "gptq"),
                   help="rounding for smoothquant/quarot/duquant (default: %(default)s)")
    q.add_argument("--calib", default="default", help="'default' (bundled corpus) or a local .txt / .jsonl file")
    q.add_argument("--calib-mask", default="uniform", help="'uniform' (mask-aware, default), 'decode' (timestep-aware: "
                                                         "decoding's canvases at the mask ratios the loop visits, "
                                                         "measured first) or 'none' (plain text)")
    q.add_argument("--calib-samples", type=int, default=64)
    q.add_argument("--calib-seq-len", type=int, default=256)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--torch-device", default="cpu",
                   help="where blocks are calibrated and rounded: cpu (default) or cuda (rtn and gptq)")
    q.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    q.add_argument("--no-progress", action="store_true")


def _add_bench_build(sub) -> None:
    from .quant.kernels import KERNELS
    from .runtime.backends import BACKENDS
    from .runtime.loop import CACHES, PRESETS

    bn = sub.add_parser("bench", help="artifacts side by side: load, step latency, tokens/s, memory, size")
    bn.add_argument("artifacts", nargs="+", help="checkpoint folders, ONNX / GGUF artifact folders, .gguf files, "
                                                "'default'; ratios are to the first")
    bn.add_argument("--backend", default="auto", choices=BACKENDS,
                    help="auto (by what each path holds) | torch | onnxruntime | llama.cpp")
    bn.add_argument("--canvas", type=_at_least(1), default=128,
                    help="tokens of one timed denoising step (default: %(default)s)")
    bn.add_argument("--reps", type=_at_least(1), default=10, help="timed denoising steps (default: %(default)s)")
    bn.add_argument("--decode-reps", type=_at_least(1), default=3,
                    help="timed decodes after a warm-up one; tokens/s is their median (default: %(default)s)")
    bn.add_argument("--gen-length", type=int, default=64)
    bn.add_argument("--steps", type=int, help="denoising steps of the timed decode (default: --gen-length)")
    bn.add_argument("--block-length", type=int, help="decode block (default: 32 where it divides --gen-length, "
                                                        "else --gen-length)")
    bn.add_argument("--cache", choices=CACHES, help="block KV cache of the timed decode (default: none)")
    bn.add_argument("--threshold", type=float)
    bn.add_argument("--refresh-tokens", type=int, help="with a cache: a full forward once N tokens were committed past it")
    bn.add_argument("--refresh-blocks", type=int, help="with a cache: a full forward starts only every N-th block")
    bn.add_argument("--stop-at-eos", action="store_true", default=None, help="stop the timed decode at an EOS block")
    bn.add_argument("--preset", choices=sorted(PRESETS), default="reference",
                    help="defaults for --cache/--threshold/--refresh-tokens/--stop-at-eos, as generate's, per "
                         "artifact (default: %(default)s)")
    bn.add_argument("--threads", type=_threads, default=0, help="CPU threads (default: one per physical core)")
    bn.add_argument("--quality", action="store_true", help="also arithmetic exact match on held-out problems")
    bn.add_argument("--json", dest="json_out", help="write the results here")
    bn.add_argument("--markdown", help="write a markdown table here")
    bn.add_argument("--plot", help="write a PNG of every figure here")
    bn.add_argument("--torch-device", default="cpu", help="device of torch-backend artifacts (cpu, cuda)")
    bn.add_argument("--no-roofline", action="store_true", help="skip the step floors (host bandwidth / GEMM rates)")
    bn.add_argument("--profile", action="store_true",
                    help="also one decode under the runtime's profiler: time per op type (onnxruntime, torch)")
    bn.add_argument("--kernel", choices=KERNELS, default="fake",
                    help="quantized checkpoints on torch: fake | int (integer CPU kernels, bf16 where the host "
                         "has bf16 units) (default: %(default)s)")

    bd = sub.add_parser("build", help="build a matrix of artifacts from a TOML config, with quality gates")
    bd.add_argument("config", help="build TOML (see examples/build.toml)")
    bd.add_argument("--out", help="output folder (must not exist or be empty)")
    bd.add_argument("--matrix", action="store_true",
                    help="print the cells as a JSON CI matrix ({\"include\": [{\"cell\": KEY, \"id\": ...}]}) and exit")
    bd.add_argument("--cell", action="append", help="build only this cell, MODEL/TARGET (repeatable)")
    bd.add_argument("--merge", nargs="+", metavar="PART",
                    help="join the --out folders of per-cell builds into --out (one release manifest)")
    _add_executor_args(bd)
    bd.add_argument("--no-progress", action="store_true")


def _add_analyze_eval(sub) -> None:
    an = sub.add_parser("analyze", help="activation outliers at every linear input (JSON + markdown)")
    _add_model_arg(an)
    an.add_argument("--out", required=True, help="output folder for outliers.json and outliers.md")
    an.add_argument("--samples", type=int, default=16, help="calibration windows (default: %(default)s)")
    an.add_argument("--seq-len", type=int, default=128)
    an.add_argument("--ratios", default="0.15,0.5,0.85", help="mask ratios (default: %(default)s)")
    an.add_argument("--no-plots", action="store_true", help="JSON and markdown only, no PNG")
    an.add_argument("--sensitivity", action="store_true",
                    help="instead: the KLD each layer adds when quantized alone, per bit-width (sensitivity.json/.md)")
    an.add_argument("--bits-choices", default=None, help="--sensitivity bit-widths (default: the grid's: onnx "
                                                         "2,3,4,5,6,8; gguf 4,5,8; gguf-k 2,3,4,5,6,8)")
    an.add_argument("--granularity", default="layer", help="--sensitivity units: layer | role (default: %(default)s)")
    an.add_argument("--method", default="gptq", help="--sensitivity rounding: gptq | rtn (default: %(default)s)")
    an.add_argument("--grid", default="onnx", help="--sensitivity grids of a target: onnx (scheme groups) | gguf "
                                                   "(symmetric groups of 32) | gguf-k (K-quants) "
                                                   "(default: %(default)s)")
    an.add_argument("--group-size", type=int, help="--sensitivity group size (default: the grid's)")
    an.add_argument("--group-choices", help="--sensitivity, onnx grid: also scan each bit-width at these group "
                                            "sizes, as options of their own (e.g. 64,128)")
    an.add_argument("--windows", type=int, default=8, help="--sensitivity held-out windows per ratio (default: %(default)s)")
    an.add_argument("--mix-embed-head", action="store_true",
                    help="--sensitivity: scan the embedding and LM head too (units `embedding`, `head`)")
    an.add_argument("--no-progress", action="store_true")

    ev = sub.add_parser("eval", help="task suites (general / math / code) on a checkpoint or an artifact")
    ev.add_argument("--model", default="default", help="checkpoint, ONNX / GGUF artifact, or 'default'")
    ev.add_argument("--tasks", help="comma-separated tasks (default: docstring_cloze,arithmetic,line_infill; "
                                    "none with --fidelity unless given)")
    ev.add_argument("--items", type=int, help="items per task (default: the task's)")
    ev.add_argument("--fidelity", action="store_true",
                    help="KL divergence, top-1 agreement, logit SQNR and ELBO difference against --reference "
                         "at masked positions of held-out text")
    ev.add_argument("--reference", help="float model for --fidelity (default: the source in --model's manifest)")
    ev.add_argument("--ratios", default="0.15,0.5,0.85,decode",
                    help="--fidelity mask ratios; 'decode' = the loop's measured ones (default: %(default)s)")
    ev.add_argument("--windows", type=int, default=16, help="--fidelity held-out windows per ratio (default: %(default)s)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", dest="json_out", help="write the results here")

    le = sub.add_parser("lm-eval", help="lm-evaluation-harness tasks (GSM8K, HumanEval, ARC, ...) on a checkpoint "
                                        "or an artifact, as lm-eval's model `dllm`")
    le.add_argument("--model", default="default", help="checkpoint, ONNX / GGUF artifact, or 'default' / 'default-dream'")
    le.add_argument("--tasks", required=True, help="comma-separated lm-eval task / group names or task YAML files")
    le.add_argument("--include-path", help="folder of extra task YAMLs (local tasks)")
    le.add_argument("--limit", type=float, help="examples per task (a fraction when < 1)")
    le.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    le.add_argument("--model-args", default="", help="k=v,...: backend, dtype, mc_num, batch, greedy, gen_length, "
                                                     "steps, block_length, cache, threshold, sampler, seed, ...")
    le.add_argument("--gen-kwargs", help="k=v,... overriding the tasks' generation kwargs (until, max_gen_toks)")
    le.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the model's chat template")
    le.add_argument("--confirm-run-unsafe-code", action="store_true",
                    help="allow tasks that execute generated code (HumanEval, MBPP)")
    le.add_argument("--out", help="write lm-eval's results JSON here")
    le.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_report_verify_info(sub) -> None:
    rp = sub.add_parser("report", help="the study's grid: models x methods x schemes x tasks, with drops and findings")
    rp.add_argument("--models", default="default,default-dream")
    rp.add_argument("--methods", default="rtn,gptq,awq")
    rp.add_argument("--schemes", default="W8A16,W4A16,W3A16")
    rp.add_argument("--tasks", default="docstring_cloze,arithmetic,line_infill")
    rp.add_argument("--calib-masks", default="uniform", help="uniform (mask-aware) and/or none (plain text)")
    rp.add_argument("--items", type=int, help="items per task (default: the task's)")
    rp.add_argument("--calib-samples", type=int, default=32)
    rp.add_argument("--no-fidelity", action="store_true", help="no KLD / top-1 / ELBO columns (task scores only)")
    rp.add_argument("--fidelity-windows", type=int, default=16, help="held-out windows per mask ratio (default: %(default)s)")
    rp.add_argument("--out", required=True, help="report folder (cells are cached there: rerun to resume)")
    _add_executor_args(rp)

    vf = sub.add_parser("verify", help="check an artifact: file sizes and sha256, the format checker, a load and a "
                                       "smoke forward against its stored reference logits")
    vf.add_argument("artifact", help="ONNX / GGUF artifact folder (or its .gguf file), or a quantized checkpoint")
    vf.add_argument("--no-smoke", action="store_true", help="files and format only: no load, no forward")
    vf.add_argument("--json", action="store_true")

    i = sub.add_parser("info", help="print a checkpoint's family, spec and parameter count, or what an ONNX / "
                                    "GGUF artifact's manifest says it is (reads no weights)")
    _add_model_arg(i, dtype=False)
    i.add_argument("--json", action="store_true")


def _add_serve(sub) -> None:
    from .runtime.backends import BACKENDS
    from .runtime.loop import PRESETS
    from .targets import PROFILES

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, batching, "
                                      "metrics; Ollama's /api/* too) for a checkpoint or artifact")
    sv.add_argument("model", nargs="?", default="default",
                    help="checkpoint folder, 'default' / 'default-dream', ONNX or GGUF artifact (default: %(default)s)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--backend", default="auto", choices=BACKENDS,
                    help="default: by what MODEL holds")
    sv.add_argument("--device", choices=["auto", *PROFILES], help="device profile: its threads and onnxruntime "
                                                                  "providers (cuda: torch on the GPU)")
    sv.add_argument("--threads", type=_threads, default=0, help="CPU threads (default: one per physical core)")
    sv.add_argument("--max-batch", type=int, default=8, help="rows decoded together at most (default: %(default)s)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 429")
    sv.add_argument("--batch-wait-ms", type=_at_least(0, float), default=50.0,
                    help="under concurrency, wait this long for requests to join a batch (default: %(default)s)")
    sv.add_argument("--timeout", type=float, default=300.0, help="seconds per request, queueing included")
    sv.add_argument("--api-key", default=os.environ.get("DLLM_EXPORT_API_KEY"),
                    help="require Authorization: Bearer KEY on /v1/* and /api/* (default: $DLLM_EXPORT_API_KEY, "
                         "or none)")
    sv.add_argument("--max-tokens", type=_at_least(1),
                    help="gen length when a request sets no max_tokens (default: 64, or the limit where lower)")
    sv.add_argument("--preset", choices=sorted(PRESETS), default="reference",
                    help="decoding defaults of requests that set none (a request's `preset` or own settings win): "
                         "reference (the released loops) | edge (dual cache refreshed after 16 commits, threshold "
                         "0.99, stop at EOS) (default: %(default)s)")
    sv.add_argument("--max-tokens-limit", type=_at_least(1), help="largest max_tokens accepted (default: the context)")
    sv.add_argument("--block-length", type=_at_least(1),
                    help="block length of requests that name none, where it divides their max_tokens and steps: "
                         "requests of other lengths then share decodings and join them at block boundaries "
                         "(default: one block of max_tokens, as generate)")
    sv.add_argument("--max-body-bytes", type=int, default=1 << 20)
    sv.add_argument("--model-id", help="the model name clients use (default: the folder's name)")
    sv.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug", "trace"),
                    help="uvicorn's log level (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The `dllm-export` parser: export options at the root (and as `export`), one subparser per command;
    the choices of methods, schemes, device profiles and GGUF types come from their registries."""
    parser = _Parser(prog="dllm-export", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    _add_export_args(parser.add_argument_group("export (no subcommand, or `export`): quantize and write an "
                                               "artifact for a target"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_export_args(sub.add_parser("export", help="quantize and write an artifact for a target (as the root "
                                                   "options: dllm-export --target onnx --bits 4)"))
    for add in (_add_generate, _add_quantize, _add_bench_build, _add_analyze_eval, _add_report_verify_info, _add_serve):
        add(sub)
    return parser


def cmd_generate(args) -> int:
    from . import generate, load_tokenizer
    from .runtime.backends import load_backend
    from .runtime.loop import with_preset
    from .tokenizer import encode_prompt

    t0 = time.perf_counter()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load_backend(args.model, backend=args.backend, dtype=args.dtype, threads=args.threads, kernel=args.kernel)
    tok = load_tokenizer(args.model)
    load_s = time.perf_counter() - t0
    if args.logprobs is not None and not args.json:
        raise InputError("--logprobs prints with --json")
    prompts = [encode_prompt(tok, p, chat=args.chat) for p in args.prompt]
    suffixes = _suffixes(args, tok)
    bar = None
    if not (args.no_progress or args.json) and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=args.steps or args.gen_length, desc="denoising", unit="step", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    opts = with_preset(args.preset, {"cache": args.cache, "threshold": args.threshold, "factor": args.factor,
                                     "refresh": args.refresh, "refresh_tokens": args.refresh_tokens,
                                     "refresh_blocks": args.refresh_blocks, "stop_at_eos": args.stop_at_eos},
                       model.supports_cache)
    out = generate(model, prompts, gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                   sampler=args.sampler, temperature=args.temperature, cfg_scale=args.cfg_scale, top_k=args.top_k,
                   top_p=args.top_p, alg_temp=args.alg_temp, seed=args.seed, callback=progress,
                   suffix_ids=suffixes, logprobs=args.logprobs, **opts)
    if bar is not None:
        bar.close()
    texts = [tok.decode(row, skip_special_tokens=True) for row in out.generated.tolist()]
    if args.json:
        n_tokens = out.generated.numel()
        print(json.dumps({
            "model": str(args.model), "backend": model.name, "family": model.spec.family, "prompts": args.prompt,
            "suffixes": args.suffix, "text": texts, "ids": out.ids.tolist(), "prompt_length": out.prompt_length,
            "commit_step": out.commit_step.tolist(), "nfe": out.nfe, "settings": out.settings,
            **_logprobs_json(out),
            "timings": {"load_s": round(load_s, 4), "generate_s": round(out.seconds, 4),
                        "tokens_per_s": round(n_tokens / out.seconds, 2) if out.seconds else None,
                        "s_per_step": round(out.seconds / max(out.nfe, 1), 5),
                        "tokens_per_step": round(n_tokens / max(out.nfe, 1), 3)},
        }, indent=2))
    else:
        after = [""] * len(args.prompt) if not args.suffix else args.suffix * (len(args.prompt) // len(args.suffix))
        for prompt, text, suffix in zip(args.prompt, texts, after):
            print(prompt + text + suffix if not args.chat else text)
    return 0


def _logprobs_json(out) -> dict:
    """`generate --json --logprobs`'s fields: per row and position the token's log-probability (null
    where no step committed it) and the top tokens as [id, log-probability] pairs."""
    if out.logprobs is None:
        return {}
    nan_to_none = lambda rows: [[None if v != v else v for v in row] for row in rows]  # noqa: E731
    res = {"logprobs": nan_to_none(out.logprobs.tolist())}
    if out.top_logprobs is not None:
        values, ids = out.top_logprobs
        res["top_logprobs"] = [[[[i, v] for i, v in zip(pi, pv) if i >= 0] for pi, pv in zip(ri, rv)]
                               for ri, rv in zip(ids.tolist(), values.tolist())]
    return res


def _suffixes(args, tok) -> list[list[int]] | None:
    """Token ids of `--suffix` (one for every prompt, or one per prompt), or None."""
    from .tokenizer import encode_prompt

    if not args.suffix:
        return None
    if args.chat:
        raise InputError("--suffix infills between a raw prompt and the suffix; --chat ends the prompt with the "
                         "assistant's turn (drop one of them)")
    if len(args.suffix) not in (1, len(args.prompt)):
        raise InputError(f"{len(args.suffix)} --suffix for {len(args.prompt)} --prompt (give one for every prompt, "
                         f"or one per prompt)")
    return [encode_prompt(tok, s) for s in args.suffix]


def cmd_quantize(args) -> int:
    from .quant import CalibConfig, QuantizeConfig
    from .verify import quantize_verified

    sym = args.sym
    scheme, group_size, mixed = args.scheme, args.group_size, {}
    if args.scheme.lower() == "auto":
        opts, _ = _auto_recipe(args, None, args.method, args.group_size)
        scheme, group_size, sym = opts["scheme"], opts["group_size"], opts["sym"]
        mixed = {k: opts[k] for k in ("layer_bits", "avg_bits", "mix_embed_head")}
    else:
        _refuse_auto_args(args)
    decode = {}
    if args.calib_mask == "decode":  # measured with the float model's own loop on held-out prompts
        from . import load_tokenizer
        from .eval.fidelity import calibration_decode_ratios
        from .runtime.backends import load_backend

        decode = {"decode_ratios": tuple(calibration_decode_ratios(load_backend(args.model),
                                                                   load_tokenizer(args.model)))}
    qcfg = QuantizeConfig(method=args.method, scheme=scheme, bits=args.w_bits, group_size=group_size, sym=sym,
                          zero_kind=args.zero_kind, mse_clip=args.mse_clip, act_order=args.act_order, alpha=args.alpha,
                          weight_method=args.weight_method, seed=args.seed, act_granularity=args.act_granularity,
                          progressive=args.progressive,
                          calib=CalibConfig(source=args.calib, n_samples=args.calib_samples,
                                            seq_len=args.calib_seq_len, mask=args.calib_mask, seed=args.seed, **decode),
                          **mixed)
    t0 = time.perf_counter()  # the time is printed, not stored: the manifest identifies the weights only
    out, _ = quantize_verified(args.model, args.out, qcfg, progress=not args.no_progress and sys.stderr.isatty(),
                               device=args.torch_device)
    seconds = time.perf_counter() - t0
    from .verify import override_bits

    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    worst = max(manifest["blocks"], key=lambda b: b["out_rel_err"])
    bits = override_bits(manifest)
    label = manifest["scheme"] + (f" at {bits}-bit weights" if bits else "")
    print(f"{out}: {args.method} {label}, {len(manifest['layers'])} quantized layers, {size / 2**20:.2f} MiB, "
          f"quantized in {seconds:.2f} s; worst block output error {worst['out_rel_err']:.3g} (block {worst['index']})")
    return 0


def cmd_bench(args) -> int:
    from .bench import BenchConfig, bench, to_markdown
    from .fileio import atomic_file, check_output_file

    for f in (args.json_out, args.markdown, args.plot):  # before the run's minutes
        if f:
            check_output_file(f)
    cfg = BenchConfig(canvas=args.canvas, reps=args.reps, decode_reps=args.decode_reps, gen_length=args.gen_length,
                      steps=args.steps, block_length=args.block_length, cache=args.cache, threshold=args.threshold,
                      refresh_tokens=args.refresh_tokens, refresh_blocks=args.refresh_blocks,
                      stop_at_eos=args.stop_at_eos, preset=args.preset,
                      threads=args.threads, backend=args.backend, quality=args.quality, device=args.torch_device,
                      kernel=args.kernel, roofline=not args.no_roofline, profile=args.profile)
    res = bench(args.artifacts, cfg)
    table = to_markdown(res)
    print(table, end="")
    for name, text in ((args.json_out, json.dumps(res, indent=2) + "\n"), (args.markdown, table)):
        if name:
            with atomic_file(name) as tmp:
                tmp.write_text(text)
    if args.plot:
        from .eval.plots import plot_bench

        with atomic_file(args.plot) as tmp:
            plot_bench(res, tmp)
    failed = [r for r in res["artifacts"] if "error" in r]
    for r in failed:  # the table says it too, but a script reads stderr
        print(f"dllm-export: error: {r['path']}: {r['error']}", file=sys.stderr)
    return 2 if failed else 0


def cmd_build(args) -> int:
    from .build import build, merge, plan_matrix

    if args.matrix:
        print(json.dumps(plan_matrix(args.config), separators=(",", ":")))
        return 0
    if not args.out:
        raise DllmExportError("build needs --out (or --matrix)")
    if args.merge:
        if args.cell:
            raise DllmExportError("--merge joins whole cells; --cell applies to a build")
        m = merge(args.config, args.merge, args.out)
    else:
        m = build(args.config, args.out, progress=not args.no_progress and sys.stderr.isatty(),
                  executor=_executor(args), cells=args.cell)
    errors = False
    for c in m["cells"]:
        if "error" in c:
            errors = True
            print(f"dllm-export: cell {c['cell']}: {c['error']}", file=sys.stderr)
            continue
        q, d = c["quality"], c["deltas"]
        print(f"{c['cell']:40s} {c['gate']:6s} bits/token {q['bits_per_token']:.3f} ({d['bpt_increase']:+.1%}), "
              f"arith EM {q['arith_em']:.3f} ({-d['arith_em_drop']:+.3f}), "
              f"{sum(f['bytes'] for f in c['files'].values()) / 2**20:.2f} MiB")
    gated = [c["cell"] for c in m["cells"] if "error" not in c and c["gate"] != "pass"]
    if gated:
        print(f"dllm-export: quality gate failed: {', '.join(gated)}", file=sys.stderr)
    if errors:  # the exporter refused a cell (bad input) or a cell raised
        return 2
    if gated:
        return 1
    print(f"wrote {args.out}/manifest.json ({len(m['cells'])} artifacts) and measurements.json")
    return 0


def cmd_sensitivity(args) -> int:
    from . import load_model, load_tokenizer
    from .fileio import atomic_folder, check_output_folder
    from .eval.fidelity import FidelityConfig
    from .eval.sensitivity import TARGET_GRIDS, SensitivityConfig, sensitivity_scan, to_markdown
    from .models.checkpoint import resolve_float_checkpoint

    if args.grid not in ("onnx", "gguf", "gguf-k"):
        raise DllmExportError(f"--grid must be onnx, gguf or gguf-k, got {args.grid!r}")
    grid = TARGET_GRIDS[args.grid]
    if args.group_size is not None and (grid.get("kquant") or grid["group_size"] not in (None, args.group_size)):
        raise DllmExportError(f"--grid {args.grid} stores groups of {grid['group_size'] or 'its types'} weights")
    if args.group_choices and args.grid != "onnx":
        raise DllmExportError(f"--grid {args.grid} stores a layer's groups in its block type: no --group-choices")
    cfg = SensitivityConfig(bits=_int_list(args.bits_choices) if args.bits_choices else grid["bits"],
                            granularity=args.granularity, method=args.method,
                            group_size=grid["group_size"] or args.group_size,
                            group_sizes=_int_list(args.group_choices) if args.group_choices else (),
                            sym=grid["sym"], fidelity=FidelityConfig(ratios=FidelityConfig.parse_ratios(args.ratios),
                                                                     windows=args.windows, elbo=False),
                            embed_head=args.mix_embed_head, kquant=bool(grid.get("kquant")))
    resolve_float_checkpoint(args.model, "a sensitivity scan")
    out = check_output_folder(args.out)  # before the scan's minutes
    res = sensitivity_scan(load_model(args.model), load_tokenizer(args.model), cfg,
                           progress=not args.no_progress and sys.stderr.isatty())
    with atomic_folder(out) as tmp:
        (tmp / "sensitivity.json").write_text(json.dumps(res, indent=2) + "\n")
        (tmp / "sensitivity.md").write_text(to_markdown(res, top=len(res["units"])))
    print(to_markdown(res, top=10), end="")
    print(f"wrote {out / 'sensitivity.json'}, {out / 'sensitivity.md'}")
    return 0


def cmd_analyze(args) -> int:
    if args.sensitivity:
        return cmd_sensitivity(args)

    from . import load_model, load_tokenizer
    from .fileio import atomic_folder, check_output_folder
    from .eval.outliers import analyze, to_markdown
    from .quant.calibrate import CalibConfig, calibration_ids

    try:
        ratios = tuple(float(r) for r in args.ratios.split(",") if r.strip())
    except ValueError:
        raise DllmExportError(f"--ratios takes mask ratios in [0, 1] separated by commas, got {args.ratios!r}") \
            from None
    out = check_output_folder(args.out)  # before the model runs
    model = load_model(args.model, dtype=args.dtype or "float32")
    ids, _ = calibration_ids(load_tokenizer(args.model), model.spec,
                             CalibConfig(n_samples=args.samples, seq_len=args.seq_len, mask="none"),
                             model.config.dims.context)
    snapshots: dict = {}
    res = analyze(model, ids, model.spec.mask_id, ratios=ratios, snapshots=snapshots)
    with atomic_folder(out) as tmp:
        (tmp / "outliers.json").write_text(json.dumps(res, indent=2) + "\n")
        (tmp / "outliers.md").write_text(to_markdown(res))
        if not args.no_plots:
            from .eval.plots import plot_outliers

            # the pictures: every block's FFN hidden state (down) and the block with the worst q input
            worst_q = max((n for n in snapshots if res["layers"][n]["role"] == "q"),
                          key=lambda n: res["layers"][n]["all"]["channel_max_over_median"], default=None)
            keep = {n: x for n, x in snapshots.items() if res["layers"][n]["role"] != "q" or n == worst_q}
            plot_outliers(res, tmp, keep)
    print(f"{len(res['layers'])} linear inputs over {res['windows']} windows x {len(res['ratios'])} mask ratios; "
          f"largest channel max/median by role: {res['by_role']}")
    for f in res["flagged"][:10]:
        print(f"  {f['layer']}: channel outliers {f['channel_outliers']}, massive tokens {f['massive']}")
    print(f"wrote {out / 'outliers.json'}, {out / 'outliers.md'}" + ("" if args.no_plots else ", PNG plots"))
    return 0


def _fidelity_reference(model: str, reference: str | None) -> str:
    """The float model a --fidelity run compares with: --reference, else the manifest's source."""
    from pathlib import Path

    if reference:
        return reference
    from .formats import artifact_folder
    from .models.checkpoint import BUNDLED, source_record

    manifest = Path(artifact_folder(model)) / "manifest.json"
    src = json.loads(manifest.read_text()).get("source") if manifest.is_file() else None
    # manifests name their source by folder name + sha256, not a path: only a bundled model is found
    for name, folder in BUNDLED.items():
        if isinstance(src, dict) and src.get("name") == folder and source_record(name) == src:
            return name
    raise DllmExportError(f"--fidelity: {model} records no float source that exists here; pass --reference")


def cmd_eval(args) -> int:
    from . import load_tokenizer
    from .eval.fidelity import FidelityConfig, fidelity, to_markdown
    from .eval.tasks import check_items, check_tasks, run_task
    from .fileio import atomic_file, check_output_file
    from .models.checkpoint import resolve_model_path
    from .runtime.backends import load_backend

    tasks = args.tasks or ("" if args.fidelity else "docstring_cloze,arithmetic,line_infill")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names and not args.fidelity:
        raise DllmExportError(f"--tasks names no task (got {args.tasks!r})")
    # everything a later step would refuse, before the first task's minutes
    check_tasks(names)
    check_items(args.items)
    if args.json_out:
        check_output_file(args.json_out)
    if args.fidelity:
        cfg = FidelityConfig(ratios=FidelityConfig.parse_ratios(args.ratios), windows=args.windows, seed=args.seed)
        ref = _fidelity_reference(args.model, args.reference)
        resolve_model_path(ref)  # a reference that is not there: now, not after the tasks
    be = load_backend(args.model)
    tok = load_tokenizer(args.model)
    results = [run_task(be, tok, t, args.items, seed=args.seed) for t in names]
    for r in results:
        print(f"{r['task']:18s} {r['category']:8s} {r['score']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
              f"({r['n']} items)")
    out = {"model": str(args.model), "backend": be.name, "results": results}
    if args.fidelity:
        out["reference"] = str(ref)
        out["fidelity"] = fidelity(be, load_backend(ref), tok, cfg)
        print(f"fidelity of {args.model} against {ref}:")
        print(to_markdown(out["fidelity"]), end="")
    if args.json_out:
        with atomic_file(args.json_out) as tmp:
            tmp.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def cmd_lm_eval(args) -> int:
    try:
        from .eval import harness
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        raise DllmExportError("lm-eval is not installed: pip install lm-eval") from None

    model_args = harness.parse_model_args(args.model_args)
    if args.no_progress or not sys.stderr.isatty():
        model_args.setdefault("disable_tqdm", True)
    if args.out:  # before the run, not after its minutes
        harness.check_results_path(args.out)
    res = harness.evaluate(args.model, args.tasks, model_args=model_args, include_path=args.include_path,
                           limit=args.limit, num_fewshot=args.num_fewshot, gen_kwargs=args.gen_kwargs,
                           apply_chat_template=args.apply_chat_template,
                           confirm_run_unsafe_code=args.confirm_run_unsafe_code)
    print(harness.results_table(res), end="")
    if args.out:
        print(f"wrote {harness.write_results(res, args.out)}")
    return 0


def cmd_report(args) -> int:
    from .eval.report import ReportConfig, run_report

    split = lambda v: tuple(x.strip() for x in v.split(",") if x.strip())  # noqa: E731
    cfg = ReportConfig(models=split(args.models), methods=split(args.methods), schemes=split(args.schemes),
                       tasks=split(args.tasks), calib_masks=split(args.calib_masks), items=args.items,
                       calib_samples=args.calib_samples, fidelity=not args.no_fidelity,
                       fidelity_windows=args.fidelity_windows)
    res = run_report(cfg, args.out, progress=sys.stderr.isatty(), executor=_executor(args))
    for f in res["findings"]:
        print(f)
    print(f"wrote {args.out}/report.md, report.csv, report.json, score_vs_bits.png")
    for f in res["failed"]:
        print(f"dllm-export: cell {f['cell']} failed: {f['error']}", file=sys.stderr)
    return 1 if res["failed"] else 0


def cmd_info(args) -> int:
    from .models import family_for
    from .models.checkpoint import read_config, resolve_model_path, tokenizer_special_ids, weight_files
    from .models.loader import build_model
    from .runtime.backends import backend_kind

    if backend_kind(args.model) != "torch":
        return _artifact_info(args)
    path = resolve_model_path(args.model)
    config = read_config(path)
    model = build_model(config, device="meta", added_tokens=tokenizer_special_ids(path))
    n_params = sum(p.numel() for p in model.parameters())
    files = weight_files(path)
    info = {
        "path": str(path), "family": family_for(config.get("model_type")).spec.family,
        "checkpoint_dtype": config.get("torch_dtype"), "parameters": n_params,
        "files": [f.name for f in files], "bytes": sum(f.stat().st_size for f in files),
        "config": {k: v for k, v in vars(model.config).items()}, "spec": model.spec.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"{info['path']}: {info['family']} ({config.get('model_type')}), {n_params:,} parameters "
              f"({n_params / 1e6:.1f}M), {info['checkpoint_dtype']}, {len(files)} file(s), {info['bytes'] / 2**20:.1f} MiB")
        for k, v in info["config"].items():
            print(f"  {k:24s} {v}")
        s = model.spec
        print(f"  {'mask/eos/pad/bos/eot id':24s} {s.mask_id} / {s.eos_id} / {s.pad_id} / {s.bos_id} / {s.eot_id}")
        print(f"  {'shift_logits':24s} {s.shift_logits}")
        print(f"  {'default sampler':24s} {s.default_sampler}")
    return 0


def _artifact_info(args) -> int:
    """`info` on an ONNX / GGUF artifact: what its manifest says it is."""
    from .verify import artifact_info

    info = artifact_info(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    scheme = info["scheme"] and info["scheme"] + (f" at {info['weight_bits']}-bit weights" if info["weight_bits"] else "")
    grid = " ".join(str(x) for x in (info["method"], scheme, info["file_type"]) if x) or "float"
    total = sum(b or 0 for b in info["files"].values())
    src = (info["source"] or {}).get("name", "?")
    print(f"{info['path']}: {info['kind'].upper()} artifact ({info['format']} v{info['version']}) of {src} "
          f"({info['family']}), {grid}, {len(info['files'])} file(s), {total / 2**20:.1f} MiB")
    for key in ("export", "dims", "spec"):
        for k, v in (info[key] or {}).items():
            print(f"  {key + '.' + k:28s} {v}")
    if info["device"]:
        print(f"  {'device':28s} {info['device']}")
    for name, size in info["files"].items():
        print(f"  {'file ' + name:28s} {size:,} bytes")
    return 0


def cmd_verify(args) -> int:
    from .verify import verify

    res = verify(args.artifact, smoke=not args.no_smoke)
    if args.json:
        print(json.dumps({"path": str(res.path), "kind": res.kind, "files": res.files, "checks": res.checks,
                          "ok": True}, indent=2))
    else:
        print(f"{res.path}: {res.kind} artifact verified")
        for c in res.checks:
            print(f"  {c}")
    return 0


def cmd_serve(args) -> int:
    try:
        from .serve import ServeConfig, bind_socket, load_engine, make_server
    except ModuleNotFoundError as e:
        raise DllmExportError(f"serve needs {e.name}: pip install 'dllm-export[serve]'") from None

    cfg = ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                      batch_wait=args.batch_wait_ms / 1000, timeout=args.timeout, api_key=args.api_key or None,
                      max_body_bytes=args.max_body_bytes)
    sock = bind_socket(args.host, args.port)  # before the load: a taken port fails fast
    engine = load_engine(args.model, backend=args.backend, device=args.device, threads=args.threads,
                         model_id=args.model_id, default_max_tokens=args.max_tokens,
                         max_tokens_limit=args.max_tokens_limit, preset=args.preset,
                         default_block_length=args.block_length)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        print(f"dllm-export: warning: listening on {args.host} without --api-key", file=sys.stderr)
    print(f"dllm-export: serving {engine.model_id!r} ({engine.backend.name}) at "
          f"http://{args.host}:{sock.getsockname()[1]}/v1", file=sys.stderr)
    try:
        make_server(engine, cfg, log_level=args.log_level).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once in-flight requests are finished
        print("dllm-export: server stopped", file=sys.stderr)
    return 0


def _host_profile():
    """This host's device profile, or None where none fits."""
    from .targets import detect

    try:
        return detect()
    except DllmExportError:
        return None


def _portable_note() -> str:
    """What `--device auto` would change for a portable ONNX export on this host."""
    profile = _host_profile()
    if profile is None:
        return "--device names the profile of the device it will run on"
    return (f"--device auto builds for this host ({profile.name}) on its int8 kernels, faster at some fidelity "
            f"(README: Choosing a 4-bit ONNX artifact)")


def cmd_export(args) -> int:
    from pathlib import Path

    from .exporter import TARGETS
    from .verify import export_verified

    if args.target not in TARGETS:
        have = ", ".join(f"{k} ({v[0]})" for k, v in TARGETS.items())
        raise DllmExportError(f"unknown export target {args.target!r}; targets: {have}")
    label = args.quant or args.scheme or (f"W{args.bits}A16" if args.bits and args.bits < 16 else
                                          args.device or "float")
    scheme, group_size, qopts, extra = args.scheme, args.group_size, None, None
    if (args.scheme or "").lower() == "auto":
        if args.bits or args.quant:
            raise DllmExportError("--scheme auto chooses the bits per layer: drop --bits / --quant")
        opts, rec = _auto_recipe(args, args.target, args.method or "gptq", args.group_size)
        scheme, group_size = opts["scheme"], opts["group_size"]
        qopts = {k: opts[k] for k in ("layer_bits", "avg_bits", "sym", "mix_embed_head", "kquant")}
        extra = {"allocation": rec["allocation"]}
        label = f"auto{args.avg_bits:g}"
    else:
        _refuse_auto_args(args)
    if args.progressive is not None:
        qopts = {**(qopts or {}), "progressive": args.progressive}
    method = args.method or ("" if label == "float" else "gptq")  # a float export has no method to name
    out = args.out or Path("out") / "-".join(filter(None, (Path(str(args.model)).name, args.target, label,
                                                           method))).lower()
    res, _ = export_verified(args.model, out, target=args.target, bits=args.bits, method=args.method, scheme=scheme,
                             group_size=group_size, quantize_options=qopts, extra_manifest=extra,
                             weight_format=args.weight_format,
                             accuracy_level=args.accuracy_level, act_kernel=args.act_kernel, quant=args.quant,
                             device=args.device, embed_head=args.embed_head,
                             progress=not args.no_progress and sys.stderr.isatty())
    m = res.manifest
    size = sum(f.stat().st_size for f in res.path.iterdir() if f.name.startswith("model."))
    if args.target == "gguf":
        exact = " (PTQ grid written exactly)" if m["exact_from_ptq"] else ""
        print(f"{res.path / 'model.gguf'}: {m['family']} -> gguf arch {m['arch']}, {m['file_type']}{exact}, "
              f"{m['method'] or ''} {size / 2**20:.2f} MiB; quantize {res.quantize_seconds:.1f} s, "
              f"export {res.export_seconds:.1f} s; tensor types {m['tensor_types']}")
        note = (m.get("device") or {}).get("speed_note") or getattr(_host_profile(), "speed_note", "")
        if note:
            print(f"  speed: {note}")
        print(f"  run it: dllm-export generate --model {res.path} --prompt TEXT")
        return 0
    kernels = sorted(set(m["layers"].values()))
    print(f"{res.path}: {m['family']} -> {args.target} ({m['export']['weight_format']}), "
          f"{m['scheme'] or 'float32'} {m['method'] or ''}".rstrip() + f", {size / 2**20:.2f} MiB "
          f"(model.onnx + model.onnx.data); quantize {res.quantize_seconds:.1f} s, export {res.export_seconds:.1f} s")
    if m.get("device"):
        print(f"  built for device {m['device']['name']}: {m['device']['description']}")
    elif m["scheme"] and kernels == ["float"] and not m["simulated"]:  # weight-only codes, fp32 compute
        print(f"  portable: no --device, so fp32 arithmetic on every host; {_portable_note()}")
    print(f"  activations: {', '.join(kernels) or 'float'}; accuracy level {m['accuracy_level']}"
          + ("; SIMULATION graph (fake-quant activations: for accuracy studies, not speed)" if m["simulated"] else ""))
    if (m.get("quantize_settings") or {}).get("progressive"):
        print("  weights: progressive group scales (integers x a channel scale): grouped, on the int8 GEMM")
    print(f"  run it: dllm-export generate --model {res.path} --prompt TEXT")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dllm-export` console script; returns the exit code."""
    from .interrupts import terminate_as_interrupt

    if (sys.argv[1:] if argv is None else argv) == ["--version"]:  # without building the parser (torch: seconds)
        from . import __version__

        print(__version__)
        return 0
    with terminate_as_interrupt():
        return _run(build_parser(), argv)


def _run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """One command, its errors turned into one line and an exit code: 2 bad input, 130 / 143
    interrupted / terminated, 1 the machine or a bug (DLLM_EXPORT_DEBUG=1 re-raises with the traceback)."""
    from .interrupts import Terminated

    try:
        args = parser.parse_args(argv)
        if args.version:
            from . import __version__

            print(__version__)
            return 0
        if args.command is None:
            if args.target is None:
                if sys.argv[1:] if argv is None else argv:  # export options without the one that names the artifact
                    raise DllmExportError("an export needs --target (onnx | gguf); see dllm-export --help")
                parser.print_help()
                return 2
            return cmd_export(args)
        return {"export": cmd_export, "generate": cmd_generate, "info": cmd_info, "quantize": cmd_quantize,
                "bench": cmd_bench, "build": cmd_build, "analyze": cmd_analyze,
                "eval": cmd_eval, "lm-eval": cmd_lm_eval, "report": cmd_report,
                "verify": cmd_verify, "serve": cmd_serve}[args.command](args)
    except DllmExportError as e:
        print(f"dllm-export: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # every writer removes its temporary folder on the way out
        print(f"dllm-export: {'terminated' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except BrokenPipeError:  # the reader left (`dllm-export info | head`): stop quietly, as head's writers do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return 141
    except OSError as e:  # the machine (a full disk, a file gone mid-run): one line, exit 1; a file it may not
        where = f"{e.filename}: " if e.filename else ""  # read is one the user named (outputs are tried first): 2
        print(f"dllm-export: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2 if isinstance(e, PermissionError) else 1
    except Exception as e:  # a library's own error type (safetensors' disk full, ...) or a bug: still one line
        if os.environ.get("DLLM_EXPORT_DEBUG"):
            raise
        detail = " ".join(str(e).split())[:300] or "no message"
        print(f"dllm-export: error: {type(e).__name__}: {detail} (DLLM_EXPORT_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
