"""The iterative-unmasking loop shared by every backend.

The canvas is prompt + `gen_length` mask tokens (+ a suffix, for infilling), decoded left to
right in blocks of `block_length` (semi-autoregressive; one block = the whole answer by default).
Each step runs the backend over the whole canvas, applies classifier-free guidance and the family's logit
shift, and commits positions of the current block by the sampler's rule. Steps are split evenly
over blocks, as LLaDA's `generate.py` does; with `threshold` a block runs until it is decoded.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..checks import check_fields, is_int
from ..errors import InputError
from ..models.layers import KVCache
from . import samplers as S
from .backends import Backend, as_backend

CACHES = ("none", "prefix", "dual")

# named option sets for `generate` (the CLI's --preset): "reference" decodes as LLaDA's / Dream's own
# loops (a full forward per step, the whole canvas); "edge" is the fast setting of the edge targets:
# Fast-dLLM's dual cache, refreshed once 16 tokens were committed past it (an EOS tail committed in
# one step otherwise leaves the cached prompt blind to it), a 0.99 confidence threshold (0.9 costs
# 6 points of exact match on the bundled LLaDA) and no steps spent on the EOS tail
PRESETS: dict[str, dict] = {
    "reference": {},
    "edge": {"cache": "dual", "threshold": 0.99, "refresh_tokens": 16, "stop_at_eos": True},
}


def with_preset(preset: str, options: dict, supports_cache: bool = True) -> dict:
    """Decoding `options` (None: left open) with the open ones taken from PRESETS[preset], Nones
    dropped; an option set to a factor takes nothing from the preset (its threshold excludes one),
    and a backend without a KV cache takes the preset's other settings (not its cache). The rule
    the CLI's `--preset` (generate, bench) and the server's default / per-request preset share."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r} (choose from {', '.join(sorted(PRESETS))})")
    fill = {} if options.get("factor") is not None else PRESETS[preset]
    if not supports_cache:
        fill = {k: v for k, v in fill.items() if k != "cache"}
    given = {k: v for k, v in options.items() if v is not None}
    merged = {**{k: v for k, v in fill.items() if k not in given}, **given}
    if merged.get("cache", "none") == "none" and "refresh_tokens" not in given:
        merged.pop("refresh_tokens", None)  # the preset's cache refresh goes with its cache
    return merged


@dataclass
class GenerateOutput:
    """Result of `generate`.

    Attributes:
        ids: (B, P + gen_length + S) int64 prompt (left-padded), generated tokens and the suffix
            (right-padded; S = 0 without one).
        commit_step: (B, gen_length) int64, 0-based step (counted across blocks) at which each
            generated position stopped being the mask token; -1 if it never did.
        prompt_length: P.
        attention_mask: (B, P + gen_length + S) 0/1, zeros at the prompt's left padding and the
            suffix's right padding.
        nfe: number of steps, i.e. backend forward calls (a CFG step counts once; so does a batch step
            that refreshes only some rows' caches, though it runs the cached and the full forward).
        seconds: wall time of the loop.
        settings: the resolved decoding settings.
        logprobs: with `generate(logprobs=k)`, (B, gen_length) float64 log-probability of each
            generated token under the distribution of the step that committed it (NaN where no step
            did: never committed, or filled by `stop_at_eos`); else None.
        top_logprobs: with k > 0, ((B, gen_length, k) log-probabilities, (B, gen_length, k) token
            ids) of that distribution's k most likely tokens; else None.
    """

    ids: torch.Tensor
    commit_step: torch.Tensor
    prompt_length: int
    attention_mask: torch.Tensor
    nfe: int
    seconds: float
    settings: dict = field(default_factory=dict)
    logprobs: torch.Tensor | None = None
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def generated(self) -> torch.Tensor:
        """(B, gen_length) the generated part of `ids` (between the prompt and the suffix)."""
        return self.ids[:, self.prompt_length:self.prompt_length + self.commit_step.shape[1]]


def prepare_prompt(prompt_ids, pad_id: int, attention_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) from a tensor [B, P] / [P] or (ragged) lists of ids; ragged rows are left-padded.
    Anything but integer ids (text, floats, bools) is an InputError, not silently truncated."""
    if isinstance(prompt_ids, str):
        raise InputError("prompt_ids are token ids, got a string: encode text with the model's tokenizer "
                         "(dllm_export.load_tokenizer) first")
    if isinstance(prompt_ids, np.ndarray):
        prompt_ids = torch.from_numpy(prompt_ids)
    if isinstance(prompt_ids, torch.Tensor):
        _check_int_ids(prompt_ids, "prompt_ids")
        ids = prompt_ids.long()
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise InputError(f"prompt_ids must be [batch, length] with length >= 1, got shape {tuple(prompt_ids.shape)}")
        return ids, torch.ones_like(ids) if attention_mask is None else _check_mask(attention_mask, ids)
    if attention_mask is not None:  # the rows' padding makes the mask; a given one would be dropped
        raise InputError("attention_mask goes with a [batch, length] tensor prompt; lists of ids of any lengths "
                         "are left-padded and masked by generate itself")
    rows: Sequence = prompt_ids
    if not isinstance(rows, (list, tuple)):
        raise InputError(f"prompt_ids must be a tensor or lists of token ids, got {type(rows).__name__}")
    if rows and isinstance(rows[0], numbers.Number):
        rows = [rows]
    if not rows or any(len(r) == 0 for r in rows):
        raise InputError("the prompt is empty")
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, P - len(r):] = _row_ids(r, i, "prompt")
        mask[i, P - len(r):] = 1
    return ids, mask


def _row_ids(r, i: int, what: str) -> torch.Tensor:
    """Row i of lists of token ids as int64 (numpy integers too), or an InputError naming it."""
    if not isinstance(r, (list, tuple)) or not all(map(is_int, r)):
        raise InputError(f"{what} row {i} must be a list of integer token ids, got {r!r:.80}")
    try:
        return torch.as_tensor([int(t) for t in r], dtype=torch.long)
    except (OverflowError, ValueError, RuntimeError):
        raise InputError(f"{what} row {i} holds an id beyond 64 bits") from None


def prepare_suffix(suffix_ids, rows: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [rows, S], mask [rows, S]) of the text after the canvas (infilling): a tensor [B, S] / [S]
    or (ragged) lists of ids, right-padded with the pad id and masked; one row is every row's, and an
    empty row (or S = 0) is a row without a suffix."""
    if isinstance(suffix_ids, str):
        raise InputError("suffix_ids are token ids, got a string: encode text with the model's tokenizer first")
    if isinstance(suffix_ids, np.ndarray):
        suffix_ids = torch.from_numpy(suffix_ids)
    if isinstance(suffix_ids, torch.Tensor):
        _check_int_ids(suffix_ids, "suffix_ids")
        ids = suffix_ids.long()
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2:
            raise InputError(f"suffix_ids must be [batch, length], got shape {tuple(suffix_ids.shape)}")
        lists = ids.tolist()
    elif isinstance(suffix_ids, (list, tuple)):
        lists = [suffix_ids] if not suffix_ids or isinstance(suffix_ids[0], numbers.Number) else suffix_ids
    else:
        raise InputError(f"suffix_ids must be a tensor or lists of token ids, got {type(suffix_ids).__name__}")
    if len(lists) == 1:
        lists = list(lists) * rows
    if len(lists) != rows:
        raise InputError(f"suffix_ids has {len(lists)} rows for {rows} prompt rows (give one row, or one per prompt)")
    row_ids = [_row_ids(r, i, "suffix") for i, r in enumerate(lists)]
    S = max(len(r) for r in row_ids)
    ids, mask = torch.full((rows, S), pad_id, dtype=torch.long), torch.zeros((rows, S), dtype=torch.long)
    for i, r in enumerate(row_ids):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask


def _check_mask(attention_mask, ids: torch.Tensor) -> torch.Tensor:
    """The attention mask of a tensor prompt: ids' shape, 0 / 1 only (1 = a real token, 0 = left
    padding), at least one real token a row; `.long()` made 0.5 a 0 and masked the whole prompt."""
    m = torch.as_tensor(np.asarray(attention_mask) if not isinstance(attention_mask, torch.Tensor) else attention_mask)
    if tuple(m.shape) != tuple(ids.shape):
        raise InputError(f"attention_mask must have the prompt's shape {tuple(ids.shape)}, got {tuple(m.shape)}")
    if not bool(((m == 0) | (m == 1)).all()):
        raise InputError("attention_mask holds values other than 0 and 1")
    if not bool((m == 1).any(1).all()):
        raise InputError("attention_mask masks every token of a prompt row")
    return m.long()


def _check_int_ids(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"{name} must be integer token ids, got {t.dtype}")


def generate(model_or_backend, prompt_ids, *, gen_length: int = 128, steps: int | None = None,
             block_length: int | None = None, sampler: str | None = None, temperature: float = 0.0,
             cfg_scale: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             alg_temp: float | None = None, eps: float = 1e-3, threshold: float | None = None,
             attention_mask=None, seed: int | None = None, generator: torch.Generator | None = None,
             callback: Callable[[int, int], None] | None = None, cache: str = "none", refresh: int | None = None,
             refresh_tokens: int | None = None, refresh_blocks: int | None = None, factor: float | None = None,
             stop_at_eos: bool = False, on_canvas: Callable[[torch.Tensor], None] | None = None, suffix_ids=None,
             logprobs: "int | Logprobs | None" = None) -> GenerateOutput:
    """Decode `gen_length` tokens after `prompt_ids` by iterative unmasking.

    Args:
        model_or_backend: a model from `load_model` or any backend with `forward(ids) -> logits`.
        prompt_ids: [B, P] tensor, a list of ids, or a list of lists (left-padded with the pad id).
        gen_length: tokens to generate.
        steps: denoising steps in total (default gen_length), split evenly over the blocks.
        block_length: semi-autoregressive block size (default gen_length: one block).
        sampler: `low_confidence` | `random` (LLaDA remasking), `origin` | `maskgit_plus` |
            `topk_margin` | `entropy` (Dream algorithms); default from the model's spec.
        temperature: 0 is greedy. LLaDA samplers use float64 Gumbel noise, Dream's categorical draws.
        cfg_scale: classifier-free guidance; the unconditional pass masks the prompt.
        top_k, top_p: Dream's filtering, applied only when given (Dream's own `diffusion_generate`
            silently applies top_k=50 when top_k is omitted: pass top_k=50 to reproduce that).
        alg_temp: Dream: sample positions from softmax(confidence / alg_temp) instead of top-k.
        eps: Dream's final timestep (timesteps = linspace(1, eps, steps_per_block + 1)).
        threshold: Fast-dLLM parallel decoding: per step commit every position of the block whose
            top-1 probability is >= threshold, at least one; a block runs until it is decoded. In
            a batch of greedy rows, a row whose block is decoded sits out the block's next forwards.
        factor: Fast-dLLM's factor rule instead: commit the n most confident positions while the
            n-th confidence is >= 1 - factor / (n + 1) (at least one).
        cache: Fast-dLLM block caches. "prefix": each block starts with a full forward that caches
            every layer's keys/values; later steps recompute only the block and what follows it,
            attending to the cached prefix. "dual": later steps recompute only the block, with
            cached prefix and suffix keys/values. "none": a full forward every step (the reference).
            For Dream (shifted logits) the block's first position keeps the block-start prediction.
        refresh: with a cache, also run the full forward every `refresh` steps inside a block.
        refresh_tokens: with a cache, run the full forward again once any row has committed this
            many tokens since the cache was filled: the cached keys/values are stale by exactly
            those tokens, so a step that commits many at once (an EOS tail) is followed by an exact one,
            while one-token steps keep the cache. 1 refreshes after every commit (the reference trace).
            Per row: in a batch each row is refreshed when it needs it (a step where only some rows
            do runs the cached and the full forward), so its tokens are those it gets alone.
        refresh_blocks: with a cache, only every `refresh_blocks`-th block (the first included)
            starts with the full forward; the others start with a windowed forward from the start
            of the block just decoded (its final tokens and the new block; "prefix": to the end)
            that writes those columns' keys/values into the cache, while the prompt's and the rest
            keep those of the last full forward (dLLM-Cache's long-interval prompt cache). Block
            starts then cost a block step of two blocks instead of a forward over the canvas; the
            tokens are no longer the dual cache's (measure quality). None or 1: every block.
        stop_at_eos: once a block is decoded with an end token (EOS or end of turn) in a row's
            generated part and only masks after the block, that row's rest is filled with EOS
            (commit step: the block's last) and not decoded; the loop ends when every row has
            ended, and the next blocks' forwards leave the ended rows out where a row's tokens do
            not depend on its companions (`Plan.rows_independent`). Otherwise (sampled draws,
            Dream's batch-mean step quota, which then counts the ended rows' zeros) they stay in.
            Off by default: the reference loops decode the whole canvas (the model may write past
            an end token).
        attention_mask: [B, P] 0/1 for a pre-padded prompt tensor.
        suffix_ids: infilling: text that follows the generated tokens, [B, S] / [S] tensor or (ragged)
            lists of ids (one row: every row's; [] : a row without one). The canvas is prompt +
            gen_length masks + suffix; the blocks decode the masks between them, every forward reads
            the suffix (the caches keep it with the rest of the context), classifier-free guidance
            masks it with the prompt, and `stop_at_eos` fills with EOS up to it. A suffix of mask
            tokens is refused (masks in the prompt are filled: put them there).
        logprobs: record each generated token's log-probability under the distribution of the step
            that committed it (the step's logits after guidance and the family's shift, before
            temperature and filtering), and with k > 0 that distribution's k most likely tokens
            (`GenerateOutput.logprobs` / `.top_logprobs`); None records nothing. Diffusion decoding
            has no left-to-right likelihood: this is the model's confidence when it committed. A
            `Logprobs(k)` recorder does the same and can be read while decoding (from `on_canvas`).
        seed / generator: randomness (None = torch's global generator, like the references).
        callback: called as callback(step_done, steps_total_estimate) after each step.
        on_canvas: called with the live canvas x [B, P + gen_length + S] after each step (read it, do
            not keep or change it): streaming reads the committed prefix from it; an exception
            raised there stops the loop (a server cancels a batch whose clients all left).
    Returns:
        GenerateOutput with `.ids` [B, P + gen_length + S] and `.commit_step` [B, gen_length].
    Raises:
        InputError: bad schedule, unknown sampler, ids out of the vocabulary, context overflow.
    """
    dec = Decoding.create(model_or_backend, logprobs=logprobs, generator=generator, callback=callback,
                          on_canvas=on_canvas, gen_length=gen_length, steps=steps, block_length=block_length,
                          sampler=sampler, temperature=temperature, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p,
                          alg_temp=alg_temp, eps=eps, threshold=threshold, factor=factor, cache=cache,
                          refresh=refresh, refresh_tokens=refresh_tokens, refresh_blocks=refresh_blocks,
                          stop_at_eos=stop_at_eos, seed=seed)
    dec.admit(prompt_ids, suffix_ids, attention_mask)
    t0 = time.perf_counter()
    with loop_threads(dec.backend):
        while not dec.done:
            dec.run_block()
    record = dec.record
    return GenerateOutput(ids=dec.x, commit_step=dec.commit, prompt_length=int(dec.start[0]), attention_mask=dec.am,
                          nfe=dec.nfe, seconds=time.perf_counter() - t0, settings=dec.plan.settings(),
                          logprobs=None if record is None else record.token,
                          top_logprobs=None if record is None or not record.k else (record.top, record.top_ids))


class Decoding:
    """One batch's unmasking, a block at a time: the canvas x [B, W] (a row: left padding, prompt,
    its `length` masks from its `start` column, suffix, right padding), each generated position's
    commit step and the rows that ended. Blocks lie on one grid of columns shared by every row
    (the last decoded block ends at `hi`), so every step reads one window of the canvas; rows may
    generate different lengths (whole blocks), decoded with the plan's steps per block.

    `generate` admits every row at once and runs the blocks. A server may also `admit` rows at a
    block boundary (continuous batching: they decode from the next block on, their masks starting
    at `hi`) and `retire` rows it has answered. The canvas then moves (padding added or cut) between
    two blocks, where it may: a block's first step is a full forward over the canvas as it stands,
    refilling any cache. A row's tokens are then those it gets alone, as in any ragged batch (up to
    float rounding for LLaDA, whose positions count from the canvas start: RoPE's angles differ, the
    relative ones do not). Joining rows need `plan.rows_independent` (no shared draws or quotas).
    The grid pads a row that joined late on both sides (its prompt left of the older rows' blocks,
    its masks right of theirs); a full forward therefore runs once per admission (`cohort`) over
    the columns its rows span, where that spares an eighth of the cells or more (`_StepLogits.groups`).
    """

    def __init__(self, backend: Backend, plan: Plan, *, generator: torch.Generator | None = None,
                 record: "Logprobs | None" = None, on_canvas=None, callback=None):
        self.backend, self.plan, self.spec = backend, plan, backend.spec
        self.rule = _rule(plan, self.spec.mask_id, generator)
        self.record, self.on_canvas, self.callback = record, on_canvas, callback
        if record is not None:
            record.clear()
        self.x = torch.zeros(0, 0, dtype=torch.long)
        self.am, self.prompt_index = self.x.clone(), self.x.bool()
        self.start = torch.zeros(0, dtype=torch.long)  # each row's first generated column
        self.length = torch.zeros(0, dtype=torch.long)  # and how many it generates
        self.commit = torch.zeros(0, 0, dtype=torch.long)  # [B, longest length]; -1 past a row's own
        self.ended = torch.zeros(0, dtype=torch.bool)  # its blocks are decoded, or stop_at_eos ended it
        self.cohort = torch.zeros(0, dtype=torch.long)  # the admission that brought each row
        self._admissions = 0
        self.hi = 0  # the end column of the last decoded block: rows admitted now start there
        self._nfe = 0
        self._live: _LiveRows | None = None  # the rows the block under way decodes; None: rebuild

    @classmethod
    def create(cls, model_or_backend, *, logprobs: "int | Logprobs | None" = None,
               generator: torch.Generator | None = None, on_canvas=None, callback=None, **settings) -> "Decoding":
        """An empty decoding of a model or backend with `generate`'s settings (checked)."""
        _check_callables(callback=callback, on_canvas=on_canvas)
        record = logprobs if isinstance(logprobs, Logprobs) or logprobs is None else Logprobs(logprobs)
        backend: Backend = as_backend(model_or_backend)
        plan = Plan.resolve(backend.spec, **settings)
        plan.check(backend)
        if generator is None and plan.seed is not None:
            generator = torch.Generator().manual_seed(int(plan.seed))  # numpy integers too
        return cls(backend, plan, generator=generator, record=record, on_canvas=on_canvas, callback=callback)

    @property
    def nfe(self) -> int:
        """Steps so far (backend forward calls; see GenerateOutput.nfe)."""
        return self._nfe if self._live is None else self._live.step_logits.nfe

    @property
    def done(self) -> bool:
        """Every row has ended (an empty batch too)."""
        return bool(self.ended.all())

    @property
    def generated(self) -> torch.Tensor:
        """(B, longest length) each row's generated columns of the canvas (masks where not yet
        decoded; the pad id past the row's length)."""
        cols, own = _gen_cols(self.start, self.length, self.commit.shape[1], self.x.shape[1])
        return torch.where(own, self.x.gather(1, cols), self.spec.pad_id)

    def admit(self, prompt_ids, suffix_ids=None, attention_mask=None, gen_length: int | None = None) -> int:
        """Add rows that decode from the next block on (`prepare_prompt` / `prepare_suffix` inputs),
        each generating `gen_length` tokens (default: the plan's; whole blocks, at the plan's steps
        per block); returns how many. The canvas moves right when a prompt is longer than the
        columns before `hi`; InputError (and nothing added) when the canvas would outgrow the
        model's context."""
        spec, G = self.spec, self.plan.gen_length if gen_length is None else gen_length
        if not (is_int(G) and G >= self.plan.block_length and G % self.plan.block_length == 0):
            raise InputError(f"gen_length {G!r} of joining rows must be a positive multiple of the block length "
                             f"{self.plan.block_length}")
        prompt, pmask = prepare_prompt(prompt_ids, spec.pad_id, attention_mask)
        n, p = prompt.shape
        suffix, smask = (torch.zeros(n, 0, dtype=torch.long),) * 2 if suffix_ids is None else \
            prepare_suffix(suffix_ids, n, spec.pad_id)
        _check_prompt(prompt, G, self.backend, suffix)
        first = self.x.shape[0] == 0
        if first:
            self.hi = 0  # an empty decoding starts its grid afresh
        d = max(p - self.hi, 0)  # old rows move right so that the new prompts end at the boundary
        h = self.hi + d
        W = max(self.x.shape[1] + d, h + G + suffix.shape[1])
        new_x = torch.full((n, W), spec.pad_id, dtype=torch.long)
        new_am = torch.zeros((n, W), dtype=torch.long)
        new_x[:, h - p:h], new_am[:, h - p:h] = prompt, pmask
        new_x[:, h:h + G], new_am[:, h:h + G] = spec.mask_id, 1
        new_x[:, h + G:h + G + suffix.shape[1]], new_am[:, h + G:h + G + suffix.shape[1]] = suffix, smask
        x, am = (torch.cat([_pad_cols(t, d, W, fill), new]) for t, fill, new in
                 ((self.x, spec.pad_id, new_x), (self.am, 0, new_am)))
        pi = torch.cat([_pad_cols(self.prompt_index, d, W, True), new_x != spec.mask_id])
        start = torch.cat([self.start + d, torch.full((n,), h, dtype=torch.long)])
        a, b = (0, W) if first else _real_span(am)  # the columns left once padding every row has is cut
        if b - a > self.backend.max_length:
            raise InputError(f"joining {n} row(s) would make the batch's canvas {b - a} tokens, "
                             f"beyond the model's context of {self.backend.max_length}")
        self.x, self.am, self.prompt_index, self.start, self.hi = x, am, pi, start, h
        self.length = torch.cat([self.length, torch.full((n,), G, dtype=torch.long)])
        width = max(self.commit.shape[1], G)
        self.commit = torch.cat([_pad_cols(self.commit, 0, width, -1), torch.full((n, width), -1, dtype=torch.long)])
        self.ended = torch.cat([self.ended, torch.zeros(n, dtype=torch.bool)])
        self.cohort = torch.cat([self.cohort, torch.full((n,), self._admissions, dtype=torch.long)])
        self._admissions += 1
        if self.record is not None:
            self.record.add(n, G)
        self._cut(a, b)
        self._nfe, self._live = self.nfe, None
        return n

    def start_recording(self, record: "Logprobs") -> None:
        """Record logprobs from the next block on, into `record` (cleared; rows admitted so far hold
        NaN for what they committed before): a server starts when a request that asks for them joins."""
        record.clear()
        record.add(self.x.shape[0], self.commit.shape[1])
        self.record, self._nfe, self._live = record, self.nfe, None

    def retire(self, keep: torch.Tensor) -> None:
        """Drop the rows where `keep` (a bool mask over the rows) is False, at a block boundary."""
        keep = torch.as_tensor(keep, dtype=torch.bool)
        self.x, self.am, self.prompt_index = self.x[keep], self.am[keep], self.prompt_index[keep]
        self.start, self.length, self.ended = self.start[keep], self.length[keep], self.ended[keep]
        self.cohort = self.cohort[keep]
        width = int(self.length.max()) if len(self.length) else 0
        self.commit = self.commit[keep, :width]
        if self.record is not None:
            self.record.keep(keep, width)
        self._cut(*_real_span(self.am))
        self._nfe, self._live = self.nfe, None

    def _cut(self, a: int, b: int) -> None:
        """Keep the canvas columns [a, b) (outside them: padding in every row)."""
        self.x, self.am, self.prompt_index = self.x[:, a:b], self.am[:, a:b], self.prompt_index[:, a:b]
        self.start, self.hi = self.start - a, self.hi - a

    def run_block(self) -> None:
        """Decode the next block of the grid in every row that has not ended; a row whose last
        block it was ends (and, under `stop_at_eos`, a row whose decoded part holds an end token)."""
        plan, spec, mask_id = self.plan, self.spec, self.spec.mask_id
        hi = self.hi + plan.block_length
        live = self._live
        rows = ~self.ended if plan.rows_independent else torch.ones_like(self.ended)
        if live is None or (plan.rows_independent and live.differs(rows)):
            # a block starts with a full forward: the rows that have not ended decode it, afresh
            nfe, live = self.nfe, _LiveRows(self.x, self.commit, self.start, self.length, self.on_canvas, self.record)
            live.keep(rows, _StepLogits(self.backend, plan, self.prompt_index[rows], self.am[rows], self.cohort[rows]),
                      nfe)
            self._live = live
        _decode_block(live, hi, plan, self.rule, mask_id, self.callback)
        live.write_back()
        self.hi = hi
        end = self.start + self.length
        if plan.stop_at_eos:
            done = end_rows(self.x, self.start, hi, spec, mask_id, end) & ~self.ended
            cols = torch.arange(self.x.shape[1])
            self.x[done[:, None] & (cols >= hi) & (cols < end[:, None])] = spec.eos_id
            j = torch.arange(self.commit.shape[1])
            tail = done[:, None] & (j >= (hi - self.start)[:, None]) & (j < self.length[:, None])
            self.commit[tail] = live.step_logits.nfe - 1
            self.ended |= done
        self.ended |= end <= hi


def _gen_cols(start: torch.Tensor, length: torch.Tensor, width: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns [B, width] of each row's generated positions, clamped into the canvas of W columns;
    bool [B, width]: the position is the row's own, j < its length)."""
    j = torch.arange(width)
    return (start[:, None] + j).clamp(max=max(W - 1, 0)), j < length[:, None]


def _pad_cols(t: torch.Tensor, left: int, width: int, fill) -> torch.Tensor:
    """t [B, w] with `left` columns of `fill` before it and as many after as make `width`."""
    out = torch.full((t.shape[0], width), fill, dtype=t.dtype)
    out[:, left:left + t.shape[1]] = t
    return out


def _real_span(am: torch.Tensor) -> tuple[int, int]:
    """(first, end): the columns from the first to the last that hold a real token in some row
    ((0, 0) without rows); outside them every row is padding."""
    real = am.any(0).nonzero()
    return (int(real[0, 0]), int(real[-1, 0]) + 1) if len(real) else (0, 0)


@contextmanager
def loop_threads(backend: Backend):
    """The loop's own tensor ops (softmax, confidences, top-k over [B, block, V]) on one torch
    thread while a backend with a thread pool of its own runs the forwards: two pools on the same
    cores made those small ops take as long as an onnxruntime step (bundled LLaDA, W4 ONNX, 2
    cores: 19.6 ms a step against 8.2). torch's thread count is restored after."""
    n = torch.get_num_threads()
    if not backend.own_threads or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _decode_block(live: "_LiveRows", hi: int, plan: Plan, rule: Callable, mask_id: int,
                  callback: Callable[[int, int], None] | None) -> None:
    """Unmask the block ending at column `hi` in the live rows (their canvas and commit steps).
    Under threshold / factor decoding a row whose block is decoded leaves the block's next steps
    (`_LiveRows.narrow`) when its tokens do not depend on the others."""
    lo = hi - plan.block_length
    # masks left of the block end are eligible (prompt masks too: infilling), later ones are not;
    # one column mask serves every row count (rows that sit out leave fewer)
    upto_block = torch.arange(live.x.shape[1]) < hi
    # LLaDA's quota counts the block's masks; masks left of it (infilling prompts) count too, so
    # they are decoded as well (identical to the reference when the prompt has none)
    quota = S.get_num_transfer_tokens((live.x == mask_id) & upto_block, plan.steps_per_block)
    for i in range(plan.max_block_steps):
        x, commit, step_logits = live.x, live.commit, live.step_logits
        # threshold / factor rules read no quota and may run past the schedule (a committed mask id)
        q = None if plan.parallel or i >= quota.shape[1] else quota[:, i]
        eligible = (x == mask_id) & upto_block
        if not bool(eligible.any()):
            break  # nothing left to unmask in this block
        logits = step_logits(x, i, lo, hi, eligible)
        before = x == mask_id
        # greedy samplers only read eligible positions: run them on those columns (a softmax
        # over the whole canvas cost as much as a cached forward); random draws keep the full
        # shape so seeded traces stay those of the references
        cols = eligible.any(0).nonzero().squeeze(1) if plan.greedy else None
        if cols is None:
            rule(logits, x, eligible, q, i)
        else:
            xs = x[:, cols]
            rule(logits[:, cols], xs, eligible[:, cols], q, i)
            x[:, cols] = xs
        newly = (before & (x != mask_id)).gather(1, live.cols) & live.own
        commit[newly & (commit < 0)] = step_logits.nfe - 1
        live.record(logits, newly)
        if callback is not None:
            callback(step_logits.nfe, plan.total_estimate)
        live.show()
        if plan.parallel and plan.rows_independent:
            decoded = ~((x == mask_id) & upto_block).any(1)
            if bool(decoded.any()) and not bool(decoded.all()):
                live.narrow(~decoded)


class _LiveRows:
    """The rows of a batch that still decode: all of them, or copies of some (`rows`), so that the
    forwards compute only those: the rows that have not ended (`stop_at_eos`, from a block's start)
    and, under threshold / factor decoding, those whose block is not decoded yet. Hooks see the
    whole canvas and logprobs land in the whole batch's rows; `write_back` copies the live rows into
    the full tensors. `cols` [rows, longest length] are the live rows' generated columns, `own`
    where a column is the row's own (within its length)."""

    def __init__(self, x: torch.Tensor, commit: torch.Tensor, start: torch.Tensor, length: torch.Tensor,
                 on_canvas, record):
        self.full_x, self.full_commit, self.full_start, self.full_length = x, commit, start, length
        self.step_logits: _StepLogits | None = None
        self.rows: torch.Tensor | None = None
        self._on_canvas, self._record = on_canvas, record
        self._take()

    def differs(self, rows: torch.Tensor) -> bool:
        """Whether the live rows are other than `rows` (a bool mask over the batch)."""
        live = torch.arange(len(rows)) if self.rows is None else self.rows
        return not torch.equal(live, rows.nonzero().squeeze(1))

    def keep(self, rows: torch.Tensor, step_logits: "_StepLogits", nfe: int | None = None) -> None:
        """Decode `rows` (a bool mask over the batch) from a block's start on, with `step_logits` a
        fresh one for them (its first step, a block's first, is a full forward); its step count
        goes on from `nfe` (default: the current one's)."""
        self.write_back()
        step_logits.nfe = self.step_logits.nfe if nfe is None else nfe
        self.step_logits = step_logits
        self.rows = None if bool(rows.all()) else rows.nonzero().squeeze(1)
        self._take()

    def narrow(self, keep: torch.Tensor) -> None:
        """Go on with the live rows where `keep` (a bool mask over them), inside a block: the step
        state (cached keys / values, logits) is theirs, cut out of the batch's."""
        self.write_back()
        live = torch.arange(len(keep)) if self.rows is None else self.rows
        self.rows, self.step_logits = live[keep], self.step_logits.subset(keep)
        self._take()

    def _take(self) -> None:
        r = slice(None) if self.rows is None else self.rows
        self.x, self.commit = (self.full_x, self.full_commit) if self.rows is None else (self.full_x[r], self.full_commit[r])
        self.cols, self.own = _gen_cols(self.full_start[r], self.full_length[r], self.commit.shape[1], self.x.shape[1])

    def write_back(self) -> None:
        if self.rows is not None:
            self.full_x[self.rows], self.full_commit[self.rows] = self.x, self.commit

    def show(self) -> None:
        """Hand the whole canvas, the live rows' latest included, to the `on_canvas` hook."""
        if self._on_canvas is not None:
            if self.rows is not None:
                self.full_x.index_copy_(0, self.rows, self.x)
            self._on_canvas(self.full_x)

    def record(self, logits: torch.Tensor, newly: torch.Tensor) -> None:
        """Record the live rows' commits of a step in the `Logprobs` recorder (if any), at their batch rows."""
        if self._record is not None:
            self._record(logits, newly, self.x, self.cols, self.rows)


@dataclass(frozen=True)
class Plan:
    """The decoding settings of one `generate` call, resolved (see `generate` for their meaning)."""

    sampler: str
    gen_length: int
    steps: int
    block_length: int
    temperature: float = 0.0
    cfg_scale: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    alg_temp: float | None = None
    eps: float = 1e-3
    threshold: float | None = None
    factor: float | None = None
    cache: str = "none"
    refresh: int | None = None
    refresh_tokens: int | None = None
    refresh_blocks: int | None = None
    stop_at_eos: bool = False
    seed: int | None = None

    @classmethod
    def resolve(cls, spec, *, gen_length: int, steps: int | None = None, block_length: int | None = None,
                sampler: str | None = None, **settings) -> "Plan":
        """The plan of `generate`'s settings, defaults filled in: steps and block_length =
        gen_length, the family's default sampler (`spec`)."""
        check_sampler_read(sampler, settings.get("threshold"), settings.get("factor"))
        return cls(sampler=sampler or spec.default_sampler, gen_length=gen_length,
                   steps=gen_length if steps is None else steps,
                   block_length=gen_length if block_length is None else block_length, **settings)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def parallel(self) -> bool:
        """Threshold / factor decoding: a block runs until decoded, not for a fixed step count."""
        return self.threshold is not None or self.factor is not None

    @property
    def max_block_steps(self) -> int:
        return 2 * self.block_length if self.parallel else self.steps_per_block

    @property
    def total_estimate(self) -> int:
        return self.gen_length if self.parallel else self.steps

    @property
    def rows_independent(self) -> bool:
        """Rows may leave (or join) a batch without changing the others' tokens: greedy (no shared
        random draws), no batch-mean quota (Dream's samplers without threshold / factor), and every
        block start refreshes the cache (with `refresh_blocks`, a batch whose rows changed would
        start its next block with the full forward, where each row alone renews its cache)."""
        return (self.greedy and (self.parallel or self.sampler in S.LLADA_SAMPLERS)
                and (self.refresh_blocks or 1) == 1)

    @property
    def greedy(self) -> bool:
        """The sampler reads only the eligible positions and draws nothing at random."""
        return self.temperature == 0 and self.sampler not in ("random", "origin") and not self.alg_temp

    def check(self, backend=None) -> None:
        """Raise InputError for settings that cannot run (on `backend`, for the cache; None: on any)."""
        self._check_types()
        _validate(self.sampler, self.gen_length, self.steps, self.block_length, self.temperature, self.top_k,
                  self.top_p, self.threshold, self.factor is not None)
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise InputError(f"cfg_scale must be >= 0 and finite (0: no guidance), got {self.cfg_scale}")
        if self.alg_temp is not None and not (math.isfinite(self.alg_temp) and self.alg_temp >= 0):
            raise InputError(f"alg_temp must be >= 0 and finite (0: top-k positions), got {self.alg_temp}")
        if self.factor is not None:
            if self.threshold is not None:
                raise InputError("pass threshold or factor, not both")
            if not (math.isfinite(self.factor) and self.factor > 0):
                raise InputError(f"factor must be > 0 and finite, got {self.factor}")
            if self.sampler in ("random", "origin"):
                raise InputError(f"factor decoding ranks by confidence; sampler {self.sampler!r} has none")
        if self.cache not in CACHES:
            raise InputError(f"unknown cache {self.cache!r} (choose from {', '.join(CACHES)})")
        for name in ("refresh", "refresh_tokens", "refresh_blocks"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 64):
            raise InputError(f"seed must lie in [-2**63, 2**64) (torch's generator takes 64 bits), got {self.seed}")
        self._check_reads()
        if self.cache != "none" and backend is not None and not backend.supports_cache:
            raise InputError(f"the {backend.name} backend has no KV cache; use cache='none'")

    def _check_types(self) -> None:
        """Counts are integers and settings numbers (numpy's too; a bool is neither): `gen_length=8.0`
        or `temperature="0.5"` failed deep inside torch, `refresh=1.5` ran a schedule nobody asked for."""
        check_fields(self, ints=("gen_length", "steps", "block_length", "top_k", "refresh", "refresh_tokens",
                                 "refresh_blocks", "seed"),
                     reals=("temperature", "cfg_scale", "top_p", "alg_temp", "eps", "threshold", "factor"),
                     bools=("stop_at_eos",))
        if not 0 < self.eps < 1:  # Dream's schedule runs from t = 1 down to eps
            raise InputError(f"eps must lie in (0, 1), got {self.eps}")
        if not isinstance(self.sampler, str) or not isinstance(self.cache, str):
            raise InputError(f"sampler and cache are names, got {self.sampler!r} and {self.cache!r}")

    def _check_reads(self) -> None:
        """Refuse settings the decoding would drop without a word: a cache refresh without a cache,
        Dream's sampling filters where a LLaDA sampler or a threshold / factor rule commits."""
        refresh = [n for n in ("refresh", "refresh_tokens", "refresh_blocks") if getattr(self, n) is not None]
        if refresh and self.cache == "none":
            raise InputError(f"{' and '.join(refresh)} {'needs' if len(refresh) == 1 else 'need'} a block cache: "
                             f"set cache to {' or '.join(repr(c) for c in CACHES if c != 'none')}")
        dream_only = [n for n in ("top_k", "top_p", "alg_temp") if getattr(self, n) is not None]
        if dream_only and (self.parallel or self.sampler in S.LLADA_SAMPLERS):
            rule = (f"{'threshold' if self.threshold is not None else 'factor'} decoding" if self.parallel
                    else f"LLaDA's sampler {self.sampler!r}")
            what, it = ("is an option", "it") if len(dream_only) == 1 else ("are options", "them")
            raise InputError(f"{', '.join(dream_only)} {what} of Dream's samplers ({', '.join(S.DREAM_SAMPLERS)}); "
                             f"{rule} does not read {it}")

    def settings(self) -> dict:
        """The settings as a plain dict (GenerateOutput.settings)."""
        return asdict(self)


def _check_callables(**hooks) -> None:
    """InputError naming a hook argument that is neither None nor callable (a TypeError mid-loop)."""
    for name, hook in hooks.items():
        if hook is not None and not callable(hook):
            raise InputError(f"{name} must be a function or None, got {hook!r:.40}")


def _check_prompt(prompt: torch.Tensor, gen_length: int, backend, suffix: torch.Tensor | None = None) -> None:
    P, S = prompt.shape[1], 0 if suffix is None else suffix.shape[1]
    if P + gen_length + S > backend.max_length:
        what = f"prompt ({P} tokens) + gen_length ({gen_length})" + (f" + suffix ({S} tokens)" if S else "")
        raise InputError(f"{what} = {P + gen_length + S} exceeds the model's context of {backend.max_length} tokens")
    for name, ids in (("prompt", prompt), ("suffix", suffix)):
        if ids is None or not ids.numel():
            continue
        if int(ids.min()) < 0 or int(ids.max()) >= backend.vocab_size:
            raise InputError(f"{name} token ids must lie in [0, {backend.vocab_size}); got min {int(ids.min())}, "
                             f"max {int(ids.max())}")
    if S and bool((suffix == backend.spec.mask_id).any()):
        raise InputError(f"the suffix holds the mask token (id {backend.spec.mask_id}): generate fills the "
                         f"canvas before it; masks to fill go in the prompt")


def end_rows(x: torch.Tensor, P, hi: int, spec, mask_id: int, E=None) -> torch.Tensor:
    """(B,) bool: rows whose generated part (from column P) up to `hi` is decoded, holds an end token
    (EOS or end of turn) and has only masks from `hi` to the canvas end `E` (default: the row's end;
    a suffix follows it): `stop_at_eos` fills the rest of such a row's canvas with EOS. P and E are
    columns, or (B,) tensors of each row's."""
    stops = torch.tensor([i for i in (spec.eos_id, spec.eot_id) if i is not None], dtype=x.dtype)
    cols = torch.arange(x.shape[1])
    P = torch.as_tensor(P).reshape(-1, 1)
    E = torch.as_tensor(x.shape[1] if E is None else E).reshape(-1, 1)
    has_end = (torch.isin(x, stops) & (cols >= P) & (cols < hi)).any(1)
    decoded = (x[:, :hi] != mask_id).all(1)
    tail_masked = ((x == mask_id) | (cols < hi) | (cols >= E)).all(1)
    return has_end & decoded & tail_masked


class _StepLogits:
    """The logits a step samples from, [B, L, V] aligned so that row i predicts token i.

    Without a cache every step is a full forward (the reference). With one, a block's first step
    (every `refresh`-th, and for a row the first with `refresh_tokens` commits past its cache) is a
    full forward that fills the KVCache; the other steps run only the cached window (the block for
    "dual", block to end for "prefix") and write its rows into the last full logits. With
    `refresh_blocks`, the other blocks start with a window from the block before's start that renews
    the cache there (`KVCache.update`). A backend with `supports_rows` computes the head only on the
    rows the greedy samplers read (the first eligible position to the block end).
    """

    def __init__(self, backend: Backend, plan: Plan, prompt_index: torch.Tensor, am: torch.Tensor,
                 cohort: torch.Tensor | None = None):
        self.backend, self.plan = backend, plan
        self.spec = backend.spec
        self.prompt_index = prompt_index
        self.fwd_mask = None if bool((am == 1).all()) else am
        self.cohort = cohort  # (B,) each row's admission (Decoding.admit); full forwards run one per admission
        self.kv = KVCache() if plan.cache != "none" else None
        self.shift = 1 if self.spec.shift_logits else 0
        self.use_rows = plan.greedy and backend.supports_rows
        self.logits: torch.Tensor | None = None
        self.nfe = 0  # steps, i.e. backend forward calls (a CFG step counts once, so does a step whose
        # rows split into full and cached ones, though it runs both)
        self.filled: torch.Tensor | None = None  # (B,) decoded positions when the cache was filled
        self.block_starts = 0  # blocks started on this cache (refresh_blocks counts them)
        self.last_lo: int | None = None  # the start column of the block before

    def subset(self, keep: torch.Tensor) -> "_StepLogits":
        """This step state for the rows where `keep` (a bool mask over its rows), mid-block: their
        cached keys / values (both halves' with guidance), last logits and commit counts."""
        idx = keep.nonzero().squeeze(1)
        new = copy.copy(self)
        new.prompt_index = self.prompt_index[idx]
        new.fwd_mask = None if self.fwd_mask is None else self.fwd_mask[idx]
        new.cohort = None if self.cohort is None else self.cohort[idx]
        new.logits = None if self.logits is None else self.logits[idx]
        new.filled = None if self.filled is None else self.filled[idx]
        if self.kv is not None:
            B = len(keep)
            rows = idx if not self.kv.k or self.kv.k[0].shape[0] == B else torch.cat([idx, idx + B])
            new.kv = KVCache()
            new.kv.k, new.kv.v = [_take_rows(t, rows) for t in self.kv.k], [_take_rows(t, rows) for t in self.kv.v]
            new.kv.window, new.kv.length = self.kv.window, self.kv.length
        return new

    def full_rows(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """(B,) bool: the rows whose step `i` of a block is a full forward (which refills their
        cache): every row at a block's start and every `refresh`-th step; with `refresh_tokens`, the
        rows that committed that many tokens since their cache was filled."""
        plan, B = self.plan, x.shape[0]
        every = self.kv is None or i == 0 or (plan.refresh is not None and i % plan.refresh == 0)
        if plan.refresh_tokens is None or self.kv is None:
            return torch.full((B,), every)
        filled = (x != self.spec.mask_id).sum(1)
        if every:
            self.filled = filled
            return torch.ones(B, dtype=torch.bool)
        full = filled - self.filled >= plan.refresh_tokens
        self.filled = torch.where(full, filled, self.filled)
        return full

    def renew_from(self, i: int, lo_blk: int) -> int | None:
        """At a block's start: the column from which a windowed forward renews the cache (the start
        of the block before) where `refresh_blocks` spares this block the full forward, else None."""
        if i != 0 or self.kv is None:
            return None
        since, self.last_lo = self.last_lo, lo_blk
        self.block_starts += 1
        return None if since is None or (self.block_starts - 1) % (self.plan.refresh_blocks or 1) == 0 else since

    def __call__(self, x: torch.Tensor, i: int, lo_blk: int, hi: int, eligible: torch.Tensor) -> torch.Tensor:
        since = self.renew_from(i, lo_blk)
        if since is not None:
            self.nfe += 1
            self.filled = (x != self.spec.mask_id).sum(1)  # every committed token is in the cache again
            return self.step(x, False, lo_blk, hi, eligible, since)
        full = self.full_rows(x, i)
        self.nfe += 1
        if bool(full.all()) or not bool(full.any()):
            return self.step(x, bool(full.all()), lo_blk, hi, eligible)
        # some rows' caches went stale, the others' did not: each row gets what it would decoding
        # alone (a batch's answers do not depend on its companions), at the cost of both forwards
        keep = ~full
        self.step(x, False, lo_blk, hi, eligible)
        kept_logits, old_k, old_v = self.logits[keep].clone(), self.kv.k, self.kv.v
        self.step(x, True, lo_blk, hi, eligible)
        self.logits[keep] = kept_logits
        self.kv.k = [_rows_where(keep, o, n) for o, n in zip(old_k, self.kv.k)]
        self.kv.v = [_rows_where(keep, o, n) for o, n in zip(old_v, self.kv.v)]
        return self.logits

    def step(self, x: torch.Tensor, full: bool, lo_blk: int, hi: int, eligible: torch.Tensor,
             since: int | None = None) -> torch.Tensor:
        """The logits of a full forward (refilling the cache) or of a cached window, for every row;
        with `since` (`renew_from`), the window starts there and its keys/values renew the cache."""
        plan, shift, L = self.plan, self.shift, x.shape[1]
        if full and not self.use_rows:
            logits = self.spec.align_logits(self.raw(x, None))
            if self.kv is not None:
                logits = logits.clone()  # windows write into it (backends may return inference tensors)
            self.logits = logits
            return logits
        # raw rows [ra, rb) feed aligned rows [ra + shift, rb + shift)
        a = lo_blk if since is None else since
        window = None if full else (a, L) if plan.cache == "prefix" else (a, hi)
        off = 0 if window is None else window[0]
        first = max(int(eligible.any(0).nonzero()[0, 0]) - shift, 0)  # the first raw row a sampler reads
        if not self.use_rows:
            ra = off  # the backend returns the whole window
        elif full or since is not None:
            ra = max(first, off)  # a renewing window's rows before that are the block just decoded
        else:
            ra = lo_blk
        rb = hi - shift if self.use_rows else window[1]  # aligned rows up to the block end are read
        part = self.raw(x, window, (ra - off, rb - off) if self.use_rows else None, update=since is not None)
        if self.logits is None:
            self.logits = torch.empty(x.shape[0], L, part.shape[-1], dtype=part.dtype)
        lo, up = ra + shift, min(rb + shift, L)
        self.logits[:, lo:up] = part[:, :up - lo]
        if shift and ra == 0:  # Dream's row 0 keeps its own output (spec.align_logits)
            self.logits[:, 0] = part[:, 0]
        return self.logits

    def raw(self, x: torch.Tensor, window: tuple[int, int] | None, rows: tuple[int, int] | None = None,
            update: bool = False) -> torch.Tensor:
        """Raw backend logits of the canvas (or of a cached window, which with `update` renews the
        cache there), with classifier-free guidance."""
        groups = self.groups() if window is None else None
        if groups is not None:
            return self._grouped(x, groups, rows)
        return self._forward(x, self.prompt_index, self.fwd_mask, window, rows, self.kv, update)

    def groups(self) -> list[tuple[torch.Tensor, int, int]] | None:
        """[(rows, a, e)]: the rows of each admission with the columns [a, e) their real tokens
        span, when one full forward each spares an eighth of the padded canvas's cells or more
        (rows that joined a running decoding sit on its grid with padding on both sides); else None."""
        if self.cohort is None or self.fwd_mask is None:
            return None
        cohorts = self.cohort.unique()
        if len(cohorts) < 2:
            return None
        groups = []
        for c in cohorts:
            idx = (self.cohort == c).nonzero().squeeze(1)
            groups.append((idx, *_real_span(self.fwd_mask[idx])))
        B, L = self.fwd_mask.shape
        return groups if 8 * sum(len(i) * (e - a) for i, a, e in groups) <= 7 * B * L else None

    def _grouped(self, x: torch.Tensor, groups: list, rows: tuple[int, int] | None) -> torch.Tensor:
        """A full forward as one forward per group over its columns alone, the logits (zeros on
        the columns a group does not span) and any cache put together in the canvas's layout.
        Without a cache the columns run from position 0 (LLaDA's RoPE angles move, the relative
        ones do not; Dream's positions count real tokens); a cache needs the canvas positions
        (later steps' queries are rotated there), which a cached forward with `fill` gives."""
        B, L = x.shape
        lo = 0 if rows is None else rows[0]
        out, caches = None, []
        for idx, a, e in groups:
            c0 = a if rows is None else max(rows[0], a)  # the first canvas column of the logits
            r = None if rows is None else (c0 - a, rows[1] - a)
            xs, pi, am = x[idx], self.prompt_index[idx], self.fwd_mask[idx]
            if self.kv is None:
                part = self._forward(xs[:, a:e], pi[:, a:e], am[:, a:e], None, r, None)
            else:
                kv = KVCache()
                kv.fill, kv.length = True, L
                part = self._forward(xs, pi, am, (a, e), r, kv)
                caches.append(kv)
            if out is None:
                out = part.new_zeros((B, L if rows is None else rows[1] - lo, part.shape[-1]))
            out[idx, c0 - lo:c0 - lo + part.shape[1]] = part
        if caches:
            self.kv.k, self.kv.v = (_assemble([getattr(kv, kind) for kv in caches], groups, B, L,
                                              self.plan.cfg_scale > 0) for kind in ("k", "v"))
            self.kv.window, self.kv.length = None, L
        return out

    def _forward(self, x: torch.Tensor, prompt_index: torch.Tensor, am: torch.Tensor | None,
                 window: tuple[int, int] | None, rows: tuple[int, int] | None, kv: KVCache | None,
                 update: bool = False) -> torch.Tensor:
        """One backend forward of the rows `x` (or of their window), with classifier-free guidance."""
        cfg = self.plan.cfg_scale
        ids = x if window is None else x[:, window[0]:window[1]]
        if cfg > 0:
            un_x = x.clone()
            un_x[prompt_index] = self.spec.mask_id
            ids = torch.cat([ids, un_x if window is None else un_x[:, window[0]:window[1]]])
            am = None if am is None else torch.cat([am, am])
        kw = {} if rows is None else {"rows": rows}
        if kv is not None:
            kv.window, kv.update = window, update
            kw["cache"] = kv
        out = self.backend.forward(ids, am, **kw)
        if cfg > 0:
            cond, un = out.chunk(2, dim=0)
            out = un + (cfg + 1) * (cond - un)
        return out


def _assemble(parts: list[list], groups: list, B: int, L: int, cfg: bool) -> list:
    """Per layer, the batch's cached keys (or values) [B (2 B with guidance), kvH, L, hd] from each
    group's [rows, kvH, e - a, hd]; zeros on the padding (masked keys). Torch tensors or numpy arrays."""
    out = []
    for layer in zip(*parts):
        t = layer[0]
        shape = (2 * B if cfg else B, t.shape[1], L, t.shape[3])
        full = t.new_zeros(shape) if isinstance(t, torch.Tensor) else np.zeros(shape, t.dtype)
        for (idx, a, e), g in zip(groups, layer):
            dest = torch.cat([idx, idx + B]) if cfg else idx
            full[dest.to(full.device) if isinstance(full, torch.Tensor) else dest.numpy(), :, a:e] = g
        out.append(full)
    return out


MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


class Logprobs:
    """Where `generate(logprobs=...)` records each generated token's log-probability under the step
    that committed it, and that step's top `k` tokens: `token` (B, gen_length), `top` and `top_ids`
    (B, gen_length, k); NaN / -1 until a step commits the position. Pass one to `generate` to read
    them while it decodes (from `on_canvas`)."""

    def __init__(self, k: int = 0):
        if not (is_int(k) and 0 <= k <= MAX_TOP_LOGPROBS):
            raise InputError(f"logprobs must be an integer in 0..{MAX_TOP_LOGPROBS} (top tokens per position) or None, "
                             f"got {k!r:.40}")
        self.k = int(k)
        self.clear()

    def clear(self) -> None:
        """No rows (a decoding starts from here)."""
        self.token = self.top = self.top_ids = None

    def add(self, n: int, gen_length: int) -> None:
        """Empty records for n more rows generating `gen_length` tokens (a decoding calls it as rows
        join; the records are as wide as the longest row)."""
        B, width = (0, gen_length) if self.token is None else (self.token.shape[0], max(self.token.shape[1], gen_length))
        token = torch.full((B + n, width), float("nan"), dtype=torch.float64)
        top = torch.full((B + n, width, self.k), float("nan"), dtype=torch.float64)
        top_ids = torch.full((B + n, width, self.k), -1, dtype=torch.long)
        if self.token is not None:
            w = self.token.shape[1]
            token[:B, :w], top[:B, :w], top_ids[:B, :w] = self.token, self.top, self.top_ids
        self.token, self.top, self.top_ids = token, top, top_ids

    def keep(self, keep: torch.Tensor, width: int | None = None) -> None:
        """Keep the rows where `keep` (the decoding retired the others), `width` positions of each."""
        w = slice(None) if width is None else slice(0, width)
        self.token, self.top, self.top_ids = self.token[keep, w], self.top[keep, w], self.top_ids[keep, w]

    def __call__(self, logits: torch.Tensor, newly: torch.Tensor, x: torch.Tensor, cols: torch.Tensor,
                 rows: torch.Tensor | None = None) -> None:
        """Record the positions `newly` (b, gen_length) committed from the aligned `logits` [b, L, V]
        of the canvas x, whose generated positions are at columns `cols` (b, gen_length) (`rows`: the
        batch rows these b are, when only some rows decode)."""
        b, j = newly.nonzero(as_tuple=True)
        if not len(b):
            return
        c = cols[b, j]
        lp = torch.log_softmax(logits[b, c].double(), dim=-1)
        at = b if rows is None else rows[b]
        self.token[at, j] = lp.gather(1, x[b, c][:, None])[:, 0]
        if self.k:
            self.top[at, j], self.top_ids[at, j] = lp.topk(min(self.k, lp.shape[-1]), dim=-1)


def _take_rows(t, rows: torch.Tensor):
    """A cached layer's keys (or values) at batch rows `rows`: torch tensors or numpy arrays."""
    return t[rows.to(t.device)] if isinstance(t, torch.Tensor) else t[rows.numpy()]


def _rows_where(keep: torch.Tensor, old, new):
    """A cached layer's keys (or values) [rows, ...]: `old`'s rows where `keep`, else `new`'s; torch
    tensors or numpy arrays, as the backend stores them (rows = 2 B with classifier-free guidance)."""
    keep = keep.repeat(new.shape[0] // keep.shape[0])
    if isinstance(new, torch.Tensor):
        return torch.where(keep.to(new.device).view(-1, *[1] * (new.dim() - 1)), old, new)
    return np.where(keep.numpy().reshape(-1, *[1] * (new.ndim - 1)), old, new)


def _rule(plan: Plan, mask_id: int, generator: torch.Generator | None) -> Callable:
    """The commit rule of a step as one callable (logits, x, eligible, quota, i), x updated in place:
    Fast-dLLM's threshold or factor rule when set, else the sampler's reference step."""
    T = plan.temperature
    timesteps = torch.linspace(1, plan.eps, plan.steps_per_block + 1)
    rules = {
        "threshold": lambda lg, x, el, q, i: S.threshold_step(lg, x, el, plan.threshold, T, generator),
        "factor": lambda lg, x, el, q, i: S.factor_step(lg, x, el, plan.factor, T, generator),
        "llada": lambda lg, x, el, q, i: S.llada_step(lg, x, el, q, plan.sampler, T, generator),
        "dream": lambda lg, x, el, q, i: S.dream_step(lg, x, el, plan.sampler, i, plan.steps_per_block, timesteps,
                                                      T, plan.top_p, plan.top_k, plan.alg_temp, mask_id, generator),
    }
    kind = ("threshold" if plan.threshold is not None else "factor" if plan.factor is not None
            else "llada" if plan.sampler in S.LLADA_SAMPLERS else "dream")
    return rules[kind]


def check_sampler_read(sampler: str | None, threshold: float | None, factor: float | None) -> None:
    """Refuse a sampler given with threshold / factor decoding that ranks by another confidence:
    those rules rank by the top-1 probability (low_confidence / maskgit_plus), so `entropy` or
    `topk_margin` would be dropped without a word (None: the family's default, which they replace)."""
    if sampler in ("topk_margin", "entropy") and (threshold is not None or factor is not None):
        rule = "threshold" if threshold is not None else "factor"
        what = "their top-2 margin" if sampler == "topk_margin" else "entropy"
        raise InputError(f"sampler {sampler!r} ranks positions by {what}; {rule} decoding ranks them by top-1 "
                         f"probability and does not read it (drop the sampler, or use low_confidence / maskgit_plus)")


def _validate(sampler, gen_length, steps, block_length, temperature, top_k, top_p, threshold, by_factor) -> None:
    if sampler not in S.SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r} (choose from {', '.join(S.SAMPLERS)})")
    if gen_length < 1 or steps < 1 or block_length < 1:
        raise InputError(f"gen_length, steps and block_length must be >= 1 (got {gen_length}, {steps}, {block_length})")
    if gen_length % block_length:
        raise InputError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    num_blocks = gen_length // block_length
    if steps < num_blocks:  # every block takes at least one step (threshold and factor decoding too)
        raise InputError(f"steps {steps} is fewer than the number of blocks {num_blocks} "
                         f"(gen_length {gen_length} / block_length {block_length})")
    if threshold is None and not by_factor and steps % num_blocks:
        raise InputError(f"steps {steps} must be a multiple of the number of blocks {num_blocks} "
                         f"(gen_length {gen_length} / block_length {block_length})")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature must be >= 0 and finite, got {temperature}")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must lie in (0, 1], got {top_p}")
    if threshold is not None:
        if not 0 < threshold <= 1:
            raise InputError(f"threshold must lie in (0, 1], got {threshold}")
        if sampler in ("random", "origin"):
            raise InputError(f"threshold decoding ranks by confidence; sampler {sampler!r} has none")


@torch.no_grad()
def infill(model_or_backend, ids, *, check: Callable[[int, int], bool] | None = None) -> torch.Tensor | None:
    """Fill every mask token of `ids` [1, L] (anywhere: infilling) by greedy low-confidence
    unmasking, one position per forward, the most confident first (LLaDA's `low_confidence`
    remasking with steps = number of masks, over one block spanning the masks).

    `check(position, token)` is called after each commit; when it returns False the fill stops
    and None is returned (LLaDA's harness uses this to test whether a continuation is greedy).
    Returns the filled ids.
    """
    _check_callables(check=check)
    backend: Backend = as_backend(model_or_backend)
    spec = backend.spec
    x, _ = prepare_prompt(ids, spec.pad_id)  # integer ids, [1, L] or [L]
    if x.shape[0] != 1:
        raise InputError(f"infill takes one sequence [1, L], got shape {tuple(x.shape)}")
    _check_prompt(x, 0, backend)  # in the vocabulary and the context
    x = x.clone()
    with loop_threads(backend):
        while True:
            pos = (x[0] == spec.mask_id).nonzero().flatten()
            if not len(pos):
                return x
            logits = spec.align_logits(backend.forward(x))[0, pos]
            conf, tok = torch.softmax(logits.double(), -1).max(-1)
            j = int(conf.argmax())
            x[0, pos[j]] = tok[j]
            if check is not None and not check(int(pos[j]), int(tok[j])):
                return None
