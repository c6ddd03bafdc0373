"""Quality of the bundled default models (issue 4): arithmetic, held-out code likelihood, a sample.

Measures, for each model (default: the bundled `default` LLaDA and `default-dream`):

* **arithmetic exact match** on the held-out 2-digit `+`/`-` problems of `dllm_export.corpus`
  (never seen in training): prompt `47+38=`, `ARITH_SETTINGS` generation with the family's default
  sampler, answer = the generated text up to the first non-digit.
* **masked-token accuracy and ELBO bits/token** on the held-out stdlib modules, cut into windows of
  `--window` tokens. The ELBO is LLaDA's Monte-Carlo estimator (Nie et al. 2025, arXiv 2502.09992, and
  ML-GSAI/LLaDA's `get_log_likelihood.py`: exact mask counts l evenly spaced over the copies, weight L / l,
  here with an empty prompt); Dream uses its shifted logits and never masks the first position. Accuracy is reported over those random
  mask ratios and at fixed ratios 15% and 50%.
* the **unigram baseline**: the entropy (bits/token) of the training code's unigram distribution, the
  cross-entropy of the held-out tokens under it (add-one smoothing) and the accuracy of always
  predicting the most frequent training token.
* **foreign code** (issue 20's yardstick): masked-token cross-entropy at mask ratios 0.15-0.85 on
  real Python that is not in the training corpus and is the same on every machine here: the sources
  of the pinned torch (`FOREIGN_MODULES` of torch==2.13.0), as a ratio to the cross-entropy of the
  training code's add-one smoothed unigram on the same tokens (1.0 = no better than a unigram).
* a **sample** from `def fibonacci(n):` and the load + 32-token generation wall time on CPU.
* **does it read as Python**: completions of `CODE_PROMPTS` (greedy, and sampled at temperature
  0.8 over 4 seeds), each generated line checked on its own with `ast.parse` (a line ending in `:`
  gets a `pass`): the share of lines that are code and parse, the share that are comments, and
  the rest (prose, broken syntax, continuation lines that only parse in context).

    PYTHONPATH=. .venv/bin/python benchmarks/eval_default.py
    PYTHONPATH=. .venv/bin/python benchmarks/eval_default.py --models /tmp/ckpt --out /tmp/r.json
    PYTHONPATH=. .venv/bin/python benchmarks/eval_default.py --foreign-only   # the foreign-code ratio alone

Prints a summary and writes JSON (default benchmarks/results/default_models.json).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dllm_export as D
from dllm_export.corpus import CorpusRecipe, arithmetic_test_problems, code_texts, format_problem

# Default generation settings for the arithmetic task: one block, one token per step, greedy.
ARITH_SETTINGS = {"gen_length": 4, "steps": 4, "block_length": 4, "temperature": 0.0}
# prompts end with a newline, as typed: without it the tiny models continue the `def` line itself,
# and LLaDA, trained on many digit rows, often does so with digits
CODE_PROMPT = "def fibonacci(n):\n"
SAMPLE_SETTINGS = {"gen_length": 64, "steps": 64, "block_length": 16, "temperature": 0.0}
TIMING_SETTINGS = {"gen_length": 32, "steps": 32, "block_length": 32, "temperature": 0.0}
CODE_PROMPTS = ("def fibonacci(n):\n", "class Stack:\n", "def read_config(path):\n", "for i in range(10):\n")
PYTHONNESS_SETTINGS = {"gen_length": 64, "steps": 64, "block_length": 16}
# held-out foreign code: modules of the pinned torch (scripts/setup.sh installs torch==2.13.0), so
# every machine scores the same tokens; none of it is in the stdlib training corpus
FOREIGN_MODULES = ("nn/modules/linear.py", "nn/modules/conv.py", "nn/modules/activation.py",
                   "nn/modules/module.py", "nn/modules/container.py", "optim/adam.py", "optim/sgd.py",
                   "optim/lr_scheduler.py", "utils/data/dataloader.py", "utils/data/sampler.py")
FOREIGN_RATIOS = (0.15, 0.3, 0.5, 0.7, 0.85)


def forward_logits(model, ids: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Aligned logits (Dream's shifted), computed in row chunks."""
    outs = []
    with torch.inference_mode():
        for i in range(0, len(ids), chunk):
            lg = model(ids[i:i + chunk]).float()
            outs.append(model.spec.align_logits(lg))
    return torch.cat(outs)


def arithmetic_exact_match(model, tok, recipe: CorpusRecipe, batch: int = 250) -> dict:
    """Exact match on the held-out 2-digit +/- problems with `ARITH_SETTINGS` and the default sampler."""
    probs = arithmetic_test_problems(recipe)
    correct = {"+": 0, "-": 0}
    total = {"+": 0, "-": 0}
    examples = []
    for i in range(0, len(probs), batch):
        chunk = probs[i:i + batch]
        prompts = [tok(f"{a}{op}{b}=", add_special_tokens=False)["input_ids"] for a, op, b in chunk]
        out = D.generate(model, prompts, **ARITH_SETTINGS)
        for (a, op, b), row in zip(chunk, out.generated):
            text = tok.decode(row.tolist())
            answer = ""
            for c in text:
                if not c.isdigit():
                    break
                answer += c
            want = format_problem(a, op, b).split("=")[1]
            ok = answer == want
            correct[op] += ok
            total[op] += 1
            if len(examples) < 12:
                examples.append({"prompt": f"{a}{op}{b}=", "generated": text, "answer": answer, "correct": ok})
    return {
        "exact_match": sum(correct.values()) / sum(total.values()),
        "exact_match_add": correct["+"] / total["+"], "exact_match_sub": correct["-"] / total["-"],
        "n_problems": sum(total.values()), "settings": dict(ARITH_SETTINGS, sampler=model.spec.default_sampler),
        "examples": examples,
    }


def held_out_windows(tok, window: int) -> tuple[torch.Tensor, list[int]]:
    """Non-overlapping windows of the held-out modules' tokens ([N, window]) and all their tokens."""
    eos = tok.eos_token_id
    stream: list[int] = []
    for _, text in code_texts(held_out=True):
        stream += tok(text, add_special_tokens=False)["input_ids"] + [eos]
    n = len(stream) // window
    return torch.tensor(stream[:n * window]).view(n, window), stream


def elbo_and_accuracy(model, windows: torch.Tensor, mc: int, seed: int) -> dict:
    """LLaDA's MC ELBO (`dllm_export.eval.likelihood.elbo`, evenly spaced mask counts; an empty
    prompt, or for Dream the window's first token) and masked-token accuracy at 15% / 50% masking."""
    from dllm_export.eval.likelihood import elbo

    N, L = windows.shape
    first = 1 if model.spec.shift_logits else 0  # Dream: position 0 is context, never scored
    Lt = L - first
    mask_id = model.spec.mask_id
    nll = sum(-elbo(model, windows[w, :first].tolist(), windows[w, first:].tolist(), mc=mc, batch=mc,
                    seed=seed + w).elbo for w in range(N))
    result = {"elbo_bits_per_token": nll / (N * Lt) / math.log(2)}
    gen = torch.Generator().manual_seed(seed)
    for ratio in (0.15, 0.5):
        m = max(1, round(ratio * Lt))
        rank = torch.rand(N, Lt, generator=gen).argsort(1).argsort(1)
        masked = torch.zeros(N, L, dtype=torch.bool)
        masked[:, first:] = rank < m
        logits = forward_logits(model, torch.where(masked, mask_id, windows))
        pct = int(ratio * 100)
        result[f"masked_acc_{pct}pct"] = float((logits[masked].argmax(-1) == windows[masked]).float().mean())
        result[f"masked_ce_bits_{pct}pct"] = float(F.cross_entropy(logits[masked], windows[masked])) / math.log(2)
    result.update({"n_windows": N, "window_tokens": L, "mc_per_window": mc, "estimator": "llada"})
    return result


def train_counts(tok) -> torch.Tensor:
    """Token counts of the training code (the stdlib modules not held out) in the model's tokens."""
    counts = torch.zeros(len(tok), dtype=torch.float64)
    for ids in tok([t for _, t in code_texts(held_out=False)], add_special_tokens=False)["input_ids"]:
        counts += torch.bincount(torch.tensor(ids), minlength=len(tok)).double()
    return counts


def unigram_baseline(counts: torch.Tensor, held_out_tokens: list[int]) -> dict:
    """Unigram entropy of the training code (its `train_counts`), its cross-entropy on held-out tokens,
    most-frequent accuracy."""
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log2()).sum())
    smoothed = unigram_probs(counts)
    held = torch.tensor(held_out_tokens)
    cross = float(-smoothed[held].log2().mean())
    top = int(counts.argmax())
    return {"unigram_entropy_train_bits": entropy, "unigram_cross_entropy_held_out_bits": cross,
            "most_frequent_token_acc_held_out": float((held == top).double().mean())}


def unigram_probs(counts: torch.Tensor) -> torch.Tensor:
    """A unigram distribution from token counts, add-one smoothed."""
    return (counts + 1) / (counts.sum() + len(counts))


def foreign_code(model, tok, counts: torch.Tensor, window: int, seed: int, max_windows: int | None = None) -> dict:
    """Masked-token cross-entropy (bits) on `FOREIGN_MODULES` of the installed torch at each of
    `FOREIGN_RATIOS`, and its mean over the ratios as a fraction of the smoothed training unigram's
    cross-entropy on the same masked tokens (the masks are the same for both; `counts`: `train_counts`)."""
    root = Path(torch.__file__).parent
    eos = tok.eos_token_id
    stream: list[int] = []
    for rel in FOREIGN_MODULES:
        stream += tok((root / rel).read_text(), add_special_tokens=False)["input_ids"] + [eos]
    n = len(stream) // window
    windows = torch.tensor(stream[:n * window]).view(n, window)[:max_windows]
    N, L = windows.shape
    first = 1 if model.spec.shift_logits else 0  # Dream: position 0 is context, never scored
    logp_uni = unigram_probs(counts).log2()
    gen = torch.Generator().manual_seed(seed)
    per_ratio = {}
    for ratio in FOREIGN_RATIOS:
        m = max(1, round(ratio * (L - first)))
        masked = torch.zeros(N, L, dtype=torch.bool)
        masked[:, first:] = torch.rand(N, L - first, generator=gen).argsort(1).argsort(1) < m
        logits = forward_logits(model, torch.where(masked, model.spec.mask_id, windows))
        ce = float(F.cross_entropy(logits[masked], windows[masked])) / math.log(2)
        uni = float(-logp_uni[windows[masked]].mean())
        per_ratio[str(ratio)] = {"model_bits": ce, "unigram_bits": uni, "ratio": ce / uni,
                                 "acc": float((logits[masked].argmax(-1) == windows[masked]).float().mean())}
    mean = sum(r["model_bits"] for r in per_ratio.values()) / len(per_ratio)
    uni = sum(r["unigram_bits"] for r in per_ratio.values()) / len(per_ratio)
    return {"source": f"torch {torch.__version__}", "modules": list(FOREIGN_MODULES), "n_windows": N,
            "window_tokens": L, "seed": seed, "per_ratio": per_ratio, "model_bits": mean, "unigram_bits": uni,
            "ratio_to_unigram": mean / uni}


def sample_and_timing(name: str) -> dict:
    """Load time, 32-token generation time, and a greedy sample from `CODE_PROMPT`."""
    t0 = time.perf_counter()
    model = D.load_model(name)
    tok = D.load_tokenizer(name)
    t_load = time.perf_counter() - t0
    ids = tok(CODE_PROMPT, add_special_tokens=False)["input_ids"]
    t0 = time.perf_counter()
    D.generate(model, ids, **TIMING_SETTINGS)
    t_gen = time.perf_counter() - t0
    out = D.generate(model, ids, **SAMPLE_SETTINGS)
    text = CODE_PROMPT + tok.decode(out.generated[0].tolist())
    return {"load_s": t_load, "generate_32_tokens_s": t_gen, "timing_settings": TIMING_SETTINGS,
            "sample_prompt": CODE_PROMPT, "sample_settings": dict(SAMPLE_SETTINGS, sampler=model.spec.default_sampler),
            "sample": text}


def line_kinds(text: str) -> dict:
    """Counts of the non-empty lines of `text` that parse alone as Python code, are comments, or neither."""
    import ast

    out = {"code": 0, "comment": 0, "other": 0}
    for line in text.splitlines():
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            out["comment"] += 1
            continue
        try:
            ast.parse(s + " pass" if s.endswith(":") else s)
            out["code"] += 1
        except (SyntaxError, ValueError):
            out["other"] += 1
    return out


def pythonness(model, tok, seeds: int = 4) -> dict:
    """Line kinds of completions of `CODE_PROMPTS`: greedy, and temperature 0.8 over `seeds` seeds."""
    res = {"prompts": list(CODE_PROMPTS), "settings": dict(PYTHONNESS_SETTINGS, sampler=model.spec.default_sampler)}
    for label, temp, n in (("greedy", 0.0, 1), ("temperature_0.8", 0.8, seeds)):
        kinds = {"code": 0, "comment": 0, "other": 0}
        samples = []
        for prompt in CODE_PROMPTS:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            for seed in range(n):
                out = D.generate(model, ids, temperature=temp, seed=seed, **PYTHONNESS_SETTINGS)
                text = tok.decode(out.generated[0].tolist())
                samples.append(prompt + text)
                for k, v in line_kinds(text.split(tok.eos_token or "\0")[0]).items():
                    kinds[k] += v
        total = max(sum(kinds.values()), 1)
        res[label] = {"lines": kinds, "code_share": kinds["code"] / total, "comment_share": kinds["comment"] / total,
                      "samples": samples[:: n][:4] if n > 1 else samples}
    return res


def evaluate(name: str, window: int, mc: int, max_windows: int | None, seed: int,
             arithmetic_only: bool = False, foreign_windows: int | None = 256) -> dict:
    """Every measurement for one model folder (or `default` / `default-dream`)."""
    torch.manual_seed(seed)
    model = D.load_model(name)
    tok = D.load_tokenizer(name)
    n_params = sum(p.numel() for p in model.parameters())
    res = {"model": name, "family": model.spec.family, "params": n_params}
    t0 = time.perf_counter()
    res["arithmetic"] = arithmetic_exact_match(model, tok, CorpusRecipe())
    if arithmetic_only:
        return res
    windows, stream = held_out_windows(tok, window)
    if max_windows:
        windows = windows[:max_windows]
    res["held_out_code"] = elbo_and_accuracy(model, windows, mc, seed)
    res["held_out_code"]["modules"] = [n for n, _ in code_texts(held_out=True)]
    counts = train_counts(tok)  # tokenizing the training code once serves both baselines
    res["unigram_baseline"] = unigram_baseline(counts, windows.flatten().tolist())
    res["foreign_code"] = foreign_code(model, tok, counts, window, seed, foreign_windows)
    res.update(sample_and_timing(name))
    res["pythonness"] = pythonness(model, tok)
    res["eval_s"] = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    """CLI: evaluate the bundled (or given) models and save JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["default", "default-dream"])
    ap.add_argument("--window", type=int, default=128, help="tokens per held-out window")
    ap.add_argument("--mc", type=int, default=8, help="Monte-Carlo mask draws per window")
    ap.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arithmetic-only", action="store_true", help="quick check: only the arithmetic task")
    ap.add_argument("--foreign-windows", type=int, default=256,
                    help="foreign-code windows scored (the first N of the modules' token stream)")
    ap.add_argument("--foreign-only", action="store_true",
                    help="compute only the foreign-code ratio, updating the models in --out (if it exists)")
    ap.add_argument("--samples-only", action="store_true",
                    help="recompute only the samples, timings and line kinds, updating the models in --out")
    ap.add_argument("--out", default="benchmarks/results/default_models.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
               "machine": platform.machine(), "models": {}}
    if args.foreign_only:
        if Path(args.out).is_file():
            results = json.loads(Path(args.out).read_text())
        for name in args.models:
            torch.manual_seed(args.seed)
            tok = D.load_tokenizer(name)
            fc = foreign_code(D.load_model(name), tok, train_counts(tok), args.window, args.seed, args.foreign_windows)
            results["models"].setdefault(name, {"model": name})["foreign_code"] = fc
            print(f"{name}: foreign code {fc['model_bits']:.3f} bits/token vs unigram {fc['unigram_bits']:.3f}: "
                  f"ratio {fc['ratio_to_unigram']:.3f} ({fc['n_windows']} windows of {fc['window_tokens']})")
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        return 0
    if args.samples_only:
        results = json.loads(Path(args.out).read_text())
        for name in args.models:
            torch.manual_seed(args.seed)
            model, tok = D.load_model(name), D.load_tokenizer(name)
            r = results["models"][name]
            r.update(sample_and_timing(name))
            r["pythonness"] = pythonness(model, tok)
            for label in ("greedy", "temperature_0.8"):
                py = r["pythonness"][label]
                print(f"{name} {label}: {py['lines']} -> code {py['code_share']:.2f}")
            print(r["sample"])
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        return 0
    for name in args.models:
        r = evaluate(name, args.window, args.mc, args.max_windows, args.seed, args.arithmetic_only,
                     args.foreign_windows)
        results["models"][name] = r
        a = r["arithmetic"]
        print(f"== {name} ({r['family']}, {r['params'] / 1e6:.2f}M params)")
        print(f"arithmetic exact match {a['exact_match']:.3f} "
              f"(+ {a['exact_match_add']:.3f}, - {a['exact_match_sub']:.3f}) "
              f"on {a['n_problems']} held-out problems, {a['settings']}")
        print("examples:", " ".join(f"{e['prompt']}{e['answer']}" for e in a["examples"]))
        if args.arithmetic_only:
            continue
        h, u = r["held_out_code"], r["unigram_baseline"]
        print(f"held-out code: ELBO {h['elbo_bits_per_token']:.3f} bits/token vs unigram "
              f"{u['unigram_cross_entropy_held_out_bits']:.3f} (train entropy {u['unigram_entropy_train_bits']:.3f}); "
              f"masked acc {h['masked_acc_15pct']:.3f} at 15%, "
              f"{h['masked_acc_50pct']:.3f} at 50% (most-frequent {u['most_frequent_token_acc_held_out']:.3f})")
        fc = r["foreign_code"]
        print(f"foreign code ({fc['source']}): {fc['model_bits']:.3f} bits/token, {fc['ratio_to_unigram']:.3f} "
              f"of the smoothed training unigram")
        print(f"load {r['load_s']:.2f}s, 32-token generation {r['generate_32_tokens_s']:.2f}s")
        print(f"sample:\n{r['sample']}\n")
        for label in ("greedy", "temperature_0.8"):
            py = r["pythonness"][label]
            print(f"{label}: {py['lines']} -> code {py['code_share']:.2f}, comments {py['comment_share']:.2f}")
            print(py["samples"][0] + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
