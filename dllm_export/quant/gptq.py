"""GPTQ (Frantar et al., 2022, arXiv 2210.17323): quantize W column by column, spreading each
column's rounding error onto the not-yet-quantized columns through the inverse Hessian.

Names follow the paper and IST-DASLab/gptq: H = 2 X X^T / n, damping `percdamp` of mean(diag H),
Hinv its upper Cholesky factor, lazy batch updates of `block_size` columns. With `act_order`
columns go by decreasing diag(H), and groups are computed up front on the original column order
("static groups"), so every group stays a contiguous slice of the input dim, as exporters need.

The algorithm only, as IST-DASLab's gptq.py: it imports `primitives` and `rtn` (the clip search);
the `gptq` method that applies it block by block is in `methods.py`.
"""

from __future__ import annotations

import torch

from ..errors import CalibrationError
from .primitives import QuantizedWeight, single_thread, WeightQuantConfig, compute_grid, quantize_to_grid
from .rtn import mse_clip_ratios


class HessianStats:
    """Running H = 2/n * sum x x^T over calibration inputs x [..., in] (fed by a forward hook).

    fp32, as the reference implementation: an fp64 x^T x costs 4-8x more on CPUs.
    """

    def __init__(self, in_features: int, keep: int = 256):
        self.in_features = in_features
        self.H: torch.Tensor | None = None  # allocated on the device of the first inputs
        self.n = 0
        self.keep = keep
        self.sample = torch.zeros(0, in_features)  # the first `keep` input rows, to measure output errors

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        if self.H is None:
            self.H = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
            self.sample = self.sample.to(x.device)
        if self.sample.shape[0] < self.keep:
            self.sample = torch.cat([self.sample, x[: self.keep - self.sample.shape[0]]])
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, cfg: WeightQuantConfig, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, mse_clip: bool = False, name: str = "weight",
                  n_tokens: int | None = None) -> tuple[QuantizedWeight, float]:
    """GPTQ of W [out, in] given the Hessian H [in, in] of its inputs (`n_tokens` calibration rows).

    Returns:
        (QuantizedWeight with codes in the original column order, the GPTQ loss sum (w - q)^2 / d^2 / 2).
    Raises:
        CalibrationError: naming layer `name` and the cause, when H holds NaN / Inf or cannot be
            factorised even with the damping raised to 100x (dead channels, too few tokens).
    """
    if not bool(torch.isfinite(H).all()):
        raise CalibrationError(f"{name}: GPTQ: its Hessian holds NaN / Inf, so the calibration inputs of this "
                               f"layer do (an earlier layer overflows, or the checkpoint is corrupt)")
    # fp32 throughout, as IST-DASLab/gptq: the Cholesky of a damped H is well conditioned
    W = W.detach().clone().to(torch.float32)
    out, n = W.shape
    H = H.detach().clone().to(torch.float32)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gs = cfg.group_size or n
    G = cfg.groups(n)
    dev = W.device
    scales = torch.empty(out, G, dtype=cfg.scale_dtype, device=dev)
    zeros = torch.empty(out, G, dtype=torch.int16, device=dev) if (not cfg.sym and cfg.zero_kind == "int") else None
    mins = torch.empty(out, G, dtype=cfg.scale_dtype, device=dev) if (not cfg.sym and cfg.zero_kind == "float") else None

    # columns whose grid is set at once: a group, a K-quant super-block (its groups share d), or
    # the whole row of a progressive grid (its groups share the channel scale: static groups)
    span = n if cfg.progressive else cfg.super_group or gs
    span_cfg = cfg if cfg.super_group or cfg.progressive else _single(cfg)

    def set_grid(col: int, Wspan: torch.Tensor) -> None:
        clip = mse_clip_ratios(Wspan, span_cfg) if mse_clip else 1.0
        s, z, m = compute_grid(Wspan.float(), span_cfg, clip)
        g, k = col // gs, s.shape[1]
        scales[:, g:g + k] = s
        if zeros is not None:
            zeros[:, g:g + k] = z
        if mins is not None:
            mins[:, g:g + k] = m

    perm = torch.arange(n, device=dev)
    if act_order:
        for col in range(0, n, span):  # static groups on the original order
            set_grid(col, W[:, col:col + span])
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    Hinv = damped_inverse_cholesky(H, percdamp, name, int(dead.sum()), n_tokens)

    codes = torch.zeros(out, n, dtype=torch.float32, device=dev)
    losses = torch.zeros(out, dtype=torch.float64, device=dev)
    order = perm.tolist()  # column order as Python ints (no device sync per column)
    qmin, qmax = float(cfg.qmin), float(cfg.qmax)
    cur = -1  # group whose grid is loaded in s, z, m (fp32 copies of the stored fp16 / int grid)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        with single_thread():  # the column loop is hundreds of tiny ops: OpenMP hand-offs dominate
            for i in range(i2 - i1):
                col = order[i1 + i]
                g = col // gs
                if not act_order and col % span == 0:
                    # grid from the current (error-updated) columns of this group / super-block
                    width = min(span, n - col)
                    rest = i2 - i1 - i  # its columns still in this lazy block
                    set_grid(col, W1[:, i:i + width] if width <= rest else
                             torch.cat([W1[:, i:], W[:, i2:i2 + width - rest]], dim=1))
                if g != cur:
                    cur = g
                    s = scales[:, g].to(torch.float32)
                    z = zeros[:, g].to(torch.float32) if zeros is not None else None
                    m = mins[:, g].to(torch.float32) if mins is not None else None
                w = W1[:, i]
                d = Hinv1[i, i]
                if m is not None:
                    q = torch.round((w - m) / s).clamp_(qmin, qmax)
                    wq = s * q + m
                elif z is not None:
                    q = (torch.round(w / s) + z).clamp_(qmin, qmax)
                    wq = s * (q - z)
                else:
                    q = torch.round(w / s).clamp_(qmin, qmax)
                    wq = s * q
                codes[:, col] = q
                losses += (w - wq) ** 2 / d ** 2 / 2
                err = (w - wq) / d
                W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # in-place rank-1 update
                Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    codes = codes.to(torch.int16)
    return QuantizedWeight(codes, scales, zeros, mins, cfg), float(losses.sum())


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float, name: str = "weight", n_dead: int = 0,
                            n_tokens: int | None = None) -> torch.Tensor:
    """`inverse_upper_cholesky` of H + damp * I with damp = percdamp * mean(diag H), the damping raised
    10x at a time (to at most 100x, AutoGPTQ's escalation) while the factorisation fails; then a
    CalibrationError naming the layer and the likely cause. H is modified in place."""
    mean_diag = torch.mean(torch.diag(H))
    added = 0.0
    for factor in (1, 10, 100):
        damp = percdamp * factor * mean_diag
        H.diagonal().add_(damp - added)  # H + damp * I without an n x n identity (600 MB at n = 12288)
        added = damp
        try:
            return inverse_upper_cholesky(H)
        except torch.linalg.LinAlgError:
            continue
    n = H.shape[0]
    causes = []
    if n_dead:
        causes.append(f"{n_dead} of {n} input channels are never active (dead channels)")
    if n_tokens is not None and n_tokens < n:
        causes.append(f"only {n_tokens} calibration tokens for {n} input channels (a rank-deficient Hessian; "
                      f"raise --calib-samples / --calib-seq-len)")
    if not causes:
        causes.append(f"the inputs span too few directions (mean diag(H) = {float(mean_diag):.3g})")
    raise CalibrationError(f"{name}: GPTQ: the Hessian cannot be factorised even with damping "
                           f"{100 * percdamp:g} x mean(diag H): {'; '.join(causes)}. Use more calibration data, "
                           f"or --method rtn")


def inverse_upper_cholesky(H: torch.Tensor) -> torch.Tensor:
    """U upper triangular with U^T U = H^-1 (GPTQ's Hinv), from one Cholesky and one triangular solve.

    With J the reversal permutation and J H J = L L^T, H = R R^T for the upper triangular
    R = J L J, so H^-1 = R^-T R^-1 and U = R^-1. The paper's chol(chol_inverse(chol(H)))
    costs three n^3 / 3 factorizations instead of two (n = 12288 at an 8B FFN down projection).
    """
    L = torch.linalg.cholesky(H.flip(0, 1))
    R = L.flip(0, 1)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(R, eye, upper=True)


def _single(cfg: WeightQuantConfig) -> WeightQuantConfig:
    """The same grid viewed as one group over whatever columns are passed (a group or a column)."""
    return WeightQuantConfig(bits=cfg.bits, group_size=0, sym=cfg.sym, zero_kind=cfg.zero_kind,
                             scale_dtype=cfg.scale_dtype)
