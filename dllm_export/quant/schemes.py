"""Named quantization schemes: weight bits, activation bits, default group size.

Weight-only schemes (WxA16) keep activations in the model dtype; weight-activation schemes
(WxAy) quantize every block linear's input per token, dynamically. Embeddings, norms and the
LM head stay in high precision.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from .primitives import ActQuantConfig, WeightQuantConfig


@dataclass(frozen=True)
class Scheme:
    """A named (weight, activation) bit-width pair with its default grid."""

    name: str
    w_bits: int
    a_bits: int
    group_size: int
    sym: bool

    @property
    def weight_only(self) -> bool:
        return self.a_bits >= 16

    def weight_config(self, group_size: int | None = None, sym: bool | None = None,
                      zero_kind: str = "int") -> WeightQuantConfig:
        return WeightQuantConfig(bits=self.w_bits, group_size=self.group_size if group_size is None else group_size,
                                 sym=self.sym if sym is None else sym, zero_kind=zero_kind)

    def act_config(self, granularity: str = "per_token", sym: bool = True, clip: float = 1.0) -> ActQuantConfig | None:
        if self.weight_only:
            return None
        return ActQuantConfig(bits=self.a_bits, granularity=granularity, sym=sym, clip=clip)


SCHEMES: dict[str, Scheme] = {s.name: s for s in (
    Scheme("W8A16", 8, 16, 128, True),
    Scheme("W6A16", 6, 16, 128, True),
    Scheme("W5A16", 5, 16, 128, True),
    Scheme("W4A16", 4, 16, 128, True),
    Scheme("W3A16", 3, 16, 128, True),
    Scheme("W2A16", 2, 16, 64, False),
    # weight-activation schemes use per-channel weights, as SmoothQuant / QuaRot / DuQuant do
    Scheme("W8A8", 8, 8, 0, True),
    Scheme("W4A8", 4, 8, 0, True),
    Scheme("W4A4", 4, 4, 0, True),
)}


def fit_group(group: int, widths: list[int], smallest: int = 16) -> int:
    """`group` halved (down to `smallest`) until it divides every layer width (small models: FFN
    704 = 11 * 64); 0 (per channel) stays 0. Used where a group size is a default, never a request."""
    while group > smallest and any(w % group for w in widths):
        group //= 2
    return group


def get_scheme(name: str) -> Scheme:
    """The scheme called `name` (case-insensitive), or a clear error listing the known ones."""
    key = name.upper()
    if key not in SCHEMES:
        raise InputError(f"unknown scheme {name!r} (choose from {', '.join(SCHEMES)})")
    return SCHEMES[key]
