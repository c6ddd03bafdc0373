"""lm-evaluation-harness adapter: the registered model `dllm` runs standard lm-eval tasks (GSM8K,
HumanEval, ARC, ...) on dLLM checkpoints and on exported artifacts, with any backend.

    # library
    from dllm_export.eval.harness import evaluate
    res = evaluate("default", ["arc_easy"], model_args="mc_num=32,batch=16", limit=50)

    # our CLI
    dllm-export lm-eval --model default --tasks arc_easy,gsm8k --limit 50 --model-args gen_length=256,steps=256

    # lm-eval's own CLI (same flags as `lm_eval`), with the `dllm` model registered first
    python -m dllm_export.eval.harness --model dllm --model_args model=default,backend=auto --tasks arc_easy

lm-eval 0.4.13 discovers models only through its built-in table or by importing the module that
registers them (there is no entry-point group, and `--include_path` loads task YAMLs only), hence
the `python -m dllm_export.eval.harness` entry: it imports this module and then runs lm-eval's
`cli_evaluate` unchanged.

Model args (`--model_args k=v,...`; numbers and true/false are typed by lm-eval's parser):
    model (or pretrained): checkpoint folder, ONNX / GGUF artifact folder, .gguf file, or `default` /
        `default-dream` (default: default).
    backend: auto | torch | onnxruntime | llama.cpp; dtype (torch), threads, device (torch: cuda, ...).
    tokenizer: tokenizer folder when the model path holds none.
    mc_num, batch: Monte-Carlo samples per ELBO and samples per forward (default 128, 16).
    greedy: how `is_greedy` is decided: unmask (LLaDA's harness: unmask the continuation one token at
        a time, most confident first, and compare), argmax (one forward with the continuation masked),
        off (always False; saves the forwards).
    gen_length, steps, block_length, cache (none | prefix | dual), threshold, factor, refresh, refresh_tokens,
        refresh_blocks, sampler, temperature, cfg_scale, top_k, top_p, alg_temp, eps: the unmasking loop (see
        `generate`); default gen_length 256, steps = gen_length, block_length 32.
    seed: every ELBO and every generation is seeded with it, so results do not depend on the order
        or the batching of requests (default 0).
    add_bos: prepend the model's BOS to every context (default false).
    disable_tqdm: no progress bars.

Generation honours `until` and `max_gen_toks` of the task's gen_kwargs; sampling settings come from
the model args (task-level `temperature` / `do_sample` are ignored, as in LLaDA's own harness).
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (fills lm-eval's model table before `dllm` joins it: see get_model)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..checks import is_int, is_real
from ..errors import InputError

log = logging.getLogger(__name__)

GREEDY = ("unmask", "argmax", "off")

# model arg -> (type, default); lm-eval's parser already types numbers, this also accepts strings
_ARGS: dict[str, tuple[type, Any]] = {
    "backend": (str, "auto"), "dtype": (object, None), "threads": (int, 0), "device": (str, None),
    "mc_num": (int, 128), "batch": (int, 16), "greedy": (str, "unmask"),
    "gen_length": (int, 256), "steps": (int, None), "block_length": (int, 32), "cache": (str, "none"),
    "threshold": (float, None), "factor": (float, None), "refresh": (int, None),
    "refresh_tokens": (int, None), "refresh_blocks": (int, None), "sampler": (str, None),
    "temperature": (float, 0.0), "cfg_scale": (float, 0.0), "top_k": (int, None), "top_p": (float, None),
    "alg_temp": (float, None), "eps": (float, 1e-3), "seed": (int, 0), "add_bos": (bool, False),
    "disable_tqdm": (bool, False),
}
# the model args that are the loop's settings as they are (generate's keywords, Plan's fields)
_PLAN_ARGS = ("temperature", "cfg_scale", "top_k", "top_p", "alg_temp", "eps", "threshold", "factor", "cache",
              "refresh", "refresh_tokens", "refresh_blocks", "seed")
_IGNORED = ("batch_size", "max_batch_size")  # lm-eval's own batching: requests run one at a time here
# the task generation kwargs `generate_until` reads; sampling settings are model args (see the module docstring)
GEN_KWARGS = ("until", "max_gen_toks")


def _typed(name: str, value, kind: type):
    if value is None or kind is object:
        return value
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        if kind is int:
            f = float(value)
            if f != int(f):
                raise ValueError
            return int(f)
        return kind(value)
    except (TypeError, ValueError):
        raise InputError(f"model arg {name}={value!r} must be {kind.__name__}") from None


@register_model("dllm")
class DLLM(LM):
    """A dLLM behind lm-eval's `LM` interface: ELBO likelihoods and unmasking-loop generation.

    `model` is a path / `default` (loaded by `load_backend`) or an already loaded model / backend;
    `tokenizer` a folder or a tokenizer object (default: the model's folder). Other keyword
    arguments: see the module docstring. Raises InputError for unknown or malformed arguments.
    """

    def __init__(self, model="default", tokenizer=None, pretrained=None, **kwargs) -> None:
        super().__init__()
        from .. import load_tokenizer
        from ..runtime.backends import as_backend, load_backend
        from ..runtime.loop import CACHES, check_sampler_read

        unknown = sorted(set(kwargs) - set(_ARGS) - set(_IGNORED))
        if unknown:
            raise InputError(f"unknown dllm model arg(s) {', '.join(unknown)} (known: model, tokenizer, "
                             f"{', '.join(_ARGS)})")
        # None (lm-eval's parser reads `none` so) means the default
        a = {k: _typed(k, d if kwargs.get(k) is None else kwargs[k], t) for k, (t, d) in _ARGS.items()}
        model = pretrained if pretrained is not None else model
        if a["mc_num"] < 1 or a["batch"] < 1 or a["mc_num"] % a["batch"]:
            raise InputError(f"mc_num ({a['mc_num']}) must be a positive multiple of batch ({a['batch']})")
        if a["greedy"] not in GREEDY:
            raise InputError(f"unknown greedy {a['greedy']!r} (choose from {', '.join(GREEDY)})")
        if a["cache"] not in CACHES:  # before the weights load, whatever the sampler
            raise InputError(f"unknown cache {a['cache']!r} (choose from {', '.join(CACHES)})")
        if a["gen_length"] < 1 or a["block_length"] < 1:
            raise InputError(f"gen_length and block_length must be >= 1 (got {a['gen_length']}, {a['block_length']})")
        a["block_length"] = min(a["block_length"], a["gen_length"])
        if a["steps"] is None:
            a["steps"] = a["gen_length"]
        if a["sampler"] is not None:  # before the weights load: the loop's rules (the family picks a default)
            check_sampler_read(a["sampler"], a["threshold"], a["factor"])
            self._plan(a, a["sampler"]).check()

        if isinstance(model, (str, Path)):
            self.model_name = str(model)
            self.backend = load_backend(model, backend=a["backend"], dtype=a["dtype"], threads=a["threads"])
            if tokenizer is None:  # as `dllm-export eval`: a .gguf file's tokenizer lies beside it
                tokenizer = model
        else:
            self.backend = as_backend(model)
            self.model_name = self.backend.name
            if tokenizer is None:
                raise InputError("pass `tokenizer` with an already loaded model")
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        dev = a["device"]
        if dev is not None and dev.startswith("cuda") and not torch.cuda.is_available():
            log.info("dllm: no CUDA device, running on the CPU")  # lm-eval's CLI passes cuda:0 by default
            dev = None
        if dev is not None and hasattr(self.backend, "model"):  # torch backend; other runtimes keep theirs
            self.backend.model.to(dev)
            self._device = dev
        self.spec = self.backend.spec
        self.estimator = self.spec.elbo_estimator  # the family's own Monte-Carlo ELBO (likelihood.elbo)
        self.max_length = int(self.backend.max_length)
        self._plan(a, a["sampler"] or self.spec.default_sampler).check(self.backend)
        self.args = a
        s = self.spec
        # the prompt of an empty context / of rolling windows: BOS if the model has one; LLaDA scores from
        # nothing, Dream (shifted logits: position 0 is never predicted) needs one token, EOS then
        self.prefix = [s.bos_id] if s.bos_id is not None else ([s.eos_id] if s.shift_logits else [])
        self.stop_ids = {i for i in (s.eos_id, s.eot_id) if i is not None}
        self._warned_truncation = False

    # ------------------------------------------------------------------ tokens

    def tok_encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _bos(self) -> list[int]:
        return [self.spec.bos_id] if self.args["add_bos"] and self.spec.bos_id is not None else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) as lm-eval's HF model makes them: trailing spaces of the
        context move to the continuation, the whole string is encoded and split at the context's length
        (so BPE merges across the boundary stay those of the joined text). An empty context becomes the
        prefix (BOS, see `prefix`)."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        if not context:
            return (self._bos() or list(self.prefix)), self.tok_encode(continuation)
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return self._bos() + ctx, whole[len(ctx):]

    def prompt_ids(self, context: str) -> list[int]:
        """Token ids of a generation prompt (never empty: the prefix, else EOS, stands for "")."""
        return (self._bos() + (self.tok_encode(context) if context else [])) or list(self.prefix) or [self.spec.eos_id]

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate context (then continuation) so that the sequence fits the model's context;
        a shifted-logit model keeps at least one context token."""
        keep_ctx = 1 if self.spec.shift_logits else 0
        over = len(ctx) + len(cont) - self.max_length
        if over <= 0:
            return ctx, cont
        if not self._warned_truncation:
            log.warning("dllm: inputs longer than the model's context (%d tokens) are left-truncated",
                        self.max_length)
            self._warned_truncation = True
        cut = min(over, max(len(ctx) - keep_ctx, 0))
        ctx, over = ctx[cut:], over - cut
        return ctx, cont[over:]

    # ------------------------------------------------------------------ likelihood

    def _elbo(self, ctx: list[int], cont: list[int]) -> float:
        from .likelihood import elbo

        return elbo(self.backend, ctx, cont, mc=self.args["mc_num"], batch=self.args["batch"],
                    estimator=self.estimator, seed=self.args["seed"]).elbo

    @torch.no_grad()
    def _is_greedy(self, ctx: list[int], cont: list[int]) -> bool:
        """LLaDA's `suffix_greedy_prediction`: from the continuation fully masked, commit the most
        confident argmax one position per forward; greedy iff the result is the continuation (stops at
        the first committed mismatch: commits are final). `argmax`: a single forward instead."""
        mode = self.args["greedy"]
        if mode == "off":
            return False
        mask, P = self.spec.mask_id, len(ctx)
        x = torch.tensor([ctx + [mask] * len(cont)], dtype=torch.long)
        target = torch.tensor(cont, dtype=torch.long)
        if mode == "argmax":
            logits = self.spec.align_logits(self.backend.forward(x))[0, P:]
            return bool((logits.argmax(-1) == target).all())
        from ..runtime.loop import infill

        return infill(self.backend, x, check=lambda pos, tok: tok == cont[pos - P]) is not None

    def _bar(self, requests, desc: str, disable_tqdm: bool):
        return tqdm(requests, desc=desc, disable=disable_tqdm or self.args["disable_tqdm"])

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(ELBO of the continuation given the context, is_greedy) per request. The ELBO is the model
        family's Monte-Carlo estimator (`likelihood.elbo`), seeded with `seed`: a lower bound on
        log p(continuation | context) in expectation, not the exact log-likelihood."""
        out = []
        for req in self._bar(requests, "dllm loglikelihood", disable_tqdm):
            context, continuation = req.args
            ctx, cont = self._fit(*self.encode_pair(context, continuation))
            res = (0.0, True) if not cont else (self._elbo(ctx, cont), self._is_greedy(ctx, cont))
            out.append(res)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), res)
        return out

    def rolling_windows(self, ids: list[int]) -> list[tuple[list[int], list[int]]]:
        """(context, scored) windows covering `ids` once, as lm-eval's rolling windows: the first is
        scored after the prefix (BOS), later ones after as many preceding tokens as fit the context."""
        first = self.max_length - len(self.prefix)
        wins = [(list(self.prefix), ids[:first])]
        start, step = first, self.max_length - 1
        while start < len(ids):
            scored = ids[start:start + step]
            n_ctx = self.max_length - len(scored)
            wins.append((ids[max(0, start - n_ctx):start], scored))
            start += len(scored)
        return [w for w in wins if w[1]]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """ELBO of each whole text after the prefix (BOS if the model has one, else nothing; EOS for
        a shifted-logit model without BOS). A LOWER BOUND on log p(text), estimated by Monte Carlo
        (perplexities derived from it are upper bounds); texts longer than the context are scored in
        windows with truncated context, as lm-eval does for autoregressive models."""
        out = []
        for req in self._bar(requests, "dllm loglikelihood_rolling", disable_tqdm):
            text = req.args[0]
            ids = self.tok_encode(text)
            total = sum(self._elbo(c, s) for c, s in self.rolling_windows(ids)) if ids else 0.0
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    # ------------------------------------------------------------------ generation

    @staticmethod
    def _plan(a: dict, sampler: str):
        """The loop's Plan of the model args, checked by `Plan.check` as `generate` checks its own."""
        from ..runtime.loop import Plan

        return Plan(sampler=sampler, gen_length=a["gen_length"], steps=a["steps"], block_length=a["block_length"],
                    **{k: a[k] for k in _PLAN_ARGS})

    def schedule(self, max_gen_toks: int | None) -> dict:
        """The loop's settings for a request: gen_length = min(gen_length, max_gen_toks) tokens kept;
        the canvas is that rounded up to whole blocks, steps scaled by the canvas (the configured
        steps when nothing is cut)."""
        a = self.args
        keep = a["gen_length"] if not max_gen_toks else max(1, min(a["gen_length"], int(max_gen_toks)))
        block = min(a["block_length"], keep)
        canvas = math.ceil(keep / block) * block
        nb = canvas // block
        steps = a["steps"] if canvas == a["gen_length"] else \
            max(1, round(a["steps"] * canvas / a["gen_length"] / nb)) * nb
        return {"gen_length": canvas, "steps": steps, "block_length": block, "keep": keep}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decode each context by iterative unmasking with the model args' settings (seeded with
        `seed`), cut at the first EOS / end-of-turn token, then at the first `until` string."""
        from .. import generate

        a = self.args
        out = []
        for req in self._bar(requests, "dllm generate_until", disable_tqdm):
            context, gen_kwargs = req.args[0], dict(req.args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sch = self.schedule(gen_kwargs.get("max_gen_toks"))
            if sch["gen_length"] >= self.max_length:
                raise InputError(f"gen_length {sch['gen_length']} leaves no room for a prompt in the model's "
                                 f"context of {self.max_length} tokens: lower gen_length in the model args")
            prompt = self.prompt_ids(context)[-(self.max_length - sch["gen_length"]):]
            res = generate(self.backend, [prompt], gen_length=sch["gen_length"], steps=sch["steps"],
                           block_length=sch["block_length"], sampler=a["sampler"], **{k: a[k] for k in _PLAN_ARGS})
            text = self.decode(res.generated[0, :sch["keep"]].tolist(), until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out

    def decode(self, ids: list[int], until: list[str]) -> str:
        """Text of generated ids: up to the first stop token (EOS / end of turn), special tokens
        dropped, cut before the first `until` string."""
        cut = next((i for i, t in enumerate(ids) if t in self.stop_ids), len(ids))
        text = self.tokenizer.decode(ids[:cut], skip_special_tokens=True)
        for s in until:
            if s:
                text = text.split(s)[0]
        return text

    # ------------------------------------------------------------------ chat templates

    @property
    def tokenizer_name(self) -> str:
        return self.model_name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)


def _parse_pairs(text: str, what: str) -> dict:
    """lm-eval's `k=v,...` (values typed by its parser: numbers, true/false, none) -> dict; InputError
    for a part that is no `key=value` or a key given twice (lm-eval keeps the last without a word)."""
    from lm_eval.utils import handle_arg_string

    out: dict = {}
    for part in (p for p in str(text).split(",") if p.strip()):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise InputError(f"{what} must be key=value pairs separated by commas, got {part.strip()!r}")
        if key.strip() in out:
            raise InputError(f"{what}: {key.strip()} given twice")
        out[key.strip()] = handle_arg_string(value)
    return out


def parse_model_args(model_args: str | dict | None) -> dict:
    """`k=v,...` (typed by lm-eval's parser: numbers, true/false, none) or a dict -> dict."""
    if model_args is None:
        return {}
    if isinstance(model_args, dict):
        return dict(model_args)
    return _parse_pairs(model_args, "model args")


def parse_gen_kwargs(gen_kwargs: str | dict | None) -> dict | None:
    """lm-eval's `gen_kwargs` (`k=v,...` or a dict) checked -> dict, or None when empty. InputError for
    a malformed string, a key the dllm model does not read (only `GEN_KWARGS`: a dropped temperature
    would go unnoticed) or a max_gen_toks that is not an integer >= 1."""
    if gen_kwargs is None:
        return None
    if isinstance(gen_kwargs, str):
        kw = _parse_pairs(gen_kwargs, "gen kwargs")
    elif isinstance(gen_kwargs, dict):
        kw = dict(gen_kwargs)
    else:
        raise InputError(f"gen kwargs must be key=value pairs separated by commas, got {gen_kwargs!r}")
    unknown = sorted(set(kw) - set(GEN_KWARGS))
    if unknown:
        raise InputError(f"gen kwarg(s) {', '.join(map(str, unknown))} not read by the dllm model (it reads "
                         f"{', '.join(GEN_KWARGS)}; sampling settings are model args, e.g. temperature=0.5)")
    n = kw.get("max_gen_toks")
    if n is not None and (not is_int(n) or n < 1):
        raise InputError(f"gen kwarg max_gen_toks must be an integer >= 1, got {n!r}")
    until = kw.get("until")
    if until is not None and not (isinstance(until, str) or (isinstance(until, (list, tuple))
                                                            and all(isinstance(u, str) for u in until))):
        raise InputError(f"gen kwarg until must be a string or a list of strings, got {until!r}")
    return kw or None


def check_limit(limit) -> int | float | None:
    """lm-eval's `limit` checked: None (every example), a fraction of the examples in (0, 1), or a
    whole count >= 1 (returned as an int); InputError otherwise (lm-eval fails on it mid-run)."""
    if limit is None:
        return None
    bad = InputError(f"limit must be a fraction in (0, 1) or a whole number >= 1 of examples per task, got {limit!r}")
    if not is_real(limit) or not math.isfinite(limit) or limit <= 0:
        raise bad
    if limit < 1:
        return float(limit)
    if limit != int(limit):
        raise bad
    return int(limit)


def check_num_fewshot(num_fewshot) -> int | None:
    """`num_fewshot` checked: None (each task's own) or an integer >= 0; InputError otherwise."""
    if num_fewshot is not None and (not is_int(num_fewshot) or num_fewshot < 0):
        raise InputError(f"num_fewshot must be an integer >= 0, got {num_fewshot!r}")
    return None if num_fewshot is None else int(num_fewshot)


def check_results_path(out: str | Path) -> Path:
    """`out` as a Path, or InputError when no results file can be written there (fileio.check_output_file).
    Call it before `evaluate`: `write_results` checks again, but only after the whole run."""
    from ..fileio import check_output_file

    return check_output_file(out)


def _quiet_git_commit_hash() -> str | None:
    """lm-eval's `get_git_commit_hash` (the commit of the working folder's repository, recorded in the
    results) without git's "fatal: not a git repository" on stderr outside one."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, OSError):
        return get_commit_from_path(os.getcwd())


@contextmanager
def _quiet_git():
    """While the block runs, lm-eval records the commit quietly (it has no option for it: its evaluator
    calls git with stderr inherited); restored afterwards, so nothing changes at import time."""
    import lm_eval.evaluator as ev

    saved = ev.get_git_commit_hash
    ev.get_git_commit_hash = _quiet_git_commit_hash
    try:
        yield
    finally:
        ev.get_git_commit_hash = saved


def evaluate(model="default", tasks=("arc_easy",), *, model_args: str | dict | None = None,
             include_path: str | Path | list | None = None, include_defaults: bool = True,
             limit: int | float | None = None, num_fewshot: int | None = None, gen_kwargs: str | dict | None = None,
             apply_chat_template: bool = False, log_samples: bool = False, confirm_run_unsafe_code: bool = False,
             bootstrap_iters: int = 100000) -> dict:
    """Run lm-eval tasks on a dLLM: `lm_eval.simple_evaluate` with the `dllm` model and a
    `TaskManager(include_path=...)`.

    Args:
        model: checkpoint / artifact path, `default`, or a ready `DLLM` (model_args are then ignored).
        tasks: lm-eval task, group or tag names, or task YAML files (a comma-separated string too).
        model_args: the `dllm` model args (`k=v,...` or a dict), see the module docstring.
        include_path: folder(s) of extra task YAMLs (e.g. local tasks).
        include_defaults: also index lm-eval's built-in tasks (a few seconds; False for local tasks only).
        limit: examples per task: a whole number >= 1, or a fraction in (0, 1) of each task's examples.
        num_fewshot: few-shot examples (>= 0; default: each task's own).
        gen_kwargs: `until` / `max_gen_toks` overriding the tasks' (`k=v,...` or a dict).
    Returns:
        lm-eval's results dict ("results", "configs", "versions", "n-shot", "config", ...).
    Raises:
        InputError: bad model args, limit, num_fewshot or gen_kwargs, unknown tasks; all checked
            before the model loads.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise InputError("no tasks given")
    limit, num_fewshot = check_limit(limit), check_num_fewshot(num_fewshot)
    gen_kwargs = parse_gen_kwargs(gen_kwargs)
    args = parse_model_args(model_args)
    # the task index before the weights: an unknown task costs seconds, not a model load
    tm = TaskManager(include_path=[str(p) for p in include_path] if isinstance(include_path, (list, tuple))
                     else (str(include_path) if include_path else None), include_defaults=include_defaults)
    missing = [t for t in names if not (t.endswith(".yaml") and Path(t).is_file()) and not tm.match_tasks([t])]
    if missing:
        hint = "" if include_path else " (local task YAMLs: pass include_path / --include-path)"
        raise InputError(f"unknown lm-eval task(s): {', '.join(missing)}{hint}")
    if isinstance(model, DLLM):
        lm = model
    else:
        if "model" in args or "pretrained" in args:
            model = args.pop("model", None) or args.pop("pretrained")
        lm = DLLM(model=model, **args)
    with _quiet_git():
        res = simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                              gen_kwargs=gen_kwargs, apply_chat_template=apply_chat_template, log_samples=log_samples,
                              confirm_run_unsafe_code=confirm_run_unsafe_code, bootstrap_iters=bootstrap_iters)
    res["config"]["model"] = "dllm"
    res["config"]["model_args"] = {"model": lm.model_name, **{k: v for k, v in lm.args.items() if v is not None}}
    return res


def results_table(results: dict) -> str:
    """lm-eval's markdown table(s) of a results dict (tasks, then groups if any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


def write_results(results: dict, out: str | Path) -> Path:
    """Write a results dict as JSON (atomically: the file appears whole or not at all); InputError
    when `out` cannot be written (`check_results_path`)."""
    import json

    from lm_eval.utils import handle_non_serializable

    from ..fileio import atomic_file

    out = check_results_path(out)
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
    return out


def cli_evaluate(argv: list[str] | None = None) -> None:
    """lm-eval's own command line (`lm_eval ...`, same flags) with `--model dllm` available."""
    from lm_eval.__main__ import cli_evaluate as lm_eval_main

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    lm_eval_main()


if __name__ == "__main__":
    # `python -m` runs this file as __main__: alias it so that an import of the module finds this
    # copy (one DLLM class, registered once) instead of executing it again
    sys.modules.setdefault("dllm_export.eval.harness", sys.modules[__name__])
    cli_evaluate()
