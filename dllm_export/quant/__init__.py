"""Post-training quantization passes (RTN, GPTQ, AWQ, SmoothQuant, QuaRot, DuQuant): see issue 5."""
