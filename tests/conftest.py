"""Shared fixtures: tiny checkpoints in the released layout, built on the fly (no downloads)."""

from pathlib import Path

import pytest

from dllm_export.models.factory import make_random_checkpoint

GOLDEN = Path(__file__).parent / "golden"

TINY = {
    "llada": dict(family="llada", vocab_size=384, d_model=64, n_heads=4, n_kv_heads=4, max_sequence_length=128),
    "llada_gqa": dict(family="llada", vocab_size=384, d_model=64, n_heads=4, n_kv_heads=2, max_sequence_length=128),
    "dream": dict(family="dream", vocab_size=384, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128),
}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """name -> folder of a tiny random checkpoint with a tokenizer (fp32, single file)."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_random_checkpoint(root / name, tokenizer=True, seed=i, **kw)
            for i, (name, kw) in enumerate(TINY.items())}
