"""Building blocks shared by the LLaDA and Dream re-implementations.

Precision choices follow the released code exactly (the hub `modeling_llada.py` / `modeling_dream.py`):
RMSNorm normalises in fp32, casts back, then multiplies by the weight in the model dtype;
RoPE is rotate-half with fp32 inverse frequencies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """nn.Linear that skips random init on the meta device (the loader fills it; init there only
    costs a one-time ~1 s import of torch's meta kernels)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Embedding(nn.Embedding):
    """nn.Embedding that skips random init on the meta device (see Linear)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    """RMSNorm as in LLaDA's `RMSLayerNorm` and HF Llama/Qwen2 (identical arithmetic)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.promote_types(dtype, torch.float32))  # fp32 (fp64 stays fp64, for exactness tests)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX rotation: (x1, x2) -> (-x2, x1) over the two halves of the head dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables in fp32 for integer positions of any shape; result shape (*positions.shape, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (..., hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, in the dtype of the operands."""
    return x * cos + rotate_half(x) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional SDPA over (B, H, T, hd) with GQA by repeat-interleave of the kv heads."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)


class KVCache:
    """Keys/values of every layer from the last full forward, for Fast-dLLM's block caches.

    A full forward (`window` None) stores each layer's post-RoPE keys and values [B, kvH, L, hd].
    A windowed forward runs only the tokens of positions [start, end) and attends to the stored
    keys/values of every other position plus its own fresh ones, in the original key order, so
    key-padding masks still line up: the prefix cache recomputes [block start, L), the dual cache
    only the block. With `fill` set, a windowed forward is the full forward of rows whose other
    columns are all padding: the window's tokens attend to each other alone, at their positions in
    a canvas of `length` columns, and their keys/values [B, kvH, end - start, hd] are stored (a
    batch's rows that joined at other times fill their caches this way, without the padding).
    With `update` set, a windowed forward also stores its fresh keys/values over the window's
    stale ones (a block start that renews only the columns that changed: `refresh_blocks`).
    """

    def __init__(self):
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.window: tuple[int, int] | None = None
        self.length = 0
        self.fill = False
        self.update = False

    def layer(self, i: int):
        """The hook block i calls with its fresh (k, v); returns the (k, v) to attend over."""
        def hook(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if self.window is None or self.fill:  # a full forward refreshes the cache
                if i == 0:
                    self.k, self.v = [], []
                    self.length = k.shape[2] if self.window is None else self.length
                self.k.append(k)
                self.v.append(v)
                return k, v
            s, e = self.window
            K, V = self.k[i], self.v[i]
            K, V = torch.cat([K[:, :, :s], k, K[:, :, e:]], dim=2), torch.cat([V[:, :, :s], v, V[:, :, e:]], dim=2)
            if self.update:
                self.k[i], self.v[i] = K, V
            return K, V
        return hook


def check_ids(input_ids: torch.Tensor, vocab_rows: int, context: int | None = None,
              attention_mask: torch.Tensor | None = None) -> None:
    """Raise a clear error for ids a forward cannot take: not an integer tensor [batch, length >= 1],
    outside the embedding table, longer than `context` (where given: exported graphs fail past it,
    onnxruntime's Gather wraps a negative id), or with a mask of another shape."""
    from ..errors import InputError

    if not isinstance(input_ids, torch.Tensor):
        raise InputError(f"input_ids must be a torch tensor [batch, length], got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise InputError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids must have shape [batch, length >= 1], got {tuple(input_ids.shape)}")
    if context is not None and input_ids.shape[1] > context:
        raise InputError(f"{input_ids.shape[1]} tokens exceed the model's context of {context}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise InputError(f"attention_mask must have the ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_rows):
        raise InputError(
            f"token ids must lie in [0, {vocab_rows}); got min {int(input_ids.min())}, max {int(input_ids.max())}"
        )
