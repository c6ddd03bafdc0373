"""RTN and GPTQ as PTQ methods: every block linear rounded true-sequentially within the block
(the algorithms themselves are in `rtn.py` and `gptq.py`, which import only `primitives`)."""

from __future__ import annotations

from .base import QuantMethod, register_method, sequential_quantize


@register_method
class RTN(QuantMethod):
    """Round every block linear to nearest (optionally with MSE clipping); no calibration needed
    for the weights (calibration inputs only measure the output error)."""

    name = "rtn"
    calibrated_transforms = False

    @classmethod
    def rounding(cls, qcfg):
        return "rtn"

    def process_block(self, block, X, ctx, index):
        return sequential_quantize(self, block, X, ctx, rounding="rtn", index=index)


@register_method
class GPTQ(QuantMethod):
    """GPTQ on every block linear (q/k/v included), true-sequential within the block."""

    name = "gptq"
    calibrated_transforms = False  # its Hessians are read through `rounding`

    @classmethod
    def rounding(cls, qcfg):
        return "gptq"

    def process_block(self, block, X, ctx, index):
        return sequential_quantize(self, block, X, ctx, rounding="gptq", index=index)
