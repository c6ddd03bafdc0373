"""The layer-streamed calibration driver shared by every PTQ method.

Only the embedding, one transformer block and the calibration activations are in memory at a
time: the block's weights are read from the safetensors shards, the calibration activations are
pushed through it, the method transforms and rounds it, the result is written to the output
shard stream and the block is freed. Peak memory is about one block (fp32) + the activations
[n_samples, seq_len, d] + the embedding, so an 8B checkpoint quantizes on a 24 GB machine.

The same driver runs on an in-memory model (`source=model`): both paths give the same weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError, InputError
from ..models.checks import check_weight
from ..formats import QUANTIZED_FORMAT, QUANTIZED_VERSION
from ..models.checkpoint import (open_shards, read_config, resolve_device, resolve_float_checkpoint, source_record,
                                 tokenizer_files, tokenizer_special_ids, weight_files, write_checkpoint)
from ..models.loader import build_model

from .base import METHODS, SAMPLE_ROWS, QuantizeConfig, forward_block, round_weight
from .calibrate import calibration_ids
from .gptq import HessianStats
from .mixed import allocation_record, embed_head_shapes, linear_shapes
from .primitives import QuantizedWeight, pack_codes
from .qlinear import ActQuantLinear, QLinear
from .schemes import fit_group

SHARD_BYTES = 1 << 30
DIAGNOSTIC_SEQUENCES = 4  # calibration sequences each block's output error is measured on (at most)


class CheckpointSource:
    """Named fp32 tensors read on demand from a checkpoint's safetensors shards.

    Each read opens its shard and closes it again: a handle kept open keeps every page read so
    far mapped, and resident memory then grows with the checkpoint (20 GiB for LLaDA-8B) instead
    of staying at one block.
    """

    def __init__(self, path: Path):
        from safetensors import safe_open

        open_shards(path)  # checks every shard (truncated or corrupt files raise CheckpointError)
        self.files: dict[str, str] = {}
        for f in weight_files(path):
            with safe_open(str(f), framework="pt", device="cpu") as h:
                self.files.update(dict.fromkeys(h.keys(), str(f)))

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise InputError(f"tensor {name} missing from the checkpoint")
        with safe_open(self.files[name], framework="pt", device="cpu") as h:
            t = h.get_tensor(name)
        check_weight(name, t, self.files[name])  # before quantization: a NaN would reach the artifact
        return t.to(torch.float32) if t.dtype != torch.float32 else t.clone()


class ModuleSource:
    """Named fp32 tensors of an in-memory model (for the in-memory path and tests)."""

    def __init__(self, model: nn.Module):
        self.state = dict(model.named_parameters())

    def __contains__(self, name: str) -> bool:
        return name in self.state

    def get(self, name: str) -> torch.Tensor:
        return self.state[name].detach().to(torch.float32).clone()


def materialize(module: nn.Module, prefix: str, source, device: str | torch.device = "cpu") -> None:
    """Fill a meta module's parameters from `source` (fp32), on `device`."""
    for name, _ in list(module.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        sub = module.get_submodule(mod_name) if mod_name else module
        sub._parameters[attr] = nn.Parameter(source.get(prefix + name).to(device), requires_grad=False)


def block_tensors(block: nn.Module, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors to write for a processed block: packed codes, scales, zeros/mins and transforms for
    quantized linears; the other parameters in the checkpoint's dtype."""
    out: dict[str, torch.Tensor] = {}
    quantized = set()
    for name, mod in block.named_modules():
        if isinstance(mod, QLinear):
            p = prefix + name
            out.update(weight_tensors(p, mod.qweight))
            if mod.bias is not None:
                out[p + ".bias"] = mod.bias.to(dtype)
            if mod.act_scale is not None:
                out[p + ".act_scale"] = mod.act_scale.reshape(1).float()
            if mod.act_zero is not None:
                out[p + ".act_zero"] = mod.act_zero.reshape(1).float()
        elif isinstance(mod, ActQuantLinear):
            out[prefix + name + ".weight"] = mod.linear.weight.to(dtype)
            if mod.linear.bias is not None:
                out[prefix + name + ".bias"] = mod.linear.bias.to(dtype)
        else:
            continue
        quantized.add(name)
        if mod.input_transform is not None:
            for k, v in mod.input_transform.tensors().items():
                out[f"{prefix}{name}.input_transform.{k}"] = v
    for name, p in block.named_parameters():
        owner = name.rpartition(".")[0]
        if not any(owner == q or owner.startswith(q + ".") for q in quantized):
            out[prefix + name] = p.detach().to(dtype)
    return {k: v.cpu() for k, v in out.items()}


def weight_tensors(name: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """How a quantized weight is stored: packed codes, scales and zero points or minimums."""
    out = {f"{name}.qweight": pack_codes(qw.codes, qw.cfg), f"{name}.scales": qw.scales}
    if qw.zeros is not None:
        out[f"{name}.qzeros"] = qw.zeros.to(torch.uint8)
    if qw.mins is not None:
        out[f"{name}.qmins"] = qw.mins
    return out


def layer_manifest(block: nn.Module, prefix: str) -> dict[str, dict]:
    """Per-layer grid / activation / transform entries of a processed block."""
    layers = {}
    for name, mod in block.named_modules():
        if isinstance(mod, (QLinear, ActQuantLinear)):
            entry = {"weight": mod.qweight.cfg.to_dict() if isinstance(mod, QLinear) else None,
                     "act": None if mod.act is None else mod.act.to_dict(),
                     "input_transform": None if mod.input_transform is None else mod.input_transform.spec()}
            layers[prefix + name] = entry
    return layers


def fit_group_size(qcfg: QuantizeConfig, widths: list[int]) -> QuantizeConfig:
    """When the group size comes from the scheme (not the user) and does not divide every layer
    width, halve it down to 16 until it does (small models: FFN 704 = 11 * 64)."""
    g = qcfg.scheme_.group_size
    if qcfg.kquant or qcfg.group_size is not None or g == 0 or all(w % g == 0 for w in widths):
        return qcfg
    return dataclasses.replace(qcfg, group_size=fit_group(g, widths))


# methods whose math runs on any torch device; the others use CPU-only helpers (seeded CPU
# generators for rotations, fp64 searches) and run on the CPU
DEVICE_METHODS = ("rtn", "gptq")


def quantize_checkpoint(model_path: str | Path, out_dir: str | Path, qcfg: QuantizeConfig, *,
                        source_model: nn.Module | None = None, progress: bool = True,
                        device: str | torch.device = "cpu") -> Path:
    """Quantize a checkpoint folder with `qcfg` and write a quantized checkpoint folder.

    Args:
        model_path: checkpoint folder (or `default`); its tokenizer feeds calibration.
        out_dir: output folder (must not exist or be empty); written atomically.
        qcfg: method, scheme and calibration.
        source_model: take the weights from this in-memory model instead of streaming them
            from the shards (same result; used to check the streamed path).
        progress: a progress bar over blocks on stderr.
        device: where each block, its calibration activations and the rounding run ("cuda" puts
            an 8B block on a GPU; the streamed weights and the output stay in host memory).
            RTN and GPTQ only; results match the CPU's up to float summation order.
    Returns:
        the output folder, holding safetensors, config.json, tokenizer files and manifest.json.
    """
    if not isinstance(qcfg, QuantizeConfig):
        raise InputError(f"qcfg must be a QuantizeConfig, got {type(qcfg).__name__}")
    run = _prepare(model_path, qcfg, source_model, resolve_device(device))
    # 1 GiB shards: finished blocks leave memory as soon as their shard is written
    return write_checkpoint(out_dir, run.config, _stream(run, progress), dtype=None,
                            extra_files=lambda: tokenizer_files(run.path), max_shard_bytes=SHARD_BYTES,
                            manifest=lambda: run.manifest)


@dataclasses.dataclass
class _Run:
    """One quantization run, resolved and checked before any block is read."""

    path: Path
    config: dict
    model: nn.Module  # on the meta device; blocks are filled one at a time
    qcfg: QuantizeConfig
    method: object  # the QuantMethod
    source: object  # CheckpointSource | ModuleSource
    ids: torch.Tensor  # calibration token ids [N, L]
    ctx: tuple  # the blocks' forward context (RoPE tables, masks) on `device`
    device: torch.device
    out_dtype: torch.dtype
    shapes: dict
    manifest: dict


def _prepare(model_path, qcfg: QuantizeConfig, source_model: nn.Module | None, device: torch.device) -> _Run:
    """Validate the run (device, grid against every layer width, a bit allocation's layer names),
    then build the meta model, the method, the weight source and the calibration ids."""
    from ..tokenizer import load_tokenizer

    if device.type != "cpu" and qcfg.method not in DEVICE_METHODS:
        raise InputError(f"--device {device} runs {', '.join(DEVICE_METHODS)}; {qcfg.method} runs on the CPU")
    path = resolve_float_checkpoint(model_path, "quantize")
    config = read_config(path)
    model = build_model(config, dtype=torch.float32, device="meta", added_tokens=tokenizer_special_ids(path))
    spec = model.spec
    widths = [model.blocks[0].get_submodule(name).in_features for name in spec.linears.values()]
    qcfg = fit_group_size(qcfg, widths)
    shapes = linear_shapes(model)
    unknown = sorted(set(dict(qcfg.layer_bits)) - set(shapes) - set(embed_head_shapes(model)))
    if unknown:
        raise InputError(f"the bit allocation names layers this model does not have: {', '.join(unknown[:3])}")
    method = METHODS[qcfg.method](qcfg, spec, model.config)
    for w in widths:  # fail before any work if the grid cannot tile a layer
        method.layer_wcfg(None, w).groups(w)
    out_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.get("torch_dtype"), torch.float32)
    source = ModuleSource(source_model) if source_model is not None else CheckpointSource(path)
    max_len = int(getattr(model.config, spec.context_key))
    ids, calib_summary = calibration_ids(load_tokenizer(path), spec, qcfg.calib, max_len)
    if not method.reads_calibration():  # RTN: the rows its layers' error figures read, not the whole set
        keep = min(ids.shape[0], -(-SAMPLE_ROWS // ids.shape[1]))
        ids, calib_summary = ids[:keep], {**calib_summary, "windows_run": keep, "reads_calibration": False}
    manifest = {
        "format": QUANTIZED_FORMAT, "version": QUANTIZED_VERSION, "method": qcfg.method,
        "scheme": "auto" if qcfg.layer_bits else qcfg.scheme,  # per-layer bits: see "allocation"
        "settings": qcfg.to_dict(), "calibration": {**qcfg.calib.to_dict(), **calib_summary},
        "source": source_record(path), "family": spec.family, "spec": spec.to_dict(), "device": device.type,
        "high_precision": [n for n in (spec.embedding, spec.final_norm, spec.head) if n not in dict(qcfg.layer_bits)],
        "layers": {}, "blocks": [],
    }
    ctx = model.block_context(ids.shape[1], torch.float32, device=device)
    return _Run(path, config, model, qcfg, method, source, ids, ctx, device, out_dtype, shapes, manifest)


def _stream(run: _Run, progress: bool):
    """(name, tensor) in file order: the embedding, each processed block, the final norm and head;
    the manifest's layers, blocks and allocation fill in as they go."""
    spec, method, source = run.model.spec, run.method, run.source
    tied = spec.head == spec.embedding or f"{spec.head}.weight" not in source
    emb_name = f"{spec.embedding}.weight"
    W_emb = method.transform_embedding(source.get(emb_name))
    if spec.embedding in dict(run.qcfg.layer_bits):  # a lookup table: RTN (no input statistics)
        qw = _round_extra(run, spec.embedding, W_emb, None)
        yield from weight_tensors(spec.embedding, qw).items()
        W_emb = qw.dequantize()  # calibration sees the quantized embedding
    else:
        yield emb_name, W_emb.to(run.out_dtype)
    X = F.embedding(run.ids, W_emb).to(run.device)  # (N, L, d) fp32
    del W_emb
    blocks = run.model.blocks
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(blocks), desc=f"{run.qcfg.method} {run.qcfg.scheme}", unit="block", leave=False)
    for i in range(len(blocks)):
        X, tensors = _process_block(run, i, X)
        yield from tensors.items()
        blocks[i] = nn.Identity()  # free the processed block's weights
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    norm_w = source.get(f"{spec.final_norm}.weight")
    head_w = source.get(emb_name if tied else f"{spec.head}.weight")
    norm_w, head_w = method.transform_head(norm_w, head_w)
    yield f"{spec.final_norm}.weight", norm_w.to(run.out_dtype)
    if not tied and spec.head in dict(run.qcfg.layer_bits):
        qw = _round_extra(run, spec.head, head_w, _head_hessian(run, X, norm_w))
        yield from weight_tensors(spec.head, qw).items()
    elif not tied:
        yield f"{spec.head}.weight", head_w.to(run.out_dtype)
    if run.qcfg.layer_bits:
        extra = embed_head_shapes(run.model)
        bits = dict(run.qcfg.layer_bits)
        cfgs = {n: method.layer_wcfg(n, run.shapes[n][1]) for n in run.shapes}
        cfgs.update({n: method.layer_wcfg(n, extra[n][1]) if n in bits else None for n in extra
                     if n in bits or run.qcfg.mix_embed_head})
        run.manifest["allocation"] = allocation_record(cfgs, {**run.shapes, **extra}, run.qcfg.avg_bits)


def _round_extra(run: _Run, name: str, W: torch.Tensor, H: HessianStats | None) -> QuantizedWeight:
    """Round the embedding or LM head of a mixed recipe on its grid (GPTQ for the head when the run
    is GPTQ, else RTN) and list it in the manifest's layers."""
    wcfg = run.method.layer_wcfg(name, W.shape[1])
    how = run.qcfg.method if H is not None else "rtn"
    qw, info = round_weight(W.float().to(run.device), None if H is None else H.H, run.qcfg, wcfg, how, name=name,
                            n_tokens=None if H is None else H.n)
    qw = QuantizedWeight(*(None if t is None else t.cpu() for t in (qw.codes, qw.scales, qw.zeros, qw.mins)), qw.cfg)
    run.manifest["layers"][name] = {"weight": wcfg.to_dict(), "act": None, "input_transform": None,
                                    **{k: v for k, v in info.items() if k == "gptq_loss"}}
    return qw


def _head_hessian(run: _Run, X: torch.Tensor, norm_w: torch.Tensor) -> HessianStats | None:
    """GPTQ statistics of the LM head's input: the final norm of the last block's calibration
    outputs (None for RTN runs)."""
    if run.qcfg.method != "gptq":
        return None
    norm = run.model.get_submodule(run.model.spec.final_norm)
    norm._parameters["weight"] = nn.Parameter(norm_w.float().to(run.device), requires_grad=False)
    stats = HessianStats(X.shape[-1])
    with torch.no_grad():
        for i in range(0, X.shape[0], run.qcfg.batch_size):
            stats.update(norm(X[i:i + run.qcfg.batch_size]))
    return stats


def _process_block(run: _Run, i: int, X: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Fill block i from the source, transform and round it on the calibration activations X, and
    return its output activations (the next block's input) and its tensors to write."""
    spec, method, bs = run.model.spec, run.method, run.qcfg.batch_size
    block = run.model.blocks[i]
    prefix = f"{spec.blocks}.{i}."
    materialize(block, prefix, run.source, run.device)
    method.prepare_block(block, i)  # exact, calibration-free transforms (QuaRot's rotations)
    n_err = min(X.shape[0], DIAGNOSTIC_SEQUENCES)
    Y_ref = forward_block(block, X[:n_err], run.ctx, bs)
    try:
        info = method.process_block(block, X, run.ctx, i)
    except CalibrationError as e:  # name the block: the method only knows the layer within it
        raise CalibrationError(f"{prefix}{e}") from None
    X = forward_block(block, X, run.ctx, bs)
    rel = float((X[:n_err] - Y_ref).pow(2).sum() / Y_ref.pow(2).sum().clamp(min=1e-30))
    layers = layer_manifest(block, prefix)
    for name, extra in info.items():
        layers.setdefault(prefix + name, {}).update(extra)
    run.manifest["layers"].update(layers)
    run.manifest["blocks"].append({"index": i, "out_rel_err": round(rel, 8)})
    return X, block_tensors(block, prefix, run.out_dtype)
