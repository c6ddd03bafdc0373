"""Calibration data, mask-aware by default: sequences as a dLLM sees them while decoding.

Each calibration window keeps a visible prefix and masks the rest with probability t, with t
stratified over the set (t_i = (i + u_i) / N): the activations statistics then cover the whole
denoising trajectory, from all-masked canvases to nearly-clean ones. `mask="none"` gives the
plain-text calibration of earlier PTQ studies, for comparison. `mask="decode"` is timestep-aware
(DLLMQuant): canvases laid out as semi-autoregressive decoding feeds the model (a visible prompt,
later blocks all masked, the current block partly), at mask ratios drawn from those the loop
actually visits (`decode_ratios`, measured from its commit steps by `eval.fidelity.decode_mask_ratios`).
Text comes from the bundled corpus or a local .txt / .jsonl file; never from a download.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checks import check_fields, is_real
from ..errors import InputError


MASKS = ("uniform", "decode", "none")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration recipe (recorded in the manifest).

    Attributes:
        source: "default" (the bundled corpus recipe) or a path to a .txt / .jsonl file
            (JSONL: one object per line with a "text" field).
        n_samples: number of windows.
        seq_len: tokens per window (capped at the model's context).
        mask: "uniform" (mask ratio t ~ stratified U(0, 1) after a visible prefix), "decode"
            (decoding's canvases at the measured `decode_ratios`) or "none".
        max_prefix: the visible prefix is U(0, max_prefix) of the window.
        seed: everything random here derives from it.
        decode_ratios: mask="decode": mask ratios of the generated region the loop visited.
        gen_length, block_length: mask="decode": the decoding the canvases imitate (the prompt is
            the rest of the window).
    """

    source: str = "default"
    n_samples: int = 64
    seq_len: int = 256
    mask: str = "uniform"
    max_prefix: float = 0.5
    seed: int = 0
    decode_ratios: tuple[float, ...] = ()
    gen_length: int = 128
    block_length: int = 32

    def __post_init__(self):
        check_fields(self, ints=("n_samples", "seq_len", "seed", "gen_length", "block_length"), reals=("max_prefix",),
                     strs=("source", "mask"), seqs=("decode_ratios",))
        if not all(map(is_real, self.decode_ratios)):
            raise InputError(f"decode mask ratios must be numbers, got {self.decode_ratios!r:.60}")
        if not 0 <= self.max_prefix <= 1:  # a fraction of the window (2.0 left nothing to mask: plain-text calibration)
            raise InputError(f"max_prefix must lie in [0, 1], got {self.max_prefix}")
        if self.mask not in MASKS:
            raise InputError(f"calibration mask must be one of {', '.join(MASKS)}, got {self.mask!r}")
        object.__setattr__(self, "decode_ratios", tuple(float(r) for r in self.decode_ratios))
        if self.mask == "decode" and not self.decode_ratios:
            raise InputError("calibration mask 'decode' needs the decode mask ratios measured from the loop")
        if any(not 0 < r <= 1 for r in self.decode_ratios):
            raise InputError("decode mask ratios must lie in (0, 1]")
        if not 0 < self.block_length <= self.gen_length:
            raise InputError(f"calibration needs 0 < block_length <= gen_length (got {self.block_length}, "
                             f"{self.gen_length})")
        if self.n_samples < 1 or self.seq_len < 8:
            raise InputError(f"calibration needs n_samples >= 1 and seq_len >= 8 (got {self.n_samples}, {self.seq_len})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["decode_ratios"] = list(self.decode_ratios)
        return d


def stratified_quantiles(values, n: int) -> list[float]:
    """n stratified quantiles (midpoints) of an empirical distribution: a deterministic sample."""
    v = torch.tensor(sorted(values), dtype=torch.float64)
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.quantile(v, q).tolist()


def decode_canvas_masks(ratios: list[float], length: int, gen_length: int, block_length: int,
                        g: torch.Generator) -> torch.Tensor:
    """Masks [len(ratios), length] of canvases as semi-autoregressive decoding sees them: a visible
    prompt (the first length - gen_length tokens), then at mask ratio r of the generated region its
    last whole blocks all masked and the current block masked at random positions."""
    masks = torch.zeros(len(ratios), length, dtype=torch.bool)
    P = length - gen_length
    for i, r in enumerate(ratios):
        m = max(1, round(r * gen_length))
        full = (m // block_length) * block_length  # blocks not started yet
        masks[i, length - full:] = True
        part = m - full
        if part:
            start = max(length - full - block_length, P)  # the current block
            width = length - full - start
            pick = torch.randperm(width, generator=g)[:part]
            masks[i, start + pick] = True
    return masks


DEFAULT_ARITHMETIC_LINES = 20_000  # of the training stream's arithmetic: a sample beside the code and English


@functools.lru_cache(maxsize=1)
def _default_texts() -> tuple[str, ...]:
    """The bundled corpus recipe's training texts (built once per process: it reads the stdlib); only
    the sources calibration reads, not the whole corpus."""
    from ..corpus import arithmetic_lines, code_texts, english_sentences

    code = [t for _, t in code_texts(held_out=False)]
    english, arithmetic = english_sentences(code), arithmetic_lines(DEFAULT_ARITHMETIC_LINES)
    # code, then English and arithmetic in chunks of similar size, so a seeded document order mixes them
    chunk = lambda lines, n: ["\n".join(lines[i:i + n]) for i in range(0, len(lines), n)]  # noqa: E731
    return tuple(code + chunk(english, 200) + chunk(arithmetic, 1000))


def calibration_texts(source: str) -> list[str]:
    """The raw texts of a calibration source."""
    if source == "default":
        return list(_default_texts())
    path = Path(source)
    if not path.is_file():
        raise InputError(f"calibration file not found: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")  # a stray bad byte in a text file is tolerated
    # a binary file (model.onnx.data, an archive) calibrated on its bytes without a word
    if "\x00" in raw or raw.count("\ufffd") > 0.1 * len(raw):
        raise InputError(f"calibration file {path} is not UTF-8 text (a binary file?)")
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{path}:{i}: expected a JSON object with a 'text' field") from None
    else:
        texts = [raw]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise InputError(f"calibration file is empty: {path}")
    return texts


def calibration_ids(tokenizer, spec, cfg: CalibConfig, max_len: int) -> tuple[torch.Tensor, dict]:
    """Token windows [n_samples, seq_len] for calibration, masked as configured.

    Returns:
        (ids, summary) where summary records the realised mask ratios and prefix lengths.
    """
    L = min(cfg.seq_len, max_len)
    eos = spec.eos_id if spec.eos_id is not None else spec.pad_id
    texts = calibration_texts(cfg.source)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    stream: list[int] = []
    for i in order:  # documents in a seeded order, until there is twice what the windows need
        stream.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= 2 * cfg.n_samples * L:
            break
    if len(stream) < L:
        raise InputError(f"calibration text has {len(stream)} tokens, fewer than one window of {L}")
    data = torch.tensor(stream, dtype=torch.long)
    g = torch.Generator().manual_seed(cfg.seed)
    starts = torch.randint(0, len(stream) - L + 1, (cfg.n_samples,), generator=g)
    ids = torch.stack([data[s:s + L] for s in starts.tolist()])
    summary = {"windows": cfg.n_samples, "seq_len": L, "tokens": cfg.n_samples * L}
    if cfg.mask == "none":
        return ids, summary
    N = cfg.n_samples
    if cfg.mask == "decode":
        gen = min(cfg.gen_length, L - 1)
        ratios = stratified_quantiles(cfg.decode_ratios, N)
        ratios = [ratios[i] for i in torch.randperm(N, generator=g).tolist()]
        masked = decode_canvas_masks(ratios, L, gen, min(cfg.block_length, gen), g)
        ids = ids.masked_fill(masked, spec.mask_id)
        summary.update(mask_ratio_mean=float(masked.float().mean()), decode_ratio_mean=sum(ratios) / N,
                       gen_length=gen)
        return ids, summary
    t = (torch.arange(N) + torch.rand(N, generator=g)) / N  # stratified U(0, 1)
    t = t[torch.randperm(N, generator=g)]
    prefix = (torch.rand(N, generator=g) * cfg.max_prefix * L).long()
    u = torch.rand(N, L, generator=g)
    pos = torch.arange(L)[None]
    masked = (u < t[:, None]) & (pos >= prefix[:, None])
    ids = ids.masked_fill(masked, spec.mask_id)
    summary.update(mask_ratio_mean=float(masked.float().mean()), t_min=float(t.min()), t_max=float(t.max()),
                   prefix_mean=float(prefix.float().mean()))
    return ids, summary
