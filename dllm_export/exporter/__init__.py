"""Exporters to ONNX and GGUF: see issues 7 and 8."""
