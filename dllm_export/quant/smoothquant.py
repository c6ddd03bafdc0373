"""SmoothQuant (Xiao et al., 2023, arXiv 2211.10438): migrate activation outliers into weights.

For each (prev -> consumers) pair of the spec, s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)
per input channel j; X / s is produced by dividing the preceding norm weight (or the preceding
linear's output rows) by s, and W * s is folded into the consumers: an exact transform. Under
GQA the v -> o pair shares one s per kv-head channel across the query heads that read it.
Weights are then rounded (RTN or GPTQ) and activations quantized per token.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import QuantMethod, collect_inputs, register_method, sequential_quantize


class AbsMaxStats:
    """Running per-channel max |x| over calibration inputs x [..., C]."""

    def __init__(self):
        self.absmax: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        m = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
        self.absmax = m if self.absmax is None else torch.maximum(self.absmax, m)


def smooth_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s = act_absmax^alpha / w_absmax^(1 - alpha), w_absmax over the input channels of all consumers."""
    w_absmax = torch.stack([W.abs().amax(dim=0).float() for W in weights]).amax(dim=0)
    s = act_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def kv_group_scales(s_o: torch.Tensor, n_heads: int, n_kv: int, reduce=torch.amax) -> torch.Tensor:
    """Collapse per-o-input-channel values [n_heads*hd] to one per v output channel [n_kv*hd]
    (reducing over the query heads of each kv group) for GQA."""
    hd = s_o.numel() // n_heads
    return reduce(s_o.view(n_kv, n_heads // n_kv, hd), dim=1).reshape(-1)


def expand_kv_scales(s_kv: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """Inverse of `kv_group_scales`: per-v-output-channel values [n_kv*hd] repeated over the query
    heads of each kv group, giving one per o input channel [n_heads*hd]."""
    hd = s_kv.numel() // n_kv
    return s_kv.view(n_kv, 1, hd).expand(n_kv, n_heads // n_kv, hd).reshape(-1)


@torch.no_grad()
def fold_scales(block: nn.Module, prev: str, consumers: list[str], s: torch.Tensor, n_heads: int = 1,
                n_kv: int = 1) -> None:
    """Exact rewrite: prev's output is divided by s, each consumer's input columns multiplied by s.

    `prev` is a norm (weight [C]) or a linear (output rows). For a v -> o pair under GQA, pass the
    per-kv-channel s [n_kv*hd]; the consumer side repeats it over the heads of each group.
    """
    p = block.get_submodule(prev)
    s_c = s
    if isinstance(p, nn.Linear) and p.weight.shape[0] != block.get_submodule(consumers[0]).weight.shape[1]:
        s_c = expand_kv_scales(s, n_heads, n_kv)
    if isinstance(p, nn.Linear):
        p.weight.div_(s.to(p.weight.dtype)[:, None])
        if p.bias is not None:
            p.bias.div_(s.to(p.bias.dtype))
    else:
        p.weight.div_(s.to(p.weight.dtype))
    for c in consumers:
        W = block.get_submodule(c).weight
        W.mul_(s_c.to(W.dtype)[None, :])


def heads(model_config) -> tuple[int, int]:
    """(query heads, kv heads) of a LLaDA or Dream config."""
    return model_config.dims.n_heads, model_config.dims.n_kv_heads


@torch.no_grad()
def smooth_block(method: QuantMethod, block: nn.Module, X: torch.Tensor, ctx: tuple, alpha: float) -> dict[str, list]:
    """Collect consumer-input absmax on the fp block, then fold smoothing scales for every pair.

    Returns:
        prev name -> the scales applied (for the manifest's statistics).
    """
    pairs = method.spec.smooth_pairs
    leaders = [consumers[0] for _, consumers in pairs]
    stats = {n: AbsMaxStats() for n in leaders}
    collect_inputs(block, X, ctx, leaders, lambda n, x: stats[n].update(x), method.qcfg.batch_size)
    n_heads, n_kv = heads(method.model_config)
    applied = {}
    for prev, consumers in pairs:
        act = stats[consumers[0]].absmax
        Ws = [block.get_submodule(c).weight.float() for c in consumers]
        p = block.get_submodule(prev)
        if isinstance(p, nn.Linear) and p.weight.shape[0] != Ws[0].shape[1]:  # v -> o under GQA
            act = kv_group_scales(act, n_heads, n_kv)
            hd = act.numel() // n_kv
            Ws = [W.abs().view(W.shape[0], n_kv, n_heads // n_kv, hd).amax(dim=2).reshape(W.shape[0], -1) for W in Ws]
        s = smooth_scales(act, Ws, alpha)
        fold_scales(block, prev, list(consumers), s, n_heads, n_kv)
        applied[prev] = [float(s.min()), float(s.max())]
    return applied


@register_method
class SmoothQuant(QuantMethod):
    """SmoothQuant smoothing (alpha, default 0.5) folded into norms and linears, then rounding."""

    name = "smoothquant"
    default_act_sym = False  # per-token asymmetric activations, as the study's SmoothQuant
    options = frozenset({"alpha", "weight_method"})

    def process_block(self, block, X, ctx, index):
        ranges = smooth_block(self, block, X, ctx, self.qcfg.alpha)
        info = sequential_quantize(self, block, X, ctx, rounding=self.qcfg.weight_method)
        for prev, (lo, hi) in ranges.items():
            for c in dict(self.spec.smooth_pairs)[prev]:
                info[c]["smooth_scale_range"] = [round(lo, 6), round(hi, 6)]
        return info
