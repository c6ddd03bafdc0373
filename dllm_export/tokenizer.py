"""Tokenizers from the checkpoint folder, offline and without remote code.

LLaDA ships `tokenizer.json` (+ tokenizer_config.json with the chat template); Dream ships a
Qwen2 byte-level BPE as vocab.json + merges.txt (its `DreamTokenizer` is remote code), which we
build with transformers' own Qwen2 tokenizer. When a checkpoint carries no chat template, the
family's released template (ModelSpec.chat_template) is attached.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError, InputError
from .formats import artifact_folder
from .models import family_for
from .models.checkpoint import read_config, resolve_model_path

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")


def _token_str(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer(path: str | Path):
    """Load the tokenizer of a checkpoint or artifact folder (or `default` / `default-dream`, or a
    .gguf file, whose tokenizer files lie beside it).

    Returns:
        a transformers fast tokenizer with `chat_template` set.
    Raises:
        CheckpointError: when the folder has neither tokenizer.json nor vocab.json + merges.txt.
    """
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    path = resolve_model_path(artifact_folder(path))
    spec = family_for(read_config(path).get("model_type")).spec
    cfg_file = path / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    specials = {k: _token_str(tok_cfg[k]) for k in _SPECIAL_KEYS if tok_cfg.get(k) is not None}
    try:
        if (path / "tokenizer.json").is_file():
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **specials)
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tok = Qwen2Tokenizer(vocab=str(path / "vocab.json"), merges=str(path / "merges.txt"), **specials)
            added = sorted(tok_cfg.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))
            tok.add_special_tokens({"additional_special_tokens": [t["content"] for _, t in added if t.get("special")]})
        else:
            raise CheckpointError(f"no tokenizer.json (or vocab.json + merges.txt) in {path}")
    except CheckpointError:
        raise
    except Exception as e:  # tokenizers raises plain Exceptions for corrupt files
        raise CheckpointError(f"cannot load the tokenizer in {path}: {type(e).__name__}: {e}") from None
    template_file = path / "chat_template.jinja"
    tok.chat_template = (tok_cfg.get("chat_template")
                         or (template_file.read_text() if template_file.is_file() else None)
                         or spec.chat_template)
    return tok


def check_text(text: str, what: str = "the prompt") -> None:
    """InputError for text a tokenizer cannot take: a lone surrogate, which is what bytes that are not
    UTF-8 in a command-line argument (or a JSON \\ud800 escape) decode to."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{what} is not valid UTF-8 text (a lone surrogate or stray byte at character {e.start})") \
            from None


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt; with `chat`, wrapped in the instruct chat template as released."""
    check_text(text)
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# Qwen2's pre-tokenizer regex (llama.cpp pre-tokenizer "qwen2"): digits split one by one, which
# keeps arithmetic learnable, and llama.cpp's gpt2-style BPE loader reproduces it exactly.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SAMPLE_TEXT = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

12+34=46 7*8=56 90-45=45 The quick brown fox jumps over the lazy dog.
'''


def train_tokenizer(texts, vocab_size: int, family: str) -> tuple[dict[str, str], dict[str, int]]:
    """Train a byte-level BPE (Qwen2 pre-tokenizer) with the family's special tokens first.

    Args:
        texts: iterable of training strings.
        vocab_size: total vocabulary including the special tokens (>= 256 + specials).
        family: "llada" or "dream" (which special tokens and chat template).
    Returns:
        (files, ids): file name -> content for tokenizer.json and tokenizer_config.json, and the
        config.json id keys (mask_token_id, eos_token_id, pad_token_id, bos_token_id).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from .models import FAMILIES

    spec = FAMILIES[family].spec
    specials = list(dict.fromkeys(spec.special_tokens.values()))
    if vocab_size < 256 + len(specials):
        raise CheckpointError(f"a byte-level tokenizer needs vocab_size >= {256 + len(specials)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    ids = {role: tok.token_to_id(text) for role, text in spec.special_tokens.items()}
    st = spec.special_tokens
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
        "bos_token": st["bos"], "eos_token": st["eos"], "pad_token": st["pad"],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "chat_template": spec.chat_template,
    }
    files = {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(tok_config, indent=2) + "\n"}
    config_ids = {"mask_token_id": ids["mask"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}
    if family == "dream":
        config_ids["bos_token_id"] = ids["bos"]
    return files, config_ids
