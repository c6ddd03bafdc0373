#!/usr/bin/env python3
"""dllm-export on-device runner: measure an exported artifact on a phone or a board.

One self-contained file: it needs numpy plus onnxruntime (ONNX artifacts) or llama-cpp-python
(GGUF artifacts), and the artifact folder; not torch, not dllm_export. Copy both to the device,
run it, bring back the JSON: the same figures as `dllm-export bench` (load time, per-step latency
median / p90, greedy decoding tokens/s, peak RSS, file size).

    python3 ondevice.py ARTIFACT_DIR [--canvas 128 --reps 10 --gen-length 64 --block-length 32 --threads 4]

`--dump FILE.npz` also saves the logits of the timed canvas and the greedy decode's tokens, so a run
on another machine (an ARM board, or aarch64 under emulation: scripts/arm64-root.sh) can be checked
for correctness against this one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# the manifest layout this runner reads: formats.FORMAT_VERSIONS of the ONNX and GGUF artifacts, copied
# because the runner stands alone on a device (tests/test_integrity.py keeps the two equal)
FORMAT_VERSION = 1


class OrtModel:
    """model.onnx through onnxruntime: full-sequence logits for one sequence."""

    name = "onnxruntime"

    def __init__(self, folder: Path, manifest: dict, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        for key, value in manifest.get("session_options", {}).items():
            opts.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own Fail / InvalidProtobuf / RuntimeException types
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise BadInput(f"{folder / 'model.onnx'}: onnxruntime cannot load it ({detail})") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        dims = manifest["dims"]
        self.kv = (dims["n_kv_heads"], dims["head_dim"])

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        B, L = ids.shape
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "logit_positions" in self.inputs:
            feed["logit_positions"] = np.broadcast_to(np.arange(L, dtype=np.int64), (B, L)).copy()
        if "window_start" in self.inputs:  # the block-step graph, run as a plain forward (empty past)
            feed["window_start"] = np.zeros(1, np.int64)
            empty = np.zeros((B, self.kv[0], 0, self.kv[1]), np.float32)
            feed.update({name: empty for name in self.inputs if name.startswith("past.")})
        return self.session.run(["logits"], feed)[0]


class LlamaModel:
    """model.gguf through llama-cpp-python's low-level API (non-causal, logits for every token)."""

    name = "llama.cpp"

    def __init__(self, folder: Path, manifest: dict, threads: int, max_tokens: int):
        import llama_cpp as L

        self.L = L
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(str(folder / "model.gguf").encode(), L.llama_model_default_params())
        if not self.model:  # NULL: using it would crash the process (SIGSEGV), not raise
            raise BadInput(f"{folder / 'model.gguf'}: llama.cpp cannot load it (its log above says why)")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = cp.n_outputs_max = max_tokens
        cp.n_seq_max = 1
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if threads:
            cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise BadInput(f"{folder / 'model.gguf'}: llama.cpp cannot make a context of {max_tokens} tokens")
        self.batch = L.llama_batch_init(max_tokens, 0, 1)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.max_tokens = max_tokens

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        row = ids[0]
        if len(row) > self.max_tokens:  # llama.cpp aborts the process past n_ubatch
            raise SystemExit(f"{len(row)} tokens exceed n_ubatch {self.max_tokens}")
        b = self.batch
        for i, tok in enumerate(row.tolist()):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, i, 1, 1
            b.seq_id[i][0] = 0
        b.n_tokens = len(row)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise SystemExit("llama_decode failed")
        return np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(len(row), self.n_vocab))[None].copy()


def decode(model, prompt: np.ndarray, gen_length: int, block_length: int, mask_id: int, shift: bool) -> tuple:
    """LLaDA's greedy low-confidence unmasking, one token per step (steps = gen_length)."""
    x = np.concatenate([prompt, np.full((1, gen_length), mask_id, np.int64)], axis=1)
    P = prompt.shape[1]
    nfe = 0
    for b in range(gen_length // block_length):
        hi = P + (b + 1) * block_length
        while (x[0, :hi] == mask_id).any():
            logits = model(x)[0]
            nfe += 1
            if shift:  # Dream: row i predicts token i + 1
                logits = np.concatenate([logits[:1], logits[:-1]])
            cols = np.nonzero(x[0, :hi] == mask_id)[0]
            lg = logits[cols].astype(np.float64)
            top = lg.argmax(-1)
            p = np.exp(lg - lg.max(-1, keepdims=True))
            conf = p[np.arange(len(cols)), top] / p.sum(-1)
            j = int(conf.argmax())
            x[0, cols[j]] = top[j]
    return x, nfe


class BadInput(Exception):
    """An artifact or a setting this runner cannot run."""


def _check(args) -> tuple[Path, dict]:
    """The artifact folder and its manifest, the counts checked; BadInput names what is wrong."""
    for name in ("canvas", "reps", "gen_length", "block_length"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads < 0:
        raise BadInput(f"--threads must be >= 0, got {args.threads}")
    if args.threads > 8 * (os.cpu_count() or 1):  # more only slow a run down; 100000 exhausts the process table
        raise BadInput(f"--threads {args.threads} on {os.cpu_count()} CPUs: at most {8 * (os.cpu_count() or 1)}")
    if args.dump:
        dump = Path(args.dump)
        if dump.is_dir() or not dump.parent.is_dir():  # checked now, not after the whole run
            raise BadInput(f"--dump {dump}: {'a folder' if dump.is_dir() else 'no folder ' + str(dump.parent)}; "
                           f"give a file name in an existing folder")
    if args.gen_length % args.block_length:
        raise BadInput(f"--gen-length {args.gen_length} is not a multiple of --block-length {args.block_length}")
    folder = Path(args.artifact)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        spec, dims = manifest["spec"], manifest["dims"]
        missing = [k for k, table in (("mask_id", spec), ("shift_logits", spec), ("vocab_rows", dims),
                                      ("family", manifest)) if k not in table]
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{folder}: not a dllm-export artifact (manifest.json: {type(e).__name__}: {e})") from None
    if manifest.get("version") != FORMAT_VERSION:
        raise BadInput(f"{folder}: manifest version {manifest.get('version')!r}; this runner reads v{FORMAT_VERSION} "
                       f"(use the ondevice.py of the dllm-export that wrote the artifact)")
    if not any((folder / f).is_file() for f in ("model.onnx", "model.gguf")):
        raise BadInput(f"{folder}: neither model.onnx nor model.gguf")
    for name, entry in (manifest.get("files") or {}).items():  # a truncated file crashes llama.cpp outright
        size = (folder / name).stat().st_size if (folder / name).is_file() else None
        want = entry.get("bytes") if isinstance(entry, dict) else None
        if want is not None and size != want:
            raise BadInput(f"{folder / name}: {'missing' if size is None else f'{size} bytes'}, the manifest says "
                           f"{want} (truncated or replaced)")
    context = dims.get("context")
    longest = max(args.canvas, max(1, args.canvas - args.gen_length) + args.gen_length)
    if context and longest > context:
        raise BadInput(f"a canvas of {longest} tokens exceeds the model's context of {context}")
    return folder, manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--canvas", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--gen-length", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dump", help="save the canvas logits and the decoded tokens here (.npz)")
    args = ap.parse_args(argv)
    try:
        folder, manifest = _check(args)
        spec = manifest["spec"]
        t0 = time.perf_counter()
        if (folder / "model.onnx").is_file():
            model = OrtModel(folder, manifest, args.threads)
        else:
            model = LlamaModel(folder, manifest, args.threads, max(args.canvas, args.gen_length + 1))
    except ImportError as e:
        pip = {"onnxruntime": "onnxruntime", "llama_cpp": "llama-cpp-python"}.get(e.name, e.name)
        print(f"ondevice: error: this artifact needs {e.name}: pip install {pip}", file=sys.stderr)
        return 2
    except BadInput as e:  # one line and exit 2, as dllm-export's own errors
        print(f"ondevice: error: {e}", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t0
    vocab = manifest["dims"]["vocab_rows"]
    ids = np.random.default_rng(0).integers(0, min(vocab, 256), (1, args.canvas)).astype(np.int64)
    model(ids)  # warm-up
    steps = []
    for _ in range(args.reps):
        t = time.perf_counter()
        model(ids)
        steps.append(time.perf_counter() - t)
    steps.sort()
    prompt = ids[:, : max(1, args.canvas - args.gen_length)]
    decode(model, prompt, args.gen_length, args.block_length, spec["mask_id"], spec["shift_logits"])  # warm-up
    t = time.perf_counter()
    tokens, nfe = decode(model, prompt, args.gen_length, args.block_length, spec["mask_id"], spec["shift_logits"])
    decode_s = time.perf_counter() - t
    if args.dump:
        np.savez(args.dump, ids=ids, logits=model(ids).astype(np.float32), tokens=tokens)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model"))
    print(json.dumps({
        "path": str(folder), "backend": model.name, "family": manifest["family"], "size_mib": round(size / 2**20, 2),
        "load_s": round(load_s, 3), "step_ms_median": round(1000 * statistics.median(steps), 3),
        "step_ms_p90": round(1000 * steps[min(len(steps) - 1, int(0.9 * len(steps)))], 3),
        "tokens_per_s": round(args.gen_length / decode_s, 2), "nfe": nfe,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": {"python": sys.version.split()[0], "platform": sys.platform, "arch": platform.machine()},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
