"""Online input transforms of quantized layers: x -> x @ T, with T orthogonal (or a permutation).

Rotation methods fold T^T into a layer's weight offline (W' = W T), and the layer applies T to
its input at run time where no preceding op can absorb it (QuaRot's Hadamard before the down
projection, DuQuant's block rotations after a norm). Each transform serialises to a manifest
entry (`spec()`) plus named tensors (`tensors()`), and is rebuilt by `transform_from_spec`.
"""

from __future__ import annotations

import torch
from torch import nn

TRANSFORMS: dict[str, type["InputTransform"]] = {}


def register_transform(cls):
    """Class decorator: make a transform kind loadable from manifests."""
    TRANSFORMS[cls.kind] = cls
    return cls


class InputTransform(nn.Module):
    """Base class: `forward(x)` returns x @ T over the last dim."""

    kind = "base"

    def matrix(self, n: int | None = None, dtype=torch.float64) -> torch.Tensor:
        """T as a dense [n, n] matrix (for folding into weights and for tests)."""
        eye = torch.eye(n or self.size, dtype=dtype)
        return self.forward(eye)

    def spec(self) -> dict:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def from_spec(cls, spec: dict, tensors: dict[str, torch.Tensor]) -> "InputTransform":
        raise NotImplementedError


@register_transform
class MatrixTransform(InputTransform):
    """x @ M for a dense matrix M (stored as a tensor)."""

    kind = "matrix"

    def __init__(self, M: torch.Tensor):
        super().__init__()
        self.size = M.shape[0]
        self.register_buffer("M", M.to(torch.float32))

    def forward(self, x):
        return (x.to(self.M.dtype) @ self.M).to(x.dtype) if x.dtype != torch.float64 else x @ self.M.double()

    def spec(self) -> dict:
        return {"kind": self.kind, "size": self.size}

    def tensors(self):
        return {"M": self.M}

    @classmethod
    def from_spec(cls, spec, tensors):
        return cls(tensors["M"])


@register_transform
class BlockDiagonalTransform(InputTransform):
    """x @ (P · blockdiag(R_1..R_k)): an optional permutation of channels, then independent
    rotations of consecutive blocks (DuQuant's structure; O(n · block) instead of O(n^2))."""

    kind = "block_diagonal"

    def __init__(self, blocks: torch.Tensor, perm: torch.Tensor | None = None):
        super().__init__()
        k, b, _ = blocks.shape
        self.size = k * b
        self.register_buffer("blocks", blocks.to(torch.float32))
        self.register_buffer("perm", None if perm is None else perm.to(torch.int64))

    def forward(self, x):
        dtype = x.dtype
        if self.perm is not None:
            x = x[..., self.perm]
        k, b, _ = self.blocks.shape
        xb = x.reshape(*x.shape[:-1], k, b).to(self.blocks.dtype if dtype != torch.float64 else torch.float64)
        R = self.blocks if dtype != torch.float64 else self.blocks.double()
        y = torch.einsum("...kb,kbc->...kc", xb, R)
        return y.reshape(*x.shape[:-1], k * b).to(dtype)

    def spec(self):
        return {"kind": self.kind, "size": self.size, "block": int(self.blocks.shape[1]), "permuted": self.perm is not None}

    def tensors(self):
        t = {"blocks": self.blocks}
        if self.perm is not None:
            t["perm"] = self.perm
        return t

    @classmethod
    def from_spec(cls, spec, tensors):
        return cls(tensors["blocks"], tensors.get("perm"))


@register_transform
class ChainTransform(InputTransform):
    """Several transforms applied in order: x @ T1 @ T2 ..."""

    kind = "chain"

    def __init__(self, parts: list[InputTransform]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.size = parts[0].size

    def forward(self, x):
        for p in self.parts:
            x = p(x)
        return x

    def spec(self):
        return {"kind": self.kind, "size": self.size, "parts": [p.spec() for p in self.parts]}

    def tensors(self):
        return {f"{i}.{k}": v for i, p in enumerate(self.parts) for k, v in p.tensors().items()}

    @classmethod
    def from_spec(cls, spec, tensors):
        parts = []
        for i, s in enumerate(spec["parts"]):
            sub = {k[len(f"{i}."):]: v for k, v in tensors.items() if k.startswith(f"{i}.")}
            parts.append(transform_from_spec(s, sub))
        return cls(parts)


def transform_from_spec(spec: dict, tensors: dict[str, torch.Tensor]) -> InputTransform:
    """Rebuild a transform from its manifest entry and tensors."""
    from ..errors import CheckpointError

    if spec["kind"] not in TRANSFORMS:
        raise CheckpointError(f"unknown input transform {spec['kind']!r} in manifest (known: {', '.join(TRANSFORMS)})")
    return TRANSFORMS[spec["kind"]].from_spec(spec, tensors)
