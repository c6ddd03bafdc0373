"""DuQuant (Lin et al., 2024, arXiv 2406.01721): "Distributing Outliers via Dual Transformation".

Per linear group (q/k/v share one input, gate/up another, then o and down), after SmoothQuant-style
smoothing (alpha 0.5), the layer input x is replaced by x @ T with the dual transform

    T = R1 · P · R2

    R1, R2  block-diagonal rotations (blocks of b = 128 channels), each built greedily: every step
            finds the channel holding the largest |activation| in a block, switches it to the block's
            first slot (E_d) and rotates with an orthogonal matrix whose first row is uniform, so
            the outlier is spread evenly over the block; the step count with the smallest peak is
            kept, up to 256 steps;
    P       the zigzag permutation: channels sorted by their peak are dealt to the blocks
            back and forth, so every block gets a similar share of the outliers before R2.

The weight absorbs the inverse offline (W' = W T^-T, i.e. W T for orthogonal T) and the quantized
layer applies T online, before per-token activation fake-quant: an exact rewrite before rounding.
Weights are then rounded per channel, asymmetric, with a fixed clip ratio of 0.8 (the paper's /
QDLM's `swc`), activations per token, asymmetric, clipped at 0.9 of their range (`lac`).

Rounding: `weight_method="rtn"` rounds to nearest with the fixed swc clip (what the QDLM study ran:
DuQuant with 0 training epochs; `mse_clip` is not used then); `weight_method="gptq"` (QuantizeConfig's
default) runs GPTQ on the rotated weights (Hessian conjugated to T^T H T), with its own error feedback
and no fixed clip, since `gptq_quantize` takes none.

As the paper: smoothing first, per-block greedy rotations (each block keeps its own best step count),
zigzag, second greedy rotation; k/v share q's transform and up shares gate's. Choices of our own:
  - the rotation statistics are the mean calibration sequence (QDLM's `rotate_inps`) by default,
    taken from our mask-aware calibration set on the smoothed, not yet rounded block;
  - R~ is the normalised Hadamard matrix (a Householder reflection for non-power-of-two blocks) and
    the random complement Q' a random signed permutation (see `greedy_rotation` for why);
  - the peak is max |x| (the reference code tracks max - min over the whole activation and shares one
    rotation among all blocks; the paper rotates blocks independently, as we do);
  - no LWC / LET training (QDLM runs 0 epochs too); attention's Q/K/V matmul inputs are not quantized.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import check_fields
from ..errors import InputError
from .base import (GROUPS, QuantMethod, calibrate_static_acts, collect_inputs, input_sample,
                   install_qlinear, linear_names, output_rel_err, register_method, sequential_quantize)
from .hadamard import sylvester
from .primitives import quantize_weight, single_thread
from .smoothquant import smooth_block
from .transforms import BlockDiagonalTransform, ChainTransform, InputTransform

# Smallest rotation block we accept: below it the "spread" of an outlier is too small to matter.
MIN_BLOCK = 8


@dataclass(frozen=True)
class DuQuantConfig:
    """DuQuant's own settings (the study's flags in parentheses).

    Attributes:
        block_size: upper bound on the rotation block (`--block_size 128`); the block used for a
            width C is the largest power of two <= block_size dividing C (see `duquant_block_size`).
        max_steps: greedy rotation steps per block, at most (`--max_rotation_step 256`).
        weight_clip: fixed clip ratio of the per-channel weight range (`--swc 0.8`), RTN rounding only.
        act_clip: clip ratio of the per-token activation range (`--lac 0.9`).
        rotation_inputs: "mean" (one sequence, the mean of the calibration sequences, as QDLM's
            `rotate_inps`) or "all" (every calibration token; exact peaks, more memory and time).
    """

    block_size: int = 128
    max_steps: int = 256
    weight_clip: float = 0.8
    act_clip: float = 0.9
    rotation_inputs: str = "mean"

    def __post_init__(self):
        check_fields(self, ints=("block_size", "max_steps"), reals=("weight_clip", "act_clip"),
                     strs=("rotation_inputs",))
        if self.block_size < MIN_BLOCK:
            raise InputError(f"DuQuant block size must be >= {MIN_BLOCK}, got {self.block_size}")
        if self.max_steps < 0:
            raise InputError(f"DuQuant max_steps must be >= 0, got {self.max_steps}")
        if not (0 < self.weight_clip <= 1 and 0 < self.act_clip <= 1):
            raise InputError(f"clip ratios must lie in (0, 1], got weight {self.weight_clip}, act {self.act_clip}")
        if self.rotation_inputs not in ("mean", "all"):
            raise InputError(f"rotation_inputs must be 'mean' or 'all', got {self.rotation_inputs!r}")


# ---- pure tensor math -----------------------------------------------------------------------------

def duquant_block_size(width: int, block_size: int = 128) -> int:
    """The rotation block for a layer input of `width` channels: the largest power of two that is
    <= block_size and divides width (128 for every 7B/8B width; 32 for a width of 96).

    Raises:
        InputError: if that block is smaller than MIN_BLOCK (width not divisible by 8).
    """
    b = 1
    while b * 2 <= block_size and width % (b * 2) == 0:
        b *= 2
    if b < MIN_BLOCK:
        raise InputError(f"DuQuant needs a layer width divisible by {MIN_BLOCK} for its rotation blocks; "
                         f"width {width} only admits blocks of {b}")
    return b


def _as_samples(x: torch.Tensor) -> torch.Tensor:
    """Activations as a float64 [tokens, channels] matrix (a 1-D per-channel statistic is one row)."""
    x = x.detach().to(torch.float64)
    return x.reshape(1, -1) if x.dim() == 1 else x.reshape(-1, x.shape[-1])


def _check_blocks(width: int, block_size: int) -> int:
    if block_size < 1 or width % block_size:
        raise InputError(f"DuQuant block size {block_size} does not divide the layer width {width}")
    return width // block_size


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x [..., k*b] @ blockdiag(blocks [k, b, b])."""
    k, b, _ = blocks.shape
    y = torch.einsum("...kb,kbc->...kc", x.reshape(*x.shape[:-1], k, b), blocks.to(x.dtype))
    return y.reshape(x.shape)


def uniform_first_row(b: int, dtype=torch.float64) -> torch.Tensor:
    """An orthogonal [b, b] matrix whose first row is 1/sqrt(b) everywhere (the paper's R~): a channel
    switched into slot 0 is spread evenly over the block. For b a power of two, the normalised
    Sylvester Hadamard matrix (every row flat, so every channel is spread); otherwise the Householder
    reflection I - 2 v v^T / |v|^2 with v = e_1 - u, which maps e_1 to u = 1/sqrt(b) and is symmetric."""
    if b & (b - 1) == 0:
        return (sylvester(b) / b ** 0.5).to(dtype)
    u = torch.full((b,), b ** -0.5, dtype=dtype)
    v = -u
    v[0] += 1.0
    return torch.eye(b, dtype=dtype) - 2.0 * torch.outer(v, v) / (v @ v)


def random_signed_permutations(count: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` random signed permutations of n items, as (perm [count, n] int64, signs [count, n] float64):
    random orthogonal matrices Q' with Q' A = signs[:, None] * A[perm], exact in floating point."""
    perm = torch.argsort(torch.rand(count, n, generator=gen), dim=-1)
    signs = torch.randint(0, 2, (count, n), generator=gen).to(torch.float64) * 2 - 1
    return perm, signs


@torch.no_grad()
def greedy_rotation(act_absmax_or_samples: torch.Tensor, block_size: int, max_steps: int = 256,
                    seed: int = 0) -> torch.Tensor:
    """DuQuant's greedy block rotation R^1 R^2 ... R^n of each block of channels.

    Step j, in every block: d = the channel with the largest |x| (over the samples), and
    R^j = E_d · diag(1, Q') · R~ (row-vector convention x -> x R^j): E_d switches channel d into
    slot 0, R~ (`uniform_first_row`) spreads slot 0 evenly, and Q' (a fresh random orthogonal
    matrix on the other b - 1 dims, shared by the blocks of a step) randomises the rest. Each block
    keeps the prefix n in 0..max_steps minimising its peak max|x R^1..R^n| (n = 0: identity).

    Q' is a random signed permutation, so every row of diag(1, Q') R~ stays a flat (Hadamard) row:
    on planted outliers (tests) this reaches about half the peak that Haar-random Q' reach, whose
    Gaussian mixtures of the non-outlier channels keep the peak up; it also needs no QR.

    Args:
        act_absmax_or_samples: activations [..., C] (tokens x channels) or a per-channel |x| max [C].
        block_size: b, must divide C.
        max_steps: at most this many steps per block.
        seed: seeds the random complements.
    Returns:
        float64 [C // b, b, b] orthogonal blocks.
    """
    x = _as_samples(act_absmax_or_samples)
    n, C = x.shape
    k, b = _check_blocks(C, block_size), block_size
    # Per block, the samples [n, b] stacked over an identity [b, b]: after the steps, the bottom rows
    # hold R^1..R^j itself, so one batched matmul per step advances samples and rotation together.
    eye = torch.eye(b, dtype=torch.float64).expand(k, b, b)
    cur = torch.cat([x.reshape(n, k, b).transpose(0, 1), eye], dim=1)  # [k, n + b, b]
    best_R = eye
    ch_peak = cur[:, :n].abs().amax(dim=1)  # [k, b] per-channel peak
    best = ch_peak.amax(dim=-1)  # each block's peak
    gen = torch.Generator().manual_seed(int(seed))
    perms, signs = random_signed_permutations(max_steps, b - 1, gen)
    spread = uniform_first_row(b)
    Ms = spread.repeat(max_steps, 1, 1)
    Ms[:, 1:] = signs[..., None] * spread[1:][perms]  # diag(1, Q') · R~ keeps R~'s uniform first row
    # E_d · M = M with rows 0 and d swapped (E_d is the symmetric switching matrix): row order switch[d]
    switch = torch.arange(b).repeat(b, 1)
    switch[:, 0] = torch.arange(b)
    switch[torch.arange(b), torch.arange(b)] = 0
    with single_thread():  # few, batched ops per step: the loop is overhead-bound on small inputs
        for j in range(max_steps):
            cur = torch.bmm(cur, Ms[j][switch[ch_peak.argmax(dim=-1)]])  # d = each block's outlier channel
            ch_peak = cur[:, :n].abs().amax(dim=1)
            peak = ch_peak.amax(dim=-1)
            best_R = torch.where((peak < best)[:, None, None], cur[:, n:], best_R)
            best = torch.minimum(peak, best)
    return best_R.contiguous()


def zigzag_permutation(channel_max: torch.Tensor, block_size: int) -> torch.Tensor:
    """DuQuant's zigzag permutation: channels sorted by decreasing peak are dealt to blocks
    0, 1, ..., k-1, k-1, ..., 1, 0, 0, 1, ... so block peaks (and loads) balance.

    Returns:
        int64 perm [C] such that x[..., perm] holds block j's channels at [j*b, (j+1)*b).
    """
    C = channel_max.numel()
    k = _check_blocks(C, block_size)
    order = torch.argsort(channel_max.detach().double().abs().reshape(-1), descending=True, stable=True)
    pos = torch.arange(C) % (2 * k)
    block_of = torch.where(pos < k, pos, 2 * k - 1 - pos)  # block of the i-th largest channel
    return torch.cat([order[block_of == j] for j in range(k)])


@torch.no_grad()
def duquant_transform(stats: torch.Tensor, block_size: int = 128, max_steps: int = 256,
                      seed: int = 0) -> InputTransform:
    """The dual transform T = R1 · P · R2 fitted on activations `stats` [..., C] (or a per-channel max [C]).

    R1 = greedy rotation, P = zigzag permutation of R1's output peaks, R2 = greedy rotation of the
    permuted activations. The block is `duquant_block_size(C, block_size)`.

    Returns:
        ChainTransform([BlockDiagonalTransform(R1), BlockDiagonalTransform(R2, perm)]):
        x -> ((x R1)[..., perm]) R2, stored in float32 (use `fold_into_weight` for the weight side).
    """
    x = _as_samples(stats)
    b = duquant_block_size(x.shape[1], block_size)
    R1 = greedy_rotation(x, b, max_steps, seed)
    x1 = rotate_blocks(x, R1)
    perm = zigzag_permutation(x1.abs().amax(dim=0), b)
    R2 = greedy_rotation(x1[:, perm], b, max_steps, seed + 1)
    return ChainTransform([BlockDiagonalTransform(R1), BlockDiagonalTransform(R2, perm)])


def _parts(t: InputTransform) -> list[InputTransform]:
    return [q for p in t.parts for q in _parts(p)] if isinstance(t, ChainTransform) else [t]


@torch.no_grad()
def fold_into_weight(W: torch.Tensor, transform: InputTransform) -> torch.Tensor:
    """W' [out, C] with T(x) @ W'^T == x @ W^T, i.e. W' = W T^-T, in float64.

    Uses the inverse of the *stored* (float32-rounded) blocks, so the rewrite stays exact to float64
    precision even though float32 blocks are orthogonal only to ~1e-7. For a permuted block-diagonal
    T = P B, T^-T = P B^-T, so the rows of W go through the same permutation and the blocks B^-T.
    """
    W = W.to(torch.float64)
    for part in _parts(transform):
        if not isinstance(part, BlockDiagonalTransform):
            raise InputError(f"fold_into_weight handles block-diagonal transforms, got {type(part).__name__}")
        if part.perm is not None:
            W = W[:, part.perm]
        W = rotate_blocks(W, torch.linalg.inv(part.blocks.double()).mT)
    return W


def transform_peak(transform: InputTransform | None, x: torch.Tensor) -> float:
    """max |T(x)| (or max |x| without a transform), in float64."""
    x = _as_samples(x)
    return float((x if transform is None else transform(x)).abs().max())


# ---- the method ----------------------------------------------------------------------------------

@torch.no_grad()
def rotation_inputs(method: QuantMethod, block: nn.Module, X: torch.Tensor, ctx: tuple, names: list[str],
                    mode: str = "mean") -> dict[str, torch.Tensor]:
    """Inputs of the named linears over the calibration set, as [tokens, C] float64: the mean
    sequence over calibration samples ("mean", QDLM's rotate_inps) or every token ("all")."""
    acc: dict[str, list] = {n: [] for n in names}

    def add(n, x):
        x = x.to(torch.float64)
        if mode == "mean":  # running sum over sequences; one [L, C] tensor in memory
            acc[n] = [x.sum(dim=0) + (acc[n][0] if acc[n] else 0.0)]
        else:
            acc[n].append(x.reshape(-1, x.shape[-1]))

    collect_inputs(block, X, ctx, names, add, method.qcfg.batch_size)
    if mode == "mean":
        return {n: a[0] / X.shape[0] for n, a in acc.items()}
    return {n: torch.cat(a) for n, a in acc.items()}


@register_method
class DuQuant(QuantMethod):
    """Smoothing, then DuQuant's dual transform per linear group, then rounding (see module doc)."""

    name = "duquant"
    default_act_sym = False  # per-token asymmetric activations, as the study's DuQuant
    default_weight_sym = False  # per-channel asymmetric weights, as the study's DuQuant
    options = frozenset({"alpha", "weight_method"})

    @classmethod
    def rounding(cls, qcfg):
        return "gptq" if qcfg.weight_method == "gptq" else None  # rtn: its own swc clip

    def __init__(self, qcfg, spec, model_config, dcfg: DuQuantConfig | None = None):
        super().__init__(qcfg, spec, model_config)
        self.dcfg = dcfg or DuQuantConfig()
        self.acfg = qcfg.act_config(clip=self.dcfg.act_clip)  # the weight grid is the base's (bits included)

    def transform_block(self, block: nn.Module, X: torch.Tensor, ctx: tuple,
                        index: int) -> tuple[dict[str, InputTransform], dict[str, dict]]:
        """The exact part of DuQuant on one block: smooth (alpha), fit one dual transform per linear
        group on the smoothed inputs, fold W T^-T into the group's weights in place.

        Returns:
            (linear name -> its input transform (own copy per linear), linear name -> manifest info).
        """
        ranges = smooth_block(self, block, X, ctx, self.qcfg.alpha)
        leaders = [linear_names(self.spec, roles)[0] for roles in GROUPS]
        samples = rotation_inputs(self, block, X, ctx, leaders, self.dcfg.rotation_inputs)
        smoothed = {c: prev for prev, consumers in self.spec.smooth_pairs for c in consumers}
        transforms: dict[str, InputTransform] = {}
        info: dict[str, dict] = {}
        for g, (roles, leader) in enumerate(zip(GROUPS, leaders)):
            x = samples[leader]
            # one seed per (run, block, group): reproducible, and different rotations everywhere
            T = duquant_transform(x, self.dcfg.block_size, self.dcfg.max_steps,
                                  seed=(self.qcfg.seed * 1_000_003 + index) * 16 + 2 * g)
            stats = {"duquant_block": duquant_block_size(x.shape[-1], self.dcfg.block_size),
                     "act_peak_smoothed": round(transform_peak(None, x), 6),
                     "act_peak_rotated": round(transform_peak(T, x), 6)}
            for n in linear_names(self.spec, roles):
                lin = block.get_submodule(n)
                lin.weight.data = fold_into_weight(lin.weight.data, T).to(lin.weight.dtype)
                transforms[n] = copy.deepcopy(T)  # own tensors per layer (written once per layer)
                info[n] = dict(stats)
                if n in smoothed:
                    lo, hi = ranges[smoothed[n]]
                    info[n]["smooth_scale_range"] = [round(lo, 6), round(hi, 6)]
        return transforms, info

    def round_block(self, block: nn.Module, X: torch.Tensor, ctx: tuple,
                    transforms: dict[str, InputTransform]) -> dict[str, dict]:
        """RTN with the fixed swc clip, group by group; sample inputs (transformed, from the
        already-quantized groups) only measure the output error for the manifest."""
        info: dict[str, dict] = {}
        for roles in GROUPS:
            names = linear_names(self.spec, roles)
            X_s = transforms[names[0]](input_sample(block, X, ctx, names[0], self.qcfg.batch_size))
            for n in names:
                W = block.get_submodule(n).weight.data.float()
                qw = quantize_weight(W, self.wcfg, clip=self.dcfg.weight_clip)
                info[n] = install_qlinear(block, n, qw, self.acfg, W, transforms[n],
                                          weight_clip=self.dcfg.weight_clip, out_rel_err=output_rel_err(W, qw, X_s))
            calibrate_static_acts(block, names, X, ctx, self.qcfg.batch_size)
        return info

    def process_block(self, block, X, ctx, index):
        """Smooth, fit and fold the dual transforms, then round (RTN + swc, or GPTQ) with T online."""
        transforms, stats = self.transform_block(block, X, ctx, index)
        if self.qcfg.weight_method == "gptq":
            info = sequential_quantize(self, block, X, ctx, rounding="gptq", transforms=transforms)
        else:
            info = self.round_block(block, X, ctx, transforms)
        for n, extra in stats.items():
            info[n].update(extra)
        return info
