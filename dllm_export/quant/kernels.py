"""Integer kernels for the layers of a quantized checkpoint on torch (the serving path).

Fake-quant (`QLinear`: dequantized weight, F.linear) stays the reference for evaluation; the
`int` kernel keeps the weights in their low-bit codes and multiplies them with torch's own CPU
kernels. Which one a layer gets follows from its grid (`kernel_for`, the one rule):

    int4   bits <= 4, groups that are a multiple of 32 (per channel: of a width that is)
           -> aten._weight_int4pack_mm_for_cpu: codes packed two per byte, a scale and a zero
              per group of 32/64/128/256 (w = (q - 8) * scale + zero, so every 4-bit grid fits).
              It is a GEMV-style kernel: above 96 rows the packed codes are widened to the
              compute dtype and its GEMM runs (1.6x the kernel at 288 rows, 0.8x at 64)
    w8a8   symmetric activations of <= 8 bits (per token, or a static per-tensor scale) over a
           per-channel weight whose codes fit int8, or a progressive grouped one (its int8 weight
           is group-scale integer x code, `primitives.int8_form`) -> torch._int_mm (int8 x int8 -> int32,
           oneDNN's VNNI/AMX dot products), then the token and channel scales: exact integer sums
    int8   weight-only, 5..8 bits per channel -> aten._weight_int8pack_mm up to 16 rows; more
           rows widen the int8 codes to the compute dtype and run its GEMM (the int8pack kernel
           is a GEMV: 2-3x slower than that at 32-288 rows, benchmarks/results/torch_kernels.json)
    dense  anything else (grouped 5..8-bit weights, float minimums of more than 4 bits, the
           activation grids the integer kernels cannot take): the dequantized weight in the
           compute dtype, which is what fake-quant computes

Activations of a weight-activation scheme whose layer has no integer activation kernel are
fake-quantized first, as the reference does. The kernels take the model's dtype: bf16 is their
fast path (`targets.has_bf16` says where the host has bf16 units); fp32 works, slowly. CPU only:
torch's CUDA int4 kernel wants another packing, not built here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .primitives import ActQuantConfig, QuantizedWeight, fake_quantize_act, int8_form, quantize_act

KERNELS = ("fake", "int")
INT4_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu takes, largest first
INT8PACK_MAX_ROWS = 16  # above: widen the codes and use the dense GEMM (see the module doc)
INT4PACK_MAX_ROWS = 96


def check_kernel(kernel: str, device) -> None:
    """Raise InputError for an unknown kernel name, or integer kernels off the CPU."""
    if kernel not in KERNELS:
        raise InputError(f"unknown kernel {kernel!r} (choose from {', '.join(KERNELS)})")
    if kernel == "int" and torch.device(device).type != "cpu":
        raise InputError(f"the int kernels run on the CPU only, not {device}; use kernel 'fake' there")


def _int4_group(qw: QuantizedWeight) -> int | None:
    """The kernel group size for a <= 4-bit weight (its own group split evenly), or None."""
    out, n = qw.shape
    g = n // qw.scales.shape[1]
    return next((k for k in INT4_GROUPS if g % k == 0), None)


def kernel_for(qw: QuantizedWeight, act: ActQuantConfig | None, int8: bool) -> str:
    """The kernel a layer with weight grid `qw` and activation grid `act` runs on (see module doc);
    `int8`: whether the weight has an int8 form (`primitives.int8_form`, computed once by the caller)."""
    int_act = act is not None and act.sym and act.bits <= 8
    if int_act and int8:
        return "w8a8"
    if qw.cfg.bits <= 4 and _int4_group(qw) is not None:
        return "int4"
    if int8:
        return "int8"
    return "dense"


def _pack_int4(qw: QuantizedWeight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed weight, scales and zeros [G', N, 2] in `dtype`, group size) for the int4 kernel."""
    out, n = qw.shape
    g = _int4_group(qw)
    rep = (n // qw.scales.shape[1]) // g  # kernel groups per stored group (per channel: n / g)
    s = qw.scales.to(torch.float32)
    if qw.cfg.sym:  # w = s * c, c in [-8, 7]  ->  q = c + 8, zero 0
        q, zero = qw.codes.to(torch.int32) + 8, torch.zeros_like(s)
    elif qw.mins is not None:  # w = s * c + m  ->  q = c, zero = m + 8 s
        q, zero = qw.codes.to(torch.int32), qw.mins.to(torch.float32) + 8 * s
    else:  # w = s * (c - z)  ->  q = c - z + 8 and zero 0 when that fits (<= 3 bits), else q = c, zero = s (8 - z)
        d = qw.codes.to(torch.int32) - qw.zeros.to(torch.int32).repeat_interleave(n // qw.scales.shape[1], dim=1)
        if int(d.min()) >= -8 and int(d.max()) <= 7:
            q, zero = d + 8, torch.zeros_like(s)
        else:
            q, zero = qw.codes.to(torch.int32), s * (8 - qw.zeros.to(torch.float32))
    sz = torch.stack([s, zero], dim=-1).repeat_interleave(rep, dim=1)  # [N, G', 2]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    return packed, sz.transpose(0, 1).contiguous().to(dtype), g


class IntLinear(nn.Module):
    """y = T(x) @ W.T + b with W kept in its low-bit codes (see the module doc for the kernels).

    Attributes:
        kernel: "int4", "w8a8", "int8" or "dense".
    """

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None, act: ActQuantConfig | None,
                 input_transform: nn.Module | None, dtype: torch.dtype, act_scale: torch.Tensor | None = None,
                 act_zero: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.act = None if act is None or act.bits >= 16 else act
        self.act_scale, self.act_zero = act_scale, act_zero
        self.input_transform = input_transform
        int8 = int8_form(qweight)  # (codes, scales) or None: the rule's input and the int8 kernels' weight
        self.kernel = kernel_for(qweight, self.act, int8 is not None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.group_size = 0
        if self.kernel == "int4":
            packed, sz, self.group_size = _pack_int4(qweight, dtype)
            self.register_buffer("weight_packed", packed, persistent=False)
            self.register_buffer("scales_zeros", sz, persistent=False)
            # widening reads the CPU packing: rows in blocks of 64, byte j of a block = rows j | j + 32
            self.widens = self.out_features % 64 == 0
        elif self.kernel in ("int8", "w8a8"):
            # [N, K]: _weight_int8pack_mm's layout; _int_mm takes its transposed view (oneDNN's
            # fast "NT" case: 5x the contiguous [K, N] at 32 rows)
            codes, scales = int8
            self.register_buffer("weight_int8", codes, persistent=False)
            self.register_buffer("scales", scales.to(torch.float32 if self.kernel == "w8a8" else dtype),
                                 persistent=False)
        else:
            self.register_buffer("weight", qweight.dequantize(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "w8a8":
            q, s, _ = quantize_act(x2, self.act, self.act_scale, self.act_zero)
            acc = torch._int_mm(q.to(torch.int8), self.weight_int8.t())  # exact int32 sums
            y = (acc.to(torch.float32) * (s * self.scales)).to(x.dtype)
        else:
            if self.act is not None:
                x2 = fake_quantize_act(x2, self.act, self.act_scale, self.act_zero)
            if self.kernel == "int4" and (x2.shape[0] <= INT4PACK_MAX_ROWS or not self.widens):
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight_packed, self.group_size,
                                                               self.scales_zeros)
            elif self.kernel == "int4":
                y = x2 @ self._widened_int4(x2.dtype)
            elif self.kernel == "int8" and x2.shape[0] <= INT8PACK_MAX_ROWS:
                y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scales)
            elif self.kernel == "int8":
                y = F.linear(x2, self.weight_int8.to(x2.dtype) * self.scales[:, None])
            else:
                y = F.linear(x2, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _widened_int4(self, dtype: torch.dtype) -> torch.Tensor:
        """W.T [K, N] in `dtype` from the packed codes: w = q * scale + (zero - 8 scale)."""
        N, K, g = self.out_features, self.in_features, self.group_size
        u = self.weight_packed.view(N // 64, K, 32)
        wt = torch.empty(K, N // 64, 2, 32, dtype=dtype)
        wt[:, :, 0] = (u & 15).permute(1, 0, 2)
        wt[:, :, 1] = (u >> 4).permute(1, 0, 2)
        s, z = self.scales_zeros[..., 0], self.scales_zeros[..., 1]  # [G, N]
        grouped = wt.view(K // g, g, N)
        grouped.mul_(s[:, None].to(dtype)).add_((z.float() - 8 * s.float())[:, None].to(dtype))
        return wt.view(K, N)

    def extra_repr(self) -> str:
        g = f" g{self.group_size}" if self.group_size else ""
        a = f", a{self.act.bits}" if self.act else ""
        return f"{self.in_features}, {self.out_features}, kernel={self.kernel}{g}{a}"


def kernel_counts(model: nn.Module) -> dict[str, int]:
    """kernel -> number of IntLinear layers using it (empty for a fake-quant or float model)."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, IntLinear):
            counts[m.kernel] = counts.get(m.kernel, 0) + 1
    return dict(sorted(counts.items()))
