"""Post-training quantization: RTN, GPTQ, AWQ (weight-only), SmoothQuant, QuaRot, DuQuant
(weights and activations), with mask-aware calibration and a layer-streamed driver.

    from dllm_export.quant import QuantizeConfig, CalibConfig, quantize
    quantize("default", "out/w4", QuantizeConfig(method="gptq", scheme="W4A16", group_size=128))
"""

from . import awq, duquant, methods, quarot, smoothquant  # noqa: F401  (register methods and transforms)
from .base import METHODS, QuantizeConfig, QuantMethod
from .calibrate import CalibConfig
from .driver import quantize_checkpoint as quantize
from .primitives import ActQuantConfig, QuantizedWeight, WeightQuantConfig
from .schemes import SCHEMES, Scheme, get_scheme

__all__ = ["ActQuantConfig", "CalibConfig", "METHODS", "QuantizeConfig", "QuantMethod", "QuantizedWeight",
           "SCHEMES", "Scheme", "WeightQuantConfig", "get_scheme", "quantize"]
