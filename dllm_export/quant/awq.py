"""AWQ (Lin et al., 2023, arXiv 2306.00978): activation-aware per-channel scales, then clipping.

For each (prev -> consumers) pair of the spec, s = mean|x|^r (normalised by sqrt(max * min)) is
searched over a grid of r in [0, 1): the loss is the consumers' output error
||x W^T - (x / s) Q(W s)^T||^2 on calibration inputs. The best s is folded into prev (norm
weight or the preceding linear's rows) and the consumers' columns: an exact transform. Then a
per-group clip search (max shrink 0.5) minimises each group's output error, and weights are
rounded to nearest on the clipped grid. Under GQA the v -> o pair shares one scale per kv-head
channel across the query heads that read it (llm-awq skips that pair).

Unlike the QDLM study's LLaDA code (Lin et al. 2025, "Quantization Meets dLLMs", arXiv 2508.14896),
which scores LLaDA's scales by re-running the whole block on normalised features, the loss here is
always measured on the consumers' own outputs.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .base import QuantMethod, calibrate_static_acts, collect_inputs, install_qlinear, register_method
from .primitives import QuantizedWeight, WeightQuantConfig, compute_grid, quantize_to_grid
from .smoothquant import expand_kv_scales, fold_scales, heads, kv_group_scales


def _fake_quant(W: torch.Tensor, cfg: WeightQuantConfig, clip=1.0) -> torch.Tensor:
    s, z, m = compute_grid(W, cfg, clip)
    return QuantizedWeight(quantize_to_grid(W, s, z, m, cfg), s, z, m, cfg).dequantize()


@torch.no_grad()
def search_scales(x: torch.Tensor, weights: list[torch.Tensor], cfg: WeightQuantConfig, n_grid: int = 20,
                  expand=None, x_mean: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """AWQ's grid search of per-input-channel scales.

    Args:
        x: consumer inputs [T, C] (fp32).
        weights: consumer weights [out_i, C].
        expand: maps a scale vector to the consumers' input width (GQA v -> o), or None.
        x_mean: mean |x| per scale channel (defaults to x's).
    Returns:
        (best scales, best loss relative to ||x W^T||^2).
    """
    expand = expand or (lambda s: s)
    x_mean = x.abs().mean(dim=0) if x_mean is None else x_mean
    ref = [x @ W.T for W in weights]
    denom = sum(float(r.pow(2).sum()) for r in ref)
    best, best_loss = torch.ones_like(x_mean), float("inf")
    for i in range(n_grid):
        r = i / n_grid
        s = x_mean.clamp(min=1e-4).pow(r)
        s = s / (s.max() * s.min()).sqrt()
        se = expand(s)
        loss = sum(float((x @ (_fake_quant(W * se[None], cfg) / se[None]).T - y).pow(2).sum()) for W, y in zip(weights, ref))
        if loss < best_loss:
            best, best_loss = s, loss
    return best, best_loss / max(denom, 1e-30)


@torch.no_grad()
def search_clip(x: torch.Tensor, W: torch.Tensor, cfg: WeightQuantConfig, n_grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """Per-group clip ratios [out, G] minimising each group's output error sum_t (x_g (W_g - Q(W_g))^T)^2,
    computed as d_g^T (x_g^T x_g) d_g from the groups' Gram matrices in float64 (the same sum, in
    gs / T of the work: 64 / 4096 for groups of 64 over AWQ's tokens)."""
    out, n = W.shape
    G = cfg.groups(n)
    gs = n // G
    xg = x.double().reshape(x.shape[0], G, gs)
    gram = torch.einsum("tgi,tgj->gij", xg, xg)  # [G, gs, gs]
    best = torch.ones(out, G)
    best_err = torch.full((out, G), float("inf"), dtype=torch.float64)
    for i in range(int(n_grid * max_shrink)):
        r = 1 - i / n_grid
        D = (W - _fake_quant(W, cfg, r)).double().reshape(out, G, gs)
        err = torch.einsum("ogi,gij,ogj->og", D, gram, D)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


@register_method
class AWQ(QuantMethod):
    """AWQ scale search + clip search + round-to-nearest (asymmetric groups by default, as the paper)."""

    name = "awq"
    default_weight_sym = False
    max_tokens = 4096  # calibration tokens used by the searches (llm-awq uses a few thousand)

    @torch.no_grad()
    def process_block(self, block, X, ctx, index):
        spec = self.spec
        pairs = spec.smooth_pairs
        inputs: dict[str, list[torch.Tensor]] = {}
        g = torch.Generator().manual_seed(self.qcfg.seed + index)
        n_tok = X.shape[0] * X.shape[1]
        keep = torch.randperm(n_tok, generator=g)[: self.max_tokens].sort().values

        def grab(name, x):
            inputs.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).float())

        collect_inputs(block, X, ctx, [c[0] for _, c in pairs], grab, self.qcfg.batch_size)
        xs = {n: torch.cat(v)[keep] for n, v in inputs.items()}
        n_heads, n_kv = heads(self.model_config)
        info: dict[str, dict] = {}
        for prev, consumers in pairs:
            x = xs[consumers[0]]
            Ws = [block.get_submodule(c).weight.float() for c in consumers]
            p = block.get_submodule(prev)
            expand, x_mean = None, None
            if isinstance(p, nn.Linear) and p.weight.shape[0] != Ws[0].shape[1]:  # v -> o under GQA
                x_mean = kv_group_scales(x.abs().mean(0), n_heads, n_kv, reduce=torch.mean)
                expand = functools.partial(expand_kv_scales, n_heads=n_heads, n_kv=n_kv)
            s, loss = search_scales(x, Ws, self.layer_wcfg(None, Ws[0].shape[1]), expand=expand, x_mean=x_mean)
            fold_scales(block, prev, list(consumers), s, n_heads, n_kv)
            se = s if expand is None else expand(s)
            xs[consumers[0]] = x / se[None]  # the consumers now see x / s
            for c in consumers:
                info[c] = {"awq_scale_loss": loss}
        for prev, consumers in pairs:
            x = xs[consumers[0]]
            for c in consumers:
                W = block.get_submodule(c).weight.data.float()
                skip_clip = c in (spec.linears["q"], spec.linears["k"])  # llm-awq: q/k feed a softmax
                wcfg = self.layer_wcfg(None, W.shape[1])  # a K-quant's fallback on widths it cannot tile
                clip = 1.0 if skip_clip else search_clip(x, W, wcfg)
                s, z, m = compute_grid(W, wcfg, clip)
                qw = QuantizedWeight(quantize_to_grid(W, s, z, m, wcfg), s, z, m, wcfg)
                y = x @ W.T
                rel = float((x @ qw.dequantize().T - y).pow(2).sum() / y.pow(2).sum().clamp(min=1e-30))
                info[c] = install_qlinear(block, c, qw, self.acfg, W, out_rel_err=rel, **info.get(c, {}))
        calibrate_static_acts(block, [c for _, cs in pairs for c in cs], X, ctx, self.qcfg.batch_size)
        return info
