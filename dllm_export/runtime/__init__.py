"""The unmasking loop and its backends."""

from .backends import Backend, TorchBackend, as_backend
from .loop import Decoding, GenerateOutput, Logprobs, generate, infill
from .samplers import SAMPLERS

__all__ = ["Backend", "Decoding", "GenerateOutput", "Logprobs", "SAMPLERS", "TorchBackend", "as_backend", "generate", "infill"]
