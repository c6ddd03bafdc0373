"""ModelSpec: everything later passes need to know about a model family, as data.

One spec per family (LLaDA, Dream). Token ids are family defaults that `load_model`
overrides from the checkpoint's config.json, so tiny test models and fine-tunes with
other vocabularies work unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import CheckpointError

# bounds far beyond any released model (Llama-3 405B: 126 layers, width 16384, 128 heads), so a
# corrupt config.json is refused by name before a model of its size is built (even on `meta`,
# 10^6 layers of modules exhaust memory)
_SIZE_LIMITS = {"n_layers": 1024, "d_model": 1 << 20, "mlp_hidden": 1 << 22, "n_heads": 4096, "n_kv_heads": 4096,
                "vocab_rows": 1 << 24, "context": 1 << 22}


def check_sizes(family: str, floats: dict[str, float] | None = None, **sizes: int) -> None:
    """Raise CheckpointError naming the config.json value that is not a positive integer within
    _SIZE_LIMITS (sizes, by their Dims names) or a positive finite number (floats: rope_theta, norm_eps)."""
    for key, v in sizes.items():
        if not 1 <= v <= _SIZE_LIMITS[key]:
            raise CheckpointError(f"{family} config.json: {key} = {v} is out of range (1..{_SIZE_LIMITS[key]})")
    for key, v in (floats or {}).items():
        if not (math.isfinite(v) and v > 0):
            raise CheckpointError(f"{family} config.json: {key} = {v} must be a positive finite number")


@dataclass(frozen=True)
class Dims:
    """The architecture numbers every exporter needs, under one set of names for all families.

    Attributes:
        d_model / n_layers / n_heads / n_kv_heads / head_dim / mlp_hidden: transformer shape.
        vocab_rows: rows of the embedding and of the LM head.
        context: maximum sequence length (rows of the RoPE table).
        rope_theta / norm_eps: RoPE base and RMSNorm epsilon.
        qkv_bias: q/k/v projections carry biases.
        tied_head: the LM head reuses the embedding matrix.
    """

    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    mlp_hidden: int
    vocab_rows: int
    context: int
    rope_theta: float
    norm_eps: float
    qkv_bias: bool
    tied_head: bool


@dataclass(frozen=True)
class ModelSpec:
    """Static facts about one dLLM family.

    Attributes:
        family: short name ("llada", "dream").
        model_type: the `model_type` string of the released config.json.
        mask_id / eos_id / pad_id / bos_id / eot_id: special token ids (eot = end of turn).
        shift_logits: Dream keeps next-token alignment (position i predicts token i+1);
            the decoding loop and the scorer shift, never the forward.
        positions_skip_padding: with a padded batch, RoPE positions count real tokens only
            (Dream's `diffusion_generate`); LLaDA keeps absolute positions.
        default_sampler: the sampler `generate` uses when none is given.
        blocks: dotted path of the list of transformer blocks in the module tree.
        linears: role -> module name inside a block (q, k, v, o, gate, up, down).
        norms: role -> module name inside a block (attn, ffn).
        embedding / final_norm / head: dotted paths of the embedding, last norm and LM head.
        smooth_pairs: (norm or linear, [linears it feeds]) pairs for AWQ / SmoothQuant folding.
        gguf_arch: llama.cpp architecture name.
        gguf_rope_permute: the GGUF writer permutes q/k rows from the released half-split RoPE
            layout to adjacent pairs (llama.cpp runs LLaDA with its NORM rope; Dream's qwen2 arch
            reads the half-split rows as they are).
        elbo_estimator: the family's Monte-Carlo ELBO (`eval.likelihood.elbo`): "llada" (exact
            mask counts, evenly spaced) or "dream" (i.i.d. masking at sampled ratios).
        context_key: config key holding the context length.
        special_tokens: role (bos, eos, pad, mask, eot, ...) -> token text of the released tokenizer.
        chat_template: Jinja template used when the checkpoint ships none.
    """

    family: str
    model_type: str
    mask_id: int
    eos_id: int
    pad_id: int
    bos_id: int | None
    eot_id: int | None
    shift_logits: bool
    positions_skip_padding: bool
    default_sampler: str
    blocks: str
    linears: dict[str, str]
    norms: dict[str, str]
    embedding: str
    final_norm: str
    head: str
    smooth_pairs: tuple[tuple[str, tuple[str, ...]], ...]
    gguf_arch: str
    context_key: str
    gguf_rope_permute: bool = False
    elbo_estimator: str = "llada"
    special_tokens: dict[str, str] = field(default_factory=dict)
    chat_template: str = field(repr=False, default="")

    def is_norm(self, name: str) -> bool:
        """Whether parameter `name` is a norm's weight: a block's attn / ffn norm, or the final norm."""
        if name == f"{self.final_norm}.weight":
            return True
        return name.startswith(self.blocks + ".") and name.endswith(tuple(f".{n}.weight" for n in self.norms.values()))

    def is_residual_out(self, name: str) -> bool:
        """Whether parameter `name` is a block's residual output projection (o or down) weight."""
        outs = tuple(f".{self.linears[r]}.weight" for r in ("o", "down"))
        return name.startswith(self.blocks + ".") and name.endswith(outs)

    def align_logits(self, logits: "torch.Tensor") -> "torch.Tensor":
        """Raw model logits [B, L, V] re-indexed so that row i predicts token i: Dream's are shifted
        right by one (row 0 reuses its own output, which is never scored); LLaDA's pass through."""
        if not self.shift_logits:
            return logits
        import torch

        return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

    def to_dict(self) -> dict:
        """A JSON-serialisable view (for manifests and `dllm-export info`)."""
        d = asdict(self)
        d.pop("chat_template")
        d["smooth_pairs"] = [[a, list(b)] for a, b in self.smooth_pairs]
        return d
