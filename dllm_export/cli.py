"""The `dllm-export` command line: a thin shell over the library; each subcommand is one library call.

    dllm-export generate --model default --prompt "def fibonacci(n):"
    dllm-export info --model DIR
    dllm-export --target onnx --bits 4        (exporters: see the targets that exist)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import DllmExportError

# Export targets that exist so far: name -> one-line description. The ONNX and GGUF exporters
# register here when they land.
EXPORT_TARGETS: dict[str, str] = {}


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="checkpoint folder (config.json + safetensors), or 'default' / 'default-dream' "
                        "for the bundled models (default: %(default)s)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | auto (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllm-export", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--target", help="export target (see the list printed when it is not available)")
    parser.add_argument("--bits", type=int, help="weight bit-width of the export")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("generate", help="decode text from a prompt by iterative unmasking")
    _add_model_arg(g)
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the instruct chat template")
    g.add_argument("--gen-length", type=int, default=64, help="tokens to generate (default: %(default)s)")
    g.add_argument("--steps", type=int, help="denoising steps (default: gen-length)")
    g.add_argument("--block-length", type=int, help="semi-autoregressive block size (default: gen-length)")
    g.add_argument("--sampler", help="low_confidence | random | origin | maskgit_plus | topk_margin | entropy "
                                     "(default: the model family's)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--alg-temp", type=float, help="Dream: sample positions by softmax(confidence / alg_temp)")
    g.add_argument("--threshold", type=float, help="Fast-dLLM parallel decoding confidence threshold")
    g.add_argument("--seed", type=int, help="random seed (for temperature > 0 or random samplers)")
    g.add_argument("--json", action="store_true", help="print ids, commit steps and timings as JSON")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="print a checkpoint's family, spec and parameter count")
    _add_model_arg(i)
    i.add_argument("--json", action="store_true")
    return parser


def cmd_generate(args) -> int:
    import torch  # noqa: F401  (imported here to keep `dllm-export --help` fast)

    from . import generate, load_model, load_tokenizer
    from .tokenizer import encode_prompt

    t0 = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype)
    tok = load_tokenizer(args.model)
    load_s = time.perf_counter() - t0
    prompts = [encode_prompt(tok, p, chat=args.chat) for p in args.prompt]
    bar = None
    if not (args.no_progress or args.json) and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=args.steps or args.gen_length, desc="denoising", unit="step", file=sys.stderr, leave=False)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    out = generate(model, prompts, gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                   sampler=args.sampler, temperature=args.temperature, cfg_scale=args.cfg_scale, top_k=args.top_k,
                   top_p=args.top_p, alg_temp=args.alg_temp, threshold=args.threshold, seed=args.seed,
                   callback=progress)
    if bar is not None:
        bar.close()
    texts = [tok.decode(row, skip_special_tokens=True) for row in out.generated.tolist()]
    if args.json:
        n_tokens = out.generated.numel()
        print(json.dumps({
            "model": str(model.checkpoint_path), "family": model.spec.family, "prompts": args.prompt,
            "text": texts, "ids": out.ids.tolist(), "prompt_length": out.prompt_length,
            "commit_step": out.commit_step.tolist(), "nfe": out.nfe, "settings": out.settings,
            "timings": {"load_s": round(load_s, 4), "generate_s": round(out.seconds, 4),
                        "tokens_per_s": round(n_tokens / out.seconds, 2) if out.seconds else None,
                        "s_per_step": round(out.seconds / max(out.nfe, 1), 5)},
        }, indent=2))
    else:
        for prompt, text in zip(args.prompt, texts):
            print(prompt + text if not args.chat else text)
    return 0


def cmd_info(args) -> int:
    from .models import family_for
    from .models.loader import build_model, read_config, resolve_model_path, tokenizer_special_ids, weight_files

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


def cmd_export(args) -> int:
    if args.target not in EXPORT_TARGETS:
        have = ", ".join(f"{k} ({v})" for k, v in EXPORT_TARGETS.items()) or "none yet"
        raise DllmExportError(f"export target {args.target!r} is not available; export targets that exist: {have}. "
                              "The torch runtime is: try `dllm-export generate --model default --prompt TEXT`")
    raise DllmExportError(f"target {args.target!r} is registered but has no exporter")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dllm-export` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.version:
            from . import __version__

            print(__version__)
            return 0
        if args.command is None:
            if args.target is None:
                parser.print_help()
                return 2
            return cmd_export(args)
        return {"generate": cmd_generate, "info": cmd_info}[args.command](args)
    except DllmExportError as e:
        print(f"dllm-export: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
