"""The quick quality check of an artifact: held-out bits/token and arithmetic exact match.

Shared by `bench --quality` and the quality gates of `build`, so both report the same numbers
for the same artifact.
"""

from __future__ import annotations


def quick_quality(backend, tok, windows: int = 8, problems: int = 50, seed: int = 0) -> dict:
    """Bits/token (MC ELBO, 128-token windows of the held-out stdlib modules) and arithmetic EM."""
    from ..corpus import code_texts
    from .likelihood import text_bits_per_token
    from .tasks import run_task

    texts = [t for _, t in code_texts(held_out=True)]
    bpt = text_bits_per_token(backend, tok, texts, window=128, max_windows=windows, mc=8, seed=seed)
    em = run_task(backend, tok, "arithmetic", problems)["score"]
    return {"bits_per_token": round(float(bpt["bits_per_token"]), 4), "arith_em": round(em, 4)}
