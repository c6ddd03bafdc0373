"""Likelihood of a dLLM: the Monte-Carlo ELBO estimators of LLaDA and Dream.

LLaDA (`get_log_likelihood.py`): for a (prompt, answer) pair, each of `batch` copies masks
exactly l_i answer tokens, with l_i evenly spaced over 1..L from a random start (low variance),
and scores sum_masked CE / (l_i / L). Dream (`eval/eval.py`, nll_type "mc"): stratified times
t_i = (u + i / b) mod 1, p_mask = (1 - eps) t + eps, tokens masked i.i.d. The prompt is never
masked, logits are shifted for Dream (spec.shift_logits). The estimate is a lower bound on
log p(answer | prompt); -ELBO / L (in bits) upper-bounds the per-token entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..runtime.backends import as_backend


@dataclass(frozen=True)
class ElboResult:
    """log-likelihood lower bound of one answer given its prompt.

    Attributes:
        elbo: the estimate (nats, <= log p(answer | prompt) in expectation).
        stderr: standard error over the MC batches (nats).
        n_tokens: answer length.
    """

    elbo: float
    stderr: float
    n_tokens: int

    @property
    def nll_per_token(self) -> float:
        return -self.elbo / self.n_tokens

    @property
    def bits_per_token(self) -> float:
        return self.nll_per_token / math.log(2)


@torch.no_grad()
def elbo(model_or_backend, prompt_ids, answer_ids, *, mc: int = 128, batch: int = 16, estimator: str = "llada",
         eps: float = 1e-3, seed: int = 0) -> ElboResult:
    """Monte-Carlo ELBO of `answer_ids` given `prompt_ids` (1-D id lists or tensors).

    Args:
        mc: total masked samples (a multiple of `batch`).
        batch: copies per forward.
        estimator: "llada" (exact mask counts, evenly spaced) or "dream" (i.i.d. masking at
            stratified t, p_mask = (1 - eps) t + eps).
        seed: the estimate is deterministic for a seed.
    """
    backend = as_backend(model_or_backend)
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    answer = torch.as_tensor(list(answer_ids), dtype=torch.long)
    P, L = prompt.numel(), answer.numel()
    if L == 0:
        raise ValueError("empty answer")
    if backend.spec.shift_logits and P == 0:
        raise ValueError("a shifted-logit model needs at least one prompt token (position 0 is never predicted)")
    g = torch.Generator().manual_seed(seed)
    seq = torch.cat([prompt, answer])[None].expand(batch, P + L)
    mask_id = backend.spec.mask_id
    estimates = []
    for _ in range(max(1, mc // batch)):
        if estimator == "llada":
            k = int(torch.randint(1, L + 1, (1,), generator=g))
            counts = torch.linspace(k, k + (batch - 1) * L / batch, batch).round().long()
            counts = ((counts - 1) % L) + 1
            rank = torch.rand(batch, L, generator=g).argsort(1).argsort(1)
            masked_ans = rank < counts[:, None]
            p_mask = counts.double() / L
        elif estimator == "dream":
            t = (torch.rand(1, generator=g) + torch.arange(batch) / batch) % 1
            p_mask = ((1 - eps) * t + eps).double()
            masked_ans = torch.rand(batch, L, generator=g) < p_mask[:, None]
        else:
            raise ValueError(f"unknown estimator {estimator!r} (llada or dream)")
        masked = torch.zeros(batch, P + L, dtype=torch.bool)
        masked[:, P:] = masked_ans
        x = torch.where(masked, torch.full_like(seq, mask_id), seq)
        logits = backend.spec.align_logits(backend.forward(x))
        ce = F.cross_entropy(logits[masked], seq[masked], reduction="none").double()
        rows = masked.nonzero()[:, 0]
        per_row = torch.zeros(batch, dtype=torch.float64).index_add_(0, rows, ce) / p_mask
        estimates.append(float(per_row.mean()))
    est = torch.tensor(estimates, dtype=torch.float64)
    stderr = float(est.std(unbiased=True) / math.sqrt(len(est))) if len(est) > 1 else float("nan")
    return ElboResult(elbo=-float(est.mean()), stderr=stderr, n_tokens=L)


@torch.no_grad()
def text_bits_per_token(model_or_backend, tokenizer, texts: list[str], *, window: int = 128, max_windows: int = 32,
                        mc: int = 32, batch: int = 16, seed: int = 0, estimator: str = "llada") -> dict:
    """ELBO bits per token of held-out text: non-overlapping windows, the first token of each
    window is the (never masked) prompt, the rest is scored."""
    backend = as_backend(model_or_backend)
    eos = backend.spec.eos_id
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    n = min(len(stream) // window, max_windows)
    if n == 0:
        raise ValueError(f"held-out text has {len(stream)} tokens, fewer than one window of {window}")
    results = [elbo(backend, stream[i * window:i * window + 1], stream[i * window + 1:(i + 1) * window], mc=mc,
                    batch=batch, seed=seed + i, estimator=estimator) for i in range(n)]
    nll = sum(-r.elbo for r in results)
    tokens = sum(r.n_tokens for r in results)
    var = sum(r.stderr ** 2 for r in results if r.stderr == r.stderr)
    return {"bits_per_token": nll / tokens / math.log(2), "stderr_bits": math.sqrt(var) / tokens / math.log(2),
            "windows": n, "window": window, "mc": mc, "estimator": estimator, "tokens": tokens}
