"""Checkpoint folder I/O shared by the float loader, the quantized loader, the quantize driver,
the factory and the exporters: folder resolution, config.json, safetensors shards, tensor
setters, the tokenizer files and the atomic checkpoint writer.

It imports no loader and nothing of `quant`, so every side can use it without an import cycle.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, InputError
from ..fileio import atomic_folder, write_manifest
from ..formats import TOKENIZER_FILES, artifact_format

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}

BUNDLED = {"default": "llada-default", "default-dream": "dream-default"}


def check_model_arg(path) -> None:
    """InputError unless `path` can name a model: a path (str / os.PathLike) or a bundled name."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"a model is a folder path or a bundled name ({', '.join(BUNDLED)}), got {path!r:.60}")


def resolve_model_path(path: str | Path) -> Path:
    """Map `default` / `default-dream` to the bundled checkpoints; check that a folder exists."""
    check_model_arg(path)
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


def resolve_checkpoint(path: str | Path) -> Path:
    """`resolve_model_path` for a checkpoint whose weights are read (float or quantized): an
    exported ONNX / GGUF artifact is refused by name (its manifest used to be read as a quantized
    checkpoint's)."""
    check_model_arg(path)
    fmt = artifact_format(path) if str(path) not in BUNDLED and Path(path).exists() else None
    if fmt is not None:
        kind = {"onnx": "an ONNX", "gguf": "a GGUF"}[fmt]
        raise CheckpointError(f"{path} is {kind} artifact, not a checkpoint: export, quantize and load_model read "
                              f"the checkpoint it was made from (`dllm-export info --model {path}` names it)")
    return resolve_model_path(path)


def checkpoint_sha256(path: str | Path) -> str:
    """sha256 over a checkpoint's config.json and weight files (names and bytes), in name order."""
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
        config = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{f}: not a JSON object (got {type(config).__name__})")
    return config


def resolve_float_checkpoint(path: str | Path, reader: str) -> Path:
    """`resolve_checkpoint` for a run that reads float weights (`reader`: quantize, a sensitivity
    scan): a quantized checkpoint is refused by name, with the source its manifest records (it
    failed on a missing tensor, or scanned fake-quant weights for minutes)."""
    p = resolve_checkpoint(path)
    if is_quantized(p):
        try:
            manifest = json.loads((p / "manifest.json").read_text())
        except (OSError, ValueError):  # unreadable or not JSON: the refusal stands, without the name
            manifest = {}
        source = manifest.get("source") if isinstance(manifest, dict) else None
        name = f" ({source['name']})" if isinstance(source, dict) and isinstance(source.get("name"), str) else ""
        raise InputError(f"{path} is a quantized checkpoint: {reader} reads float weights, those of the "
                         f"checkpoint it was made from{name}")
    return p


def is_quantized(path: Path) -> bool:
    """Whether a checkpoint folder is a quantized one (written by `dllm-export quantize`): float
    checkpoints carry no manifest.json."""
    return (path / "manifest.json").is_file()


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
        if not dtype.is_floating_point:  # an integer dtype failed deep in the model's parameters
            raise CheckpointError(f"compute dtype must be a float one (float32, bfloat16, float16), got {dtype}")
        return dtype
    if dtype == "auto":
        dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (choose from float32, bfloat16, float16, auto)")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that can hold tensors on this machine; InputError for a name torch
    does not know, or a CUDA device where there is none (a CPU build of torch, no GPU visible)."""
    from ..errors import InputError

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r} ({str(e).splitlines()[0]})") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise InputError(f"device {str(device)!r}: {why} (torch {torch.__version__}); use cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise InputError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return d


def tokenizer_special_ids(path: Path) -> dict[str, int]:
    """token text -> id of the added (special) tokens of a folder's tokenizer.json, if any."""
    f = path / "tokenizer.json"
    if not f.is_file():
        return {}
    try:
        return {t["content"]: int(t["id"]) for t in json.loads(f.read_text()).get("added_tokens", [])}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return {}


def tokenizer_files(path: Path) -> dict[str, bytes]:
    """file name -> bytes of the tokenizer files (`formats.TOKENIZER_FILES`) a folder holds."""
    return {name: (path / name).read_bytes() for name in TOKENIZER_FILES if (path / name).is_file()}


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` as the (frozen) parameter `name` of `model`, replacing a meta placeholder."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    mod._parameters[attr] = nn.Parameter(value, requires_grad=False)


def write_checkpoint(out_dir: str | Path, config: dict, tensors: Iterable[tuple[str, torch.Tensor]],
                     dtype: torch.dtype | None = torch.float32, max_shard_bytes: int | None = None,
                     extra_files: dict[str, str | bytes] | Callable[[], dict[str, str | bytes]] | None = None,
                     manifest: Callable[[], dict] | None = None) -> Path:
    """Write config.json + safetensors (sharded with an index when `max_shard_bytes` is set) atomically.

    `tensors` may be a generator: each shard is written as soon as it is full, so peak memory is
    about one shard. `dtype` casts every tensor (None keeps each tensor's own dtype and config's
    torch_dtype). `extra_files` may be a callable, evaluated after the tensors are written.
    `manifest` (a callable, evaluated last) becomes manifest.json, with the size and sha256 of every
    other file (`fileio.write_manifest`). The folder appears only when complete (written to a temp
    dir, then renamed).
    """
    out = Path(out_dir)
    with atomic_folder(out) as tmp:
        if dtype is not None:
            config = dict(config, torch_dtype=DTYPE_NAMES[dtype])
        shards = _write_shards(tmp, tensors, dtype, max_shard_bytes)
        _name_shards(tmp, shards, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        extra = extra_files() if callable(extra_files) else (extra_files or {})
        for fname, content in extra.items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / fname, mode) as f:
                f.write(content)
        if manifest is not None:
            write_manifest(tmp, manifest())
    return out


def _write_shards(tmp: Path, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None,
                  max_shard_bytes: int | None) -> list[tuple[list[str], int]]:
    """Write the tensors as `shard-0000k.tmp` files of at most `max_shard_bytes`; returns
    (tensor names, bytes) per shard."""
    shards: list[tuple[list[str], int]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush():
        nonlocal shard, size
        if shard:
            save_file(shard, str(tmp / f"shard-{len(shards) + 1:05d}.tmp"), metadata={"format": "pt"})
            shards.append((list(shard), size))
            shard, size = {}, 0

    for name, t in tensors:
        t = (t if dtype is None else t.to(dtype)).contiguous()
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t
        size += nbytes
    flush()
    return shards


def _name_shards(tmp: Path, shards: list[tuple[list[str], int]], max_shard_bytes: int | None) -> None:
    """Rename the shards to the released names: model.safetensors, or model-0000k-of-0000n + index."""
    n = len(shards)
    if max_shard_bytes is None or n == 1:
        os.replace(tmp / "shard-00001.tmp", tmp / "model.safetensors")
        return
    weight_map = {}
    for i, (names, _) in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(tmp / f"shard-{i:05d}.tmp", tmp / fname)
        weight_map.update({k: fname for k in names})
    index = {"metadata": {"total_size": sum(s for _, s in shards)}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
