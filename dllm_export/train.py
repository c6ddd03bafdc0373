"""Masked-diffusion pre-training of the small bundled default models (LLaDA and Dream layouts).

The objective is LLaDA's pre-training loss (Nie et al. 2025, "Large Language Diffusion Models",
arXiv 2502.09992): per sequence t ~ U(0, 1), p_mask = (1 - eps) t + eps, every
token masked i.i.d. with probability p_mask, and

    loss = sum over masked tokens of CE(logits_i, x_i) / p_mask  /  (B * L).

Dream (Ye et al. 2025, "Dream 7B") trains the same objective with its logits shifted one position
(position i predicts token i + 1, models.md 2.5); its first position is never masked.

Training is deterministic from a seed: the corpus (`dllm_export.corpus`), the tokenizer, the init,
the windows and the masks all come from seeded generators. Checkpoints (model, optimizer, step,
RNG state) are written every few minutes and at the end; `--resume` continues bit-for-bit on the
same machine. `--minutes` is a wall-clock budget after which training stops cleanly and saves.

    python -m dllm_export.train --family llada --out runs/llada --minutes 90
    python -m dllm_export.train --family llada --out runs/llada --resume --minutes 60
    python -m dllm_export.train --family llada --out runs/llada --export dllm_export/assets/llada-default
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .corpus import CorpusRecipe, build_corpus, corpus_summary
from .models.checkpoint import write_checkpoint
from .models.factory import dream_config, llada_config
from .models.loader import build_model


@dataclass(frozen=True)
class TrainConfig:
    """Model shape and optimisation settings of one training run.

    Attributes:
        family: "llada" or "dream".
        d_model / n_layers / n_heads / n_kv_heads / mlp_hidden: transformer shape.
        vocab_size: BPE vocabulary including the family's special tokens.
        context: max_sequence_length / max_position_embeddings written to config.json.
        seq_len / batch_size: packed training windows per step.
        lr / min_lr_ratio / warmup_steps / steps: AdamW learning rate, linear warmup then cosine
            decay to lr * min_lr_ratio at `steps` (the schedule length; `--minutes` may stop earlier).
        weight_decay / betas / grad_clip: AdamW and clipping.
        eps: minimum mask probability (LLaDA's 1e-3).
        rope_theta: RoPE base.
        seed: seeds init, windows and masks.
        arithmetic_answer_only: mask only the answers (`85\n` of `47+38=85\n`) in arithmetic windows:
            LLaDA's SFT rule "the prompt is never masked" (models.md 4.1) applied to `47+38=`.
        arithmetic_rows: 0 = arithmetic as packed windows of seq_len tokens; N > 0 = every problem
            its own N-token row `47+38=85<eos><eos>...`, only the answer and its EOS padding maskable
            (LLaDA SFT's format, and exactly what decoding sees: a prompt, then a masked canvas that
            must end in EOS). An arithmetic window's token budget becomes seq_len // N such rows.
        arithmetic_row_lengths: when set, replaces `arithmetic_rows`: each arithmetic window's budget
            goes to rows of a length drawn uniformly from this tuple (e.g. (16, 64, 288)), so the model
            also sees the long all-EOS canvases of `gen_length=256` decoding. Rows may be longer than
            seq_len; the budget carries over (stochastic rounding) so the token share is kept.
    """

    family: str = "llada"
    d_model: int = 256
    n_layers: int = 5
    n_heads: int = 8
    n_kv_heads: int = 8
    mlp_hidden: int = 704
    vocab_size: int = 4096
    context: int = 1024
    seq_len: int = 128
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    steps: int = 6000
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    eps: float = 1e-3
    rope_theta: float = 10000.0
    seed: int = 0
    arithmetic_answer_only: bool = False
    arithmetic_rows: int = 0
    arithmetic_row_lengths: tuple[int, ...] = ()


# The shapes of the bundled models (see the model cards in dllm_export/assets/*/README.md): ~12M
# parameters each (24 MB in bf16), trained on a GPU with 256-token windows; "-v1" are the first, 6M / 3M
# parameter models trained on one CPU thread, kept so their model cards replay.
PRESETS: dict[str, TrainConfig] = {
    "llada": TrainConfig(d_model=320, n_layers=8, n_heads=5, n_kv_heads=5, mlp_hidden=768, seq_len=256,
                         batch_size=256, lr=3e-3, warmup_steps=300, steps=8000, arithmetic_rows=16,
                         arithmetic_row_lengths=(16, 48, 144, 288)),
    "dream": TrainConfig(family="dream", d_model=320, n_layers=8, n_heads=5, n_kv_heads=1, mlp_hidden=896,
                         seq_len=256, batch_size=256, lr=3e-3, warmup_steps=300, steps=8000, arithmetic_rows=16,
                         arithmetic_row_lengths=(16, 48, 144, 288)),
    "llada-v1": TrainConfig(),
    "dream-v1": TrainConfig(family="dream", d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, mlp_hidden=512,
                            vocab_size=4096, steps=6000),
}


def model_config(cfg: TrainConfig, ids: dict[str, int]) -> dict:
    """The released-layout config.json dict of the model `cfg` describes, with the tokenizer's ids."""
    if cfg.family == "llada":
        return llada_config(d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                            n_kv_heads=cfg.n_kv_heads, mlp_hidden_size=cfg.mlp_hidden, vocab_size=cfg.vocab_size,
                            max_sequence_length=cfg.context, rope_theta=cfg.rope_theta, **ids)
    return dream_config(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                        num_key_value_heads=cfg.n_kv_heads, intermediate_size=cfg.mlp_hidden,
                        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.context, rope_theta=cfg.rope_theta,
                        **ids)


def init_weights(model: torch.nn.Module, n_layers: int, generator: torch.Generator, std: float = 0.02) -> None:
    """GPT-2 style init: N(0, std^2), residual output projections scaled by 1/sqrt(2 n_layers), norms 1, biases 0
    (the roles from the model's spec)."""
    spec = model.spec
    with torch.no_grad():
        for name, p in model.named_parameters():
            if spec.is_norm(name):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif spec.is_residual_out(name):
                p.copy_(torch.randn(p.shape, generator=generator) * (std / math.sqrt(2 * n_layers)))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * std)


# ----------------------------------------------------------------------------------------------- data

def prepare_data(cfg: TrainConfig, recipe: CorpusRecipe) -> dict:
    """Tokenizer files, config ids and the token streams of each source (deterministic)."""
    from tokenizers import Tokenizer

    from .tokenizer import train_tokenizer

    corpus = build_corpus(recipe)
    files, ids = train_tokenizer(corpus.tokenizer_texts(), cfg.vocab_size, cfg.family)
    tok = Tokenizer.from_str(files["tokenizer.json"])
    eos = ids["eos_token_id"]

    def encode_docs(docs: list[str]) -> torch.Tensor:
        out: list[int] = []
        for enc in tok.encode_batch(docs, add_special_tokens=False):
            out.extend(enc.ids)
            out.append(eos)
        return torch.tensor(out, dtype=torch.int32)

    lines = [line + "\n" for line in corpus.arithmetic_train]
    arith = tok.encode("".join(lines), add_special_tokens=False).ids
    # digits, + - * = and \n are single characters that the pre-tokenizer isolates: one token each
    assert len(arith) == sum(map(len, lines)), "arithmetic characters must map to one token each"
    starts = torch.tensor([0] + [len(x) for x in lines[:-1]], dtype=torch.int64).cumsum(0)
    eng_docs = ["\n".join(corpus.english_train[i:i + 32]) for i in range(0, len(corpus.english_train), 32)]
    return {
        "tokenizer_files": files, "ids": ids, "summary": corpus_summary(corpus),
        "streams": {"code": encode_docs(corpus.code_train), "english": encode_docs(eng_docs),
                    "arithmetic": torch.tensor(arith, dtype=torch.int32)},
        "arithmetic_starts": starts,
    }


class WindowSampler:
    """Draws [B, seq_len] windows: a source per row by the recipe's shares, then a random offset
    (arithmetic windows start at a line start, so `47+38=` at position 0 looks like training)."""

    def __init__(self, data: dict, recipe: CorpusRecipe, seq_len: int, answer_only: bool = False,
                 arithmetic_rows: int | tuple[int, ...] = 0):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(data["tokenizer_files"]["tokenizer.json"])
        self.eq_id, self.nl_id = (tok.encode(c, add_special_tokens=False).ids[0] for c in "=\n")
        self.answer_only = answer_only
        self.streams = data["streams"]
        self.names = ["code", "arithmetic", "english"]
        self.shares = torch.tensor([recipe.code, recipe.arithmetic, recipe.english], dtype=torch.float64)
        self.starts = data["arithmetic_starts"]
        ends = torch.cat([self.starts[1:], torch.tensor([len(self.streams["arithmetic"])])]) - 1  # the "\n"
        self.line_starts, self.line_ends = self.starts, ends
        self.starts = self.starts[self.starts <= len(self.streams["arithmetic"]) - seq_len]
        self.seq_len = seq_len
        # row lengths of arithmetic problems; () = packed windows
        self.row_lengths = tuple(arithmetic_rows) if isinstance(arithmetic_rows, (tuple, list)) else (
            (arithmetic_rows,) if arithmetic_rows else ())
        self.eos_id = data["ids"]["eos_token_id"]

    def answer_positions(self, x: torch.Tensor) -> torch.Tensor:
        """[L] bool: the tokens after an `=` up to and including the next newline (a line-aligned window)."""
        idx = torch.arange(len(x))
        last_eq = torch.where(x == self.eq_id, idx, -1).cummax(0).values
        last_nl = torch.where(x == self.nl_id, idx, -1).cummax(0).values
        before_eq = torch.cat([torch.tensor([-1]), last_eq[:-1]])
        before_nl = torch.cat([torch.tensor([-1]), last_nl[:-1]])
        return before_eq > before_nl

    def problem_rows(self, n: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n arithmetic problems as [n, length] `47+38=85<eos>...` rows and their maskable answer + padding."""
        idx = torch.randint(len(self.line_starts), (n,), generator=generator)
        x = torch.full((n, length), self.eos_id, dtype=torch.int64)
        maskable = torch.zeros(n, length, dtype=torch.bool)
        stream = self.streams["arithmetic"]
        for r, i in enumerate(idx.tolist()):
            line = stream[int(self.line_starts[i]):int(self.line_ends[i])].long()[:length]
            x[r, :len(line)] = line
            eq = int((line == self.eq_id).nonzero()[0, 0])
            maskable[r, eq + 1:] = True
        return x, maskable

    def sample(self, batch_size: int, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One batch: [(windows int64 [b, L], which of their tokens may be masked)], one entry per row
        shape (packed windows, plus arithmetic problem rows when `arithmetic_rows` is set)."""
        src = torch.multinomial(self.shares, batch_size, replacement=True, generator=generator)
        rows, maskable = [], []
        budget = dict.fromkeys(self.row_lengths, 0)  # arithmetic tokens per row length
        for s in src.tolist():
            name = self.names[s]
            stream = self.streams[name]
            if name == "arithmetic" and self.row_lengths:
                pick = 0 if len(self.row_lengths) == 1 else int(
                    torch.randint(len(self.row_lengths), (1,), generator=generator))
                budget[self.row_lengths[pick]] += self.seq_len
                continue
            if name == "arithmetic":
                off = int(self.starts[torch.randint(len(self.starts), (1,), generator=generator)])
            else:
                off = int(torch.randint(len(stream) - self.seq_len, (1,), generator=generator))
            rows.append(stream[off:off + self.seq_len].long())
            if self.answer_only and name == "arithmetic":
                maskable.append(self.answer_positions(rows[-1]))
            else:
                maskable.append(torch.ones(self.seq_len, dtype=torch.bool))
        groups = [(torch.stack(rows), torch.stack(maskable))] if rows else []
        for length, tokens in budget.items():
            n = tokens // length
            if tokens % length and float(torch.rand((), generator=generator)) < (tokens % length) / length:
                n += 1  # stochastic rounding keeps the expected arithmetic share for rows > seq_len
            if n:
                groups.append(self.problem_rows(n, length, generator))
        return groups


# ----------------------------------------------------------------------------------------------- loss

def masked_diffusion_loss(model: torch.nn.Module, x0: torch.Tensor, mask_id: int, generator: torch.Generator,
                          eps: float = 1e-3, maskable: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """LLaDA pre-training loss (models.md 4.1) on clean windows `x0` [B, L].

    `maskable` [B, L] (optional) marks the tokens that may be masked; the others are always visible
    (LLaDA SFT's never-masked prompt).

    Returns:
        (loss, stats): the 1/p_mask-weighted CE summed over masked tokens / (B * L), and the
        unweighted mean CE and accuracy over masked tokens (for logs).
    """
    B, L = x0.shape
    t = torch.rand(B, generator=generator, device=x0.device)
    p_mask = ((1 - eps) * t + eps)[:, None].expand(B, L)
    masked = torch.rand(B, L, generator=generator, device=x0.device) < p_mask
    if maskable is not None:
        masked &= maskable
    if model.spec.shift_logits:
        masked[:, 0] = False  # Dream: the first position has no left neighbour to predict it
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    logits = model.spec.align_logits(model(xt))
    ce = F.cross_entropy(logits[masked].float(), x0[masked], reduction="none")
    loss = (ce / p_mask[masked]).sum() / (B * L)
    with torch.no_grad():
        acc = (logits[masked].argmax(-1) == x0[masked]).float().mean() if ce.numel() else torch.tensor(0.0)
        stats = {"ce": float(ce.mean()) if ce.numel() else 0.0, "acc": float(acc), "n_masked": int(masked.sum())}
    return loss, stats


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup for `warmup_steps`, then cosine decay to lr * min_lr_ratio at `steps` (flat after)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on embeddings, norms, biases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and "wte" not in name and "embed_tokens" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=1e-8)


# ----------------------------------------------------------------------------------------------- loop

def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class RunOptions:
    """How a run executes, not what it learns: where, for how long, and how often it saves and logs.

    Attributes:
        device: "cpu" or "cuda". On a GPU the windows are drawn in a prefetch thread with the seeded CPU
            generator and the masks with a seeded generator on the device (one stream each, so a run stays
            deterministic for its seed, up to the device's float reductions; a resume there skips the few
            batches that were drawn ahead).
        bf16: run the forward and backward under bf16 autocast (weights and optimizer stay fp32); a GEMM is
            2-4x faster where the processor has bf16 units (AVX-512 BF16, AMX, any recent GPU).
        minutes: wall-clock budget after which training stops cleanly and saves.
        checkpoint_minutes / log_every: save and log cadence.
        until_step: stop and save at this step (to replay a multi-phase run).
    """

    device: str = "cpu"
    bf16: bool = False
    minutes: float = 60.0
    checkpoint_minutes: float = 5.0
    log_every: int = 20
    until_step: int | None = None


def _resolve_run(out: Path, cfg: TrainConfig, recipe: CorpusRecipe, resume: bool, steps: int | None,
                 mix: tuple[float, float, float] | None) -> tuple[TrainConfig, CorpusRecipe, dict | None, dict]:
    """The run's settings (saved ones on resume, `steps` and `mix` applied), its saved state, and its data."""
    state = None
    if resume:
        state = torch.load(out / "ckpt.pt", weights_only=False, map_location="cpu")
        saved = {**state["train_config"], "betas": tuple(state["train_config"]["betas"])}
        saved["arithmetic_row_lengths"] = tuple(saved.get("arithmetic_row_lengths", ()))
        cfg = TrainConfig(**{**saved, "steps": steps or saved["steps"]})
        recipe = CorpusRecipe(**state["recipe"])
    if mix is not None:
        recipe = dataclasses.replace(recipe, code=mix[0], arithmetic=mix[1], english=mix[2])
    data_path = out / "data.pt"
    if data_path.exists():
        data = torch.load(data_path, weights_only=False)
    else:
        _log("building corpus and tokenizer ...")
        data = prepare_data(cfg, recipe)
        _save(data_path, data)
        _log(f"data: {json.dumps(data['summary'])[:400]} tokens: "
             f"{ {k: len(v) for k, v in data['streams'].items()} }")
    return cfg, recipe, state, data


def _prefetch(sample, depth: int = 4):
    """Yield `sample()` results drawn ahead in a daemon thread (the GPU step overlaps the CPU sampling)."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)

    def work():
        while True:
            q.put(sample())

    threading.Thread(target=work, daemon=True).start()
    while True:
        yield q.get()


def _batch_loss(model, groups, mask_id: int, mask_gen: torch.Generator, cfg: TrainConfig, opts: RunOptions):
    """Token-weighted loss over a batch's row-shape groups, and the masked-token CE / accuracy over all of them."""
    n_tok = sum(x.numel() for x, _ in groups)
    loss, ce_sum, acc_sum, n_masked = 0.0, 0.0, 0.0, 0
    for x0, maskable in groups:  # every token weighs the same across row shapes
        x0, maskable = x0.to(opts.device, non_blocking=True), maskable.to(opts.device, non_blocking=True)
        with torch.autocast(torch.device(opts.device).type, dtype=torch.bfloat16, enabled=opts.bf16):
            part, st = masked_diffusion_loss(model, x0, mask_id, mask_gen, cfg.eps, maskable)
        loss = loss + part * (x0.numel() / n_tok)
        ce_sum += st["ce"] * st["n_masked"]
        acc_sum += st["acc"] * st["n_masked"]
        n_masked += st["n_masked"]
    return loss, n_tok, ce_sum / max(n_masked, 1), acc_sum / max(n_masked, 1)


@dataclasses.dataclass
class _Run:
    """The mutable state of one training run (what a checkpoint saves)."""

    out: Path
    cfg: TrainConfig
    recipe: CorpusRecipe
    data: dict
    config: dict
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator
    mask_gen: torch.Generator
    step: int = 0
    elapsed: float = 0.0
    tokens: int = 0
    mix_history: list = dataclasses.field(default_factory=list)
    t_start: float = dataclasses.field(default_factory=time.time)

    def save(self, opts: RunOptions) -> None:
        """ckpt.pt (weights, optimizer, RNG states, progress) and run.json (settings and progress)."""
        trained = self.elapsed + time.time() - self.t_start
        cfg, recipe = dataclasses.asdict(self.cfg), dataclasses.asdict(self.recipe)
        _save(self.out / "ckpt.pt", {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.opt.state_dict(), "rng": self.gen.get_state(),
            **({"mask_rng": self.mask_gen.get_state()} if self.mask_gen is not self.gen else {}),
            "step": self.step, "elapsed_s": trained, "tokens": self.tokens, "train_config": cfg, "recipe": recipe,
            "model_config": self.config, "mix_history": self.mix_history})
        (self.out / "run.json").write_text(json.dumps({
            "train_config": cfg, "recipe": recipe, "step": self.step, "trained_minutes": round(trained / 60, 2),
            "tokens": self.tokens, "mix_history": self.mix_history,
            "params": sum(p.numel() for p in self.model.parameters()), "device": opts.device, "bf16": opts.bf16,
            "threads": torch.get_num_threads(), "corpus": self.data["summary"]}, indent=2))
        _log(f"checkpoint at step {self.step} -> {self.out / 'ckpt.pt'}")


def _start(out: Path, cfg: TrainConfig, recipe: CorpusRecipe, state: dict | None, data: dict,
           opts: RunOptions) -> _Run:
    """The model, optimizer and generators of a run: fresh (seeded) or restored from `state`."""
    config = model_config(cfg, data["ids"])
    model = build_model(config, dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(cfg.seed)
    # the CPU run draws windows and masks from one generator (bit-for-bit the runs before devices existed)
    mask_gen = gen if opts.device == "cpu" else torch.Generator(opts.device).manual_seed(cfg.seed + 1)
    if state is not None:
        model.load_state_dict(state["model"])
        gen.set_state(state["rng"])
        if "mask_rng" in state and mask_gen is not gen:
            mask_gen.set_state(state["mask_rng"])
    else:
        init_weights(model, cfg.n_layers, gen)
    model.to(opts.device).train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = make_optimizer(model, cfg)
    run = _Run(out, cfg, recipe, data, config, model, opt, gen, mask_gen)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        run.step, run.elapsed, run.tokens = state["step"], state["elapsed_s"], state["tokens"]
        run.mix_history = state.get("mix_history", [[0, [recipe.code, recipe.arithmetic, recipe.english], False]])
        _log(f"resumed at step {run.step} ({run.elapsed / 60:.1f} min trained)")
    return run


def _loop(run: _Run, batches, opts: RunOptions) -> None:
    """Optimizer steps until the schedule, `until_step` or the wall-clock budget ends; logs and checkpoints."""
    cfg = run.cfg
    last_ckpt = t_window = time.time()
    window = [0.0, 0.0, 0.0, 0]  # loss, masked CE, masked accuracy, steps since the last log line
    while run.step < min(cfg.steps, opts.until_step or cfg.steps):
        if time.time() - run.t_start > opts.minutes * 60:
            _log(f"wall-clock budget of {opts.minutes} min reached")
            break
        for g in run.opt.param_groups:
            g["lr"] = lr_at(run.step, cfg)
        loss, n_tok, ce, acc = _batch_loss(run.model, next(batches), run.model.spec.mask_id, run.mask_gen, cfg, opts)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
        run.opt.step()
        run.step += 1
        run.tokens += n_tok
        window = [window[0] + float(loss.detach()), window[1] + ce, window[2] + acc, window[3] + 1]
        if run.step % opts.log_every == 0:
            n = window[3]
            _log(f"step {run.step} loss {window[0] / n:.3f} masked-ce {window[1] / n:.3f} "
                 f"masked-acc {window[2] / n:.3f} lr {lr_at(run.step, cfg):.2e} gnorm {float(gnorm):.2f} "
                 f"tok/s {n * n_tok / (time.time() - t_window):.0f}")
            window, t_window = [0.0, 0.0, 0.0, 0], time.time()
        if time.time() - last_ckpt > opts.checkpoint_minutes * 60:
            run.save(opts)
            last_ckpt = time.time()


def train(out: str | Path, cfg: TrainConfig, recipe: CorpusRecipe = CorpusRecipe(), resume: bool = False,
          steps: int | None = None, mix: tuple[float, float, float] | None = None,
          answer_only: bool | None = None, arithmetic_rows: int | None = None,
          arithmetic_row_lengths: tuple[int, ...] | None = None, opts: RunOptions = RunOptions()) -> Path:
    """Train (or resume) a run in folder `out` until `cfg.steps` or the wall-clock budget; return the checkpoint path.

    On `resume` the saved settings are used, except the schedule length when `steps` is given
    (to lengthen, or shorten, the cosine decay of a resumed run). `mix` = (code, arithmetic, english)
    window shares replaces the recipe's from the current step on (a curriculum; recorded in
    `mix_history` of run.json as [step, shares, arithmetic_answer_only]); so does `answer_only`, which
    sets `arithmetic_answer_only`. `opts.until_step` stops (and saves) at that step, so a run that changed
    settings part-way can be replayed phase by phase.

    `out` holds data.pt (tokenizer + token streams, built once), ckpt.pt (model, optimizer, step,
    RNG state) and run.json (settings and progress).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    cfg, recipe, state, data = _resolve_run(out, cfg, recipe, resume, steps, mix)
    run = _start(out, cfg, recipe, state, data, opts)
    run.t_start = t_start
    n_params = sum(p.numel() for p in run.model.parameters())
    _log(f"{cfg.family}: {n_params / 1e6:.2f}M params, {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len}, "
         f"{opts.device}{' bf16' if opts.bf16 else ''}, threads {torch.get_num_threads()}")
    run.cfg = cfg = dataclasses.replace(cfg, **{k: v for k, v in {
        "arithmetic_answer_only": answer_only, "arithmetic_rows": arithmetic_rows,
        "arithmetic_row_lengths": None if arithmetic_row_lengths is None else tuple(arithmetic_row_lengths),
    }.items() if v is not None})
    rows = list(cfg.arithmetic_row_lengths) or cfg.arithmetic_rows
    entry = [[recipe.code, recipe.arithmetic, recipe.english], cfg.arithmetic_answer_only, rows]
    if not run.mix_history or run.mix_history[-1][1:] != entry:
        run.mix_history.append([run.step, *entry])
    sampler = WindowSampler(data, recipe, cfg.seq_len, cfg.arithmetic_answer_only,
                            cfg.arithmetic_row_lengths or cfg.arithmetic_rows)
    draw = lambda: sampler.sample(cfg.batch_size, run.gen)  # noqa: E731
    _loop(run, (draw() for _ in iter(int, 1)) if opts.device == "cpu" else _prefetch(draw), opts)
    run.save(opts)
    _log(f"done: step {run.step}, {run.tokens / 1e6:.1f}M tokens")
    return out / "ckpt.pt"


def export(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the run's current weights as a bf16 checkpoint in the released layout, with tokenizer files."""
    run_dir = Path(run_dir)
    state = torch.load(run_dir / "ckpt.pt", weights_only=False, map_location="cpu")
    data = torch.load(run_dir / "data.pt", weights_only=False)
    config = state["model_config"]
    model = build_model(config, dtype=torch.float32, device="cpu")
    model.load_state_dict(state["model"])
    tensors = ((name, p.detach()) for name, p in model.named_parameters())
    return write_checkpoint(out_dir, config, tensors, dtype=torch.bfloat16, extra_files=data["tokenizer_files"])


def main(argv: list[str] | None = None) -> int:
    """CLI: train, resume or export a default model run."""
    ap = argparse.ArgumentParser(prog="python -m dllm_export.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=sorted(PRESETS), default="llada")
    ap.add_argument("--out", required=True, help="run folder (data.pt, ckpt.pt, run.json)")
    ap.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget; stops cleanly and saves")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    ap.add_argument("--steps", type=int, help="schedule length (default: the preset's; with --resume, the run's)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--mix", type=lambda v: tuple(float(x) for x in v.split(",")),
                    help="code,arithmetic,english window shares (overrides the recipe from the current step on)")
    ap.add_argument("--answer-only-arithmetic", action="store_true", default=None,
                    help="from now on mask only the answers of arithmetic lines (LLaDA SFT: prompt never masked)")
    ap.add_argument("--arithmetic-rows", type=int, default=None,
                    help="from now on train arithmetic as one problem per N-token row padded with EOS (0 = windows)")
    ap.add_argument("--arithmetic-row-lengths", type=lambda v: tuple(int(x) for x in v.split(",")),
                    help="from now on draw each arithmetic window's row length from these (e.g. 16,64,288)")
    ap.add_argument("--until-step", type=int, help="stop and save at this step (to replay a multi-phase run)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (a GPU trains a bundled model in minutes)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (hosts with bf16 units: AVX-512 BF16, AMX, GPUs)")
    ap.add_argument("--checkpoint-minutes", type=float, default=5.0)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--export", metavar="DIR", help="write OUT's checkpoint as a bf16 model folder and exit")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.export:
        _log(f"exported to {export(args.out, args.export)}")
        return 0
    overrides = {k: v for k, v in {"steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                                   "lr": args.lr, "seed": args.seed}.items() if v is not None}
    cfg = dataclasses.replace(PRESETS[args.family], **overrides)
    opts = RunOptions(device=args.device, bf16=args.bf16, minutes=args.minutes,
                      checkpoint_minutes=args.checkpoint_minutes, log_every=args.log_every, until_step=args.until_step)
    train(args.out, cfg, resume=args.resume, steps=args.steps, mix=args.mix, answer_only=args.answer_only_arithmetic,
          arithmetic_rows=args.arithmetic_rows, arithmetic_row_lengths=args.arithmetic_row_lengths, opts=opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
