"""LLaDA (LLaDA-8B-Base/Instruct, LLaDA-1.5) in plain PyTorch.

Module names mirror the released safetensors (`model.transformer.blocks.{i}.q_proj.weight`, ...)
so checkpoints load by name with no renaming. Arithmetic mirrors the hub `modeling_llada.py`
(GSAI-ML/LLaDA-8B-Base on the Hugging Face hub, the 2025-10 revision with attention-mask support).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError
from .layers import Embedding, KVCache, Linear, RMSNorm, apply_rope, attention, check_ids, rope_cos_sin
from .spec import Dims, ModelSpec, check_sizes

LLADA_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)

SPEC = ModelSpec(
    family="llada",
    model_type="llada",
    mask_id=126336,
    eos_id=126081,
    pad_id=126081,
    bos_id=126080,
    eot_id=126348,
    shift_logits=False,
    positions_skip_padding=False,
    default_sampler="low_confidence",
    gguf_rope_permute=True,
    elbo_estimator="llada",
    blocks="model.transformer.blocks",
    linears={"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "attn_out",
             "gate": "ff_proj", "up": "up_proj", "down": "ff_out"},
    norms={"attn": "attn_norm", "ffn": "ff_norm"},
    embedding="model.transformer.wte",
    final_norm="model.transformer.ln_f",
    head="model.transformer.ff_out",
    smooth_pairs=(
        ("attn_norm", ("q_proj", "k_proj", "v_proj")),
        ("v_proj", ("attn_out",)),
        ("ff_norm", ("ff_proj", "up_proj")),
        ("up_proj", ("ff_out",)),
    ),
    gguf_arch="llada",
    context_key="max_sequence_length",
    special_tokens={"bos": "<|startoftext|>", "eos": "<|endoftext|>", "pad": "<|endoftext|>",
                    "mask": "<|mdm_mask|>", "eot": "<|eot_id|>", "header_start": "<|start_header_id|>",
                    "header_end": "<|end_header_id|>"},
    chat_template=LLADA_CHAT_TEMPLATE,
)

# Flags of the released config that this implementation reproduces; anything else is refused
# rather than silently computed differently.
_REQUIRED = {
    "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms", "rope": True,
    "alibi": False, "attention_layer_norm": False, "include_bias": False, "bias_for_layer_norm": False,
    "scale_logits": False, "input_emb_norm": False, "block_group_size": 1,
}


@dataclass(frozen=True)
class LLaDAConfig:
    """The fields of LLaDA's config.json that define the forward pass."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    mlp_hidden_size: int
    vocab_size: int
    embedding_size: int
    max_sequence_length: int
    rope_theta: float
    rope_full_precision: bool
    rms_norm_eps: float
    weight_tying: bool
    include_qkv_bias: bool

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def dims(self) -> Dims:
        """The shape under the family-neutral names exporters use."""
        return Dims(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                    head_dim=self.head_dim, mlp_hidden=self.mlp_hidden_size, vocab_rows=self.embedding_size,
                    context=self.max_sequence_length, rope_theta=self.rope_theta, norm_eps=self.rms_norm_eps,
                    qkv_bias=self.include_qkv_bias, tied_head=self.weight_tying)

    @classmethod
    def from_dict(cls, d: dict) -> "LLaDAConfig":
        """Parse a released config.json dict, refusing flags this implementation does not compute."""
        for key, want in _REQUIRED.items():
            got = d.get(key, want)
            if got is not None and got != want:
                raise CheckpointError(f"unsupported LLaDA config: {key}={got!r} (only {want!r} is implemented)")
        try:
            d_model, n_heads = int(d["d_model"]), int(d["n_heads"])
            mlp = d.get("mlp_hidden_size") or int(d.get("mlp_ratio", 4) * d_model)
            vocab = int(d["vocab_size"])
            cfg = cls(
                d_model=d_model,
                n_heads=n_heads,
                n_kv_heads=int(d.get("n_kv_heads") or n_heads),
                n_layers=int(d["n_layers"]),
                mlp_hidden_size=int(mlp),
                vocab_size=vocab,
                embedding_size=int(d.get("embedding_size") or vocab),
                max_sequence_length=int(d.get("max_sequence_length", 4096)),
                rope_theta=float(d.get("rope_theta", 10000.0)),
                rope_full_precision=bool(d.get("rope_full_precision", True)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                weight_tying=bool(d.get("weight_tying", False)),
                include_qkv_bias=bool(d.get("include_qkv_bias", False)),
            )
        except KeyError as e:
            raise CheckpointError(f"LLaDA config.json lacks required key {e.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError) as e:
            raise CheckpointError(f"LLaDA config.json: a value of the wrong type ({e})") from None
        check_sizes("LLaDA", {"rope_theta": cfg.rope_theta, "norm_eps": cfg.rms_norm_eps}, d_model=d_model,
                    n_heads=n_heads, n_kv_heads=cfg.n_kv_heads, n_layers=cfg.n_layers, mlp_hidden=cfg.mlp_hidden_size,
                    vocab_rows=cfg.embedding_size, context=cfg.max_sequence_length)
        if d_model % n_heads or n_heads % cfg.n_kv_heads:
            raise CheckpointError(f"LLaDA config: d_model {d_model}, n_heads {n_heads}, n_kv_heads {cfg.n_kv_heads} do not divide")
        return cfg


class LLaDABlock(nn.Module):
    """`LLaDALlamaBlock`: pre-norm attention (no causal mask) and a SiLU-gated MLP."""

    def __init__(self, cfg: LLaDAConfig, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        d, hd, nkv = cfg.d_model, cfg.head_dim, cfg.n_kv_heads
        self.cfg = cfg
        self.attn_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
        self.q_proj = Linear(d, d, bias=cfg.include_qkv_bias, **kw)
        self.k_proj = Linear(d, nkv * hd, bias=cfg.include_qkv_bias, **kw)
        self.v_proj = Linear(d, nkv * hd, bias=cfg.include_qkv_bias, **kw)
        self.attn_out = Linear(d, d, bias=False, **kw)
        self.ff_norm = RMSNorm(d, cfg.rms_norm_eps, **kw)
        self.ff_proj = Linear(d, cfg.mlp_hidden_size, bias=False, **kw)
        self.up_proj = Linear(d, cfg.mlp_hidden_size, bias=False, **kw)
        self.ff_out = Linear(cfg.mlp_hidden_size, d, bias=False, **kw)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None,
                kv=None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The block on x (B, T, d). `rows` = (start, end): keys and values from every row, queries,
        attention output and MLP from those rows alone; returns (B, end - start, d)."""
        B, T, _ = x.shape
        cfg = self.cfg
        h = self.attn_norm(x)
        h_q, cos_q, sin_q = h, cos, sin
        if rows is not None:
            x, h_q = x[:, rows[0]:rows[1]], h[:, rows[0]:rows[1]]
            cos_q, sin_q = cos[rows[0]:rows[1]], sin[rows[0]:rows[1]]
        Tq = h_q.shape[1]
        q = self.q_proj(h_q).view(B, Tq, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        if cfg.rope_full_precision:  # LLaDA rotates q/k in fp32, then casts back
            up = torch.promote_types(q.dtype, torch.float32)
            q = apply_rope(q.to(up), cos_q.to(up), sin_q.to(up)).type_as(v)
            k = apply_rope(k.to(up), cos.to(up), sin.to(up)).type_as(v)
        else:
            q = apply_rope(q, cos_q.to(q.dtype), sin_q.to(q.dtype))
            k = apply_rope(k, cos.to(k.dtype), sin.to(k.dtype))
        if kv is not None:  # a KVCache hook: store, or attend over cached keys/values too
            k, v = kv(k, v)
        att = attention(q, k, v, bias)  # (B, H, Tq, hd); the key-padding bias is (B, 1, 1, keys)
        x = x + self.attn_out(att.transpose(1, 2).reshape(B, Tq, cfg.d_model))
        h = self.ff_norm(x)
        return x + self.ff_out(nn.functional.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModelLM(nn.Module):
    """LLaDA mask predictor. `forward(input_ids)` returns raw logits (B, L, embedding_size), no shift."""

    def __init__(self, cfg: LLaDAConfig, spec: ModelSpec = SPEC, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.config = cfg
        self.spec = spec
        self.model = nn.Module()
        tr = nn.ModuleDict({
            "wte": Embedding(cfg.embedding_size, cfg.d_model, **kw),
            "blocks": nn.ModuleList(LLaDABlock(cfg, **kw) for _ in range(cfg.n_layers)),
            "ln_f": RMSNorm(cfg.d_model, cfg.rms_norm_eps, **kw),
        })
        if not cfg.weight_tying:
            tr["ff_out"] = Linear(cfg.d_model, cfg.embedding_size, bias=False, **kw)
        self.model.transformer = tr

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    def head_weight(self) -> torch.Tensor:
        tr = self.model.transformer
        return tr.wte.weight if self.config.weight_tying else tr.ff_out.weight

    def rope(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin for positions 0..T-1, taken from a table of max_sequence_length rows as the reference does."""
        n = max(self.config.max_sequence_length, T)
        cos, sin = rope_cos_sin(torch.arange(n, device=device), self.config.head_dim, self.config.rope_theta)
        return cos[:T], sin[:T]

    def attention_bias(self, attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Key-padding bias of the updated hub code: 0 for real keys, finfo.min for pads; None if nothing is padded."""
        if attention_mask is None or bool((attention_mask != 0).all()):
            return None
        keep = attention_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, T)
        return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)

    def block_context(self, T: int, dtype: torch.dtype, device=None, attention_mask: torch.Tensor | None = None):
        """What every block takes besides x: (cos, sin, attention bias) for a length-T canvas."""
        cos, sin = self.rope(T, device)
        return cos, sin, self.attention_bias(attention_mask, dtype)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Raw logits. With a `cache` whose window is set, `input_ids` holds only the window's tokens
        (and `attention_mask` still spans the whole sequence). `rows` = (start, end) computes the
        last block's queries and MLP and the head only for those positions of the input (the loop
        reads only the current block's)."""
        check_ids(input_ids, self.config.embedding_size)
        tr = self.model.transformer
        x = tr.wte(input_ids)
        window = None if cache is None else cache.window
        T = input_ids.shape[1] if window is None else cache.length
        cos, sin, bias = self.block_context(T, x.dtype, input_ids.device, attention_mask)
        if window is not None:  # rotate the window's queries/keys at their absolute positions
            cos, sin = cos[window[0]:window[1]], sin[window[0]:window[1]]
            if cache.fill and bias is not None:  # its keys are its own columns alone
                bias = bias[..., window[0]:window[1]]
        last = len(tr.blocks) - 1
        for i, block in enumerate(tr.blocks):
            x = block(x, cos, sin, bias, None if cache is None else cache.layer(i), rows if i == last else None)
        x = tr.ln_f(x)
        # the head module when untied (a quantized head is a QLinear / IntLinear there)
        return nn.functional.linear(x, tr.wte.weight) if self.config.weight_tying else tr.ff_out(x)
