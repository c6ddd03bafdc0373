"""Build a model from a config and load a float checkpoint folder (config.json + safetensors,
single or sharded) into it; the folder I/O itself is in `checkpoint.py`.

The model is built on the meta device and filled tensor by tensor straight from the
memory-mapped shards, so peak memory stays near one copy of the weights in the target dtype.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from . import family_for
from .checkpoint import read_config, resolve_dtype, resolve_model_path, set_tensor, tokenizer_special_ids, weight_files
# the folder I/O lived here before checkpoint.py; these names stay importable from the loader
from .checkpoint import BUNDLED, DTYPES, checkpoint_sha256, open_shards, source_record  # noqa: F401
from .checks import check_weight

# Non-persistent buffers some exporters write; they carry nothing the forward needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".rotary.inv_freq")


def resolve_spec(fam, config: dict, vocab_rows: int, added_tokens: dict[str, int] | None = None):
    """The family spec with ids from config.json first, then the tokenizer's special tokens, then the
    family defaults; a default id outside the vocabulary (a small custom model) becomes None."""
    ids = {}
    for role in ("mask", "eos", "pad", "bos", "eot"):
        field = f"{role}_id"
        key = fam.id_keys.get(field)
        text = fam.spec.special_tokens.get(role)
        if key and config.get(key) is not None:
            if not isinstance(config[key], int) or isinstance(config[key], bool):
                raise CheckpointError(f"config.json: {key} = {config[key]!r} is not an integer token id")
            ids[field] = config[key]
        elif added_tokens and text in added_tokens:
            ids[field] = added_tokens[text]
        elif getattr(fam.spec, field) is not None and getattr(fam.spec, field) >= vocab_rows:
            ids[field] = None
    if ids.get("mask_id", fam.spec.mask_id) is None:
        raise CheckpointError("no mask token id: set mask_token_id in config.json")
    return dataclasses.replace(fam.spec, **ids)


def read_spec(path: Path):
    """(config dict, resolved ModelSpec, Dims) of a folder with a config.json (checkpoint or artifact)."""
    config = read_config(path)
    fam = family_for(config.get("model_type"))
    dims = fam.parse_config(config).dims
    return config, resolve_spec(fam, config, dims.vocab_rows, tokenizer_special_ids(path)), dims


def build_model(config: dict, dtype: torch.dtype = torch.float32, device: str | torch.device = "meta",
                added_tokens: dict[str, int] | None = None) -> nn.Module:
    """An (unfilled, meta by default) model for a config dict, with `.spec` ids resolved by `resolve_spec`."""
    fam = family_for(config.get("model_type"))
    cfg = fam.parse_config(config)
    vocab_rows = int(getattr(cfg, "embedding_size", None) or cfg.vocab_size)
    spec = resolve_spec(fam, config, vocab_rows, added_tokens)
    # constructed with device= rather than `with torch.device(...)`: the context manager pulls in
    # torch._dynamo on first use (~1 s)
    return fam.module(cfg, spec, dtype=dtype, device=device)


def load_float_model(path: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu") -> nn.Module:
    """A float LLaDA or Dream checkpoint in its released Hugging Face layout, as `load_model`
    describes (which also opens quantized checkpoints, and is the one place that chooses)."""
    from safetensors import safe_open

    path = resolve_model_path(path)
    config = read_config(path)
    dtype = resolve_dtype(dtype, config)
    model = build_model(config, dtype=dtype, device="meta", added_tokens=tokenizer_special_ids(path))
    expected = {k: tuple(v.shape) for k, v in model.named_parameters()}
    filled: set[str] = set()
    unexpected: list[str] = []
    for file in weight_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith(_IGNORED_SUFFIXES):
                        continue
                    if key not in expected:
                        unexpected.append(key)
                        continue
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != expected[key]:
                        raise CheckpointError(f"{file.name}: tensor {key} has shape {list(shape)}, "
                                              f"config.json implies {list(expected[key])}")
                    t = f.get_tensor(key)
                    check_weight(key, t, file)  # before the cast: fp16 would turn a huge value into Inf
                    set_tensor(model, key, t.to(device=device, dtype=dtype))
                    filled.add(key)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{file}: cannot read safetensors ({type(e).__name__}: {e})") from None
    if unexpected:
        raise CheckpointError(f"unexpected tensors for {model.spec.family} in {path}: "
                              f"{', '.join(sorted(unexpected)[:5])}{' ...' if len(unexpected) > 5 else ''}")
    missing = sorted(set(expected) - filled)
    if missing:
        raise CheckpointError(f"tensors missing from {path}: "
                              f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    model.eval()
    model.checkpoint_path = path
    model.raw_config = config
    return model
