"""Hadamard matrices of order n = m * 2^k and their fast, orthogonal application.

QuaRot (Ashkboos et al., 2024, arXiv 2404.00456) rotates activations by Hadamard matrices:
a random Hadamard on the residual stream (folded into weights) and exact online Hadamards
where nothing can absorb them (before the down projection, across attention heads). Model
widths are rarely powers of two (LLaDA's MLP is 12288 = 12 * 1024, Dream's 18944 = 148 * 128),
so, like the paper, we build H_n = H_m (x) H_{2^k}: a Sylvester matrix for the power of two and
a Paley matrix for the small factor m:

  * Paley I  (q prime, q = 3 mod 4): order q + 1        (e.g. 12 from q = 11)
  * Paley II (q prime, q = 1 mod 4): order 2 (q + 1)    (e.g. 148 from q = 73, 28 from q = 13)

`hadamard_transform(x)` computes x @ H_n / sqrt(n) over the last dim with the Kronecker
structure: one small matmul per Kronecker factor (H_m and two halves of the Sylvester part),
O(n (m + 2 sqrt(2^k))), never a dense n x n matmul.

`HadamardTransform` is the online transform QLinear applies before its activation quantizer
(registered as kind "hadamard"; it stores no tensors, the manifest entry holds n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError
from .transforms import InputTransform, register_transform


def is_prime(q: int) -> bool:
    """Trial-division primality test (q is at most a few thousand here)."""
    if q < 2:
        return False
    return all(q % f for f in range(2, math.isqrt(q) + 1))


def jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix Q[i, j] = chi(j - i mod q), chi the quadratic character of GF(q), q an odd prime."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def sylvester(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n = 2^k: H_2n = [[H_n, H_n], [H_n, -H_n]]."""
    if n < 1 or n & (n - 1):
        raise InputError(f"Sylvester construction needs a power of two, got n={n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def paley1(q: int) -> torch.Tensor:
    """Paley construction I, order q + 1 for a prime q = 3 mod 4: H = I + [[0, 1^T], [-1, Q]]."""
    if not (is_prime(q) and q % 4 == 3):
        raise InputError(f"Paley I needs a prime q = 3 mod 4, got q={q}")
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1.0
    S[1:, 0] = -1.0
    S[1:, 1:] = jacobsthal(q)  # skew-symmetric for q = 3 mod 4, so I + S is Hadamard
    return torch.eye(q + 1, dtype=torch.float64) + S


def paley2(q: int) -> torch.Tensor:
    """Paley construction II, order 2 (q + 1) for a prime q = 1 mod 4: each entry of the symmetric
    conference matrix C = [[0, 1^T], [1, Q]] becomes a 2 x 2 block (0 -> [[1, -1], [-1, -1]],
    +-1 -> +-[[1, 1], [1, -1]])."""
    if not (is_prime(q) and q % 4 == 1):
        raise InputError(f"Paley II needs a prime q = 1 mod 4, got q={q}")
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:] = 1.0
    C[1:, 0] = 1.0
    C[1:, 1:] = jacobsthal(q)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, plus) + torch.kron((C == 0).to(torch.float64), zero)


@dataclass(frozen=True)
class HadamardFactorization:
    """n = m * p with p = 2^k (Sylvester) and H_m from `construction` ("one", "paley1", "paley2") with prime q."""

    n: int
    m: int
    p: int
    construction: str
    q: int = 0

    def small_matrix(self) -> torch.Tensor:
        """The +-1 matrix H_m of the non-power-of-two factor (fp64)."""
        if self.construction == "paley1":
            return paley1(self.q)
        if self.construction == "paley2":
            return paley2(self.q)
        return torch.ones(1, 1, dtype=torch.float64)

    def factors(self) -> list[torch.Tensor]:
        """+-1 matrices whose Kronecker product is H_n: H_m (if m > 1), then the Sylvester part split
        into two near-square halves (H_2^k = H_2^a (x) H_2^b), each applied by one matmul."""
        k = self.p.bit_length() - 1
        sizes = [2 ** ((k + 1) // 2), 2 ** (k // 2)] if self.p > 64 else [self.p]
        mats = ([self.small_matrix()] if self.m > 1 else []) + [sylvester(s) for s in sizes if s > 1]
        return mats or [torch.ones(1, 1, dtype=torch.float64)]  # n = 1


def _small_factor(m: int) -> HadamardFactorization | None:
    """How to build H_m for a factor m (1, Paley I or Paley II), or None."""
    if m == 1:
        return HadamardFactorization(m, m, 1, "one")
    if is_prime(m - 1) and (m - 1) % 4 == 3:
        return HadamardFactorization(m, m, 1, "paley1", m - 1)
    if m % 2 == 0 and is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return HadamardFactorization(m, m, 1, "paley2", m // 2 - 1)
    return None


def hadamard_factorization(n: int) -> HadamardFactorization:
    """A factorisation n = m * 2^k with a known H_m, taking the smallest m (cheapest transform).

    Raises:
        InputError: naming n when no Sylvester x Paley construction covers it (e.g. 10, 668).
    """
    if n < 1:
        raise InputError(f"Hadamard order must be positive, got n={n}")
    p = n & -n  # the largest power of two dividing n
    while p >= 1:
        f = _small_factor(n // p)
        if f is not None:
            return HadamardFactorization(n, f.m, p, f.construction, f.q)
        p //= 2
    raise InputError(f"no Hadamard matrix of order n={n} from Sylvester x Paley I/II constructions "
                     f"(n must be m * 2^k with m = 1, q + 1 or 2(q + 1) for a suitable prime q)")


def supported_orders(limit: int) -> list[int]:
    """Every order n <= limit this module can build."""
    out = []
    for n in range(1, limit + 1):
        try:
            hadamard_factorization(n)
        except InputError:
            continue
        out.append(n)
    return out


def hadamard_matrix(n: int) -> torch.Tensor:
    """The +-1 Hadamard matrix H_n = H_m (x) H_{2^k} (fp64, H H^T = n I); dense, for tests and folding."""
    f = hadamard_factorization(n)
    return torch.kron(f.small_matrix(), sylvester(f.p))


def hadamard_transform(x: torch.Tensor, n: int | None = None, factors: list[torch.Tensor] | None = None) -> torch.Tensor:
    """x @ H_n / sqrt(n) over the last dim (an orthogonal transform), using H_n = H_m (x) H_p1 (x) H_p2.

    Viewing x as [..., m, p1, p2], x @ (A (x) B (x) C) contracts each axis with its own small matrix,
    so the cost is O(n (m + p1 + p2)) with p1, p2 ~ sqrt(2^k) instead of O(n^2) for a dense matmul.
    Half-precision inputs are computed in fp32, fp64 stays fp64; the result has x's dtype.

    Args:
        x: [..., n].
        n: the order (defaults to x.shape[-1]).
        factors: the precomputed +-1 Kronecker factors (`HadamardFactorization.factors()`).
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise InputError(f"hadamard_transform: last dim is {x.shape[-1]}, expected n={n}")
    factors = hadamard_factorization(n).factors() if factors is None else factors
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(cdt).reshape(-1, *(M.shape[0] for M in factors))
    for axis, M in enumerate(factors, start=1):  # y[.., i, ..] -> sum_i y[.., i, ..] M[i, k]
        y = torch.movedim(torch.matmul(torch.movedim(y, axis, -1), M.to(device=x.device, dtype=cdt)), -1, axis)
    return (y.reshape(x.shape) * (1.0 / math.sqrt(n))).to(x.dtype)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """n random +-1 (fp64) from a seeded generator (no global RNG state)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """QuaRot's randomised Hadamard Q = diag(s) H_n / sqrt(n), s random +-1 (signs on the LEFT: rows).

    x @ Q flips the signs of x's channels, then applies the normalised Hadamard, so
    `x @ random_hadamard(n, seed) == hadamard_transform(x * random_signs(n, seed))`. Orthogonal.
    """
    return random_signs(n, seed)[:, None] * hadamard_matrix(n) / math.sqrt(n)


@register_transform
class HadamardTransform(InputTransform):
    """Online exact Hadamard x -> x @ (H_n (x) I_inner) / sqrt(n), deterministic and stored as a spec only.

    inner = 1 is QuaRot's full Hadamard before the down projection; inner = head_dim with
    n = n_heads is its Hadamard across heads on the attention-output projection's input
    (x viewed as [..., n_heads, head_dim], mixed over the head axis).
    """

    kind = "hadamard"

    def __init__(self, n: int, inner: int = 1):
        super().__init__()
        self.n, self.inner, self.size = int(n), int(inner), int(n) * int(inner)
        # the +-1 factors are rebuilt from n on load: non-persistent buffers, nothing to store
        self.n_factors = 0
        for i, M in enumerate(hadamard_factorization(self.n).factors()):
            self.register_buffer(f"factor{i}", M, persistent=False)
            self.n_factors += 1

    def factors(self) -> list[torch.Tensor]:
        return [getattr(self, f"factor{i}") for i in range(self.n_factors)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inner == 1:
            return hadamard_transform(x, self.n, self.factors())
        xt = x.reshape(*x.shape[:-1], self.n, self.inner).transpose(-1, -2)
        return hadamard_transform(xt, self.n, self.factors()).transpose(-1, -2).reshape(x.shape)

    def spec(self) -> dict:
        return {"kind": self.kind, "size": self.size, "n": self.n, "inner": self.inner}

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "HadamardTransform":
        return cls(spec["n"], spec.get("inner", 1))

    def extra_repr(self) -> str:
        return f"n={self.n}, inner={self.inner}"
