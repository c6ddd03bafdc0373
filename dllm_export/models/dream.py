"""Dream (Dream-v0-Base/Instruct-7B) in plain PyTorch: a Qwen2 body with bidirectional attention.

Module names mirror the released safetensors (`model.layers.{i}.self_attn.q_proj.weight`, ...).
Arithmetic mirrors the hub `modeling_dream.py` (Dream-org/Dream-v0-Base-7B on the Hugging Face hub): fp32
`inv_freq`, cos/sin cast to the activation dtype before rotation, q/k/v biases, no o_proj bias.
The forward returns unshifted logits; the decoding loop and the scorer apply the shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError
from .layers import Embedding, KVCache, Linear, RMSNorm, apply_rope, attention, check_ids, rope_cos_sin
from .spec import Dims, ModelSpec, check_sizes

DREAM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPEC = ModelSpec(
    family="dream",
    model_type="Dream",
    mask_id=151666,
    eos_id=151643,
    pad_id=151643,
    bos_id=151665,
    eot_id=151645,
    shift_logits=True,
    positions_skip_padding=True,
    default_sampler="entropy",
    gguf_rope_permute=False,
    elbo_estimator="dream",
    blocks="model.layers",
    linears={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
    norms={"attn": "input_layernorm", "ffn": "post_attention_layernorm"},
    embedding="model.embed_tokens",
    final_norm="model.norm",
    head="lm_head",
    smooth_pairs=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    gguf_arch="dream",
    context_key="max_position_embeddings",
    special_tokens={"eos": "<|endoftext|>", "pad": "<|endoftext|>", "im_start": "<|im_start|>",
                    "eot": "<|im_end|>", "bos": "<|beginoftext|>", "mask": "<|mask|>"},
    chat_template=DREAM_CHAT_TEMPLATE,
)


@dataclass(frozen=True)
class DreamConfig:
    """The fields of Dream's config.json that define the forward pass."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def dims(self) -> Dims:
        """The shape under the family-neutral names exporters use."""
        return Dims(d_model=self.hidden_size, n_layers=self.num_hidden_layers, n_heads=self.num_attention_heads,
                    n_kv_heads=self.num_key_value_heads, head_dim=self.head_dim, mlp_hidden=self.intermediate_size,
                    vocab_rows=self.vocab_size, context=self.max_position_embeddings, rope_theta=self.rope_theta,
                    norm_eps=self.rms_norm_eps, qkv_bias=True, tied_head=self.tie_word_embeddings)

    @classmethod
    def from_dict(cls, d: dict) -> "DreamConfig":
        """Parse a released config.json dict, refusing options this implementation does not compute."""
        if d.get("rope_scaling") not in (None, {}):
            raise CheckpointError(f"unsupported Dream config: rope_scaling={d['rope_scaling']!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"unsupported Dream config: hidden_act={d['hidden_act']!r}")
        try:
            heads = int(d["num_attention_heads"])
            cfg = cls(
                hidden_size=int(d["hidden_size"]),
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                vocab_size=int(d["vocab_size"]),
                max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
                rope_theta=float(d.get("rope_theta", 10000.0)),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            )
        except KeyError as e:
            raise CheckpointError(f"Dream config.json lacks required key {e.args[0]!r}") from None
        except (TypeError, ValueError, OverflowError) as e:
            raise CheckpointError(f"Dream config.json: a value of the wrong type ({e})") from None
        check_sizes("Dream", {"rope_theta": cfg.rope_theta, "norm_eps": cfg.rms_norm_eps}, d_model=cfg.hidden_size,
                    n_heads=heads, n_kv_heads=cfg.num_key_value_heads, n_layers=cfg.num_hidden_layers,
                    mlp_hidden=cfg.intermediate_size, vocab_rows=cfg.vocab_size, context=cfg.max_position_embeddings)
        if cfg.hidden_size % heads or heads % cfg.num_key_value_heads:
            raise CheckpointError(
                f"Dream config: hidden_size {cfg.hidden_size}, heads {heads}, kv heads {cfg.num_key_value_heads} do not divide")
        return cfg


class DreamAttention(nn.Module):
    def __init__(self, cfg: DreamConfig, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        d, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.q_proj = Linear(d, cfg.num_attention_heads * hd, bias=True, **kw)
        self.k_proj = Linear(d, cfg.num_key_value_heads * hd, bias=True, **kw)
        self.v_proj = Linear(d, cfg.num_key_value_heads * hd, bias=True, **kw)
        self.o_proj = Linear(cfg.num_attention_heads * hd, d, bias=False, **kw)

    def forward(self, h, cos, sin, mask, kv=None, rows: tuple[int, int] | None = None):
        """Attention over h (B, T, d); `rows` = (start, end): queries (and output) for those rows alone."""
        B, T, _ = h.shape
        cfg = self.cfg
        h_q, cos_q, sin_q = h, cos, sin
        if rows is not None:  # cos / sin / mask are (B or 1, 1, rows, ...): their query axis is 2
            h_q, cos_q, sin_q = h[:, rows[0]:rows[1]], cos[:, :, rows[0]:rows[1]], sin[:, :, rows[0]:rows[1]]
            mask = None if mask is None else mask[:, :, rows[0]:rows[1]]
        Tq = h_q.shape[1]
        q = self.q_proj(h_q).view(B, Tq, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos_q, sin_q), apply_rope(k, cos, sin)  # in the activation dtype, as Dream does
        if kv is not None:  # a KVCache hook: store, or attend over cached keys/values too
            k, v = kv(k, v)
        att = attention(q, k, v, mask)
        return self.o_proj(att.transpose(1, 2).reshape(B, Tq, -1))


class DreamMLP(nn.Module):
    def __init__(self, cfg: DreamConfig, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False, **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False, **kw)

    def forward(self, h):
        return self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class DreamLayer(nn.Module):
    def __init__(self, cfg: DreamConfig, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.self_attn = DreamAttention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = DreamMLP(cfg, **kw)

    def forward(self, x, cos, sin, mask, kv=None, rows: tuple[int, int] | None = None):
        """The layer on x (B, T, d); `rows` = (start, end): keys and values from every row, the rest
        from those rows alone, returning (B, end - start, d)."""
        h = self.input_layernorm(x)
        if rows is not None:
            x = x[:, rows[0]:rows[1]]
        x = x + self.self_attn(h, cos, sin, mask, kv, rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamModelLM(nn.Module):
    """Dream mask predictor. `forward(input_ids)` returns raw, unshifted logits (B, L, vocab)."""

    def __init__(self, cfg: DreamConfig, spec: ModelSpec = SPEC, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.config = cfg
        self.spec = spec
        self.model = nn.Module()
        self.model.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, **kw)
        self.model.layers = nn.ModuleList(DreamLayer(cfg, **kw) for _ in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, **kw)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    @staticmethod
    def padding_inputs(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position_ids, 4-D bool mask) from a [B, T] 0/1 mask, as Dream's `diffusion_generate` builds them:
        positions count real tokens only (pads get 1) and pad rows and columns are both masked."""
        keep = attention_mask.to(torch.bool)
        pos = attention_mask.long().cumsum(-1) - 1
        pos = pos.masked_fill(~keep, 1)
        mask = keep[:, None, None, :] & keep[:, None, :, None]  # (B, 1, T, T)
        return pos, mask

    def block_context(self, T: int, dtype: torch.dtype, device=None, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None):
        """What every layer takes besides x: (cos, sin, attention mask) for a length-T canvas."""
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask.to(torch.bool)
        elif attention_mask is not None and bool((attention_mask == 0).any()):
            pos, mask = self.padding_inputs(attention_mask)
            position_ids = pos if position_ids is None else position_ids
        if position_ids is None:
            position_ids = torch.arange(T, device=device)[None]
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        return cos[:, None].to(dtype), sin[:, None].to(dtype), mask  # (B or 1, 1, T, hd)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Raw (unshifted) logits. With a `cache` whose window is set, `input_ids` holds only the
        window's tokens (`attention_mask` / `position_ids` still span the whole sequence). `rows` =
        (start, end) computes the last layer's queries and MLP and the head only for those positions
        of the input."""
        check_ids(input_ids, self.config.vocab_size)
        x = self.model.embed_tokens(input_ids)
        window = None if cache is None else cache.window
        T = input_ids.shape[1] if window is None else cache.length
        cos, sin, mask = self.block_context(T, x.dtype, input_ids.device, attention_mask, position_ids)
        if window is not None:  # the window's query rows, at their absolute positions
            s, e = window
            cos, sin = cos[:, :, s:e], sin[:, :, s:e]
            mask = None if mask is None else mask[:, :, s:e, s:e] if cache.fill else mask[:, :, s:e]
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, None if cache is None else cache.layer(i), rows if i == last else None)
        x = self.model.norm(x)
        # the head module when untied (a quantized head is a QLinear / IntLinear there)
        if self.config.tie_word_embeddings:
            return nn.functional.linear(x, self.model.embed_tokens.weight)
        return self.lm_head(x)
