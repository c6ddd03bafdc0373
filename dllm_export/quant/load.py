"""Load a quantized checkpoint folder (manifest.json + packed safetensors) for fake-quant evaluation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..models.checks import check_weight
from ..formats import QUANTIZED_FORMAT, check_format_version
from ..models.checkpoint import open_shards, read_config, set_tensor, tokenizer_special_ids
from ..models.loader import build_model
from .base import set_module
from .kernels import IntLinear, check_kernel
from .primitives import ActQuantConfig, QuantizedWeight, WeightQuantConfig, unpack_codes
from .qlinear import ActQuantLinear, QLinear
from .transforms import InputTransform, transform_from_spec

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def read_manifest(path: Path) -> dict:
    """manifest.json of a quantized checkpoint, checked for its format tag."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'manifest.json'}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != QUANTIZED_FORMAT:
        raise CheckpointError(f"{path / 'manifest.json'} is not a dllm-export quantized manifest")
    check_format_version(manifest, path / "manifest.json")
    layers = manifest.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(e, dict) for e in layers.values()):
        raise CheckpointError(f"{path / 'manifest.json'}: no per-layer entries (`layers`); the manifest is malformed")
    return manifest


def weight_config(d: dict) -> WeightQuantConfig:
    d = dict(d)
    d["scale_dtype"] = _SCALE_DTYPES[d.get("scale_dtype", "float16")]
    return WeightQuantConfig(**d)


@dataclass
class StoredLinear:
    """One linear layer of a quantized checkpoint, as stored: a QuantizedWeight (or, for layers kept
    in high precision, a float weight), plus bias, activation quantization and input transform."""

    name: str
    qweight: QuantizedWeight | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    act: ActQuantConfig | None
    transform: InputTransform | None
    act_scale: torch.Tensor | None = None  # static per-tensor activation grid (scalar tensors)
    act_zero: torch.Tensor | None = None
    tensor_names: set[str] = field(default_factory=set)

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape if self.qweight is not None else tuple(self.weight.shape)


def read_linear(handles: dict, name: str, entry: dict, path: Path) -> StoredLinear:
    """Read layer `name` described by manifest `entry` from open shards (see `open_shards`); a
    malformed entry (wrong types, unknown values, missing keys) is a CheckpointError naming it."""
    try:
        return _read_linear(handles, name, entry, path)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path / 'manifest.json'}: the entry of layer {name} is malformed "
                              f"({type(e).__name__}: {e})") from None


def _read_linear(handles: dict, name: str, entry: dict, path: Path) -> StoredLinear:
    def get(key: str) -> torch.Tensor:
        if key not in handles:
            raise CheckpointError(f"tensor {key} missing from quantized checkpoint {path}")
        t = handles[key].get_tensor(key)
        check_weight(key, t, path)
        return t

    def opt(key: str) -> torch.Tensor | None:
        return get(key) if key in handles else None

    names = {f"{name}.bias"}
    transform = None
    if entry.get("input_transform"):
        pre = f"{name}.input_transform."
        tt = {k[len(pre):]: get(k) for k in handles if k.startswith(pre)}
        names.update(pre + k for k in tt)
        transform = transform_from_spec(entry["input_transform"], tt)
    act = ActQuantConfig(**entry["act"]) if entry.get("act") else None
    bias = opt(f"{name}.bias")
    if entry.get("weight") is None:
        names.add(f"{name}.weight")
        return StoredLinear(name, None, get(f"{name}.weight"), bias, act, transform, tensor_names=names)
    cfg = weight_config(entry["weight"])
    zeros = opt(f"{name}.qzeros")
    qw = QuantizedWeight(unpack_codes(get(f"{name}.qweight"), cfg), get(f"{name}.scales"),
                         None if zeros is None else zeros.to(torch.int16), opt(f"{name}.qmins"), cfg)
    scale, zero = opt(f"{name}.act_scale"), opt(f"{name}.act_zero")
    names.update(f"{name}.{k}" for k in ("qweight", "scales", "qzeros", "qmins", "act_scale", "act_zero"))
    return StoredLinear(name, qw, None, bias, act, transform, None if scale is None else scale[0],
                        None if zero is None else zero[0], names)


def load_quantized(path: Path, dtype: torch.dtype, device="cpu", kernel: str = "fake") -> nn.Module:
    """Build the model from a quantized checkpoint (see quant.driver): with kernel "fake", QLinear
    layers (the reference); with "int", IntLinear layers on integer kernels (see quant.kernels)."""
    check_kernel(kernel, device)
    manifest = read_manifest(path)
    config = read_config(path)
    model = build_model(config, dtype=dtype, device="meta", added_tokens=tokenizer_special_ids(path))
    handles = open_shards(path)
    used = set()
    for name, entry in manifest["layers"].items():
        lin = read_linear(handles, name, entry, path)
        used |= lin.tensor_names
        bias = None if lin.bias is None else lin.bias.to(dtype)
        if name == model.spec.embedding and lin.qweight is not None:  # a lookup: its dequantized table
            expected = tuple(model.get_submodule(name).weight.shape)
            if lin.shape != expected:
                raise CheckpointError(f"quantized embedding {name} has shape {list(lin.shape)}, config implies "
                                      f"{list(expected)}")
            set_tensor(model, f"{name}.weight", lin.qweight.dequantize(dtype).to(device))
            continue
        if lin.qweight is None:
            dense = nn.Linear(0, 0)
            dense.weight = nn.Parameter(lin.weight.to(dtype), requires_grad=False)
            dense.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
            dense.in_features, dense.out_features = lin.weight.shape[1], lin.weight.shape[0]
            module = ActQuantLinear(dense, lin.act, lin.transform)
        else:
            expected = tuple(model.get_submodule(name).weight.shape)
            if lin.shape != expected:
                raise CheckpointError(f"quantized layer {name} has shape {list(lin.shape)}, config implies {list(expected)}")
            if kernel == "int":
                module = IntLinear(lin.qweight, bias, lin.act, lin.transform, dtype, lin.act_scale, lin.act_zero)
            else:
                module = QLinear(lin.qweight, bias, lin.act, lin.transform, dtype=dtype)
                module.act_scale, module.act_zero = lin.act_scale, lin.act_zero
        set_module(model, name, module.to(device))
    for pname, p in list(model.named_parameters()):
        if p.is_meta:
            if pname not in handles:
                raise CheckpointError(f"tensor {pname} missing from quantized checkpoint {path}")
            t = handles[pname].get_tensor(pname)
            check_weight(pname, t, path)
            set_tensor(model, pname, t.to(device=device, dtype=dtype))
            used.add(pname)
    unexpected = sorted(set(handles) - used)
    if unexpected:
        raise CheckpointError(f"unexpected tensors in {path}: {', '.join(unexpected[:5])}")
    model.eval()
    model.checkpoint_path = path
    model.raw_config = config
    model.manifest = manifest
    return model
