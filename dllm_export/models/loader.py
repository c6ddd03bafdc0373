"""Load a released checkpoint folder (config.json + safetensors, single or sharded).

The model is built on the meta device and filled tensor by tensor straight from the
memory-mapped shards, so peak memory stays near one copy of the weights in the target dtype.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from . import family_for
from .checks import check_weight

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

# Non-persistent buffers some exporters write; they carry nothing the forward needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", ".rotary.inv_freq")

BUNDLED = {"default": "llada-default", "default-dream": "dream-default"}


def resolve_model_path(path: str | Path) -> Path:
    """Map `default` / `default-dream` to the bundled checkpoints; check that a folder exists."""
    if str(path) in BUNDLED:
        p = Path(__file__).resolve().parent.parent / "assets" / BUNDLED[str(path)]
        if not (p / "config.json").is_file():
            raise CheckpointError(f"the bundled model {str(path)!r} is not installed (expected {p})")
        return p
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model folder not found: {p}")
    if not p.is_dir():
        raise CheckpointError(f"expected a checkpoint folder (config.json + safetensors), got a file: {p}")
    return p


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 over a checkpoint's config.json and weight files (names and bytes), in name order."""
    import hashlib

    folder = resolve_model_path(path)
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.name == "config.json" or f.suffix == ".safetensors":
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()


def source_record(path: str | Path) -> dict:
    """The `source` of a manifest: the checkpoint's folder name and `checkpoint_sha256`, never a
    machine's path, so the same checkpoint gives the same manifest (and artifact bytes) anywhere."""
    folder = resolve_model_path(path)
    return {"name": folder.name, "sha256": checkpoint_sha256(folder)}


def read_config(path: Path) -> dict:
    """config.json of a checkpoint folder, with a clear error when missing or malformed."""
    f = path / "config.json"
    if not f.is_file():
        raise CheckpointError(f"missing config.json in {path}")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed shard index ({e})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"missing safetensors shard: {f}")
    return files


def open_shards(path: Path) -> dict:
    """tensor name -> open safetensors handle, over every shard of a checkpoint (memory-mapped;
    nothing is read until `get_tensor`). Corrupt or truncated files raise CheckpointError."""
    from safetensors import safe_open

    handles = {}
    for f in weight_files(path):
        try:
            h = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
        handles.update({k: h for k in h.keys()})
    return handles


def resolve_dtype(dtype: torch.dtype | str, config: dict) -> torch.dtype:
    """torch dtype from a dtype or a name; 'auto' takes the checkpoint's own `torch_dtype`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (choose from float32, bfloat16, float16, auto)")
    return DTYPES[dtype]


def tokenizer_special_ids(path: Path) -> dict[str, int]:
    """token text -> id of the added (special) tokens of a folder's tokenizer.json, if any."""
    f = path / "tokenizer.json"
    if not f.is_file():
        return {}
    try:
        return {t["content"]: int(t["id"]) for t in json.loads(f.read_text()).get("added_tokens", [])}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return {}


def resolve_spec(fam, config: dict, vocab_rows: int, added_tokens: dict[str, int] | None = None):
    """The family spec with ids from config.json first, then the tokenizer's special tokens, then the
    family defaults; a default id outside the vocabulary (a small custom model) becomes None."""
    ids = {}
    for role in ("mask", "eos", "pad", "bos", "eot"):
        field = f"{role}_id"
        key = fam.id_keys.get(field)
        text = fam.spec.special_tokens.get(role)
        if key and config.get(key) is not None:
            ids[field] = int(config[key])
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


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    mod._parameters[attr] = nn.Parameter(value, requires_grad=False)


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               kernel: str = "fake") -> nn.Module:
    """Load a LLaDA or Dream checkpoint in its released Hugging Face layout.

    Args:
        path: checkpoint folder (config.json + model.safetensors or sharded shards with index),
            or `default` / `default-dream` for the bundled models.
        dtype: compute dtype (float32, bfloat16, float16, or 'auto' for the checkpoint's own).
        device: where the weights go.
        kernel: the quantized layers' kernels: "fake" (dequantized weights, the reference) or
            "int" (integer kernels, CPU; see quant.kernels). Float checkpoints ignore it.
    Returns:
        an eval-mode `nn.Module` with `.spec` (a `ModelSpec`) and `.config`; `model(input_ids)`
        returns raw logits (B, L, V) in `dtype` (Dream's are unshifted).
    Raises:
        CheckpointError: missing/truncated files, unknown model_type, wrong tensor shapes.
    """
    from safetensors import safe_open

    path = resolve_model_path(path)
    config = read_config(path)
    dtype = resolve_dtype(dtype, config)
    if (path / "manifest.json").is_file():  # a quantized checkpoint written by dllm-export quantize
        from ..quant.load import load_quantized

        return load_quantized(path, dtype, device, kernel)
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
                    _set_tensor(model, key, t.to(device=device, dtype=dtype))
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
