"""The package's import graph, read from the source (nothing is imported): no module reaches itself
through its imports, lazy (function-level) imports included."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dllm_export"


def module_files(root: Path = PACKAGE) -> dict[str, Path]:
    """dotted module name -> file (a package is named by its folder, as `import` names it)."""
    out = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports_of(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that module `name` imports anywhere in its file."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from . import x` imports the submodule x when there is one
                found.add(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target)
    return {m for m in found if m in modules and m != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return comps


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    modules = module_files()
    assert len(modules) > 50 and "dllm_export.quant.gptq" in modules
    graph = {name: imports_of(name, f, modules) for name, f in modules.items()}
    assert "dllm_export.quant.primitives" in graph["dllm_export.quant.gptq"]
    assert cycles(graph) == []


def test_algorithm_modules_import_only_primitives():
    """GPTQ and RTN are pure algorithms (as IST-DASLab's gptq.py): no method registry, no driver."""
    modules = module_files()
    allowed = {"dllm_export.errors", "dllm_export.quant.primitives", "dllm_export.quant.rtn"}
    for name in ("dllm_export.quant.gptq", "dllm_export.quant.rtn"):
        assert imports_of(name, modules[name], modules) <= allowed, name


def test_sources_cite_nothing_outside_the_repository():
    """Docstrings state the fact or cite a public source, never a notes folder of one machine."""
    cited = [f.name for f in PACKAGE.rglob("*.py") if "shared/research" in f.read_text()]
    assert cited == []


def test_the_package_imports_without_torch_and_resolves_its_api():
    """`import dllm_export` (and `dllm-export --version`) load no torch: the API's modules load on
    first use; every public name resolves to the object its module defines."""
    import subprocess
    import sys

    probe = ("import sys, dllm_export, dllm_export.cli as cli; assert 'torch' not in sys.modules, 'torch'; "
             "assert cli.main(['--version']) == 0; assert 'torch' not in sys.modules, 'torch after --version'")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == __import__("dllm_export").__version__, done.stderr[-500:]

    import importlib

    import dllm_export as D

    for name in D.__all__:
        value = getattr(D, name)
        if name in D._LAZY:
            assert value is getattr(importlib.import_module(D._LAZY[name], "dllm_export"), name)
    assert sorted(dir(D)) == sorted(D.__all__)
