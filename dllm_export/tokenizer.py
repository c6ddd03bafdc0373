"""Tokenizers from the checkpoint folder, offline and without remote code.

LLaDA ships `tokenizer.json` (+ tokenizer_config.json with the chat template); Dream ships a
Qwen2 byte-level BPE as vocab.json + merges.txt (its `DreamTokenizer` is remote code), which we
build with transformers' own Qwen2 tokenizer. When a checkpoint carries no chat template, the
family's released template (ModelSpec.chat_template) is attached.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CheckpointError
from .models import family_for
from .models.loader import read_config, resolve_model_path

_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")


def _token_str(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_tokenizer(path: str | Path):
    """Load the tokenizer of a checkpoint folder (or `default` / `default-dream`).

    Returns:
        a transformers fast tokenizer with `chat_template` set.
    Raises:
        CheckpointError: when the folder has neither tokenizer.json nor vocab.json + merges.txt.
    """
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    path = resolve_model_path(path)
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


def encode_prompt(tokenizer, text: str, chat: bool = False) -> list[int]:
    """Token ids of a prompt; with `chat`, wrapped in the instruct chat template as released."""
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
