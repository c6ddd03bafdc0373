"""RTN: round-to-nearest weight quantization, with optional MSE clipping search (the algorithm only:
it imports nothing but `primitives`; the `rtn` method that applies it block by block is in `methods.py`).

The clip search (as in QuaRot's `w_clip` / GPTQ's `mse` quantizer option) shrinks each group's
range by a ratio from a grid and keeps, per group, the ratio with the least ||W - Q(W)||_p^p.
"""

from __future__ import annotations

import torch

from .primitives import QuantizedWeight, WeightQuantConfig, _group_view, compute_grid, quantize_to_grid


def mse_clip_ratios(W: torch.Tensor, cfg: WeightQuantConfig, grid: int = 20, max_shrink: float = 0.5,
                    norm: float = 2.4) -> torch.Tensor:
    """Per-group clip ratios [out, G] in [1 - max_shrink, 1] minimising the weight error ||W - Q(W)||_norm."""
    W = W.float()
    Wg = _group_view(W, cfg)
    best_err = torch.full(Wg.shape[:2], float("inf"), device=W.device)
    best = torch.ones(Wg.shape[:2], device=W.device)
    for i in range(grid):
        r = 1.0 - max_shrink * i / grid
        scales, zeros, mins = compute_grid(W, cfg, r)
        deq = QuantizedWeight(quantize_to_grid(W, scales, zeros, mins, cfg), scales, zeros, mins, cfg).dequantize()
        err = (_group_view(deq, cfg) - Wg).abs().pow(norm).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


def rtn_quantize(W: torch.Tensor, cfg: WeightQuantConfig, mse_clip: bool = False) -> QuantizedWeight:
    """Round W [out, in] to nearest on the group grid; with `mse_clip`, after a per-group clip search."""
    clip = mse_clip_ratios(W, cfg) if mse_clip else 1.0
    scales, zeros, mins = compute_grid(W, cfg, clip)
    return QuantizedWeight(quantize_to_grid(W, scales, zeros, mins, cfg), scales, zeros, mins, cfg)
