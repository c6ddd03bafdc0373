"""QLinear: a linear layer that computes with a QuantizedWeight (fake-quant, for evaluation).

Optionally applies an online input transform (QuaRot's Hadamard before the down projection,
DuQuant's block rotations) and activation fake-quant before the matmul, in that order, exactly
as an exported graph would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .primitives import ActQuantConfig, QuantizedWeight, fake_quantize_act, static_act_params


class QLinear(nn.Module):
    """y = act_quant(T(x)) @ dequant(W).T + b, with W a QuantizedWeight and T an optional transform."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, act: ActQuantConfig | None = None,
                 input_transform: nn.Module | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.act = act
        self.input_transform = input_transform
        self.register_buffer("weight", qweight.dequantize(dtype), persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.act_scale: torch.Tensor | None = None  # static per-tensor activation grid
        self.act_zero: torch.Tensor | None = None
        self.observed: list[float] | None = None  # [min, max] of inputs while calibrating

    def observe(self) -> None:
        """Start recording the input range (activations pass unquantized meanwhile)."""
        self.observed = [0.0, 0.0]

    def calibrate(self) -> None:
        """Fix the static activation grid from the recorded range."""
        self.act_scale, self.act_zero = static_act_params(self.observed[0], self.observed[1], self.act)
        self.observed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.observed is not None:
            self.observed[0] = min(self.observed[0], float(x.min()))
            self.observed[1] = max(self.observed[1], float(x.max()))
        elif self.act is not None:
            x = fake_quantize_act(x, self.act, self.act_scale, self.act_zero)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        c = self.qweight.cfg
        a = f", a{self.act.bits} {self.act.granularity}" if self.act else ""
        t = f", transform={type(self.input_transform).__name__}" if self.input_transform is not None else ""
        return (f"{self.in_features}, {self.out_features}, w{c.bits} g{c.group_size or 'channel'} "
                f"{'sym' if c.sym else 'asym'}{a}{t}")


class ActQuantLinear(nn.Module):
    """A high-precision linear whose input is transformed / fake-quantized (for layers kept at
    high weight precision under a weight-activation scheme)."""

    def __init__(self, linear: nn.Linear, act: ActQuantConfig | None, input_transform: nn.Module | None = None):
        super().__init__()
        self.linear = linear
        self.act = act
        self.input_transform = input_transform

    def forward(self, x):
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.act is not None:
            x = fake_quantize_act(x, self.act)
        return self.linear(x)
