"""The training corpus of the bundled default models, fixed in code and built offline.

Nothing is downloaded: every machine that runs Python has its standard library, so the corpus is
made of three deterministic sources (see `CorpusRecipe`):

* **code**: the CPython standard library source (`Lib/**/*.py` of the running interpreter), sorted by
  path, without tests, GUI/IDE packages, vendored packages and large generated tables. The modules in
  `HELD_OUT_MODULES` never enter training; they are the held-out set for masked-token accuracy and
  ELBO bits/token.
* **arithmetic**: lines such as `47+38=85`, `91-17=74`, `7*8=56` drawn from a seeded RNG. A fixed,
  seeded subset of the 2-digit `+`/`-` problems (`arithmetic_test_problems`) is held out, and
  training lines never contain them.
* **english**: sentences taken from the docstrings of the training modules (a general-text task).

The same recipe and seed give the same texts on the same Python version (the stdlib differs between
versions; the model cards record the one used).
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from collections import deque
from dataclasses import dataclass
from pathlib import Path

# Whole modules held out for evaluation: a mix of text processing, numerics, algorithms and parsing.
HELD_OUT_MODULES: tuple[str, ...] = (
    "textwrap", "fractions", "heapq", "bisect", "colorsys", "shlex", "fnmatch", "graphlib", "calendar",
    "string",
)

# Directories (any path component) that are not part of the corpus.
EXCLUDED_DIRS: frozenset[str] = frozenset({
    "test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages", "__pycache__",
    "encodings", "pydoc_data", "ensurepip", "config-3.11", "dist-packages",
})
# Files larger than this are generated tables or bundled data rather than hand-written code.
MAX_FILE_BYTES = 250_000


@dataclass(frozen=True)
class CorpusRecipe:
    """Mixing proportions (fractions of training windows) and the arithmetic set-up.

    Attributes:
        code / arithmetic / english: share of training windows drawn from each source.
        seed: seeds the arithmetic lines, the test split and the sentence shuffle.
        n_arithmetic_test: 2-digit `+`/`-` problems held out (never in training).
        n_arithmetic_train_lines: arithmetic lines in the training stream.
    """

    code: float = 0.38
    arithmetic: float = 0.52
    english: float = 0.10
    seed: int = 1234
    n_arithmetic_test: int = 1000
    n_arithmetic_train_lines: int = 400_000


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder (`Lib/`)."""
    return Path(sysconfig.get_paths()["stdlib"])


def module_name(path: Path, root: Path) -> str:
    """Dotted module name of a stdlib file (`json/decoder.py` -> `json.decoder`, `__init__` dropped)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_held_out(name: str) -> bool:
    """True for a module (or a submodule of a package) listed in `HELD_OUT_MODULES`."""
    top = name.split(".")[0]
    return top in HELD_OUT_MODULES


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The corpus's stdlib source files, sorted by path (held-out modules included)."""
    root = root or stdlib_root()
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in EXCLUDED_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("test_") or p.stat().st_size > MAX_FILE_BYTES:
            continue
        out.append(p)
    return out


def _read(p: Path) -> str | None:
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text.replace("\r\n", "\n")


def code_texts(held_out: bool = False) -> list[tuple[str, str]]:
    """(module name, source) of the training modules, or of the held-out ones with `held_out=True`."""
    root = stdlib_root()
    out = []
    for p in stdlib_files(root):
        name = module_name(p, root)
        if is_held_out(name) != held_out:
            continue
        text = _read(p)
        if text and text.strip():
            out.append((name, text))
    return out


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_SCOPES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)  # the nodes a docstring opens
_STATEMENT_LISTS = frozenset({"body", "orelse", "finalbody", "handlers", "cases"})


def _scopes(tree: ast.AST):
    """The module, classes and functions of `tree` in `ast.walk`'s breadth-first order, walking only
    the statement lists (defs and classes stand nowhere else), so most of the tree is skipped."""
    todo = deque([tree])
    while todo:
        node = todo.popleft()
        for name in node._fields:  # field order, as ast.iter_child_nodes
            if name in _STATEMENT_LISTS:
                todo.extend(getattr(node, name))
        if isinstance(node, _SCOPES):
            yield node


def docstring_sentences(sources: list[str]) -> list[str]:
    """English-looking sentences from the docstrings of `sources` (deduplicated, in first-seen order)."""
    seen: dict[str, None] = {}
    for src in sources:
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        for node in _scopes(tree):
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in doc.split("\n\n"):
                flat = " ".join(para.split())
                for s in _SENTENCE_SPLIT.split(flat):
                    if _looks_english(s):
                        seen.setdefault(s, None)
    return list(seen)


def _looks_english(s: str) -> bool:
    if not (20 <= len(s) <= 240) or not s[0].isupper() or s[-1] not in ".!?":
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters / len(s) > 0.9 and len(s.split()) >= 4 and ">>>" not in s


def format_problem(a: int, op: str, b: int) -> str:
    """`a op b=result` for op in + - * (no spaces, no trailing newline)."""
    result = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a}{op}{b}={result}"


def _all_two_digit_problems() -> list[tuple[int, str, int]]:
    """Every 2-digit `a+b` and `a-b` with a >= b (non-negative results)."""
    probs = [(a, "+", b) for a in range(10, 100) for b in range(10, 100)]
    probs += [(a, "-", b) for a in range(10, 100) for b in range(10, 100) if a >= b]
    return probs


def arithmetic_test_problems(recipe: CorpusRecipe = CorpusRecipe()) -> list[tuple[int, str, int]]:
    """The held-out 2-digit +/- problems (a seeded sample; training lines never contain them)."""
    probs = _all_two_digit_problems()
    random.Random(recipe.seed).shuffle(probs)
    return sorted(probs[:recipe.n_arithmetic_test], key=lambda p: (p[1], p[0], p[2]))


def arithmetic_lines(n: int, recipe: CorpusRecipe = CorpusRecipe(), seed_offset: int = 1) -> list[str]:
    """`n` training lines: 40% 2-digit +, 40% 2-digit - (a >= b), 20% (1-2 digit) * (1 digit).

    Problems in `arithmetic_test_problems` are never produced. One seeded stream: the first k of
    `n` lines are the k lines asked for alone.
    """
    test = set(arithmetic_test_problems(recipe))
    rng = random.Random(recipe.seed + seed_offset)
    out = []
    while len(out) < n:
        r = rng.random()
        if r < 0.8:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            op = "+" if r < 0.4 else "-"
            if op == "-" and a < b:
                a, b = b, a
            if (a, op, b) in test:
                continue
        else:
            a, b, op = rng.randint(0, 99), rng.randint(0, 9), "*"
            if rng.random() < 0.5:
                a, b = b, a
        out.append(format_problem(a, op, b))
    return out


@dataclass(frozen=True)
class Corpus:
    """The texts of each source: training documents and held-out evaluation data."""

    code_train: list[str]
    english_train: list[str]
    arithmetic_train: list[str]
    code_held_out: list[tuple[str, str]]
    arithmetic_test: list[tuple[int, str, int]]

    def tokenizer_texts(self) -> list[str]:
        """Texts the tokenizer is trained on (training sources only, arithmetic as a small sample)."""
        return self.code_train + ["\n".join(self.english_train)] + ["\n".join(self.arithmetic_train[:20000])]


def english_sentences(code_train: list[str], recipe: CorpusRecipe = CorpusRecipe()) -> list[str]:
    """The English training sentences: the docstrings of the training code, in the recipe's order."""
    sentences = docstring_sentences(code_train)
    random.Random(recipe.seed + 2).shuffle(sentences)
    return sentences


def build_corpus(recipe: CorpusRecipe = CorpusRecipe()) -> Corpus:
    """Build every source of the recipe (deterministic for a given Python version)."""
    train = [t for _, t in code_texts(held_out=False)]
    return Corpus(
        code_train=train,
        english_train=english_sentences(train, recipe),
        arithmetic_train=arithmetic_lines(recipe.n_arithmetic_train_lines, recipe),
        code_held_out=code_texts(held_out=True),
        arithmetic_test=arithmetic_test_problems(recipe),
    )


def corpus_summary(corpus: Corpus) -> dict:
    """Sizes of each source (for logs and model cards)."""
    return {
        "stdlib": str(stdlib_root()),
        "code_train_files": len(corpus.code_train),
        "code_train_chars": sum(map(len, corpus.code_train)),
        "english_sentences": len(corpus.english_train),
        "arithmetic_train_lines": len(corpus.arithmetic_train),
        "held_out_modules": [n for n, _ in corpus.code_held_out],
        "held_out_chars": sum(len(t) for _, t in corpus.code_held_out),
        "arithmetic_test_problems": len(corpus.arithmetic_test),
    }
