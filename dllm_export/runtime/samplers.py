"""Token proposal, confidence scores and transfer schedules of the reference dLLM samplers.

Pure tensor functions, each named after and token-exact with its reference:
LLaDA `generate.py` (low_confidence / random remasking, `get_num_transfer_tokens`, float64
Gumbel noise), Dream `generation_utils.py` (`sample_tokens`, top-p / top-k filtering,
`origin` / `maskgit_plus` / `topk_margin` / `entropy`), and Fast-dLLM's confidence threshold.
Random draws take an explicit `torch.Generator` (None = torch's default generator, as the
references use), in the same order as the references, so seeded runs reproduce them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LLADA_SAMPLERS = ("low_confidence", "random")
DREAM_SAMPLERS = ("origin", "maskgit_plus", "topk_margin", "entropy")
SAMPLERS = LLADA_SAMPLERS + DREAM_SAMPLERS


def get_num_transfer_tokens(block_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's linear schedule: split each row's masked count evenly over `steps`, extras first.

    Args:
        block_mask: (B, block_length) bool, masked positions of the block at its start.
        steps: denoising steps of this block.
    Returns:
        (B, steps) int64 number of tokens to commit at each step.
    """
    n = block_mask.sum(dim=1, keepdim=True)  # (B, 1)
    base, rem = n // steps, n % steps
    sched = torch.zeros(n.shape[0], steps, dtype=torch.int64, device=block_mask.device) + base
    for i in range(n.shape[0]):
        sched[i, : int(rem[i])] += 1
    return sched


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max in float64 (LLaDA): argmax of exp(l) / (-log u)^T samples softmax(l / T).

    Temperature 0 returns the logits unchanged (no random draw), as the reference does.
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(noise)) ** temperature


def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering (Dream): keep the smallest prefix of sorted tokens whose mass exceeds top_p."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses the threshold
    remove[..., 0] = False
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Top-k filtering (Dream): everything below the k-th largest logit gets finfo.min."""
    top_k = min(top_k, logits.size(-1))
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, top_p: float | None = None,
                  top_k: int | None = None, confidence: str = "prob",
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dream's `sample_tokens` over (N, V) logits of masked positions.

    Args:
        confidence: "prob" (probability of the chosen token, maskgit_plus), "margin"
            (top1 - top2 probability, topk_margin) or "neg_entropy" (entropy).
    Returns:
        (confidence (N,), tokens (N,)).
    """
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    conf, x0 = probs.max(dim=-1)
    if temperature > 0 and probs.shape[0] > 0:
        # torch.distributions.Categorical(probs).sample(): renormalise, one draw with replacement
        norm = probs / probs.sum(-1, keepdim=True)
        if bool(torch.isfinite(norm).all()) and bool((norm >= 0).all()):
            x0 = torch.multinomial(norm.reshape(-1, norm.shape[-1]), 1, True, generator=generator).T.reshape(norm.shape[:-1])
            conf = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    if confidence == "margin":
        top2 = torch.sort(probs, dim=-1, descending=True)[0]
        conf = top2[:, 0] - top2[:, 1]
    elif confidence == "neg_entropy":
        conf = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return conf, x0


DREAM_CONFIDENCE = {"maskgit_plus": "prob", "topk_margin": "margin", "entropy": "neg_entropy"}


def llada_step(logits: torch.Tensor, x: torch.Tensor, eligible: torch.Tensor, quota: torch.Tensor,
               sampler: str, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One step of LLaDA's `generate`: commit `quota[b]` eligible positions of each row.

    Args:
        logits: (B, L, V) float logits of the whole canvas.
        x: (B, L) canvas, updated in place.
        eligible: (B, L) still-masked positions inside the current block.
        quota: (B,) tokens to commit per row at this step.
    Returns:
        (B, L) bool: the positions written.
    """
    x0 = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)  # (B, L)
    if sampler == "low_confidence":
        p = F.softmax(logits, dim=-1)
        x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:  # "random"
        x0_p = torch.rand(x0.shape, device=x0.device, generator=generator)
    confidence = torch.where(eligible, x0_p, -torch.inf)
    transfer = torch.zeros_like(eligible)
    for j in range(x.shape[0]):
        _, idx = torch.topk(confidence[j], k=int(quota[j]))
        transfer[j, idx] = True
    x[transfer] = x0[transfer]
    return transfer


def _fast_dllm_confidence(logits, eligible, temperature, generator):
    """Fast-dLLM's proposals and confidences: x0 = argmax of the (Gumbel-noised) logits, confidence =
    its float64 softmax probability on eligible positions, -inf elsewhere."""
    x0 = torch.argmax(add_gumbel_noise(logits, temperature, generator), dim=-1)
    p = F.softmax(logits.to(torch.float64), dim=-1)
    x0_p = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
    return x0, torch.where(eligible, x0_p, -torch.inf)


def threshold_step(logits: torch.Tensor, x: torch.Tensor, eligible: torch.Tensor, threshold: float,
                   temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Fast-dLLM parallel decoding: commit every eligible position whose float64 top-1 probability
    is >= threshold, and always the most confident one, so each step makes progress."""
    x0, confidence = _fast_dllm_confidence(logits, eligible, temperature, generator)
    transfer = torch.zeros_like(eligible)
    counts = eligible.sum(dim=1)
    for j in range(x.shape[0]):
        vals, idx = torch.topk(confidence[j], k=int(counts[j]))
        keep = vals >= threshold
        keep[:1] = True
        transfer[j, idx[keep]] = True
    transfer &= eligible
    x[transfer] = x0[transfer]
    return transfer


def factor_step(logits: torch.Tensor, x: torch.Tensor, eligible: torch.Tensor, factor: float,
                temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Fast-dLLM's factor rule: with eligible confidences sorted c_1 >= c_2 >= ..., commit the
    first n up to the first c_n < 1 - factor / (n + 1) (the top one always; Fast-dLLM also takes
    the failing position when the failure is at the last candidate, kept here)."""
    x0, confidence = _fast_dllm_confidence(logits, eligible, temperature, generator)
    transfer = torch.zeros_like(eligible)
    counts = eligible.sum(dim=1)
    for j in range(x.shape[0]):
        n = int(counts[j])
        if n == 0:
            continue
        vals, idx = torch.topk(confidence[j], k=n)
        thresh = 1 - factor / (torch.arange(1, n + 1, dtype=torch.float64) + 1)
        thresh[0] = -1.0
        fail = (vals < thresh).nonzero()
        k = int(fail[0, 0]) if len(fail) else n - 1
        if k == 0 or k == n - 1:
            k += 1
        transfer[j, idx[:k]] = True
    transfer &= eligible
    x[transfer] = x0[transfer]
    return transfer


def dream_step(logits: torch.Tensor, x: torch.Tensor, eligible: torch.Tensor, sampler: str, i: int, steps: int,
               timesteps: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None,
               alg_temp: float | None, mask_id: int, generator: torch.Generator | None) -> torch.Tensor:
    """One step of Dream's `_sample` (timesteps t = timesteps[i], s = timesteps[i + 1]).

    `origin` commits each eligible position independently with probability 1 - s/t; the others
    commit the int(mean eligible count * (1 - s/t)) most confident positions per row (all on the
    last step), by top-k or, with `alg_temp`, by sampling softmax(confidence / alg_temp).
    Unlike the reference, a row never commits more than its own eligible positions (the reference
    overwrites finished positions with the mask when batch rows have unequal mask counts).
    """
    t, s = timesteps[i], timesteps[i + 1]
    mask_logits = logits[eligible]  # (N, V)
    if sampler == "origin":
        p_transfer = 1 - s / t if i < steps - 1 else 1
        x0 = torch.full((mask_logits.shape[0],), mask_id, dtype=torch.long, device=x.device)
        chosen = torch.rand(x0.shape, device=x.device, generator=generator) < p_transfer
        if bool(chosen.any()):
            _, x0[chosen] = sample_tokens(mask_logits[chosen], temperature, top_p, top_k, generator=generator)
        transfer = torch.zeros_like(eligible)
        transfer[eligible] = chosen
        x[eligible] = torch.where(chosen, x0, x[eligible])
        return transfer

    conf, x0 = sample_tokens(mask_logits, temperature, top_p, top_k, DREAM_CONFIDENCE[sampler], generator=generator)
    B = x.shape[0]
    mean_masks = eligible.sum() / B
    k = int(mean_masks * (1 - s / t)) if i < steps - 1 else int(mean_masks)
    transfer = torch.zeros_like(eligible)
    if k <= 0:
        return transfer
    full_conf = torch.full(x.shape, -torch.inf, dtype=logits.dtype, device=x.device)
    full_conf[eligible] = conf
    counts = eligible.sum(dim=1)
    rows = [(slice(None), k)] if bool((counts >= k).all()) else [(j, min(k, int(counts[j]))) for j in range(B)]
    for r, kr in rows:
        fc = full_conf[r]
        if kr <= 0:
            continue
        if alg_temp is None or alg_temp == 0:
            idx = torch.topk(fc, kr).indices
        else:
            idx = torch.multinomial(F.softmax(fc / alg_temp, dim=-1), num_samples=kr, generator=generator)
        if isinstance(r, slice):
            transfer.scatter_(1, idx, True)
        else:
            transfer[r, idx] = True
    proposal = torch.full_like(x, mask_id)
    proposal[eligible] = x0
    transfer &= eligible
    x[transfer] = proposal[transfer]
    return transfer
