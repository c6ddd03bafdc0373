"""dllm-export: turn diffusion LLM checkpoints (LLaDA, Dream) into small, fast, verified edge artifacts.

Public API:
    load_model(path, dtype=torch.float32) -> nn.Module with `.spec`; model(ids) -> logits [B, L, V]
    load_tokenizer(path) -> a transformers fast tokenizer with the family's chat template
    generate(model_or_backend, prompt_ids, *, gen_length, steps, ..., cache, threshold) -> GenerateOutput
    infill(model_or_backend, ids) -> ids with every mask token filled (greedy, most confident first)
    export(model, out, target="onnx" | "gguf", bits=4, method="gptq", ...) -> ExportResult
    load_backend(path) -> a torch, onnxruntime or llama.cpp backend for generate, by what path holds

The API's modules load on first use (PEP 562), so `import dllm_export` and `dllm-export --version`
start without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import CheckpointError, DllmExportError, InputError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {"export": ".exporter", "ModelSpec": ".models.spec", "load_backend": ".runtime.backends",
         "load_model": ".runtime.backends", "GenerateOutput": ".runtime.loop", "generate": ".runtime.loop",
         "infill": ".runtime.loop", "load_tokenizer": ".tokenizer"}

if TYPE_CHECKING:  # what static tools see
    from .exporter import export
    from .models.spec import ModelSpec
    from .runtime.backends import load_backend, load_model
    from .runtime.loop import GenerateOutput, generate, infill
    from .tokenizer import load_tokenizer


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["CheckpointError", "DllmExportError", "GenerateOutput", "InputError", "ModelSpec",
           "export", "generate", "infill", "load_backend", "load_model", "load_tokenizer", "__version__"]
