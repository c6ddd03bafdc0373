"""`dllm-export build CONFIG.toml`: a matrix of artifacts (models x targets) with quality gates.

Every cell (one model x one target, key "model/target") is exported with `exporter.export`
(deterministic: same inputs, same bytes), scored against its float model (held-out bits/token and
arithmetic exact match, through the artifact's own runtime) and benchmarked. The output folder holds
the artifacts and two files:

    manifest.json       what the artifacts are: per cell its files (sha256, bytes), scheme, method,
                        calibration, quality, deltas and gate; no timings, no machine paths, so two
                        builds of one config give the same bytes (a release manifest).
    measurements.json   how this build went: quantize / export seconds, bench figures, host.

A cell whose quality drops past a gate makes the build fail (exit code 1), naming the cell.

Cells are independent, so they run on an executor (`executors`: local, ray), or one per CI job:
`plan_matrix` lists them for a CI matrix, `build(..., cells=[KEY])` builds one, and `merge` joins
the cells' output folders into the folder (and the manifest) one `build` run gives.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import math
import re
import reprlib
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DllmExportError, InputError
from .executors import Cell, Executor, LocalExecutor
from .fileio import atomic_folder, check_output_folder

FORMAT = "dllm-export/build"
VERSION = 2  # 2: timings and bench figures moved to measurements.json, config by name and sha256
MEASUREMENTS_FORMAT = "dllm-export/build-measurements"
MANIFEST, MEASUREMENTS = "manifest.json", "measurements.json"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_SECTIONS = ("models", "targets", "calibration", "evaluation", "gates")
_MODEL_KEYS = {"name": str, "path": str}
# keys a [[targets]] entry may carry (export() arguments), with their TOML types
_TARGET_KEYS = {"name": str, "target": str, "bits": int, "method": str, "scheme": str, "group_size": int,
                "weight_format": str, "accuracy_level": int, "act_kernel": str, "quant": str, "device": str}
# gate -> the (lowest, highest) values that mean something: a drop of exact match is a fraction; a
# relative rise of bits/token can be negative (a quantized model may score better), never below -100 %
_GATES = {"max_drop": (0.0, 1.0), "max_bpt_increase": (-1.0, None)}


@dataclass(frozen=True)
class Gates:
    """Quality gates, each against the float model of the same checkpoint.

    Attributes:
        max_drop: largest allowed drop of arithmetic exact match (absolute, 0.02 = 2 points).
        max_bpt_increase: largest allowed relative increase of held-out bits/token (0.05 = 5%).
    """

    max_drop: float | None = None
    max_bpt_increase: float | None = None


@dataclass(frozen=True)
class BuildConfig:
    """A parsed build file: models, targets, calibration, evaluation sizes and gates."""

    models: list[dict]
    targets: list[dict]
    calib_samples: int = 32
    calib_seq_len: int = 128
    eval_windows: int = 8
    problems: int = 50
    bench: bool = True
    gates: Gates = field(default_factory=Gates)
    source: dict = field(default_factory=dict)  # the config file's name and sha256 (no path)


def read_config(path: str | Path) -> BuildConfig:
    """Parse and check a build TOML (see examples/build.toml): every section, key, type and range,
    so a bad file is a one-line InputError naming the key before anything is built."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise InputError("dllm-export build needs Python 3.11+ (tomllib)") from None
    p = Path(path)
    if not p.is_file():
        raise InputError(f"build config not found: {p}")
    data = p.read_bytes()
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{p}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                         f"TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{p}: not valid TOML ({e})") from None
    _check_keys(p, "section(s)", raw, _SECTIONS)
    models = _entries(p, raw, "models", _MODEL_KEYS, ("name", "path"))
    targets = _entries(p, raw, "targets", _TARGET_KEYS, ("name", "target"))
    for kind, entries in (("model", models), ("target", targets)):
        names = [x["name"] for x in entries]
        bad = [n for n in names if not _NAME.fullmatch(n)]
        if bad:  # a name is a folder of the output and half of a cell key ("model/target")
            raise InputError(f"{p}: names may hold letters, digits, '.', '_' and '-' only: {', '.join(map(repr, bad))}")
        if len(set(names)) != len(names):
            raise InputError(f"{p}: {kind} names must be unique")
    cal = _section(p, raw, "calibration", {"samples": (32, 1), "seq_len": (128, 8)})
    ev = _section(p, raw, "evaluation", {"windows": (8, 1), "problems": (50, 1), "bench": (True, None)})
    return BuildConfig(models=models, targets=targets, calib_samples=cal["samples"], calib_seq_len=cal["seq_len"],
                       eval_windows=ev["windows"], problems=ev["problems"], bench=ev["bench"],
                       gates=_gates(p, raw), source={"name": p.name, "sha256": hashlib.sha256(data).hexdigest()})


def _check_keys(p: Path, where: str, table: dict, known) -> None:
    """InputError naming the keys of `table` not in `known` (and the closest known one)."""
    unknown = sorted(k for k in table if k not in known)
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(known), n=1)
        shown = ", ".join(k if k.isprintable() else repr(k) for k in unknown)
        raise InputError(f"{p}: unknown {where} {shown} (known: {', '.join(known)})"
                         + (f"; did you mean {close[0]}?" if close else ""))


def _table(p: Path, raw: dict, name: str) -> dict:
    table = raw.get(name, {})
    if not isinstance(table, dict):  # reprlib: a value shown in one short line
        raise InputError(f"{p}: [{name}] must be a table, got {name} = {reprlib.repr(table)}")
    return table


def _entries(p: Path, raw: dict, name: str, keys: dict, required: tuple) -> list[dict]:
    """The [[name]] tables (at least one): known keys of the right type, the required ones present."""
    entries = raw.get(name)
    if entries is None or entries == []:
        raise InputError(f"{p}: needs at least one [[{name}]] table")
    if not isinstance(entries, list) or not all(isinstance(x, dict) for x in entries):
        raise InputError(f"{p}: {name} must be [[{name}]] tables, got {name} = {reprlib.repr(entries)}")
    for i, x in enumerate(entries, 1):
        where = f"[[{name}]] {x['name']!r}" if isinstance(x.get("name"), str) else f"[[{name}]] #{i}"
        _check_keys(p, f"{where} key(s)", x, keys)
        missing = [k for k in required if k not in x]
        if missing:
            raise InputError(f"{p}: {where} needs {' and '.join(missing)}")
        for k, v in x.items():
            if type(v) is not keys[k]:  # bool is an int in Python: `bits = true` is not a width
                want = "a string" if keys[k] is str else "an integer"
                raise InputError(f"{p}: {where} {k} must be {want}, got {reprlib.repr(v)}")
    return entries


def _section(p: Path, raw: dict, name: str, keys: dict) -> dict:
    """A [name] table's settings: {key: (default, least)}, integers >= least (or a bool where least
    is None); an unknown key or a value of another type or range is an InputError naming it."""
    table = _table(p, raw, name)
    _check_keys(p, f"[{name}] key(s)", table, keys)
    out = {}
    for key, (default, least) in keys.items():
        v = table.get(key, default)
        kind = bool if least is None else int
        # bool is an int in Python: `samples = true` is not a count
        if type(v) is not kind or (least is not None and v < least):
            want = "true or false" if least is None else f"an integer >= {least}"
            raise InputError(f"{p}: [{name}] {key} must be {want}, got {reprlib.repr(v)}")
        out[key] = v
    return out


def _gates(p: Path, raw: dict) -> Gates:
    """[gates]: finite numbers within each gate's bounds (_GATES)."""
    table = _table(p, raw, "gates")
    _check_keys(p, "[gates] key(s)", table, _GATES)
    for key, v in table.items():
        low, top = _GATES[key]
        # bool is an int in Python, and nan passes no comparison: both would gate nothing
        if type(v) not in (int, float) or not math.isfinite(v) or v < low or (top is not None and v > top):
            want = f"a number >= {low:g}" if top is None else f"a number from {low:g} to {top:g}"
            raise InputError(f"{p}: [gates] {key} must be {want}, got {reprlib.repr(v)}")
    return Gates(**table)


def cell_key(model: dict, target: dict) -> str:
    """The stable key of a cell: "model/target" (the names of the config)."""
    return f"{model['name']}/{target['name']}"


def build_cells(cfg: BuildConfig, out_dir: str | Path) -> list[Cell]:
    """The config's cells, models outer and targets inner (the manifest's order). Paths in the
    arguments are absolute so that a worker on another node (sharing the filesystem) finds them."""
    from .models.checkpoint import BUNDLED

    out = Path(out_dir).resolve()
    calib = {"n_samples": cfg.calib_samples, "seq_len": cfg.calib_seq_len}
    ev = {"windows": cfg.eval_windows, "problems": cfg.problems, "bench": cfg.bench}
    return [Cell(cell_key(m, t), {"model": m["path"] if m["path"] in BUNDLED else str(Path(m["path"]).resolve()),
                                  "target": t, "out": str(out / m["name"] / t["name"]), "calib": calib,
                                  "evaluation": ev, "gates": asdict(cfg.gates)})
            for m in cfg.models for t in cfg.targets]


def check_cells(cells: list[Cell]) -> None:
    """Resolve each cell's export as `run_build_cell` will (`exporter.plan_export`: target, bits,
    scheme, method, model path), so a request the exporter refuses stops the build before anything
    is written, not after the other cells were built."""
    from .exporter import ExportRequest, plan_export
    from .quant import CalibConfig

    for c in cells:
        a = c.args
        req = ExportRequest(**{k: v for k, v in a["target"].items() if k != "name"},
                            quantize_options={"calib": CalibConfig(**a["calib"])})
        try:
            plan_export(a["model"], a["out"], req)
        except DllmExportError as e:
            raise InputError(f"cell {c.key}: {e}") from None


def plan_matrix(config_path: str | Path) -> dict:
    """The cells as a CI job matrix: {"include": [{"cell": KEY, "id": a file-name-safe KEY}, ...]}
    (GitHub Actions: `strategy.matrix: ${{ fromJSON(needs.plan.outputs.matrix) }}`), every cell
    checked as `build` checks it, so a bad target or model fails the plan, not one job of it."""
    cfg = read_config(config_path)
    with tempfile.TemporaryDirectory() as d:  # plan_export checks an output path too; nothing is written
        check_cells(build_cells(cfg, d))
    return {"include": [{"cell": cell_key(m, t), "id": f"{m['name']}--{t['name']}"}
                        for m in cfg.models for t in cfg.targets]}


@functools.lru_cache(maxsize=8)
def _float_quality(model: str, windows: int, problems: int) -> dict:
    """The float model's quality (what the gates compare to), once per model and process."""
    from . import load_tokenizer
    from .eval.quality import quick_quality
    from .runtime.backends import load_backend

    return quick_quality(load_backend(model), load_tokenizer(model), windows=windows, problems=problems)


def _files(folder: Path) -> dict:
    return {f.name: {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "bytes": f.stat().st_size}
            for f in sorted(folder.iterdir()) if f.is_file()}


def _host() -> dict:
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "machine": platform.machine(), "cpus": os.cpu_count()}


def run_build_cell(cell: Cell) -> dict:
    """Export, score and gate one cell; returns {"entry": its manifest entry, "measurements": ...}.
    A request the exporter refuses (bad input) is the entry's `error`. An artifact folder that is
    already there (complete: exports are atomic) is reused, e.g. by a retry after a killed worker."""
    import time

    from . import load_tokenizer
    from .bench import BenchConfig, measure
    from .quant import CalibConfig
    from .runtime.backends import load_backend
    from .verify import export_verified

    a, key = cell.args, cell.key
    out, t = Path(a["out"]), a["target"]
    calib, ev, gates = CalibConfig(**a["calib"]), a["evaluation"], Gates(**a["gates"])
    rel = f"{out.parent.name}/{out.name}"
    times: dict = {"quantize_s": None, "export_s": None}
    try:
        for tmp in out.parent.glob(f".{out.name}.*"):  # left by a worker killed while exporting
            shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "manifest.json").is_file():
            t0 = time.perf_counter()
            # verified (hashes, checker, smoke forward) before it takes its name
            res, _ = export_verified(a["model"], out, quantize_options={"calib": calib},
                                     **{k: v for k, v in t.items() if k != "name"})
            times = {"quantize_s": res.quantize_seconds, "export_s": res.export_seconds,
                     "total_s": round(time.perf_counter() - t0, 3)}
        manifest = json.loads((out / "manifest.json").read_text())
        base = _float_quality(a["model"], ev["windows"], ev["problems"])
        tok = load_tokenizer(a["model"])
        from .eval.quality import quick_quality

        quality = quick_quality(load_backend(out), tok, windows=ev["windows"], problems=ev["problems"])
    except DllmExportError as e:
        return {"entry": {"cell": key, "path": rel, "target": t["target"], "error": str(e), "gate": "error"},
                "measurements": {"cell": key}}
    deltas = {"arith_em_drop": round(base["arith_em"] - quality["arith_em"], 4),
              "bpt_increase": round(quality["bits_per_token"] / base["bits_per_token"] - 1, 4)}
    failures = []
    if gates.max_drop is not None and deltas["arith_em_drop"] > gates.max_drop:
        failures.append(f"arithmetic exact match drops {deltas['arith_em_drop']:.3f} > {gates.max_drop}")
    if gates.max_bpt_increase is not None and deltas["bpt_increase"] > gates.max_bpt_increase:
        failures.append(f"bits/token rise {deltas['bpt_increase']:.3f} > {gates.max_bpt_increase}")
    entry = {"cell": key, "path": rel, "target": t["target"], "scheme": manifest.get("scheme"),
             "method": manifest.get("method"), "file_type": manifest.get("file_type"), "calibration": asdict(calib),
             "files": _files(out), "quality": quality, "float_quality": base, "deltas": deltas,
             "gate": "fail: " + "; ".join(failures) if failures else "pass"}
    meas = {"cell": key, **times, "host": _host()}
    if ev["bench"]:
        bench = measure(str(out), BenchConfig(reps=3, gen_length=32, block_length=32))
        bench.pop("path", None)
        meas["bench"] = bench
    return {"entry": entry, "measurements": meas}


def _write_outputs(out: Path, cfg: BuildConfig, entries: list[dict], measurements: list[dict]) -> dict:
    """manifest.json (deterministic: what the artifacts are) and measurements.json (how the build went)."""
    from .fileio import atomic_file

    failed = [e["cell"] for e in entries if e.get("gate") != "pass"]
    manifest = {"format": FORMAT, "version": VERSION, "config": cfg.source, "gates": asdict(cfg.gates),
                "cells": entries, "failed": failed}
    for name, doc in ((MEASUREMENTS, {"format": MEASUREMENTS_FORMAT, "cells": measurements}), (MANIFEST, manifest)):
        with atomic_file(out / name) as tmp:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return manifest


def _select(cells: list[Cell], keys: list[str] | None) -> list[Cell]:
    if keys is None:
        return cells
    have = {c.key for c in cells}
    unknown = [k for k in keys if k not in have]
    if unknown:
        raise InputError(f"unknown cell(s) {', '.join(unknown)}; the config's cells: {', '.join(sorted(have))}")
    return [c for c in cells if c.key in set(keys)]


def build(config_path: str | Path, out_dir: str | Path, progress: bool = False, executor: Executor | None = None,
          cells: list[str] | None = None) -> dict:
    """Build the config's cells (all, or the keys in `cells`) into `out_dir` on `executor` (default:
    this process); returns the build manifest (also out_dir/manifest.json, with measurements.json
    beside it). `manifest["failed"]` lists the cells that broke a gate or could not be built; a
    cell that raised is in it with its error, and the other cells are built all the same.

    The config, the cell keys and each selected cell's export are checked before anything is
    written; the build is staged beside `out_dir` and renamed into place whole, so a refused or
    interrupted build leaves no output folder (and a re-run starts afresh)."""
    cfg = read_config(config_path)
    out = check_output_folder(out_dir)
    check_cells(_select(build_cells(cfg, out), cells))
    with atomic_folder(out) as stage:
        todo = _select(build_cells(cfg, stage), cells)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="build", unit="cell")
        try:
            results = (executor or LocalExecutor()).map(run_build_cell, todo,
                                                        on_done=None if bar is None else lambda r: bar.update(1))
        finally:
            if bar is not None:
                bar.close()
        entries, meas = [], []
        for c, r in zip(todo, results):
            if r.error is not None:
                r_value = {"entry": {"cell": c.key, "path": c.key, "target": c.args["target"]["target"],
                                     "error": f"cell {c.key} failed: {r.error}", "gate": "error"},
                           "measurements": {"cell": c.key}}
            else:
                r_value = r.value
            entries.append(r_value["entry"])
            meas.append(r_value["measurements"])
        manifest = _write_outputs(stage, cfg, entries, meas)
    return manifest


def _read_part(part: Path, cfg: BuildConfig) -> tuple[list[dict], dict]:
    """A per-cell build folder's manifest entries and its measurements by cell, checked: this format
    and version, this config, and entries that name their cell and lie under its key."""
    f = part / MANIFEST
    if not f.is_file():
        raise InputError(f"{part}: no {MANIFEST} (expected the --out folder of `dllm-export build --cell`)")
    try:
        m = json.loads(f.read_text())
        meas = json.loads((part / MEASUREMENTS).read_text()) if (part / MEASUREMENTS).is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{part}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise InputError(f"{f}: not a build manifest of this version ({FORMAT} v{VERSION})")
    if m.get("config") != cfg.source:
        raise InputError(f"{part} was built from another config ({m.get('config')}), not {cfg.source}")
    cells = m.get("cells")
    # an entry's path is joined to the part and to the merged folder: only its own key may be there
    if not isinstance(cells, list) or not all(isinstance(e, dict) and isinstance(e.get("cell"), str)
                                              and e.get("path") == e["cell"] for e in cells):
        raise InputError(f"{f}: malformed cell list (each entry names its cell, with path MODEL/TARGET)")
    rows = meas.get("cells") if isinstance(meas, dict) else None
    rows = rows if isinstance(rows, list) else []  # timings only: a part without them merges all the same
    return cells, {x["cell"]: x for x in rows if isinstance(x, dict) and isinstance(x.get("cell"), str)}


def merge(config_path: str | Path, parts: list[str | Path], out_dir: str | Path) -> dict:
    """Join the output folders of per-cell builds (`build(..., cells=[KEY])`, e.g. one CI job each)
    into `out_dir`: every cell of the config exactly once, each artifact's files checked against
    its part's manifest (sha256), copied into the layout one `build` run writes, and that run's
    manifest.json (same bytes) and measurements.json. Written atomically."""
    cfg = read_config(config_path)
    keys = [cell_key(m, t) for m in cfg.models for t in cfg.targets]
    found: dict[str, tuple[Path, dict, dict]] = {}
    for part in map(Path, parts):
        cells, by_key = _read_part(part, cfg)
        for e in cells:
            if e["cell"] in found:
                raise InputError(f"cell {e['cell']} is in both {found[e['cell']][0]} and {part}")
            if e["cell"] not in keys:
                raise InputError(f"{part}: cell {e['cell']} is not in {cfg.source['name']}")
            found[e["cell"]] = (part, e, by_key.get(e["cell"], {"cell": e["cell"]}))
    missing = [k for k in keys if k not in found]
    if missing:
        raise InputError(f"missing cell(s) {', '.join(missing)}: pass the output folder of each")
    with atomic_folder(out_dir) as tmp:
        for k in keys:
            part, e, _ = found[k]
            if "files" not in e:  # a cell that could not be built: its entry says why
                continue
            src = part / e["path"]
            if not src.is_dir() or _files(src) != e["files"]:
                raise InputError(f"{part}: the files of cell {k} under {src} do not match its manifest")
            shutil.copytree(src, tmp / e["path"])
        manifest = _write_outputs(tmp, cfg, [found[k][1] for k in keys], [found[k][2] for k in keys])
    return manifest


__all__ = ["BuildConfig", "Gates", "build", "build_cells", "cell_key", "check_cells", "merge", "plan_matrix",
           "read_config", "run_build_cell"]
