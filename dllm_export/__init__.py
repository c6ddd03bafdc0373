"""dllm-export: turn diffusion LLM checkpoints (LLaDA, Dream) into small, fast, verified edge artifacts.

Public API:
    load_model(path, dtype=torch.float32) -> nn.Module with `.spec`; model(ids) -> logits [B, L, V]
    load_tokenizer(path) -> a transformers fast tokenizer with the family's chat template
    generate(model_or_backend, prompt_ids, *, gen_length, steps, ..., cache, threshold) -> GenerateOutput
    infill(model_or_backend, ids) -> ids with every mask token filled (greedy, most confident first)
    export(model, out, target="onnx" | "gguf", bits=4, method="gptq", ...) -> ExportResult
    load_backend(path) -> a torch, onnxruntime or llama.cpp backend for generate, by what path holds
"""

from .errors import CheckpointError, DllmExportError, InputError
from .exporter import export
from .models.spec import ModelSpec
from .runtime.backends import load_backend, load_model
from .runtime.loop import GenerateOutput, generate, infill
from .tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = ["CheckpointError", "DllmExportError", "GenerateOutput", "InputError", "ModelSpec",
           "export", "generate", "infill", "load_backend", "load_model", "load_tokenizer", "__version__"]
