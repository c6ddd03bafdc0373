"""Fidelity of a quantized model or artifact to its float source, measured where a dLLM predicts.

llama.cpp judges a quantization by the KL divergence of its next-token distributions to the
float model's (`llama-perplexity --kl-divergence`). A dLLM predicts masked positions, and how
many are masked changes the task: near t = 1 it guesses from the prompt alone, near t = 0 it
fills single gaps. So the same held-out windows are masked at several ratios, and at every
masked position the candidate's distribution Q is compared with the float reference's P:

* KL(P || Q) (nats): mean with its standard error, and the 99th percentile;
* top-1 agreement: argmax Q == argmax P;
* logit SQNR (dB): 10 log10(||z_P||^2 / ||z_P - z_Q||^2), logits centred per position (a softmax
  is unchanged by a shift, so a runtime that adds a constant loses nothing);
* the cross-entropy of the true tokens, candidate minus reference (nats per masked token).

The ratio sets: fixed t (exactly round(t * (L - 1)) masked positions per window, position 0
always visible, so Dream's shifted logits have a context), and "decode": canvases as the
unmasking loop visits them (a visible prompt, later blocks all masked, the current block partly),
at mask ratios measured from the loop's commit steps on held-out prompts (`decode_mask_ratios`).
A stratified-uniform set gives the LLaDA ELBO (sum_masked log p / t) of both models: its
difference is the bound's change in bits per token, with a paired standard error.

Standard errors treat a window as the unit (positions of one window are correlated): ratio
estimators over windows. Both models see the same canvases, so two candidates compare pairwise
(`paired_difference`), which is what makes small differences (GPTQ against RTN) significant.
Everything is deterministic for a seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..checks import check_fields
from ..errors import InputError
from ..quant.calibrate import decode_canvas_masks, stratified_quantiles
from ..runtime.backends import as_backend

DECODE = "decode"


@dataclass(frozen=True)
class FidelityConfig:
    """What is measured.

    Attributes:
        ratios: mask ratios in (0, 1], and/or "decode" (the loop's measured distribution).
        windows: held-out windows per ratio set.
        window: tokens per window (capped at the model's context).
        elbo: also the ELBO difference on a stratified-uniform set of the same windows.
        gen_length, block_length: the decoding that "decode" canvases imitate (prompt = the rest of
            the window); its ratios are measured on `decode_prompts` held-out prompts.
        decode_prompts: prompts decoded by the reference to measure the ratios.
        batch: canvases per forward.
        seed: canvases and masks derive from it.
    """

    ratios: tuple = (0.15, 0.5, 0.85, DECODE)
    windows: int = 16
    window: int = 128
    elbo: bool = True
    gen_length: int = 64
    block_length: int = 32
    decode_prompts: int = 4
    batch: int = 8
    seed: int = 0

    def __post_init__(self):
        check_fields(self, ints=("windows", "window", "gen_length", "block_length", "decode_prompts", "batch", "seed"),
                     bools=("elbo",), seqs=("ratios",))
        for r in self.ratios:
            if r != DECODE and not (isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1):
                raise InputError(f"fidelity mask ratio must lie in (0, 1] or be 'decode', got {r!r}")
        if not self.ratios:
            raise InputError("fidelity needs at least one mask ratio")
        if self.windows < 2 or self.window < 8:
            raise InputError(f"fidelity needs windows >= 2 and window >= 8 (got {self.windows}, {self.window})")
        if not 0 < self.block_length <= self.gen_length < self.window:
            raise InputError(f"fidelity decode canvases need 0 < block_length <= gen_length < window (got "
                             f"{self.block_length}, {self.gen_length}, {self.window})")

    @staticmethod
    def parse_ratios(text: str) -> tuple:
        """'0.15,0.5,decode' -> (0.15, 0.5, 'decode'), with a clear error for anything else."""
        out = []
        for part in (p.strip() for p in text.split(",") if p.strip()):
            if part == DECODE:
                out.append(DECODE)
                continue
            try:
                out.append(float(part))
            except ValueError:
                raise InputError(f"fidelity mask ratio must be a number in (0, 1] or 'decode', got {part!r}") from None
        return tuple(out)


def held_out_stream(tokenizer, eos_id: int | None) -> list[int]:
    """Token ids of the held-out stdlib modules (code with English docstrings), EOS between them."""
    from ..corpus import code_texts

    stream: list[int] = []
    for _, text in code_texts(held_out=True):
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos_id] if eos_id is not None else [])
    return stream


def held_out_windows(stream: list[int], n: int, length: int) -> torch.Tensor:
    """n windows [n, length] spread evenly over the stream (so they cover many modules)."""
    if len(stream) < length + n:
        raise InputError(f"held-out text has {len(stream)} tokens, too few for {n} windows of {length}")
    data = torch.tensor(stream, dtype=torch.long)
    starts = torch.linspace(0, len(stream) - length, n).long()
    return torch.stack([data[s:s + length] for s in starts.tolist()])


@torch.no_grad()
def decode_mask_ratios(backend, prompts: list[list[int]], gen_length: int, block_length: int,
                       steps: int | None = None, threshold: float | None = None) -> list[float]:
    """Mask ratios of the generated region that the unmasking loop feeds the model: for each step s
    of each decoded prompt, the fraction of positions whose commit step is >= s (still masked)."""
    from ..runtime.loop import generate

    out = generate(as_backend(backend), prompts, gen_length=gen_length, steps=steps or gen_length,
                   block_length=block_length, threshold=threshold)
    ratios = []
    for row in out.commit_step:
        row = torch.where(row < 0, torch.full_like(row, 1 << 30), row)  # never committed: masked throughout
        for s in range(out.nfe):
            r = float((row >= s).float().mean())
            if r > 0:
                ratios.append(r)
    return ratios


_quantiles = stratified_quantiles


def _fixed_masks(n: int, length: int, t: float, g: torch.Generator) -> torch.Tensor:
    """Exactly round(t * (length - 1)) masked positions per row, never position 0."""
    k = max(1, round(t * (length - 1)))
    rank = torch.rand(n, length - 1, generator=g).argsort(1).argsort(1)
    return torch.cat([torch.zeros(n, 1, dtype=torch.bool), rank < k], 1)


_decode_masks = decode_canvas_masks  # the layout lives with calibration, which builds the same canvases


@dataclass
class FidelityReference:
    """The canvases and the reference's logits at their masked positions, reusable for many
    candidates (one forward of the float model per canvas, however many cells are scored).

    Attributes:
        sets: name -> {"ids": canvases [N, L], "mask": bool [N, L], "target": [N, L] true ids,
            "logits": reference logits at the masked positions [M, V] (row-major over the mask),
            "t": per-window mask ratio [N] (ELBO set only)}.
        config: the FidelityConfig.
        decode_ratios: the measured ratios behind the "decode" set.
    """

    sets: dict
    config: FidelityConfig
    decode_ratios: list[float] = field(default_factory=list)
    family: str | None = None  # the reference's: a candidate of another family would score its own tokenizer


def _logits_at(backend, ids: torch.Tensor, mask: torch.Tensor, batch: int) -> torch.Tensor:
    """Aligned float32 logits of `backend` at the masked positions of `ids` (row-major)."""
    out = []
    for i in range(0, ids.shape[0], batch):
        lg = backend.spec.align_logits(backend.forward(ids[i:i + batch]))
        out.append(lg[mask[i:i + batch]].float())
    return torch.cat(out)


def _decode_prompts(stream: list[int], n: int, prompt_length: int, window: int) -> list[list[int]]:
    """Held-out prompts for measuring decode ratios: from the stream's second half (other text than
    the scored windows) when it is long enough."""
    return held_out_windows(stream[len(stream) // 2 + 1:] if len(stream) > 4 * window else stream,
                            n, prompt_length).tolist()


def calibration_decode_ratios(model, tokenizer, n_prompts: int = 4, prompt_length: int = 64, gen_length: int = 128,
                              block_length: int = 32, threshold: float | None = None) -> list[float]:
    """The mask ratios the unmasking loop of `model` visits on held-out prompts, for timestep-aware
    calibration (`CalibConfig(mask="decode", decode_ratios=...)`): 64 stratified quantiles."""
    be = as_backend(model)
    stream = held_out_stream(tokenizer, be.spec.eos_id)
    prompts = _decode_prompts(stream, n_prompts, prompt_length, prompt_length + gen_length)
    return stratified_quantiles(decode_mask_ratios(be, prompts, gen_length, block_length, threshold=threshold), 64)


@torch.no_grad()
def build_reference(reference, tokenizer, cfg: FidelityConfig = FidelityConfig()) -> FidelityReference:
    """Canvases from held-out text and the reference model's (or backend's) logits on them."""
    be = as_backend(reference)
    spec = be.spec
    L = min(cfg.window, be.max_length)
    stream = held_out_stream(tokenizer, spec.eos_id)
    windows = held_out_windows(stream, cfg.windows, L)
    g = torch.Generator().manual_seed(cfg.seed)
    sets: dict = {}
    decode_ratios: list[float] = []
    for r in cfg.ratios:
        if r == DECODE:
            gen = min(cfg.gen_length, L - 1)
            block = min(cfg.block_length, gen)
            # the prompts: held-out windows other than the scored ones, cut to the visible prompt
            prompts = _decode_prompts(stream, cfg.decode_prompts, L - gen, L)
            decode_ratios = decode_mask_ratios(be, prompts, gen, block)
            mask = _decode_masks(_quantiles(decode_ratios, cfg.windows), L, gen, block, g)
            name = DECODE
        else:
            mask = _fixed_masks(cfg.windows, L, float(r), g)
            name = f"t={float(r):g}"
        sets[name] = {"mask": mask}
    if cfg.elbo:
        N = cfg.windows
        t = ((torch.arange(N) + torch.rand(N, generator=g)) / N).clamp(min=1e-3)  # stratified U(0, 1)
        mask = torch.rand(N, L, generator=g) < t[:, None]
        mask[:, 0] = False
        mask[torch.arange(N), 1 + torch.randint(0, L - 1, (N,), generator=g)] = True  # at least one
        sets["elbo"] = {"mask": mask, "t": t.double()}
    for s in sets.values():
        s["target"] = windows
        s["ids"] = windows.masked_fill(s["mask"], spec.mask_id)
        s["logits"] = _logits_at(be, s["ids"], s["mask"], cfg.batch)
    return FidelityReference(sets=sets, config=cfg, decode_ratios=decode_ratios, family=spec.family)


def _cluster(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> tuple[float, float, list[float], list[int]]:
    """Mean of per-position `values` with its standard error over rows (a ratio estimator: rows are
    the independent units); also the per-row sums and counts (for paired comparisons)."""
    sums = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows, values.double())
    counts = torch.zeros(n_rows, dtype=torch.float64).index_add_(0, rows, torch.ones_like(values, dtype=torch.float64))
    mean = float(sums.sum() / counts.sum())
    resid = sums - mean * counts
    se = math.sqrt(float(resid.pow(2).sum()) * n_rows / max(n_rows - 1, 1)) / float(counts.sum())
    return mean, se, sums.tolist(), counts.long().tolist()


def _position_metrics(ref_logits: torch.Tensor, cand_logits: torch.Tensor, target: torch.Tensor) -> dict:
    """Per masked position: KL(P || Q), top-1 agreement, CE difference; plus SQNR terms."""
    lp = F.log_softmax(ref_logits.double(), -1)
    lq = F.log_softmax(cand_logits.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp(min=0)  # >= 0 up to rounding
    agree = (ref_logits.argmax(-1) == cand_logits.argmax(-1)).double()
    dce = F.nll_loss(lq, target, reduction="none") - F.nll_loss(lp, target, reduction="none")
    zp = ref_logits.double() - ref_logits.double().mean(-1, keepdim=True)
    zq = cand_logits.double() - cand_logits.double().mean(-1, keepdim=True)
    return {"kl": kl, "agree": agree, "dce": dce, "signal": float(zp.pow(2).sum()),
            "noise": float((zp - zq).pow(2).sum())}


def _sqnr(signal: float, noise: float) -> float:
    return float("inf") if noise == 0 else 10 * math.log10(signal / noise)


@torch.no_grad()
def compare(candidate, ref: FidelityReference) -> dict:
    """Fidelity of `candidate` (a model or any backend) to the reference's logits on its canvases.

    Returns a JSON-ready dict: "summary" (pooled over the ratio sets: kld_mean, kld_se, kld_p99,
    top1, top1_se, sqnr_db, positions; and the ELBO difference elbo_diff_bits +- elbo_diff_se_bits
    per token, candidate minus reference), "sets" (the same per ratio set, with the per-window KL
    sums and counts used by `paired_difference`), and the config.
    """
    be = as_backend(candidate)
    if ref.family is not None and be.spec.family != ref.family:
        raise InputError(f"a {be.spec.family} candidate cannot be scored against a {ref.family} reference "
                         f"(different mask id and tokenizer): pass the float model it was made from")
    cfg = ref.config
    per_set: dict = {}
    pooled_kl, pooled_agree, pooled_rows = [], [], []
    signal = noise = 0.0
    row_offset = 0
    for name, s in ref.sets.items():
        cand = _logits_at(be, s["ids"], s["mask"], cfg.batch)
        if cand.shape != s["logits"].shape:
            raise InputError(f"candidate logits {tuple(cand.shape)} do not match the reference's "
                             f"{tuple(s['logits'].shape)}: a different vocabulary?")
        target = s["target"][s["mask"]]
        rows = s["mask"].nonzero()[:, 0]
        m = _position_metrics(s["logits"], cand, target)
        n = s["ids"].shape[0]
        if name == "elbo":  # LLaDA's bound per window: sum_masked CE / t over the window's scored tokens
            d = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, m["dce"]) / s["t"] / (s["ids"].shape[1] - 1)
            ce_ref = torch.zeros(n, dtype=torch.float64).index_add_(
                0, rows, F.nll_loss(F.log_softmax(s["logits"].double(), -1), target, reduction="none"))
            ref_bits = float((ce_ref / s["t"]).sum() / (n * (s["ids"].shape[1] - 1))) / math.log(2)
            per_set[name] = {"ref_bits_per_token": ref_bits,
                             # ELBO_q - ELBO_p = -(CE_q - CE_p): negative when the candidate is worse
                             "elbo_diff_bits": -float(d.mean()) / math.log(2),
                             "elbo_diff_se_bits": float(d.std(unbiased=True) / math.sqrt(n)) / math.log(2),
                             "window_diff_bits": (-d / math.log(2)).tolist()}
            continue
        kl_mean, kl_se, kl_sums, counts = _cluster(m["kl"], rows, n)
        ag_mean, ag_se, _, _ = _cluster(m["agree"], rows, n)
        dce_mean, dce_se, _, _ = _cluster(m["dce"], rows, n)
        per_set[name] = {"kld_mean": kl_mean, "kld_se": kl_se, "kld_p99": float(torch.quantile(m["kl"], 0.99)),
                         "top1": ag_mean, "top1_se": ag_se, "sqnr_db": _sqnr(m["signal"], m["noise"]),
                         "ce_diff": dce_mean, "ce_diff_se": dce_se, "positions": int(m["kl"].numel()),
                         "window_kld_sum": kl_sums, "window_n": counts}
        pooled_kl.append(m["kl"])
        pooled_agree.append(m["agree"])
        pooled_rows.append(rows + row_offset)
        row_offset += n
        signal += m["signal"]
        noise += m["noise"]
    summary: dict = {}
    if pooled_kl:
        kl, agree, rows = torch.cat(pooled_kl), torch.cat(pooled_agree), torch.cat(pooled_rows)
        kl_mean, kl_se, _, _ = _cluster(kl, rows, row_offset)
        ag_mean, ag_se, _, _ = _cluster(agree, rows, row_offset)
        summary = {"kld_mean": kl_mean, "kld_se": kl_se, "kld_p99": float(torch.quantile(kl, 0.99)),
                   "top1": ag_mean, "top1_se": ag_se, "sqnr_db": _sqnr(signal, noise), "positions": int(kl.numel())}
    if "elbo" in per_set:
        summary.update({k: per_set["elbo"][k] for k in ("elbo_diff_bits", "elbo_diff_se_bits", "ref_bits_per_token")})
    cfg_d = asdict(cfg)
    cfg_d["ratios"] = list(cfg.ratios)
    return {"summary": summary, "sets": per_set, "config": cfg_d,
            "decode_ratio_mean": (sum(ref.decode_ratios) / len(ref.decode_ratios)) if ref.decode_ratios else None}


def fidelity(candidate, reference, tokenizer, cfg: FidelityConfig = FidelityConfig()) -> dict:
    """KL divergence, top-1 agreement, logit SQNR and ELBO difference of `candidate` against
    `reference` (models or backends of any runtime) on masked held-out canvases; see `compare`."""
    return compare(candidate, build_reference(reference, tokenizer, cfg))


def paired_difference(a: dict, b: dict, set_name: str | None = None) -> dict:
    """Mean KLD of result `a` minus result `b` (both from `compare` against the same reference),
    with the paired standard error over windows: the same canvases cancel most of the noise.

    `set_name` picks one ratio set; None pools them all. Returns {"diff", "se", "z", "significant"}
    (|z| > 1.96: two-sided at 95%).
    """
    names = [set_name] if set_name else [k for k in a["sets"] if k != "elbo"]
    da, db, n = [], [], []
    for k in names:
        if k not in a["sets"] or k not in b["sets"]:
            raise InputError(f"ratio set {k!r} missing from one of the results")
        sa, sb = a["sets"][k], b["sets"][k]
        if sa["window_n"] != sb["window_n"]:
            raise InputError(f"ratio set {k!r}: the results were measured on different canvases")
        da += sa["window_kld_sum"]
        db += sb["window_kld_sum"]
        n += sa["window_n"]
    d = torch.tensor(da, dtype=torch.float64) - torch.tensor(db, dtype=torch.float64)
    cnt = torch.tensor(n, dtype=torch.float64)
    mean = float(d.sum() / cnt.sum())
    rows = len(n)
    se = math.sqrt(float((d - mean * cnt).pow(2).sum()) * rows / max(rows - 1, 1)) / float(cnt.sum())
    z = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(float("inf"), mean))
    return {"diff": mean, "se": se, "z": z, "significant": abs(z) > 1.96}


def to_markdown(res: dict) -> str:
    """A table of one fidelity result: one row per ratio set and the pooled summary."""
    lines = ["| set | positions | KLD mean +- se | KLD p99 | top-1 agree | logit SQNR dB | dCE nats |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in res["sets"].items():
        if name == "elbo":
            continue
        lines.append(f"| {name} | {s['positions']} | {s['kld_mean']:.4g} +- {s['kld_se']:.2g} | {s['kld_p99']:.4g} | "
                     f"{s['top1']:.4f} | {s['sqnr_db']:.2f} | {s['ce_diff']:+.4g} |")
    sm = res["summary"]
    if "kld_mean" in sm:
        lines.append(f"| **all** | {sm['positions']} | {sm['kld_mean']:.4g} +- {sm['kld_se']:.2g} | {sm['kld_p99']:.4g} | "
                     f"{sm['top1']:.4f} | {sm['sqnr_db']:.2f} | |")
    if "elbo_diff_bits" in sm:
        lines += ["", f"ELBO difference (candidate - reference): {sm['elbo_diff_bits']:+.4f} +- "
                      f"{sm['elbo_diff_se_bits']:.4f} bits/token (reference {sm['ref_bits_per_token']:.3f} bits/token)"]
    return "\n".join(lines) + "\n"
