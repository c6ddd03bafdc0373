"""Backends of the unmasking loop: the `Backend` protocol, the torch backend, and the public
`load_model` / `load_backend` that choose what to open.

Contract: `forward(ids [B, L] int64, attention_mask [B, L] 0/1 or None) -> logits [B, L, V] float32`,
raw (unshifted) logits; `spec` (a ModelSpec), `vocab_size` (rows of the embedding) and
`max_length` (context) describe the model; `name`, `supports_cache`, `supports_rows` and
`own_threads` are its capabilities. A backend with `supports_cache = True` also accepts
`forward(..., cache=KVCache)` for the block caches of the loop (a full forward, a block step, and
the full forward of a window's columns alone at their canvas positions, `KVCache.fill`); one with
`supports_rows = True` accepts `forward(..., rows=(start, end))` and returns only those positions'
logits (the head is the costliest layer of a large-vocabulary model, and its output the largest
transfer); one with
`own_threads = True` computes in a thread pool of its own (onnxruntime, llama.cpp), so the loop runs
its own tensor ops on one torch thread instead of fighting that pool for the same cores. A backend
may also supply `op_profile(fn)`: the time per op of its runtime while `fn()` runs (torch's and
onnxruntime's profilers; `bench --profile`).
`as_backend` gives an object that has only `spec`, `vocab_size`, `max_length` and `forward` the
capabilities of a plain forward.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..models.spec import ModelSpec


@runtime_checkable
class ForwardOnly(Protocol):
    """The least a foreign backend supplies: the model's description and one forward."""

    spec: ModelSpec
    vocab_size: int
    max_length: int

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class Backend(ForwardOnly, Protocol):
    """What the loop runs on: a forward plus its declared capabilities (see the module doc)."""

    name: str
    supports_cache: bool
    supports_rows: bool
    own_threads: bool


class _Declared:
    """A ForwardOnly object with declared capabilities: what it defines itself, else a plain
    forward's (no cache, no rows), named by its class."""

    def __init__(self, inner: ForwardOnly):
        self.inner = inner
        self.spec, self.vocab_size, self.max_length = inner.spec, inner.vocab_size, inner.max_length
        # the one place a capability may be absent: read once here, never in the loop
        self.name = getattr(inner, "name", type(inner).__name__)
        self.supports_cache = bool(getattr(inner, "supports_cache", False))
        self.supports_rows = bool(getattr(inner, "supports_rows", False))
        self.own_threads = bool(getattr(inner, "own_threads", False))

    def forward(self, ids, attention_mask=None, **kw):
        return self.inner.forward(ids, attention_mask, **kw)


class TorchBackend:
    """Runs a loaded `nn.Module` (from `load_model`) under inference mode; logits come back as float32."""

    name = "torch"
    supports_cache = True
    supports_rows = True
    own_threads = False  # its forwards run on torch's own threads, as the loop's ops do

    def __init__(self, model: nn.Module):
        from ..quant.kernels import kernel_counts

        self.model = model
        self.kernels = kernel_counts(model)  # e.g. {"int4": 112} with kernel "int"; {} for fake-quant
        self.spec: ModelSpec = model.spec
        dims = model.config.dims
        self.vocab_size = dims.vocab_rows
        self.max_length = dims.context

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Raw logits; with a `KVCache` (see `models.layers`), a full forward fills it and a windowed
        one (ids = the window's tokens) reuses it; `rows` limits them to those input positions."""
        with torch.inference_mode():
            dev = self.model.get_submodule(self.spec.embedding).weight.device  # a plain table on every path
            am = None if attention_mask is None else attention_mask.to(dev)
            kw = {} if cache is None else {"cache": cache}
            if rows is not None:
                kw["rows"] = rows
            return self.model(ids.to(dev), attention_mask=am, **kw).float().cpu()

    def op_profile(self, fn) -> dict:
        """Where `fn()` (which calls `forward`) spends torch's time: {"wall_ms", "ops": {op: [ms,
        calls]}} of its second call, from torch.profiler (self CPU time per op, the loop's own ops
        included; on a GPU that is launch time, not the kernels')."""
        from torch.profiler import ProfilerActivity, profile

        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            fn()
            wall_ms = 1000 * (time.perf_counter() - t0)
        return {"wall_ms": wall_ms, "ops": {e.key: [e.self_cpu_time_total / 1000, e.count]
                                             for e in prof.key_averages() if e.self_cpu_time_total > 0}}


def as_backend(model_or_backend) -> Backend:
    """Wrap an `nn.Module` in a TorchBackend; pass backends through; give a ForwardOnly object the
    capabilities it declares (`_Declared`)."""
    if isinstance(model_or_backend, nn.Module):
        return TorchBackend(model_or_backend)
    if isinstance(model_or_backend, Backend):
        return model_or_backend
    if isinstance(model_or_backend, ForwardOnly):
        return _Declared(model_or_backend)
    raise TypeError(f"expected a model from load_model or a backend with forward(ids), got {type(model_or_backend).__name__}")


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", kernel: str = "fake") -> nn.Module:
    """Load a LLaDA or Dream checkpoint: a float one in its released Hugging Face layout, or a
    quantized one written by `dllm-export quantize` (fake-quant `QLinear` layers); this is the one
    place that tells them apart.

    Args:
        path: checkpoint folder (config.json + model.safetensors or sharded shards with index),
            or `default` / `default-dream` for the bundled models.
        dtype: compute dtype (float32, bfloat16, float16, or 'auto' for the checkpoint's own).
        device: where the weights go.
        kernel: the quantized layers' kernels: "fake" (dequantized weights, the reference) or
            "int" (integer kernels, CPU; see quant.kernels). Float checkpoints ignore it.
    Returns:
        an eval-mode `nn.Module` with `.spec` (a `ModelSpec`) and `.config`; `model(input_ids)`
        returns raw logits (B, L, V) in `dtype` (Dream's are unshifted).
    Raises:
        CheckpointError: missing/truncated files, unknown model_type, wrong tensor shapes.
    """
    from ..models.checkpoint import is_quantized, read_config, resolve_checkpoint, resolve_device, resolve_dtype
    from ..models.loader import load_float_model

    from ..quant.kernels import check_kernel

    device = resolve_device(device)
    check_kernel(kernel, device)  # a float checkpoint ignores it, but a misspelt name is no choice
    folder = resolve_checkpoint(path)
    if is_quantized(folder):
        from ..quant.load import load_quantized

        return load_quantized(folder, resolve_dtype(dtype, read_config(folder)), device, kernel)
    return load_float_model(folder, dtype, device)


BACKENDS = ("auto", "torch", "onnxruntime", "llama.cpp")


def backend_kind(path, backend: str = "auto") -> str:
    """The runtime that opens `path`: "onnxruntime" for a folder with model.onnx, "llama.cpp" for a
    .gguf file or a folder with model.gguf, else "torch" (a checkpoint, `default`); `backend`
    other than "auto" forces one."""
    from ..errors import InputError
    from ..formats import artifact_format
    from ..models.checkpoint import BUNDLED

    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend != "auto" or str(path) in BUNDLED:
        return "torch" if backend == "auto" else backend
    return {"onnx": "onnxruntime", "gguf": "llama.cpp"}.get(artifact_format(path), "torch")


def _options_of(cls, options: dict) -> dict:
    """`options` if `cls` takes each by name (its constructor's keywords but the path and threads);
    else InputError naming the strays (a TypeError from the constructor, or dropped by torch)."""
    import inspect

    from ..errors import InputError

    known = set() if cls is TorchBackend else set(inspect.signature(cls).parameters) - {"path", "threads"}
    stray = sorted(set(options) - known)
    if stray:
        takes = f"takes {', '.join(sorted(known))}" if known else "takes none"
        raise InputError(f"backend option(s) {', '.join(stray)}: the {cls.name} backend {takes}")
    return options


def load_backend(path, backend: str = "auto", dtype: torch.dtype | str | None = None, threads: int = 0,
                 device: str = "cpu", kernel: str = "fake", **options) -> Backend:
    """Open a model for the loop by what `path` holds: an ONNX artifact folder (model.onnx) runs on
    onnxruntime, a GGUF artifact (folder with model.gguf, or the .gguf file) on llama.cpp, anything
    else (a checkpoint folder, `default`) on torch in `dtype`.

    `backend` forces one ("torch", "onnxruntime", "llama.cpp"); `threads` and `options` go to the
    onnxruntime session / llama.cpp context (torch's thread count is the caller's); `device` is the
    torch backend's ("cuda" for a GPU). `kernel` is the torch backend's for quantized checkpoints:
    "fake" (the reference) or "int" (integer kernels, see quant.kernels); `dtype` None is float32,
    with "int" bf16 where the host has bf16 units. Every file a manifest lists is first checked for its size
    (a truncated or missing file is named; `dllm-export verify` also checks the hashes).
    """
    from ..errors import InputError
    from ..fileio import MANIFEST, check_files
    from ..formats import artifact_folder
    from ..models.checkpoint import BUNDLED, check_model_arg
    from ..targets import check_threads

    check_model_arg(path)
    check_threads(threads)
    p = Path(path)
    folder = Path(artifact_folder(p))
    if str(path) not in BUNDLED and (folder / MANIFEST).is_file():
        check_files(folder)
    kind = backend_kind(path, backend)
    if kind != "torch" and (dtype is not None or kernel != "fake"):
        raise InputError(f"dtype and kernel choose a torch checkpoint's compute; {kind} runs {p} as exported "
                         f"(drop --dtype / --kernel)")
    if kind == "llama.cpp":
        from .llamacpp import LlamaCppBackend

        return LlamaCppBackend(p, threads=threads, **_options_of(LlamaCppBackend, options))
    if kind == "onnxruntime":
        from .ort import OrtBackend

        return OrtBackend(p, threads=threads, **_options_of(OrtBackend, options))
    _options_of(TorchBackend, options)
    from ..quant.kernels import check_kernel
    from ..targets import has_bf16

    check_kernel(kernel, device)
    if dtype is None:
        dtype = torch.bfloat16 if kernel == "int" and has_bf16() else torch.float32
    return TorchBackend(load_model(path, dtype=dtype, device=device, kernel=kernel))
