"""Weight sanity checks at load and before quantization: a corrupt tensor is named, not propagated.

A NaN or Inf in one weight turns every activation after it into NaN: quantizing such a
checkpoint either dies in a Cholesky deep inside GPTQ or, worse, writes the NaN into an artifact
without a word. One reduction per tensor (max |x|) catches the three ways a weight is broken:
non-finite values, a tensor of zeros where a trained weight must be, and magnitudes no trained
network has (fp16 overflows at 65504; trained LLM weights stay below a few hundred).
"""

from __future__ import annotations

import math

import torch

from ..errors import CheckpointError

# |w| above this is no trained weight: a unit or byte-order mistake, or garbage
ABSURD_MAGNITUDE = 1e4
# tensors that may legitimately be all zero (biases, zero points, minimums, transforms)
_MAY_BE_ZERO = (".bias", ".qzeros", ".qmins", ".act_zero", ".act_scale")


def check_weight(name: str, t: torch.Tensor, where: object = "") -> None:
    """Raise CheckpointError naming `name` (and the file `where`) when the float tensor `t` holds
    NaN / Inf, is all zero (weights and scales), or exceeds `ABSURD_MAGNITUDE`. Integer tensors
    (packed codes) and empty ones pass."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    peak = float(t.detach().abs().max())
    prefix = f"{where}: tensor {name}" if where else f"tensor {name}"
    if not math.isfinite(peak):
        flat = t.detach().reshape(-1)
        bad = ~torch.isfinite(flat)
        n_nan, n_bad = int(torch.isnan(flat).sum()), int(bad.sum())
        first = tuple(int(i) for i in torch.unravel_index(bad.nonzero()[0, 0], t.shape))
        raise CheckpointError(f"{prefix} has {n_nan} NaN and {n_bad - n_nan} Inf values (first at index "
                              f"{list(first)}): the checkpoint is corrupt (a diverged run or a bad conversion)")
    if peak == 0 and not name.endswith(_MAY_BE_ZERO):
        raise CheckpointError(f"{prefix} is all zeros {list(t.shape)}: a trained weight never is "
                              f"(an unfilled or truncated conversion)")
    if peak > ABSURD_MAGNITUDE:
        raise CheckpointError(f"{prefix} has a value of magnitude {peak:.3g} (> {ABSURD_MAGNITUDE:g}): no trained "
                              f"weight is that large (wrong dtype, byte order or scale)")
