"""GGUF export for llama.cpp: architectures `llada` and `dream`, written tensor by tensor.

A PTQ grid that *is* a GGML block format goes in code for code, scale for scale:

    symmetric, 4-bit, group 32      -> Q4_0  (w = d * (q - 8))
    symmetric, 5-bit, group 32      -> Q5_0  (w = d * (q - 16))
    symmetric, 8-bit, group 32      -> Q8_0  (w = d * q)
    float minimum, 4-bit, group 32  -> Q4_1  (w = d * q + m)
    float minimum, 5-bit, group 32  -> Q5_1
    K-quant grids (quant.kquant)    -> Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (exporter.gguf_kquants)

so the file dequantizes (gguf.quants, llama.cpp) to exactly the weights our fake-quant computes
with. A float checkpoint is written as F32 / F16 / BF16, or rounded here with the reference
round-to-nearest of the classic block types (gguf.quants); llama.cpp's mixed K-quant recipes
(Q4_K_M, ...) come from llama.cpp's own quantizer run on an F16 file. Online rotations and
activation quantization have no GGUF form and are refused with the target that can carry them.

The artifact is a folder: `model.gguf`, plus config.json, the tokenizer files and manifest.json
(so `dllm-export generate --model OUT` can tokenize without llama.cpp).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, InputError
from ..fileio import atomic_folder
from ..formats import FORMAT_VERSIONS, GGUF_FORMAT
from ..interrupts import kept_interrupts
from ..models.checkpoint import source_record
from ..quant.kquant import BLOCK_GRIDS, KQUANTS, kquant_name
from ..quant.load import weight_config
from ..quant.primitives import QuantizedWeight, WeightQuantConfig
from .gguf_kquants import pack_kquant
from .gguf_vocab import (check_text, choose_pre, differences, llama_cpp_version, parity_record, read_back,
                         read_vocab, special_ids)
from .source import open_source, write_sidecars

FORMAT = GGUF_FORMAT
VERSION = FORMAT_VERSIONS[FORMAT]
MODEL_FILE = "model.gguf"
ADD_BOS = False  # prompts arrive as ids; the chat template adds BOS where the model wants it
FLOAT_TYPES = ("F32", "F16", "BF16")
# the PTQ grids written exactly: classic blocks of 32 and K-quant super-blocks of 256
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1") + tuple(KQUANTS)
# llama.cpp's mixed recipes: its quantizer (llama_model_quantize) on an F16 file; name -> llama_ftype
LLAMA_QUANTS = {"Q3_K_M": 12, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "IQ4_NL": 25, "IQ4_XS": 30}
QUANT_TYPES = FLOAT_TYPES + BLOCK_TYPES + tuple(LLAMA_QUANTS)
# general.file_type of a file whose block linears are mostly one K-quant (no MOSTLY_Q4_K: the _S recipe)
_FILE_TYPES = {"Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S"}

# (bits, symmetric) of a group-32 grid -> the block type that stores it exactly
_EXACT = {(g.bits, g.sym): name for name, g in BLOCK_GRIDS.items()}

# llada: HF module name (inside a block) -> GGUF name; Dream uses the Qwen2 names
_ROLE_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
               "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
_NORM_NAMES = {"attn": "attn_norm", "ffn": "ffn_norm"}

@dataclass(frozen=True)
class GgufExportConfig:
    """How to write the file.

    Attributes:
        quant: the type of the block linears of a float checkpoint (F32, F16, BF16, Q8_0, Q4_0,
            Q4_1, Q5_0, Q5_1, or a llama.cpp K-quant such as Q4_K_M). A quantized checkpoint's
            layers are written in the block type their grid matches; then this must be None or it.
        embed_type / head_type: the embedding and LM head where the checkpoint keeps them in float:
            F32 or F16 (a mixed recipe's quantized ones are written in their block type).
    """

    quant: str | None = None
    embed_type: str = "F16"
    head_type: str = "F16"

    def __post_init__(self):
        if self.quant is not None and self.quant not in QUANT_TYPES:
            raise InputError(f"unknown GGUF type {self.quant!r} (choose from {', '.join(QUANT_TYPES)})")
        for t in (self.embed_type, self.head_type):
            if t not in ("F32", "F16"):
                raise InputError(f"embedding / head type must be F32 or F16, got {t!r}")


def block_type_for(c: WeightQuantConfig, in_features: int, name: str = "weight") -> str:
    """The GGML block type that stores the grid `c` (of a layer `in_features` wide) exactly, or a
    clear error saying why none does."""
    if c.progressive:
        raise InputError(f"{name}: progressive group scales (integers x a channel scale, for the int8 GEMMs) have "
                         f"no exact GGUF form: export it with --target onnx")
    if c.super_group:
        kq = kquant_name(c)
        if kq is None:
            raise InputError(f"{name}: a super-block grid that is none of {', '.join(KQUANTS)}")
        c.groups(in_features)  # super-blocks tile the width
        return kq
    group = c.group_size or in_features
    if group != 32:
        raise InputError(f"{name}: GGUF block formats hold groups of 32 weights; this grid has groups of "
                         f"{group} (quantize with --group-size 32)")
    if not c.sym and c.zero_kind != "float":
        raise InputError(f"{name}: asymmetric grids with integer zero points have no exact GGUF form (Q4_1/Q5_1 "
                         f"store a float minimum); quantize with --zero-kind float, or symmetric for Q4_0")
    key = (c.bits, c.sym)
    if key not in _EXACT:
        raise InputError(f"{name}: no GGUF block format stores a {c.bits}-bit {'symmetric' if c.sym else 'asymmetric'} "
                         f"grid (exact: 4/5/8-bit symmetric -> Q4_0/Q5_0/Q8_0, 4/5-bit float-min -> Q4_1/Q5_1)")
    return _EXACT[key]


def pack_blocks(qw: QuantizedWeight, qtype: str) -> np.ndarray:
    """The GGML blocks (uint8 [out, in / 32 * type_size]) of a group-32 grid, bit for bit.

    Q4_x / Q5_x put element j of a block in the low nibble of byte j and element j + 16 in the
    high nibble; Q5_x keep the fifth bits in a little-endian 32-bit mask. K-quants: `pack_kquant`.
    """
    if qtype in KQUANTS:
        return pack_kquant(qw, qtype)
    out, n = qw.shape
    G = n // 32
    codes = qw.codes.numpy().astype(np.int32).reshape(out, G, 32)
    d = qw.scales.to(torch.float16).numpy().reshape(out, G, 1).view(np.uint8)  # [out, G, 2]
    if qtype == "Q8_0":
        qs = codes.astype(np.int8).view(np.uint8)
        return np.concatenate([d, qs], axis=-1).reshape(out, -1)
    offset = {"Q4_0": 8, "Q5_0": 16}.get(qtype, 0)
    q = (codes + offset).astype(np.uint8)
    lo = q & 0x0F
    qs = lo[..., :16] | (lo[..., 16:] << 4)
    parts = [d]
    if qtype in ("Q4_1", "Q5_1"):
        parts.append(qw.mins.to(torch.float16).numpy().reshape(out, G, 1).view(np.uint8))
    if qtype in ("Q5_0", "Q5_1"):
        parts.append(np.packbits((q >> 4).astype(np.uint8), axis=-1, bitorder="little"))  # [out, G, 4]
    parts.append(qs)
    return np.concatenate(parts, axis=-1).reshape(out, -1)


def _permute_rope_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's adjacent-pair (NORM rope) order, per head (LLaDA q/k)."""
    return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file, planned from the manifest and the safetensors headers before any
    value is read.

    Attributes:
        name: the GGUF tensor name (`blk.0.attn_q.weight`).
        shape: the numpy shape in elements ([rows, cols] = HF [out, in], or [n]).
        qtype: the GGML type it is stored in (F32, F16, BF16, Q8_0, Q4_0, ...).
        source: the HF tensor it is read from (a float tensor rounded to `qtype` here), or with
            `packed` the HF layer whose PTQ grid is packed code for code.
        packed: the values are the PTQ codes and scales of layer `source`, not a float tensor.
        rope_heads: permute the rows per head into llama.cpp's adjacent-pair rope order (LLaDA q/k).
    """

    name: str
    shape: tuple[int, ...]
    qtype: str
    source: str
    packed: bool = False
    rope_heads: int | None = None

    @property
    def ggml_type(self):
        import gguf

        return gguf.GGMLQuantizationType[self.qtype]

    @property
    def stored(self) -> tuple[tuple[int, ...], np.dtype]:
        """The numpy shape and dtype of the array written: F32 / F16 as themselves, block types
        (and BF16) as rows of bytes."""
        import gguf

        if self.qtype in ("F32", "F16"):
            return self.shape, np.dtype(np.float32 if self.qtype == "F32" else np.float16)
        return tuple(gguf.quant_shape_to_byte_shape(self.shape, self.ggml_type)), np.dtype(np.uint8)

    @property
    def nbytes(self) -> int:
        import gguf

        block, type_size = gguf.GGML_QUANT_SIZES[self.ggml_type]
        return int(np.prod(self.shape)) // block * type_size


def plan_tensors(source, cfg: GgufExportConfig) -> list[PlannedTensor]:
    """Every tensor of the file in file order, with its type, for a float or quantized checkpoint
    (`exporter.source.Source`). Raises InputError for layers GGUF cannot carry (online rotations,
    activation quantization, grids no block type stores exactly) before anything is written."""
    spec, dims, handles = source.spec, source.dims, source.handles
    float_type = "F16" if cfg.quant in LLAMA_QUANTS else (cfg.quant or "F32")
    permute = spec.gguf_rope_permute  # llama.cpp runs LLaDA with NORM (adjacent-pair) rope
    plan: list[PlannedTensor] = []

    def add_float(gname: str, hf_name: str, qtype: str, rope_heads: int | None = None):
        if hf_name not in handles:
            raise CheckpointError(f"tensor {hf_name} missing from {source.path}")
        shape = tuple(handles[hf_name].get_slice(hf_name).get_shape())
        if len(shape) == 1:
            qtype = "F32"  # norms and biases: llama.cpp keeps 1-D tensors in F32
        plan.append(PlannedTensor(gname, shape, qtype, hf_name, rope_heads=rope_heads))

    def add_linear(gname: str, hf_name: str, shape: tuple[int, int], rope_heads: int | None):
        entry = source.layers.get(hf_name)
        if entry is not None:
            _refuse_online_parts(hf_name, entry)
        if entry is None or entry.get("weight") is None:
            add_float(gname + ".weight", hf_name + ".weight", float_type, rope_heads)
        else:
            qtype = block_type_for(weight_config(entry["weight"]), shape[1], hf_name)
            if cfg.quant not in (None, qtype):
                raise InputError(f"{hf_name}: the quantized grid is {qtype}; it cannot be written as {cfg.quant} "
                                 f"without rounding again")
            plan.append(PlannedTensor(gname + ".weight", shape, qtype, hf_name, packed=True, rope_heads=rope_heads))
        if f"{hf_name}.bias" in handles:
            add_float(gname + ".bias", hf_name + ".bias", "F32", rope_heads)

    q_out, kv_out = dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim
    shapes = {"q": (q_out, dims.d_model), "k": (kv_out, dims.d_model), "v": (kv_out, dims.d_model),
              "o": (dims.d_model, q_out), "gate": (dims.mlp_hidden, dims.d_model),
              "up": (dims.mlp_hidden, dims.d_model), "down": (dims.d_model, dims.mlp_hidden)}
    # a mixed recipe may have quantized the embedding / head: packed like a linear's rows
    table = (dims.vocab_rows, dims.d_model)
    if spec.embedding in source.layers:
        add_linear("token_embd", spec.embedding, table, None)
    else:
        add_float("token_embd.weight", f"{spec.embedding}.weight", cfg.embed_type)
    for i in range(dims.n_layers):
        p = f"{spec.blocks}.{i}."
        add_float(f"blk.{i}.attn_norm.weight", p + spec.norms["attn"] + ".weight", "F32")
        for role, hf in spec.linears.items():
            heads = {"q": dims.n_heads, "k": dims.n_kv_heads}.get(role) if permute else None
            add_linear(f"blk.{i}.{_ROLE_NAMES[role]}", p + hf, shapes[role], heads)
        add_float(f"blk.{i}.ffn_norm.weight", p + spec.norms["ffn"] + ".weight", "F32")
    add_float("output_norm.weight", f"{spec.final_norm}.weight", "F32")
    if not dims.tied_head and spec.head in source.layers:
        add_linear("output", spec.head, table, None)
    elif not dims.tied_head:
        add_float("output.weight", f"{spec.head}.weight", cfg.head_type)
    return plan


def tensor_data(source, t: PlannedTensor) -> np.ndarray:
    """The array written for `t`: the layer's PTQ blocks packed as they are, or the float tensor
    rounded to `t.qtype`; rows permuted for rope where planned."""
    if t.packed:
        x = pack_blocks(source.linear(t.source).qweight, t.qtype)
        return _permute_rope_rows(x, t.rope_heads) if t.rope_heads is not None else x
    x = source.tensor(t.source).to(torch.float32).numpy()
    if t.rope_heads is not None:
        x = _permute_rope_rows(x, t.rope_heads)
    return _encode(x, t.qtype)


def write_gguf(path: str | Path, arch: str, plan: list[PlannedTensor], data, add_metadata) -> None:
    """Write a GGUF file from a tensor plan, strictly: the header and tensor table come from the
    plan, then `data(t)` must give each tensor, in plan order, in exactly its planned shape, dtype
    and size (one tensor in memory at a time).

    Args:
        path: the file to write.
        arch: `general.architecture`.
        plan: the tensors, in file order (names unique).
        data: PlannedTensor -> np.ndarray.
        add_metadata: GGUFWriter -> None, adds the key/value pairs.
    Raises:
        CheckpointError: a tensor whose values do not fit its plan (named, with its source).
    """
    import gguf

    names = [t.name for t in plan]
    if len(set(names)) != len(names):
        raise ValueError(f"tensor plan names a tensor twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    w = gguf.GGUFWriter(str(path), arch)
    try:
        add_metadata(w)
        for t in plan:
            shape, dtype = t.stored
            w.add_tensor_info(t.name, shape, dtype, t.nbytes, raw_dtype=None if t.qtype in ("F32", "F16") else t.ggml_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in plan:
            x = data(t)
            shape, dtype = t.stored
            if x.shape != shape or x.dtype != dtype or x.nbytes != t.nbytes:
                raise CheckpointError(f"{t.source}: gives {x.dtype}{list(x.shape)} for GGUF tensor {t.name}, planned "
                                      f"{dtype}{list(shape)} ({t.qtype}); the checkpoint's tensors and config.json "
                                      f"disagree")
            w.write_tensor_data(x)
    finally:
        w.close()


def export_gguf(model_path: str | Path, out_dir: str | Path, cfg: GgufExportConfig = GgufExportConfig(),
                extra_manifest: dict | None = None) -> Path:
    """Write `model.gguf` (+ config, tokenizer, manifest.json) for a float or quantized checkpoint folder.

    Args:
        model_path: checkpoint folder, `default` / `default-dream`, or a quantized checkpoint whose
            layers use group-32 grids that a block type stores exactly (see `block_type_for`).
        out_dir: the artifact folder (must not exist or be empty); written atomically.
        cfg: the type of float layers, embedding and head.
    Returns:
        `out_dir`.
    """
    source = open_source(model_path)
    spec, dims = source.spec, source.dims
    llama_quant = cfg.quant in LLAMA_QUANTS
    vocab = read_vocab(source.path, dims.vocab_rows)
    plan = plan_tensors(source, cfg)
    tensor_types: dict[str, int] = {}
    for t in plan:
        tensor_types[t.qtype] = tensor_types.get(t.qtype, 0) + 1
    main_type = _main_type(tensor_types)
    with atomic_folder(out_dir) as tmp:
        vocab, check = _choose_pre(tmp, source, vocab, main_type)  # before the tensors: refuse early
        target = tmp / (MODEL_FILE + ".f16" if llama_quant else MODEL_FILE)
        write_gguf(target, spec.gguf_arch, plan, lambda t: tensor_data(source, t),
                   lambda w: _write_metadata(w, spec, dims, vocab, main_type))
        if llama_quant:
            _llama_quantize(target, tmp / MODEL_FILE, LLAMA_QUANTS[cfg.quant])
            target.unlink()
        parity = _confirm_parity(tmp / MODEL_FILE, vocab["pre"], check)
        qmanifest = source.manifest
        manifest = {
            "format": FORMAT, "version": VERSION, "family": spec.family, "arch": spec.gguf_arch,
            "source": qmanifest["source"] if qmanifest else source_record(source.path),
            "export": dataclasses.asdict(cfg),
            "method": qmanifest["method"] if qmanifest else None, "scheme": qmanifest["scheme"] if qmanifest else None,
            "quantize_settings": qmanifest["settings"] if qmanifest else None,
            "file_type": cfg.quant if llama_quant else main_type, "tensor_types": tensor_types,
            "exact_from_ptq": bool(qmanifest) and any(t in BLOCK_TYPES for t in tensor_types),
            "rope_rows_permuted": spec.gguf_rope_permute, "shift_logits": spec.shift_logits,
            "pre_tokenizer": vocab["pre"], "tokenizer_parity": parity, "spec": spec.to_dict(), "dims": dataclasses.asdict(dims),
        }
        manifest.update(extra_manifest or {})
        write_sidecars(tmp, manifest, source)
    return Path(out_dir)


def _main_type(tensor_types: dict[str, int]) -> str:
    """The file's type (general.file_type, the manifest): the block type most tensors use (a mix:
    its commonest), else BF16 / F16 / F32."""
    blocks = [t for t in BLOCK_TYPES if t in tensor_types]
    if blocks:
        return max(blocks, key=lambda t: tensor_types[t])  # ties: BLOCK_TYPES order
    return next((t for t in ("BF16", "F16") if t in tensor_types), "F32")


def _refuse_online_parts(name: str, entry: dict) -> None:
    """Online rotations and activation quantization (manifest entry of a layer) have no GGUF form."""
    if entry.get("input_transform"):
        raise InputError(f"{name}: an online rotation ({entry['input_transform']['kind']}) has no GGUF form; "
                         f"export this checkpoint with --target onnx")
    act = entry.get("act") or {}
    if act.get("bits", 16) < 16:
        raise InputError(f"{name}: activation quantization (A{act['bits']}) has no GGUF form; llama.cpp "
                         f"quantizes activations itself. Use a weight-only scheme here, or --target onnx")


def _encode(x: np.ndarray, qtype: str) -> np.ndarray:
    """A float array in a GGML type: F32 / F16 as arrays, the rest as blocks (gguf's reference rounding)."""
    import gguf

    if qtype == "F32":
        return x.astype(np.float32)
    if qtype == "F16":
        return x.astype(np.float16)
    if x.shape[-1] % 32:
        raise InputError(f"a row of {x.shape[-1]} values does not split into blocks of 32 for {qtype}")
    return gguf.quants.quantize(x.astype(np.float32), gguf.GGMLQuantizationType[qtype])


def _write_metadata(w, spec, dims, vocab: dict, main_type: str) -> None:
    import gguf

    w.add_name(f"{spec.family} (dllm-export)")
    w.add_context_length(dims.context)
    w.add_embedding_length(dims.d_model)
    w.add_block_count(dims.n_layers)
    w.add_feed_forward_length(dims.mlp_hidden)
    w.add_head_count(dims.n_heads)
    w.add_head_count_kv(dims.n_kv_heads)
    w.add_layer_norm_rms_eps(dims.norm_eps)
    w.add_rope_freq_base(dims.rope_theta)
    w.add_rope_dimension_count(dims.head_dim)
    w.add_vocab_size(dims.vocab_rows)
    w.add_causal_attention(False)
    w.add_diffusion_shift_logits(spec.shift_logits)
    name = "ALL_F32" if main_type == "F32" else _FILE_TYPES.get(main_type, f"MOSTLY_{main_type}")
    w.add_file_type(getattr(gguf.LlamaFileType, name))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    if vocab["pre"]:
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "pad": w.add_pad_token_id,
              "mask": w.add_mask_token_id, "eot": w.add_eot_token_id}
    for role, tid in special_ids(spec, dims.vocab_rows).items():
        adders[role](tid)
    w.add_add_bos_token(ADD_BOS)
    if spec.chat_template:
        w.add_chat_template(spec.chat_template)


def check_tokenizer(model_path: str | Path) -> str:
    """The pre-tokenizer name `export_gguf` would write for checkpoint `model_path`, found as it
    does (probe files in a temporary folder), so a tokenizer llama.cpp cannot reproduce is refused
    before a calibration runs rather than after."""
    import tempfile

    source = open_source(model_path)
    vocab = read_vocab(source.path, source.dims.vocab_rows)
    with tempfile.TemporaryDirectory(prefix="dllm-export-vocab-") as tmp:
        vocab, _ = _choose_pre(Path(tmp), source, vocab, "F32")
    return vocab["pre"]


def _choose_pre(tmp: Path, source, vocab: dict, main_type: str) -> tuple[dict, dict | None]:
    """The vocabulary with the llama.cpp pre-tokenizer name that tokenizes like the checkpoint
    (`gguf_vocab.choose_pre`, on vocabulary-only probe files in `tmp`), and what the final file
    must read back (None without llama-cpp-python: then only a known regex's name is written)."""
    if llama_cpp_version() is None:
        if vocab["pre"] is None:
            raise CheckpointError(f"{source.path / 'tokenizer.json'}: its pre-tokenizer regex has no llama.cpp "
                                  f"name known here; install llama-cpp-python so the export can find the one "
                                  f"that tokenizes alike")
        return vocab, None
    from ..tokenizer import load_tokenizer

    text = check_text(vocab["specials"])
    want = {"ids": load_tokenizer(source.path)(text, add_special_tokens=False)["input_ids"],
            "special_ids": special_ids(source.spec, source.dims.vocab_rows), "add_bos": ADD_BOS,
            "chat_template": source.spec.chat_template}
    probe_file = tmp / ".vocab-probe.gguf"

    def probe(name: str) -> Path:
        write_gguf(probe_file, source.spec.gguf_arch, [], None,
                   lambda w: _write_metadata(w, source.spec, source.dims, {**vocab, "pre": name}, main_type))
        return probe_file
    try:
        name, how = choose_pre(vocab, probe, want, text)
    finally:
        probe_file.unlink(missing_ok=True)
    return {**vocab, "pre": name}, {"how": how, "want": want, "text": text}


def _confirm_parity(file: Path, pre: str, check: dict | None) -> dict:
    """The manifest's `tokenizer_parity`, after llama.cpp read the written file's vocabulary back
    as the probe did (a CheckpointError naming what differs otherwise)."""
    if check is None:
        return {"checked_with": None, "pre_tokenizer": pre, "found_by": "regex",
                "summary": f"{pre} (known regex), not checked: llama-cpp-python is not installed"}
    got = read_back(file, check["text"])
    diff = differences(got, check["want"])
    if diff:
        raise CheckpointError(f"{file}: " + "; ".join(diff))
    rec = parity_record(pre, check["how"], got, check["text"])
    rec["summary"] = (f"{pre} ({'known regex' if check['how'] == 'regex' else 'found by search'}): "
                      f"{len(got['ids'])} check tokens, special ids, add_bos and chat template as written")
    return rec


def _llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    """llama.cpp's own quantizer (K-quants) through llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError as e:
        raise InputError(f"K-quants need llama-cpp-python (pip install llama-cpp-python): {e}") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    with kept_interrupts():  # its log callback would swallow Ctrl-C
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise CheckpointError(f"llama.cpp's quantizer failed on {src} (code {rc})")
