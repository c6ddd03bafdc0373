"""Constants and rules of the file formats that the quantizer, the exporters, the runtimes and the
quantized loader share, each written once.

Nothing here imports the rest of the package except `errors`, so any layer may use it.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError, InputError

# manifest.json "format" tags of the folders dllm-export writes, and the layout version of each that
# this code writes and reads: a newer one may mean what this reader would misread, so it is refused
QUANTIZED_FORMAT = "dllm-export/quantized"
ONNX_FORMAT = "dllm-export/onnx"
GGUF_FORMAT = "dllm-export/gguf"
FORMAT_VERSIONS = {QUANTIZED_FORMAT: 1, ONNX_FORMAT: 1, GGUF_FORMAT: 1}
QUANTIZED_VERSION = FORMAT_VERSIONS[QUANTIZED_FORMAT]


def check_format_version(manifest: dict, where) -> None:
    """CheckpointError unless `manifest` (of a known format tag) has a version this code reads:
    an integer from 1 to FORMAT_VERSIONS[format]."""
    fmt, version = manifest.get("format"), manifest.get("version")
    known = FORMAT_VERSIONS.get(fmt)
    if known is None:
        return  # the tag is the caller's to check
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{where}: {fmt} manifest without a valid version (got {version!r})")
    if version > known:
        raise CheckpointError(f"{where}: written as {fmt} v{version} by a newer dllm-export; this one reads up "
                              f"to v{known} (upgrade dllm-export, or export again with this one)")

# Files of a checkpoint's tokenizer, copied beside every quantized checkpoint and exported model.
# LLaDA ships tokenizer.json; Dream ships a Qwen2 BPE as vocab.json + merges.txt (see tokenizer.py).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")

# com.microsoft MatMulNBits (onnxruntime contrib op): packed 2/4/8-bit codes in power-of-two
# blocks of at least 16 along K (onnxruntime/core/graph/contrib_ops/contrib_defs.cc)
MATMULNBITS_BITS = (2, 4, 8)
MATMULNBITS_MIN_BLOCK = 16

# GGUF block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) hold groups of 32 weights (ggml's QK4_0 = QK8_0 = 32)
GGUF_BLOCK = 32


def artifact_folder(path: str | Path) -> str | Path:
    """The folder that holds an artifact's config, tokenizer and manifest: a .gguf file's parent,
    else `path` itself (names such as `default` pass through)."""
    return Path(path).parent if str(path).endswith(".gguf") else path


# the model file that makes a folder an exported artifact of each format
ARTIFACT_MODEL_FILES = {"onnx": "model.onnx", "gguf": "model.gguf"}


def artifact_format(path: str | Path) -> str | None:
    """"onnx" / "gguf" for an exported artifact (its folder, or a .gguf file), None for anything
    else (a checkpoint folder, a bundled model's name)."""
    p = Path(path)
    if p.suffix == ".gguf":
        return "gguf"
    return next((fmt for fmt, name in ARTIFACT_MODEL_FILES.items() if (p / name).is_file()), None)


def matmulnbits_block_ok(block_size: int) -> bool:
    """Whether MatMulNBits can hold groups of `block_size` weights (a power of two >= 16)."""
    return block_size >= MATMULNBITS_MIN_BLOCK and not block_size & (block_size - 1)


def check_matmulnbits(bits: int, block_size: int, where: str = "") -> None:
    """Raise InputError unless MatMulNBits can store `bits`-bit codes in blocks of `block_size`."""
    at = f"{where}: " if where else ""
    if bits not in MATMULNBITS_BITS:
        raise InputError(f"{at}MatMulNBits stores 2, 4 or 8-bit weights, not {bits}-bit "
                         f"(use --format qdq, which stores any width from 2 to 8 bits)")
    if not matmulnbits_block_ok(block_size):
        raise InputError(f"{at}MatMulNBits needs a power-of-two block size >= {MATMULNBITS_MIN_BLOCK}, the grid "
                         f"has groups of {block_size} (quantize with --group-size 32/64/128, or use --format qdq)")
