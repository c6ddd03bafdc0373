"""GGUF export for llama.cpp: architectures `llada` and `dream`, written tensor by tensor.

A PTQ grid that *is* a GGML block format goes in code for code, scale for scale:

    symmetric, 4-bit, group 32      -> Q4_0  (w = d * (q - 8))
    symmetric, 5-bit, group 32      -> Q5_0  (w = d * (q - 16))
    symmetric, 8-bit, group 32      -> Q8_0  (w = d * q)
    float minimum, 4-bit, group 32  -> Q4_1  (w = d * q + m)
    float minimum, 5-bit, group 32  -> Q5_1

so the file dequantizes (gguf.quants, llama.cpp) to exactly the weights our fake-quant computes
with. A float checkpoint is written as F32 / F16 / BF16, or rounded here with the reference
round-to-nearest of those block types (gguf.quants); K-quants (Q4_K_M, ...) come from
llama.cpp's own quantizer run on an F16 file. Online rotations and activation quantization
have no GGUF form and are refused with the target that can carry them.

The artifact is a folder: `model.gguf`, plus config.json, the tokenizer files and manifest.json
(so `dllm-export generate --model OUT` can tokenize without llama.cpp).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, InputError
from ..fileio import atomic_folder
from ..formats import GGUF_FORMAT
from ..models.checkpoint import source_record
from ..quant.load import weight_config
from ..quant.primitives import QuantizedWeight, WeightQuantConfig
from .source import open_source, write_sidecars

FORMAT = GGUF_FORMAT
VERSION = 1
MODEL_FILE = "model.gguf"
FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
# K-quants and friends: llama.cpp's quantizer (llama_model_quantize) on an F16 file; name -> llama_ftype
LLAMA_QUANTS = {"Q2_K": 10, "Q3_K_M": 12, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
                "IQ4_NL": 25, "IQ4_XS": 30}
QUANT_TYPES = FLOAT_TYPES + BLOCK_TYPES + tuple(LLAMA_QUANTS)

# (bits, symmetric) of a group-32 grid -> the block type that stores it exactly
_EXACT = {(4, True): "Q4_0", (5, True): "Q5_0", (8, True): "Q8_0", (4, False): "Q4_1", (5, False): "Q5_1"}

# llada: HF module name (inside a block) -> GGUF name; Dream uses the Qwen2 names
_ROLE_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
               "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
_NORM_NAMES = {"attn": "attn_norm", "ffn": "ffn_norm"}

# pre-tokenizer regexes llama.cpp knows (tokenizer.ggml.pre), by the regex of tokenizer.json
_KNOWN_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}


@dataclass(frozen=True)
class GgufExportConfig:
    """How to write the file.

    Attributes:
        quant: the type of the block linears of a float checkpoint (F32, F16, BF16, Q8_0, Q4_0,
            Q4_1, Q5_0, Q5_1, or a llama.cpp K-quant such as Q4_K_M). A quantized checkpoint's
            layers are written in the block type their grid matches; then this must be None or it.
        embed_type / head_type: the embedding and LM head (kept high precision by our PTQ): F32 or F16.
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
    high nibble; Q5_x keep the fifth bits in a little-endian 32-bit mask.
    """
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


def _vocab(src: Path, n_rows: int) -> dict:
    """tokens / merges / token types / pre-tokenizer of a byte-level BPE tokenizer.json."""
    f = src / "tokenizer.json"
    if not f.is_file():
        raise CheckpointError(f"{src} has no tokenizer.json: GGUF needs the vocabulary (tokens and merges)")
    tj = json.loads(f.read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"{f}: GGUF export supports byte-level BPE tokenizers, got {model.get('type')!r}")
    id_to_tok: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    control = set()
    for t in tj.get("added_tokens", []):
        id_to_tok[int(t["id"])] = t["content"]
        if t.get("special", True):
            control.add(int(t["id"]))
    if max(id_to_tok) >= n_rows:
        raise CheckpointError(f"tokenizer has ids up to {max(id_to_tok)} but the embedding has {n_rows} rows")
    tokens, types = [], []
    for i in range(n_rows):  # llama.cpp wants one token per embedding row
        if i in id_to_tok:
            tokens.append(id_to_tok[i])
            types.append(3 if i in control else 1)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(5)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    regexes = re.findall(r'"Regex": ("(?:[^"\\]|\\.)*")', json.dumps(tj.get("pre_tokenizer")))
    pre = next((_KNOWN_PRE[json.loads(r)] for r in regexes if json.loads(r) in _KNOWN_PRE), None)
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre}


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
    import gguf

    source = open_source(model_path)
    src, spec, dims, qmanifest, handles = source.path, source.spec, source.dims, source.manifest, source.handles
    layers, tensor = source.layers, source.tensor
    llama_quant = cfg.quant in LLAMA_QUANTS
    float_type = "F16" if llama_quant else (cfg.quant or "F32")
    vocab = _vocab(src, dims.vocab_rows)

    # plan: (gguf name, numpy shape [rows, cols] or [n], type, producer) in file order
    plan: list[tuple[str, tuple[int, ...], str, object]] = []
    permute = spec.family == "llada"  # llama.cpp runs LLaDA with NORM (adjacent-pair) rope

    def add_float(gname: str, hf_name: str, qtype: str, n_head: int | None = None):
        shape = tuple(handles[hf_name].get_slice(hf_name).get_shape()) if hf_name in handles else None
        if shape is None:
            raise CheckpointError(f"tensor {hf_name} missing from {src}")
        if len(shape) == 1:
            qtype = "F32"  # norms and biases: llama.cpp keeps 1-D tensors in F32

        def produce():
            x = tensor(hf_name).to(torch.float32).numpy()
            if n_head is not None:
                x = _permute_rope_rows(x, n_head)
            return _encode(x, qtype)
        plan.append((gname, shape, qtype, produce))

    def add_linear(gname: str, hf_name: str, shape: tuple[int, int], n_head: int | None = None):
        # planned from the manifest alone: each layer's tensors are read when written, so the file
        # streams one layer at a time
        entry = layers.get(hf_name)
        if entry is None or entry.get("weight") is None:
            if entry is not None:
                _refuse_online_parts(hf_name, entry)
            add_float(gname + ".weight", hf_name + ".weight", float_type, n_head)
            if f"{hf_name}.bias" in handles:
                add_float(gname + ".bias", hf_name + ".bias", "F32", n_head)
            return
        _refuse_online_parts(hf_name, entry)
        qtype = block_type_for(weight_config(entry["weight"]), shape[1], hf_name)
        if cfg.quant not in (None, qtype):
            raise InputError(f"{hf_name}: the quantized grid is {qtype}; it cannot be written as {cfg.quant} "
                             f"without rounding again")

        def produce():
            packed = pack_blocks(source.linear(hf_name).qweight, qtype)
            return _permute_rope_rows(packed, n_head) if n_head is not None else packed
        plan.append((gname + ".weight", shape, qtype, produce))
        if f"{hf_name}.bias" in handles:
            add_float(gname + ".bias", hf_name + ".bias", "F32", n_head)

    q_out, kv_out = dims.n_heads * dims.head_dim, dims.n_kv_heads * dims.head_dim
    shapes = {"q": (q_out, dims.d_model), "k": (kv_out, dims.d_model), "v": (kv_out, dims.d_model),
              "o": (dims.d_model, q_out), "gate": (dims.mlp_hidden, dims.d_model),
              "up": (dims.mlp_hidden, dims.d_model), "down": (dims.d_model, dims.mlp_hidden)}
    add_float("token_embd.weight", f"{spec.embedding}.weight", cfg.embed_type)
    for i in range(dims.n_layers):
        p = f"{spec.blocks}.{i}."
        add_float(f"blk.{i}.attn_norm.weight", p + spec.norms["attn"] + ".weight", "F32")
        for role, hf in spec.linears.items():
            heads = {"q": dims.n_heads, "k": dims.n_kv_heads}.get(role) if permute else None
            add_linear(f"blk.{i}.{_ROLE_NAMES[role]}", p + hf, shapes[role], heads)
        add_float(f"blk.{i}.ffn_norm.weight", p + spec.norms["ffn"] + ".weight", "F32")
    add_float("output_norm.weight", f"{spec.final_norm}.weight", "F32")
    if not dims.tied_head:
        add_float("output.weight", f"{spec.head}.weight", cfg.head_type)

    types = {t for _, _, t, _ in plan if t not in ("F32",)}
    main_type = next((t for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16", "F16") if t in types), "F32")
    with atomic_folder(out_dir) as tmp:
        target = tmp / (MODEL_FILE + ".f16" if llama_quant else MODEL_FILE)
        w = gguf.GGUFWriter(str(target), spec.gguf_arch)
        _write_metadata(w, gguf, spec, dims, vocab, main_type)
        for gname, shape, qtype, _ in plan:
            gt = gguf.GGMLQuantizationType[qtype]
            block, type_size = gguf.GGML_QUANT_SIZES[gt]
            n_bytes = int(np.prod(shape)) // block * type_size
            if qtype in ("F32", "F16"):
                w.add_tensor_info(gname, shape, np.float32 if qtype == "F32" else np.float16, n_bytes)
            else:
                w.add_tensor_info(gname, gguf.quant_shape_to_byte_shape(shape, gt), np.uint8, n_bytes, raw_dtype=gt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, _, _, produce in plan:  # one tensor in memory at a time
            w.write_tensor_data(produce())
        w.close()
        if llama_quant:
            _llama_quantize(target, tmp / MODEL_FILE, LLAMA_QUANTS[cfg.quant])
            target.unlink()
        tensor_types: dict[str, int] = {}
        for _, _, t, _ in plan:
            tensor_types[t] = tensor_types.get(t, 0) + 1
        manifest = {
            "format": FORMAT, "version": VERSION, "family": spec.family, "arch": spec.gguf_arch,
            "source": qmanifest["source"] if qmanifest else source_record(src), "export": dataclasses.asdict(cfg),
            "method": qmanifest["method"] if qmanifest else None, "scheme": qmanifest["scheme"] if qmanifest else None,
            "quantize_settings": qmanifest["settings"] if qmanifest else None,
            "file_type": cfg.quant if llama_quant else main_type, "tensor_types": tensor_types,
            "exact_from_ptq": bool(qmanifest) and any(t in BLOCK_TYPES for t in tensor_types),
            "rope_rows_permuted": permute, "shift_logits": spec.shift_logits, "pre_tokenizer": vocab["pre"],
            "spec": spec.to_dict(), "dims": dataclasses.asdict(dims),
        }
        manifest.update(extra_manifest or {})
        write_sidecars(tmp, manifest, source)
    return Path(out_dir)


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


def _write_metadata(w, gguf, spec, dims, vocab: dict, main_type: str) -> None:
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
    w.add_file_type(getattr(gguf.LlamaFileType, "ALL_F32" if main_type == "F32" else f"MOSTLY_{main_type}"))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    if vocab["pre"]:
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    for role, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                      ("mask", w.add_mask_token_id), ("eot", w.add_eot_token_id)):
        tid = getattr(spec, f"{role}_id")
        if tid is not None and 0 <= tid < dims.vocab_rows:
            add(tid)
    w.add_add_bos_token(False)  # prompts arrive as ids; the chat template adds BOS where the model wants it
    if spec.chat_template:
        w.add_chat_template(spec.chat_template)


def _llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    """llama.cpp's own quantizer (K-quants) through llama-cpp-python."""
    try:
        import llama_cpp
    except ImportError as e:
        raise InputError(f"K-quants need llama-cpp-python (pip install llama-cpp-python): {e}") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise CheckpointError(f"llama.cpp's quantizer failed on {src} (code {rc})")
