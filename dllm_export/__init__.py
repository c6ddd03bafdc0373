"""dllm-export: turn diffusion LLM checkpoints (LLaDA, Dream) into small, fast, verified edge artifacts.

Public API:
    load_model(path, dtype=torch.float32) -> nn.Module with `.spec`; model(ids) -> logits [B, L, V]
    load_tokenizer(path) -> a transformers fast tokenizer with the family's chat template
    generate(model_or_backend, prompt_ids, *, gen_length, steps, ...) -> GenerateOutput
"""

from .errors import CheckpointError, DllmExportError, InputError
from .models.loader import load_model
from .models.spec import ModelSpec
from .runtime.loop import GenerateOutput, generate
from .tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = ["CheckpointError", "DllmExportError", "GenerateOutput", "InputError", "ModelSpec",
           "generate", "load_model", "load_tokenizer", "__version__"]
