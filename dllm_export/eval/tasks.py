"""Task suites built offline from held-out material, one per category of the study.

* general: cloze on English sentences from the held-out modules' docstrings: one word removed,
  four candidates (the word and three seeded distractors of similar length from other
  sentences), scored by the Monte-Carlo ELBO of the completed sentence; accuracy.
* math: 2-digit + and - problems never seen in training (`47+38=`), answered by generation;
  exact match of the digits before the first non-digit.
* code: line infill in held-out stdlib functions: the function with one interior line replaced
  by masks, generated in place; exact match of the line (whitespace-normalised). `line_infill_exec`
  scores the same kind of infill by execution (pass@1, greedy): the infilled line is put back into
  its module, and the module must pass its own CPython unit tests (`test.test_<module>`), run in a
  subprocess with a timeout. Only lines those tests execute are asked, so a wrong line can fail.

Items are deterministic for a seed; the generation settings are fixed per task and written into
every result, so numbers from different runs and backends are comparable.
"""

from __future__ import annotations

import ast
import random
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..corpus import arithmetic_test_problems, code_texts, docstring_sentences, format_problem
from ..errors import InputError


@dataclass(frozen=True)
class Task:
    """A task: its category, how many items, and the fixed decoding settings of generative tasks."""

    name: str
    category: str
    n_items: int
    gen_length: int = 0
    steps: int = 0
    block_length: int = 0
    mc: int = 16  # ELBO samples per candidate (likelihood tasks)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("docstring_cloze", "general", 50, mc=16),
    Task("arithmetic", "math", 100, gen_length=4, steps=4, block_length=4),
    # the canvas is the masked line inside its function: one token per step, low-confidence order
    Task("line_infill", "code", 40),
    Task("line_infill_exec", "code", 30),
)}
CATEGORIES = {t.category: t.name for t in TASKS.values()}


def cloze_items(n: int, seed: int = 0) -> list[dict]:
    """Held-out docstring sentences with one word (>= 4 letters) to choose among 4 candidates."""
    sentences = docstring_sentences([t for _, t in code_texts(held_out=True)])
    rng = random.Random(seed)
    rng.shuffle(sentences)
    vocab = sorted({w for s in sentences for w in re.findall(r"\b[a-z]{4,}\b", s)})
    items = []
    for s in sentences:
        words = [m for m in re.finditer(r"\b[a-z]{4,}\b", s)]
        if not words:
            continue
        m = rng.choice(words)
        near = [w for w in vocab if abs(len(w) - len(m.group())) <= 1 and w != m.group()]
        if len(near) < 3:
            continue
        choices = rng.sample(near, 3) + [m.group()]
        rng.shuffle(choices)
        items.append({"prefix": s[:m.start()], "suffix": s[m.end():], "choices": choices,
                      "answer": choices.index(m.group())})
        if len(items) == n:
            break
    return items


def infill_items(n: int, seed: int = 0, executed: dict[str, set[int]] | None = None) -> list[dict]:
    """Held-out functions (3-30 lines) with one interior, non-blank line to regenerate.

    With `executed` (module -> 1-based line numbers its tests run), only modules in it and lines
    in their sets are asked. Items carry their module and the line's 1-based number.
    """
    rng = random.Random(seed)
    funcs = []
    for module, src in code_texts(held_out=True):
        if executed is not None and module not in executed:
            continue
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        lines = src.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.end_lineno and 3 <= node.end_lineno - node.lineno < 30:
                funcs.append((module, node.lineno, lines[node.lineno - 1:node.end_lineno]))
    rng.shuffle(funcs)
    items = []
    for module, first, body in funcs:
        inner = [i for i in range(1, len(body)) if body[i].strip() and not body[i].strip().startswith(("#", '"""'))
                 and (executed is None or first + i in executed[module])]
        if not inner:
            continue
        i = rng.choice(inner)
        items.append({"before": "\n".join(body[:i]) + "\n", "line": body[i], "after": "\n" + "\n".join(body[i + 1:]),
                      "module": module, "lineno": first + i})
        if len(items) == n:
            break
    return items


# Run in a subprocess: the 1-based lines of module argv[1]'s file that its CPython tests execute.
_TRACE = """
import importlib.util, json, sys, threading, unittest
mod = sys.argv[1]
target = importlib.util.find_spec(mod).origin
seen = set()
def local(frame, event, arg):
    if event == "line":
        seen.add(frame.f_lineno)
    return local
def tracer(frame, event, arg):
    return local if frame.f_code.co_filename == target else None
threading.settrace(tracer)
sys.settrace(tracer)
unittest.main(module="test.test_" + mod, argv=["trace", "-q"], exit=False)
sys.settrace(None)
print(json.dumps(sorted(seen)))
"""


def _has_tests(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(f"test.test_{module}") is not None
    except ModuleNotFoundError:  # a Python built without its test package
        return False


def executed_lines(timeout: float = 120.0) -> dict[str, set[int]]:
    """Held-out module -> the lines of its source that its CPython unit tests execute (traced in a
    subprocess per module); modules whose test package is missing are left out."""
    import json
    import subprocess
    import sys

    out = {}
    for module, _ in code_texts(held_out=True):
        if "." in module or not _has_tests(module):
            continue
        done = subprocess.run([sys.executable, "-c", _TRACE, module], capture_output=True, text=True,
                              timeout=timeout, cwd=tempfile.gettempdir())
        if done.returncode == 0 and done.stdout.strip():
            out[module] = set(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def passes_tests(module: str, source: str, timeout: float = 60.0) -> bool:
    """True if `source`, standing in for stdlib `module`, passes `test.test_<module>` (subprocess,
    the patched file first on PYTHONPATH, killed after `timeout` s)."""
    import os
    import subprocess
    import sys

    try:
        compile(source, f"{module}.py", "exec")
    except (SyntaxError, ValueError):
        return False
    with tempfile.TemporaryDirectory() as d:
        Path(d, f"{module}.py").write_text(source)
        env = {**os.environ, "PYTHONPATH": d, "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            done = subprocess.run([sys.executable, "-m", "unittest", "-q", f"test.test_{module}"], cwd=d, env=env,
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def answer_digits(text: str) -> str:
    """The arithmetic answer read from generated text: the digits before the first non-digit."""
    return text[: next((i for i, c in enumerate(text) if not c.isdigit()), len(text))]


def check_tasks(names) -> None:
    """Raise InputError naming the first of `names` that is no task (before any of them runs)."""
    bad = next((n for n in names if n not in TASKS), None)
    if bad is not None:
        raise InputError(f"unknown task {bad!r} (choose from {', '.join(TASKS)})")


def check_items(n_items: int | None) -> None:
    """Raise InputError unless `n_items` (items per task) is None (the task's own count) or >= 1."""
    if n_items is not None and n_items < 1:
        raise InputError(f"items per task must be >= 1, got {n_items}")


def _fit(before: list[int], line: list[int], after: list[int], context: int) -> tuple[list, list, list]:
    """An infill item cut to the model's context: the masked line whole, the code around it trimmed
    from its far ends, the room shared (a model never sees past its context)."""
    room = max(context - len(line), 0)
    if len(before) + len(after) <= room:
        return before, line, after
    a = min(len(after), room // 2)
    b = room - a
    return before[len(before) - b:], line, after[:a]


def run_task(backend, tok, name: str, n_items: int | None = None, seed: int = 0) -> dict:
    """Score one task on any backend (torch model, onnxruntime, llama.cpp); returns the score
    with its 95% Wilson interval (`ci95`), the item count, the per-item outcomes (1 right, 0
    wrong, in item order: the same items for every model, so two models compare pairwise) and the
    task's fixed settings."""
    from .. import generate
    from ..runtime.backends import as_backend
    from ..runtime.loop import infill
    from .likelihood import elbo
    from .stats import wilson

    check_tasks([name])
    check_items(n_items)
    task = TASKS[name]
    n = n_items or task.n_items
    be = as_backend(backend)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    outcomes: list[int] = []  # 1 right, 0 wrong, per item in order (paired comparisons across models)
    if task.category == "general":
        for k, it in enumerate(cloze_items(n, seed)):
            scores = []
            for c in it["choices"]:
                ids = enc(it["prefix"] + c + it["suffix"])
                scores.append(elbo(be, ids[:1], ids[1:], mc=task.mc, batch=task.mc, seed=seed + k).elbo)
            outcomes.append(int(max(range(len(scores)), key=scores.__getitem__) == it["answer"]))
    elif task.category == "math":
        for a, op, b in arithmetic_test_problems()[:: max(1, 1000 // n)][:n]:
            out = generate(be, [enc(f"{a}{op}{b}=")], gen_length=task.gen_length, steps=task.steps,
                           block_length=task.block_length)
            outcomes.append(int(answer_digits(tok.decode(out.generated[0].tolist()))
                                == format_problem(a, op, b).split("=")[1]))
    else:  # code: infill the masked line in place, as many tokens as the reference line has
        mask = be.spec.mask_id
        run = name == "line_infill_exec"
        if run:
            executed = executed_lines()
            if not executed:
                raise InputError("line_infill_exec needs CPython's test package (test.test_textwrap, ...), "
                                 "which this Python lacks")
            sources = dict(code_texts(held_out=True))
        for it in infill_items(n, seed, executed if run else None):
            before, line, after = _fit(enc(it["before"]), enc(it["line"]), enc(it["after"]), be.max_length)
            x = torch.tensor([before + [mask] * len(line) + after])
            got = infill(be, x)[0, len(before):len(before) + len(line)]
            text = tok.decode(got.tolist())
            exact = " ".join(text.split()) == " ".join(it["line"].split())
            if run and not exact:  # an exact line passes by construction; anything else is run
                lines = sources[it["module"]].split("\n")
                indent = it["line"][: len(it["line"]) - len(it["line"].lstrip())]
                lines[it["lineno"] - 1] = indent + text.strip() if text.strip() else indent + "pass"
                exact = passes_tests(it["module"], "\n".join(lines))
            outcomes.append(int(exact))
    total = len(outcomes)
    lo, hi = wilson(sum(outcomes), total)
    return {"task": name, "category": task.category, "score": sum(outcomes) / max(total, 1), "n": total,
            "ci95": [lo, hi], "outcomes": outcomes, "settings": asdict(task)}
