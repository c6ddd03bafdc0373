"""The vocabulary of a GGUF file, and proof that llama.cpp tokenizes like the checkpoint.

llama.cpp does not run a tokenizer.json: it reimplements each BPE pre-tokenizer regex in C++ and
picks one by the name in `tokenizer.ggml.pre`. An unknown name is a load error; a missing one falls
back to `default`, which splits text differently from most tokenizers, silently (a GPT-2 style
ByteLevel BPE gives 22 tokens in llama.cpp for a line the checkpoint's tokenizer makes 21 of).
So a name is not trusted, it is tested: the exporter writes the vocabulary, loads it with
llama.cpp (vocab only), tokenizes a fixed check text with both llama.cpp and the checkpoint's own
tokenizer and compares the ids, plus the special ids, `add_bos` and the chat template as llama.cpp
reads them back. When the tokenizer's regex is not one whose name is known here, each name
llama.cpp accepts is tried in turn; when none matches, the export is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError
from ..interrupts import kept_interrupts

# pre-tokenizer regexes of tokenizer.json whose llama.cpp name is known: tried first
KNOWN_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
}

# The `tokenizer.ggml.pre` names llama.cpp accepts (src/llama-vocab.cpp of the llama.cpp that
# llama-cpp-python 0.3.36 builds, ggml-org/llama.cpp 0c1e570), one per branch there (the names of a
# branch share regex and flags, so the others would test the same thing): the common ones first,
# then llama.cpp's order. Left out: gemma4, sarvam-moe and whitespace, which split raw UTF-8 for
# SentencePiece-style vocabularies (not byte-level BPE) and abort the process (GGML_ASSERT in
# find_bpe_rank) on a byte-level vocabulary whose pieces contain spaces.
LLAMA_CPP_PRE = (
    "gpt-2", "llama-bpe", "qwen2", "default", "minicpm5", "deepseek-llm", "deepseek-coder", "deepseek-v3",
    "spark2_5", "youtu", "falcon", "mpt", "starcoder", "jais-2", "jina-v1-en", "refact", "command-r", "qwen35",
    "stablelm2", "olmo", "dbrx", "smaug-bpe", "poro-chat", "chatglm-bpe", "glm4", "viking", "jais", "tekken",
    "smollm", "codeshell", "bloom", "gpt3-finnish", "exaone", "exaone4", "exaone-moe", "chameleon", "minerva-7b",
    "megrez", "gpt-4o", "granite-embed-multi-97m", "tiny_aya", "superbpe", "trillion", "granite-docling",
    "bailingmoe", "seed-coder", "hunyuan", "hunyuan-dense", "hy_v4", "joyai-llm", "kimi-k2", "ufakzeka", "grok-2",
    "afmoe", "laguna", "minimax-m2", "solar-open", "mellum2",
)

# Text that tells pre-tokenizers apart: code, digit runs (split 1 / 1-3 / all), whitespace runs,
# contractions, punctuation runs, several scripts and emoji; the special tokens are appended.
CHECK_TEXT = (
    "def f(a,b):\n    return a+b  # 12345\n"
    "for i in range(10):\n\tif x[i]!=y[i]: print(f\"{i:03d}\") ;; z=a**2//3->b\n"
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n"
    "3 33 333 3333 33333 333333 3.14 3..3 1,000,000 -42 0x1F 2024-05-17\n"
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like tea? We'Ve a'lL DON'T\n"
    "Hello, World!!! ...??? ------======= '''```\"\"\" (normal) [brackets] {braces} <angle>\n"
    "🚀 ✅ 🦙🦙 😶\u200d🌫️ héllo naïve Straße 你好世界1314天～ こんにちは Привет, мир! ١٢٣ नमस्ते ကာ\n"
    "  leading   and trailing   \r\nCRLF\r\n\r\nend"
)


def read_vocab(src: Path, n_rows: int) -> dict:
    """tokens / token types / merges of a byte-level BPE tokenizer.json, one token per embedding
    row (ids the tokenizer lacks become `[PAD{i}]`, type UNUSED, as llama.cpp's converter writes
    them), the added tokens (`specials`), and `pre`: the llama.cpp name of its pre-tokenizer regex
    when it is one in KNOWN_PRE, else None."""
    f = src / "tokenizer.json"
    if not f.is_file():
        raise CheckpointError(f"{src} has no tokenizer.json: GGUF needs the vocabulary (tokens and merges)")
    try:
        tj = json.loads(f.read_text())
        model = tj.get("model", {})
        if model.get("type") != "BPE":
            raise CheckpointError(f"{f}: GGUF export supports byte-level BPE tokenizers, got {model.get('type')!r}")
        id_to_tok: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
        added = [(int(t["id"]), t["content"], bool(t.get("special", True))) for t in tj.get("added_tokens", [])]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{f}: unreadable tokenizer ({type(e).__name__}: {e})") from None
    # added tokens: CONTROL (3) if special, else USER_DEFINED (4), as llama.cpp's converter does
    kinds = {i: 3 if special else 4 for i, _, special in added}
    id_to_tok.update({i: text for i, text, _ in added})
    if not id_to_tok or max(id_to_tok) >= n_rows:
        raise CheckpointError(f"tokenizer has ids up to {max(id_to_tok, default=-1)} but the embedding has "
                              f"{n_rows} rows")
    tokens = [id_to_tok.get(i, f"[PAD{i}]") for i in range(n_rows)]
    types = [kinds.get(i, 1) if i in id_to_tok else 5 for i in range(n_rows)]
    regexes = re.findall(r'"Regex": ("(?:[^"\\]|\\.)*")', json.dumps(tj.get("pre_tokenizer")))
    pre = next((KNOWN_PRE[json.loads(r)] for r in regexes if json.loads(r) in KNOWN_PRE), None)
    return {"tokens": tokens, "types": types, "merges": merges, "pre": pre,
            "specials": [text for _, text, _ in sorted(added)]}


def special_ids(spec, n_rows: int) -> dict[str, int]:
    """role -> id of the special tokens the GGUF carries (those of the spec inside the vocabulary)."""
    ids = {role: getattr(spec, f"{role}_id") for role in ("bos", "eos", "pad", "mask", "eot")}
    return {role: tid for role, tid in ids.items() if tid is not None and 0 <= tid < n_rows}


def check_text(specials: list[str]) -> str:
    """CHECK_TEXT with every added token of the tokenizer, between words and lines."""
    return CHECK_TEXT + "".join(f"{s}x {s}\n" for s in specials)


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        return None
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp's load log would flood stderr; its errors still show
    return llama_cpp


def llama_cpp_version() -> str | None:
    """llama-cpp-python's version, or None when it is not installed."""
    L = _llama_cpp()
    return None if L is None else L.__version__


def read_back(path: Path, text: str) -> dict:
    """What llama.cpp makes of the vocabulary of GGUF `path` (loaded vocab only): the ids of `text`
    (specials parsed, none added), the special ids, add_bos and the chat template."""
    with kept_interrupts():  # llama.cpp logs through a Python callback that would swallow Ctrl-C
        return _read_back(_llama_cpp(), path, text)


def _read_back(L, path: Path, text: str) -> dict:
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.vocab_only = True
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise CheckpointError(f"{path}: llama.cpp cannot load its vocabulary")
    try:
        vocab = L.llama_model_get_vocab(model)
        raw = text.encode()
        n_max = len(raw) + 8  # at most one token per byte
        buf = (L.llama_token * n_max)()
        n = L.llama_tokenize(vocab, raw, len(raw), buf, n_max, False, True)
        if n < 0:
            raise CheckpointError(f"{path}: llama.cpp could not tokenize the check text (code {n})")
        template = L.llama_model_chat_template(model, None)
        return {"ids": list(buf[:n]), "bos": L.llama_vocab_bos(vocab), "eos": L.llama_vocab_eos(vocab),
                "pad": L.llama_vocab_pad(vocab), "mask": L.llama_vocab_mask(vocab), "eot": L.llama_vocab_eot(vocab),
                "add_bos": bool(L.llama_vocab_get_add_bos(vocab)),
                "chat_template": template.decode() if template else None}
    finally:
        L.llama_model_free(model)


def differences(got: dict, want: dict) -> list[str]:
    """What llama.cpp reads (`got`, from read_back) that differs from what was meant (`want`: the
    checkpoint tokenizer's ids, the special ids written, add_bos, the chat template)."""
    out = []
    if got["ids"] != want["ids"]:
        i = next((k for k, (a, b) in enumerate(zip(got["ids"], want["ids"])) if a != b),
                 min(len(got["ids"]), len(want["ids"])))
        out.append(f"the check text gives {len(got['ids'])} tokens in llama.cpp and {len(want['ids'])} with the "
                   f"checkpoint's tokenizer (first difference at token {i})")
    for role, tid in want["special_ids"].items():
        if got[role] != tid:
            out.append(f"llama.cpp reads {role} id {got[role]}, the checkpoint has {tid}")
    if got["add_bos"] != want["add_bos"]:
        out.append(f"llama.cpp reads add_bos {got['add_bos']}, written {want['add_bos']}")
    if (got["chat_template"] or None) != (want["chat_template"] or None):
        out.append("llama.cpp reads a different chat template")
    return out


def choose_pre(vocab: dict, probe: Callable[[str | None], Path], want: dict, text: str) -> tuple[str, str]:
    """The `tokenizer.ggml.pre` name with which llama.cpp tokenizes `text` as the checkpoint does:
    the known name of its regex when that matches, else the first of LLAMA_CPP_PRE that does.

    Args:
        vocab: from read_vocab.
        probe: name -> a vocabulary-only GGUF written with that pre-tokenizer name.
        want: the expected read-back (see `differences`).
        text: the check text.
    Returns:
        (name, how): how is "regex" (the known name) or "search".
    Raises:
        CheckpointError: when no name llama.cpp accepts matches, with the closest attempt.
    """
    hint = vocab["pre"]
    closest = None  # (token count difference, name, what differs) of the nearest miss
    for name in ([hint] if hint else []) + [n for n in LLAMA_CPP_PRE if n != hint]:
        got = read_back(probe(name), text)
        diff = differences(got, want)
        if not diff:
            return name, "regex" if name == hint else "search"
        score = abs(len(got["ids"]) - len(want["ids"]))
        if closest is None or score < closest[0]:
            closest = (score, name, diff[0])
    raise CheckpointError(f"tokenizer.json: none of the {len(LLAMA_CPP_PRE)} pre-tokenizers llama.cpp knows "
                          f"tokenizes like this tokenizer (closest, {closest[1]!r}: {closest[2]}); a GGUF would "
                          f"tokenize prompts differently, so none is written")


def parity_record(name: str, how: str, got: dict, text: str) -> dict:
    """The manifest's `tokenizer_parity`: the pre-tokenizer chosen and how, what was compared, and
    llama.cpp's read-back of the special ids."""
    return {"checked_with": f"llama-cpp-python {llama_cpp_version()}", "pre_tokenizer": name, "found_by": how,
            "check_text_sha256": hashlib.sha256(text.encode()).hexdigest(), "check_tokens": len(got["ids"]),
            "special_ids": {r: got[r] for r in ("bos", "eos", "pad", "mask", "eot")}, "add_bos": got["add_bos"],
            "chat_template": got["chat_template"] is not None}
