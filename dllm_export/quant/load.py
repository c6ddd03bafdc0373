"""Load a quantized checkpoint folder (manifest.json + packed safetensors) for fake-quant evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..models.loader import _set_tensor, build_model, open_shards, read_config, tokenizer_special_ids
from .base import set_module
from .primitives import ActQuantConfig, QuantizedWeight, WeightQuantConfig, unpack_codes
from .qlinear import ActQuantLinear, QLinear
from .transforms import transform_from_spec

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def read_manifest(path: Path) -> dict:
    """manifest.json of a quantized checkpoint, checked for its format tag."""
    from .driver import MANIFEST_FORMAT

    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'manifest.json'}: not valid JSON ({e})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path / 'manifest.json'} is not a dllm-export quantized manifest")
    return manifest


def weight_config(d: dict) -> WeightQuantConfig:
    d = dict(d)
    d["scale_dtype"] = _SCALE_DTYPES[d.get("scale_dtype", "float16")]
    return WeightQuantConfig(**d)


def load_quantized(path: Path, dtype: torch.dtype, device="cpu") -> nn.Module:
    """Build the model with QLinear layers from a quantized checkpoint (see quant.driver)."""
    manifest = read_manifest(path)
    config = read_config(path)
    model = build_model(config, dtype=dtype, device="meta", added_tokens=tokenizer_special_ids(path))
    handles = open_shards(path)

    def get(name: str) -> torch.Tensor:
        if name not in handles:
            raise CheckpointError(f"tensor {name} missing from quantized checkpoint {path}")
        return handles[name].get_tensor(name)

    used = set()
    for name, entry in manifest["layers"].items():
        transform = None
        if entry.get("input_transform"):
            pre = f"{name}.input_transform."
            tt = {k[len(pre):]: get(k) for k in handles if k.startswith(pre)}
            used.update(pre + k for k in tt)
            transform = transform_from_spec(entry["input_transform"], tt)
        act = ActQuantConfig(**entry["act"]) if entry.get("act") else None
        bias = get(f"{name}.bias").to(dtype) if f"{name}.bias" in handles else None
        if entry.get("weight") is None:
            lin = nn.Linear(0, 0)
            lin.weight = nn.Parameter(get(f"{name}.weight").to(dtype), requires_grad=False)
            lin.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
            lin.in_features, lin.out_features = lin.weight.shape[1], lin.weight.shape[0]
            module = ActQuantLinear(lin, act, transform)
            used.update({f"{name}.weight", f"{name}.bias"})
        else:
            cfg = weight_config(entry["weight"])
            codes = unpack_codes(get(f"{name}.qweight"), cfg)
            zeros = get(f"{name}.qzeros").to(torch.int16) if f"{name}.qzeros" in handles else None
            mins = get(f"{name}.qmins") if f"{name}.qmins" in handles else None
            qw = QuantizedWeight(codes, get(f"{name}.scales"), zeros, mins, cfg)
            expected = tuple(model.get_submodule(name).weight.shape)
            if qw.shape != expected:
                raise CheckpointError(f"quantized layer {name} has shape {list(qw.shape)}, config implies {list(expected)}")
            module = QLinear(qw, bias, act, transform, dtype=dtype)
            if f"{name}.act_scale" in handles:  # static per-tensor activation grid
                module.act_scale = get(f"{name}.act_scale")[0]
                module.act_zero = get(f"{name}.act_zero")[0] if f"{name}.act_zero" in handles else None
            used.update({f"{name}.qweight", f"{name}.scales", f"{name}.qzeros", f"{name}.qmins", f"{name}.bias",
                         f"{name}.act_scale", f"{name}.act_zero"})
        set_module(model, name, module.to(device))
    for pname, p in list(model.named_parameters()):
        if p.is_meta:
            _set_tensor(model, pname, get(pname).to(device=device, dtype=dtype))
            used.add(pname)
    unexpected = sorted(set(handles) - used)
    if unexpected:
        raise CheckpointError(f"unexpected tensors in {path}: {', '.join(unexpected[:5])}")
    model.eval()
    model.checkpoint_path = path
    model.raw_config = config
    model.manifest = manifest
    return model
