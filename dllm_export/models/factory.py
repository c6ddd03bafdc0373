"""Write checkpoints in the released Hugging Face layout: tiny random models for tests, full-size
random shapes for benchmarks, and trained models.

Config keys and tensor names are exactly those of the released checkpoints (the reference code's
`save_pretrained` output, see tests/golden/*/config.json), so every part of the project is tested on
files that look like the real ones. Tensors are generated and written shard by shard, so an
8B-shaped checkpoint never exists in memory at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import InputError
from .checkpoint import DTYPES, write_checkpoint
from . import family_for
from .loader import build_model


def llada_config(d_model: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int | None = None,
                 mlp_hidden_size: int = 96, vocab_size: int = 128, max_sequence_length: int = 64,
                 rope_theta: float = 500000.0, mask_token_id: int | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, weight_tying: bool = False, dtype: str = "float32") -> dict:
    """A LLaDA config.json dict with every key of the released file (ModelConfig dumped by save_pretrained)."""
    mask = vocab_size - 8 if mask_token_id is None else mask_token_id
    eos = vocab_size - 28 if eos_token_id is None else eos_token_id
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": d_model,
        "embedding_dropout": 0.0, "embedding_size": vocab_size, "eos_token_id": eos, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
        "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "mask_token_id": mask, "max_sequence_length": max_sequence_length,
        "mlp_hidden_size": mlp_hidden_size, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
        "n_heads": n_heads, "n_kv_heads": n_heads if n_kv_heads is None else n_kv_heads, "n_layers": n_layers,
        "pad_token_id": eos if pad_token_id is None else pad_token_id, "precision": None, "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": rope_theta,
        "scale_logits": False, "torch_dtype": dtype, "transformers_version": "4.46.2", "use_cache": False,
        "vocab_size": vocab_size, "weight_tying": weight_tying,
    }


def dream_config(hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                 num_key_value_heads: int | None = 2, intermediate_size: int = 96, vocab_size: int = 128,
                 max_position_embeddings: int = 64, rope_theta: float = 1e6, mask_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, bos_token_id: int | None = None,
                 tie_word_embeddings: bool = False, dtype: str = "float32") -> dict:
    """A Dream config.json dict with every key of the released file (DreamConfig dumped by save_pretrained)."""
    return {
        "architectures": ["DreamModel"], "attention_dropout": 0.0,
        "bos_token_id": vocab_size - 29 if bos_token_id is None else bos_token_id,
        "eos_token_id": vocab_size - 28 if eos_token_id is None else eos_token_id,
        "hidden_act": "silu", "hidden_size": hidden_size, "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "mask_token_id": vocab_size - 8 if mask_token_id is None else mask_token_id,
        "max_position_embeddings": max_position_embeddings, "max_window_layers": 28, "model_type": "Dream",
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_attention_heads if num_key_value_heads is None else num_key_value_heads,
        "pad_token_id": 0 if pad_token_id is None else pad_token_id, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": rope_theta, "sliding_window": None, "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype, "transformers_version": "4.46.2", "use_cache": False, "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


CONFIGS: dict[str, Callable[..., dict]] = {"llada": llada_config, "dream": dream_config}


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor a checkpoint of this config holds (computed on the meta device)."""
    model = build_model(config, device="meta")
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


def random_tensor(name: str, shape: tuple[int, ...], std: float, generator: torch.Generator, spec) -> torch.Tensor:
    """Random init: norms (by the family's `spec`) 1 + noise, everything else N(0, std^2)."""
    if spec.is_norm(name):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    return std * torch.randn(shape, generator=generator)


def make_random_checkpoint(out_dir: str | Path, family: str = "llada", *, dtype: torch.dtype | str = torch.float32,
                           seed: int = 0, std: float = 0.2, max_shard_bytes: int | None = None,
                           tokenizer: bool = False, **config_kwargs) -> Path:
    """A random-init checkpoint of any size in the released layout (tiny for tests, 8B-shaped for benchmarks).

    Args:
        family: "llada" or "dream"; `config_kwargs` go to `llada_config` / `dream_config`.
        std: weight scale; the default 0.2 gives peaky logits, so decoding traces are well-conditioned.
        max_shard_bytes: shard like the 8B releases (model-0000k-of-0000n.safetensors + index).
        tokenizer: also write a small byte-level BPE tokenizer.json whose special tokens sit at the
            config's ids (needs vocab_size >= 300).
    """
    if family not in CONFIGS:
        raise InputError(f"unknown family {family!r} (choose from {', '.join(CONFIGS)})")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    extra = {}
    if tokenizer:
        from ..tokenizer import SAMPLE_TEXT, train_tokenizer

        files, ids = train_tokenizer([SAMPLE_TEXT], config_kwargs.get("vocab_size", 128), family)
        config_kwargs = {**ids, **config_kwargs}
        extra.update(files)
    config = CONFIGS[family](**config_kwargs)
    shapes = tensor_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    mask_id = config["mask_token_id"]
    spec = family_for(config["model_type"]).spec

    def tensors():
        for name, shape in shapes.items():
            t = random_tensor(name, shape, std, gen, spec)
            if name == f"{spec.head}.weight":
                t[mask_id] = 0  # a mask predictor never proposes the mask itself
            yield name, t

    return write_checkpoint(out_dir, config, tensors(), dtype=dtype, max_shard_bytes=max_shard_bytes,
                            extra_files=extra)
