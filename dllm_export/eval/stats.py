"""Confidence intervals of task scores and paired significance of score differences.

Every task here scores items right or wrong, so a score is a binomial proportion: its 95%
interval is Wilson's score interval (close to nominal coverage down to small n and p near 0 or 1,
where the normal interval fails). Two models scored on the same items are compared pairwise:
the difference of the two proportions gets Newcombe's hybrid score interval for paired data
(Newcombe 1998, method 10), which uses the items' correlation (most items are right or wrong for
both models, so a paired difference is far tighter than two separate intervals suggest). A
difference is significant when its interval excludes 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (the whole [0, 1] when n = 0)."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise InputError(f"wilson interval needs 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


@dataclass(frozen=True)
class Difference:
    """p_a - p_b with its 95% interval; `significant` when the interval excludes 0."""

    diff: float
    lo: float
    hi: float
    n: int
    paired: bool

    @property
    def significant(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict:
        return {"diff": self.diff, "lo": self.lo, "hi": self.hi, "n": self.n, "paired": self.paired,
                "significant": self.significant}


def paired_difference(a: list[int], b: list[int], z: float = Z95) -> Difference:
    """Newcombe's interval (method 10) for p_a - p_b from per-item outcomes (0/1) of two models
    on the same items."""
    if len(a) != len(b):
        raise InputError(f"paired outcomes must cover the same items ({len(a)} against {len(b)})")
    n = len(a)
    if n == 0:
        return Difference(0.0, -1.0, 1.0, 0, True)
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    neither = n - both - only_a - only_b
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson(both + only_a, n, z)
    l2, u2 = wilson(both + only_b, n, z)
    den = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    phi = (both * neither - only_a * only_b) / math.sqrt(den) if den > 0 else 0.0
    theta = p1 - p2
    dl = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    du = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return Difference(theta, max(-1.0, theta - dl), min(1.0, theta + du), n, True)


def unpaired_difference(k_a: int, n_a: int, k_b: int, n_b: int, z: float = Z95) -> Difference:
    """Newcombe's hybrid score interval (method 10, independent samples) for k_a/n_a - k_b/n_b,
    for when per-item outcomes are not at hand."""
    p1, p2 = k_a / max(n_a, 1), k_b / max(n_b, 1)
    l1, u1 = wilson(k_a, n_a, z)
    l2, u2 = wilson(k_b, n_b, z)
    theta = p1 - p2
    return Difference(theta, theta - math.hypot(p1 - l1, u2 - p2), theta + math.hypot(u1 - p1, p2 - l2),
                      min(n_a, n_b), False)


def score_difference(base: dict, other: dict) -> Difference:
    """base score - other score (a drop when `other` is the quantized model): paired when both task
    results carry per-item `outcomes` of the same length, unpaired from the counts otherwise."""
    oa, ob = base.get("outcomes"), other.get("outcomes")
    if oa is not None and ob is not None and len(oa) == len(ob):
        return paired_difference(oa, ob)
    return unpaired_difference(round(base["score"] * base["n"]), base["n"], round(other["score"] * other["n"]),
                               other["n"])
