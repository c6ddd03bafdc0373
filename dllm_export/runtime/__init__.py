"""The unmasking loop and its backends."""

from .backends import Backend, TorchBackend, as_backend
from .loop import GenerateOutput, generate, infill
from .samplers import SAMPLERS

__all__ = ["Backend", "GenerateOutput", "SAMPLERS", "TorchBackend", "as_backend", "generate", "infill"]
