"""The study-style report: models x (method, scheme, calibration) x tasks, against the fp baseline.

Each cell quantizes once (the quantized checkpoint is kept under OUT/cells/ and reused) and
caches its task results (OUT/cells/<cell>/results.json), so an interrupted report resumes where
it stopped. A cell records the sha256 of its source model's files and the item count; a cached cell
whose model changed since (a retrained checkpoint under the same name) or that was scored on another
item count is computed again. The cells are independent (`report_cells`, `run_cell`): they run on an
executor (`executors`: this process, or one Ray task each) and the report is the same either way.
Output: report.md and report.csv (score per task with its 95% Wilson
interval, absolute and relative drop per task and per category with its 95% interval, paired on the
same items when the cells carry per-item outcomes), the fidelity of every cell to its fp model
(KLD +- se, top-1 agreement, ELBO difference: `fidelity.py`), a findings section computed from
significant differences only, and score_vs_bits.png (score against weight bits per method, one
panel per category).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..checks import check_fields
from ..errors import DllmExportError, InputError
from ..executors import Cell, Executor, LocalExecutor
from ..fileio import atomic_file, check_output_folder, probe_writable
from ..models.checkpoint import BUNDLED, checkpoint_sha256

# the files run_report writes beside cells/ (each atomically)
REPORT_FILES = ("report.json", "report.csv", "report.md", "score_vs_bits.png")


@dataclass(frozen=True)
class ReportConfig:
    """The grid and its budgets."""

    models: tuple[str, ...] = ("default", "default-dream")
    methods: tuple[str, ...] = ("rtn", "gptq", "awq")
    schemes: tuple[str, ...] = ("W8A16", "W4A16", "W3A16")
    tasks: tuple[str, ...] = ("docstring_cloze", "arithmetic", "line_infill")
    calib_masks: tuple[str, ...] = ("uniform",)
    items: int | None = None
    calib_samples: int = 32
    calib_seq_len: int = 128
    fidelity: bool = True
    fidelity_windows: int = 16

    def __post_init__(self):
        """Settings no cell could run with are refused before the grid starts (InputError): an empty
        or repeated list, a method, scheme, task or calibration mask no registry knows, bad budgets.
        The models are checked by `run_report` (`check_models`: they are files, not names)."""
        from ..quant import METHODS, CalibConfig, get_scheme
        from ..quant.calibrate import MASKS
        from .fidelity import FidelityConfig
        from .tasks import TASKS, check_items

        check_fields(self, ints=("items", "calib_samples", "calib_seq_len", "fidelity_windows"), bools=("fidelity",))
        for name in ("models", "methods", "schemes", "tasks", "calib_masks"):
            object.__setattr__(self, name, _names(name, getattr(self, name)))
        # canonical scheme names: cell keys and the bits read from them (plots, findings) need "W4A16", not "w4a16"
        object.__setattr__(self, "schemes", _names("schemes", tuple(get_scheme(s).name for s in self.schemes)))
        _known("method", self.methods, sorted(METHODS))
        _known("task", self.tasks, TASKS)
        _known("calibration mask", self.calib_masks, MASKS)
        check_items(self.items)
        CalibConfig(n_samples=self.calib_samples, seq_len=self.calib_seq_len)
        if self.fidelity:
            FidelityConfig(windows=self.fidelity_windows)


def _names(field: str, value) -> tuple[str, ...]:
    """A grid axis as a tuple of names (a string is read as a comma-separated list); InputError when
    it is empty or names something twice (two cells would share one cache folder)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(x, (str, os.PathLike)) for x in items):
        raise InputError(f"report {field} must be a list of names, got {value!r}")
    names = tuple(n for n in (str(x).strip() for x in items) if n)
    if not names:
        raise InputError(f"report {field}: none given (name at least one)")
    twice = next((n for i, n in enumerate(names) if n.lower() in {m.lower() for m in names[:i]}), None)
    if twice is not None:
        raise InputError(f"report {field}: {twice!r} is listed twice")
    return names


def _known(what: str, names: tuple[str, ...], known) -> None:
    """InputError naming the first of `names` not in `known`, with the known ones."""
    bad = next((n for n in names if n not in known), None)
    if bad is not None:
        raise InputError(f"unknown {what} {bad!r} (choose from {', '.join(known)})")


def check_models(models) -> None:
    """Raise CheckpointError / InputError unless every model is a bundled name or a float checkpoint
    folder (config.json and weights), and no two share a folder name (their cells' cache folders and
    report rows are named after it)."""
    from ..models.checkpoint import read_config, resolve_float_checkpoint, weight_files

    seen: dict[str, str] = {}
    for m in models:  # a quantized one would fail in every cell, each with its row error
        path = resolve_float_checkpoint(m, "the report")
        read_config(path)
        weight_files(path)
        key = Path(str(m)).name.lower()
        if key in seen:
            raise InputError(f"models {seen[key]} and {m} share the name {Path(str(m)).name!r}: their cells would "
                             f"share cache folders (rename one folder)")
        seen[key] = str(m)


def check_report_folder(out: str | Path) -> Path:
    """`out` as a Path, or InputError unless it can hold a report: new, an empty folder, or the folder
    of an earlier report (holding cells/: the run resumes from its cached cells), and writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {out} exists and is a file")
    if not out.is_dir() or not any(out.iterdir()):
        return check_output_folder(out)
    if not (out / "cells").is_dir():
        raise InputError(f"output folder {out} is not empty and holds no report (no cells/): pick a new or empty "
                         f"folder, or an earlier report's folder to resume it")
    taken = next((n for n in REPORT_FILES if (out / n).is_dir()), None)
    if taken is not None:
        raise InputError(f"cannot write {out / taken}: a folder of that name is in the way")
    for folder in (out, out / "cells"):
        try:
            probe_writable(folder, "report")
        except OSError as e:
            raise InputError(f"cannot write the report folder {out}: {folder}: {e.strerror or e}") from None
    return out


def _cell_name(model: str, method: str, scheme: str, mask: str) -> str:
    return f"{Path(model).name}-{method}-{scheme}-{mask}".lower()


def model_fingerprint(model: str | Path) -> str:
    """sha256 over a checkpoint's config.json and weight files (names and bytes)."""
    return checkpoint_sha256(model)


def report_cells(cfg: ReportConfig, out_dir: str | Path) -> list[Cell]:
    """The grid as independent cells: each model's float baseline, then model x scheme x method x
    calibration. A cell's key is its cache folder's name (OUT/cells/<key>); its arguments are
    absolute paths, so that a worker on another node (sharing the filesystem) finds the same files."""
    out = Path(out_dir).resolve()
    prints = {m: model_fingerprint(m) for m in cfg.models}
    grid = [(m, None, None, None) for m in cfg.models]
    grid += [(m, me, s, k) for m in cfg.models for s in cfg.schemes for me in cfg.methods for k in cfg.calib_masks]
    cells = []
    for model, method, scheme, mask in grid:
        key = f"{Path(model).name}-fp" if method is None else _cell_name(model, method, scheme, mask)
        path = model if str(model) in BUNDLED else str(Path(model).resolve())
        cells.append(Cell(key, {"model": path, "method": method, "scheme": scheme, "mask": mask, "cfg": cfg,
                                "folder": str(out / "cells" / key), "model_sha256": prints[model]}))
    return cells


def _quantized_cell(cfg: ReportConfig, folder: Path, model: str, method: str, scheme: str, mask: str,
                    stale: bool) -> Path:
    """The cell's quantized checkpoint (made once, kept under cells/<name>/quantized, and reused by
    any later task of the same cell: it is written atomically)."""
    from ..quant import CalibConfig, QuantizeConfig, quantize

    qdir = folder / "quantized"
    if stale and qdir.exists():
        shutil.rmtree(qdir)
    for tmp in folder.glob(".quantized.*"):  # left by a worker killed while quantizing
        shutil.rmtree(tmp, ignore_errors=True)
    if not (qdir / "manifest.json").is_file():
        quantize(model, qdir, QuantizeConfig(method=method, scheme=scheme, calib=CalibConfig(
            n_samples=cfg.calib_samples, seq_len=cfg.calib_seq_len, mask=mask)), progress=False)
    return qdir


@functools.lru_cache(maxsize=2)
def _reference(model: str, windows: int):
    """The fp model's fidelity reference, built once per model and process (seeded: the same anywhere)."""
    from .. import load_model, load_tokenizer
    from .fidelity import FidelityConfig, build_reference

    return build_reference(load_model(model), load_tokenizer(model), FidelityConfig(windows=windows))


def run_cell(cell: Cell) -> dict:
    """One cell of the grid, from its cache folder when it holds this cell's results: quantize,
    then run the tasks not scored yet and the fidelity to the fp model. A method that refuses a
    scheme is recorded as the row's error (cached: the grid goes on).
    Returns {"row": the cell's results, "fidelity": its full fidelity result or None}."""
    from .. import load_model, load_tokenizer
    from .fidelity import compare
    from .tasks import run_task

    a, folder = cell.args, Path(cell.args["folder"])
    cfg: ReportConfig = a["cfg"]
    model, method = a["model"], a["method"]
    cache, fcache = folder / "results.json", folder / "fidelity.json"
    row = json.loads(cache.read_text()) if cache.is_file() else None
    stale = row is not None and (row.get("model_sha256"), row.get("items")) != (a["model_sha256"], cfg.items)
    if row is None or stale:  # new, or the model or the item count changed since: compute the cell again
        row = {"model": Path(str(model)).name, "model_sha256": a["model_sha256"], "items": cfg.items,
               "method": method or "fp", "scheme": a["scheme"], "calib": a["mask"], "scores": {}, "error": None}
        if fcache.is_file():
            fcache.unlink()
    row.setdefault("tasks", {})
    missing = [t for t in cfg.tasks if t not in row["scores"]]
    want_fid = cfg.fidelity and method is not None and not fcache.is_file()
    if (missing or want_fid) and not row["error"]:  # tasks added to a cached cell run on its checkpoint
        try:
            path = model if method is None else _quantized_cell(cfg, folder, model, method, a["scheme"], a["mask"],
                                                                stale)
            m, tok = load_model(path), load_tokenizer(path)
            for t in missing:
                res = run_task(m, tok, t, cfg.items)
                row["scores"][t] = res["score"]
                row["tasks"][t] = {k: res[k] for k in ("n", "ci95", "outcomes")}
            if want_fid:
                with atomic_file(fcache) as tmp:
                    tmp.write_text(json.dumps(compare(m, _reference(model, cfg.fidelity_windows)), indent=2) + "\n")
        except DllmExportError as e:  # a method that refuses a scheme: recorded, the grid goes on
            row["error"] = str(e)
        with atomic_file(cache) as tmp:
            tmp.write_text(json.dumps(row, indent=2) + "\n")
    return {"row": row, "fidelity": json.loads(fcache.read_text()) if fcache.is_file() else None}


def run_report(cfg: ReportConfig, out_dir: str | Path, progress: bool = False,
               executor: Executor | None = None) -> dict:
    """Run (or resume) the grid on `executor` (default: this process); write report.md, report.csv
    and report.json under out_dir. `result["failed"]` lists the cells that raised (not cached: a
    re-run tries them again) with their errors; their rows carry the error too.
    Raises InputError / CheckpointError before any work (and before out_dir is made) for a model
    that is no float checkpoint or an out_dir that cannot hold the report (`check_report_folder`)."""
    check_models(cfg.models)
    out = check_report_folder(out_dir)
    cells = report_cells(cfg, out)
    # not one atomic folder: cells/ is the resume cache, kept when a run stops; the report files appear whole
    (out / "cells").mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cells), desc="report", unit="cell")
    results = (executor or LocalExecutor()).map(run_cell, cells, on_done=None if bar is None else lambda r: bar.update(1))
    if bar is not None:
        bar.close()
    rows, failed = [], []
    fidelity_results: dict = {}  # cell name -> full fidelity result (per-window data: paired findings)
    for c, res in zip(cells, results):
        if res.error is not None:
            failed.append({"cell": c.key, "error": res.error})
            a = c.args
            row = {"model": Path(str(a["model"])).name, "model_sha256": a["model_sha256"], "items": cfg.items,
                   "method": a["method"] or "fp", "scheme": a["scheme"], "calib": a["mask"], "scores": {},
                   "tasks": {}, "error": f"cell {c.key} failed: {res.error}"}
        else:
            row = res.value["row"]
            if res.value["fidelity"] is not None:
                fidelity_results[c.key] = res.value["fidelity"]
                row["fidelity"] = dict(fidelity_results[c.key]["summary"])
        row["cell"] = c.key
        rows.append({**row, "scores": {t: row["scores"][t] for t in cfg.tasks if t in row["scores"]}})
    _annotate(rows, cfg)
    result = {"config": asdict(cfg), "rows": rows, "findings": _findings(rows, fidelity_results), "failed": failed}
    texts = {"report.json": json.dumps(_without_outcomes(result), indent=2) + "\n",
             "report.csv": _csv(rows, cfg.tasks), "report.md": _markdown(result, cfg)}
    for name, text in texts.items():  # all rendered first: a rendering error leaves the last report's files
        with atomic_file(out / name) as tmp:
            tmp.write_bytes(text.encode())
    from .plots import plot_report

    plot_report(result, out)
    return result


def _without_outcomes(result: dict) -> dict:
    """report.json without the per-item outcomes (they stay in each cell's results.json)."""
    rows = [{**r, "tasks": {t: {k: v for k, v in d.items() if k != "outcomes"} for t, d in r.get("tasks", {}).items()}}
            for r in result["rows"]]
    return {**result, "rows": rows}


def _task_result(row: dict, task: str) -> dict:
    """A task's score in the shape `stats.score_difference` reads (n from the cell's items when an
    older cache has no per-item record)."""
    from .tasks import TASKS

    rec = row.get("tasks", {}).get(task, {})
    n = rec.get("n") or row.get("items") or TASKS[task].n_items
    return {"score": row["scores"][task], "n": n, "outcomes": rec.get("outcomes")}


def _pooled(row: dict, tasks: list[str]) -> dict:
    """Items of several tasks pooled into one proportion (a category's score)."""
    parts = [_task_result(row, t) for t in tasks]
    n = sum(p["n"] for p in parts)
    k = sum(round(p["score"] * p["n"]) for p in parts)
    outs = None if any(p["outcomes"] is None for p in parts) else [o for p in parts for o in p["outcomes"]]
    return {"score": k / max(n, 1), "n": n, "outcomes": outs}


def _annotate(rows: list[dict], cfg: ReportConfig) -> None:
    """Add to each row: per task and per category its score interval, the drop from the fp row of its
    model (absolute, relative, 95% interval, significant or not)."""
    from .stats import score_difference, wilson
    from .tasks import TASKS

    base = {r["model"]: r for r in rows if r["method"] == "fp" and not r.get("error")}
    for r in rows:
        b = base.get(r["model"])
        cats: dict[str, list[str]] = {}
        for t in r["scores"]:
            cats.setdefault(TASKS[t].category, []).append(t)
        r["ci95"], r["drop"], r["rel_drop"], r["drop_ci95"], r["significant"] = {}, {}, {}, {}, {}
        r["category_score"], r["category_drop"], r["category_rel_drop"] = {}, {}, {}
        r["category_drop_ci95"], r["category_significant"] = {}, {}
        for key, res, bres, pre in ([(t, _task_result(r, t), b and t in b["scores"] and _task_result(b, t), "")
                                     for t in r["scores"]]
                                    + [(c, _pooled(r, ts), b and all(t in b["scores"] for t in ts) and _pooled(b, ts),
                                        "category_") for c, ts in cats.items()]):
            if pre:
                r["category_score"][key] = round(res["score"], 4)
            else:
                r["ci95"][key] = [round(x, 4) for x in wilson(round(res["score"] * res["n"]), res["n"])]
            if not bres:
                continue
            d = score_difference(bres, res)
            r[pre + "drop"][key] = round(d.diff, 4)
            r[pre + "rel_drop"][key] = round(d.diff / bres["score"], 4) if bres["score"] else None
            r[pre + "drop_ci95"][key] = [round(d.lo, 4), round(d.hi, 4)]
            r[pre + "significant"][key] = d.significant and r["method"] != "fp"
            r["paired"] = d.paired


def _label(r: dict) -> str:
    return f"{r['model']} {r['method']} {r['scheme']} ({r['calib']})"


def _findings(rows: list[dict], fidelity: dict) -> list[str]:
    """Statements backed by significant differences only: task drops whose 95% interval excludes 0,
    and fidelity (KLD) comparisons whose paired 95% interval does."""
    from .fidelity import paired_difference

    out = []
    q = [r for r in rows if r["method"] != "fp" and not r.get("error")]
    sig = [(r, c) for r in q for c, s in r.get("category_significant", {}).items() if s]
    if sig:
        for r, c in sig:
            out.append(f"significant {c} drop: {_label(r)} {r['category_drop'][c]:+.3f} "
                       f"(95% CI {r['category_drop_ci95'][c][0]:+.3f} .. {r['category_drop_ci95'][c][1]:+.3f})")
    else:
        out.append("no cell's task score differs significantly from its fp model (95% intervals of the drops "
                   "all include 0): the task suites alone cannot rank these cells; the fidelity metrics can")
    n_cells = len([r for r in q if r.get("category_drop")])
    if n_cells:
        out.append(f"{len({id(r) for r, _ in sig})} of {n_cells} cells have a significant drop in at least one category")
    fq = [r for r in q if r["cell"] in fidelity]
    groups: dict[tuple, list[dict]] = {}
    for r in fq:
        groups.setdefault((r["model"], r["scheme"], r["calib"]), []).append(r)
    for (model, scheme, calib), cand in sorted(groups.items(), key=lambda kv: str(kv[0])):
        if len(cand) < 2:
            continue
        cand.sort(key=lambda r: r["fidelity"]["kld_mean"])
        best, second = cand[0], cand[1]
        d = paired_difference(fidelity[second["cell"]], fidelity[best["cell"]])
        verdict = "significantly" if d["significant"] else "not significantly"
        out.append(f"{model} {scheme} ({calib}): lowest KLD {best['method']} {best['fidelity']['kld_mean']:.4g}, "
                   f"{verdict} below {second['method']} {second['fidelity']['kld_mean']:.4g} "
                   f"(paired diff {d['diff']:.3g} +- {d['se']:.2g})")
    for model in sorted({r["model"] for r in fq}):  # mask-aware against plain-text calibration, paired
        wins = {"uniform": 0, "none": 0, "neither": 0}
        for r in fq:
            if r["model"] != model or r["calib"] != "uniform":
                continue
            other = next((o for o in fq if o["model"] == model and o["method"] == r["method"]
                          and o["scheme"] == r["scheme"] and o["calib"] == "none"), None)
            if other is None:
                continue
            d = paired_difference(fidelity[r["cell"]], fidelity[other["cell"]])
            wins["neither" if not d["significant"] else "uniform" if d["diff"] < 0 else "none"] += 1
        if sum(wins.values()):
            out.append(f"{model} calibration: mask-aware has significantly lower KLD than plain text in "
                       f"{wins['uniform']} cells, higher in {wins['none']}, no significant difference in "
                       f"{wins['neither']}")
    for model in sorted({r["model"] for r in fq}):  # KLD against bits, per method and activation bits
        lines = []
        for method in sorted({r["method"] for r in fq if r["model"] == model}):
            pts = sorted(((_bits(r["scheme"]), r["fidelity"]["kld_mean"], r["scheme"]) for r in fq
                          if r["model"] == model and r["method"] == method and r["calib"] == "uniform"
                          and _bits(r["scheme"])), key=lambda p: -p[0])
            if len(pts) > 1:
                mono = all(a[1] < b[1] for a, b in zip(pts, pts[1:]))
                lines.append(f"{method} {'monotone' if mono else 'NOT monotone'}")
        if lines:
            out.append(f"{model}: KLD against weight bits (mask-aware cells, fewer bits = higher KLD): "
                       + ", ".join(lines))
    return out


def _bits(scheme: str | None) -> int | None:
    import re

    m = re.match(r"W(\d+)", scheme or "")
    return int(m.group(1)) if m else None


def _csv(rows: list[dict], tasks) -> str:
    """report.csv's text: a row per cell, scores, drops, significance and fidelity per task."""
    fid = ("kld_mean", "kld_se", "kld_p99", "top1", "sqnr_db", "elbo_diff_bits", "elbo_diff_se_bits")
    with io.StringIO(newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "method", "scheme", "calib", *tasks, *(f"drop_{t}" for t in tasks),
                    *(f"rel_drop_{t}" for t in tasks), *(f"sig_{t}" for t in tasks), *fid, "error"])
        for r in rows:
            fr = r.get("fidelity", {})
            w.writerow([r["model"], r["method"], r["scheme"], r["calib"], *(r["scores"].get(t, "") for t in tasks),
                        *(r["drop"].get(t, "") for t in tasks), *(r["rel_drop"].get(t, "") for t in tasks),
                        *(r["significant"].get(t, "") for t in tasks), *(fr.get(k, "") for k in fid),
                        r.get("error") or ""])
        return f.getvalue()


def _fmt_drop(r: dict, key: str, pre: str = "") -> str:
    if key not in r[pre + "drop"] or r["method"] == "fp":
        return ""
    lo, hi = r[pre + "drop_ci95"][key]
    rel = r[pre + "rel_drop"].get(key)
    star = " **\\***" if r[pre + "significant"].get(key) else ""
    return f"{r[pre + 'drop'][key]:+.3f} [{lo:+.2f}, {hi:+.2f}]" + (f" ({rel:+.0%})" if rel is not None else "") + star


def _fmt_fid(r: dict) -> str:
    f = r.get("fidelity")
    if not f:
        return "0 | 1.000 | 0" if r["method"] == "fp" else " |  | "
    return (f"{f['kld_mean']:.3g} +- {f['kld_se']:.2g} | {f['top1']:.3f} | "
            f"{f.get('elbo_diff_bits', float('nan')):+.3f} +- {f.get('elbo_diff_se_bits', float('nan')):.3f}")


def _markdown(result: dict, cfg: ReportConfig) -> str:
    from .tasks import TASKS

    tasks = cfg.tasks
    cats = sorted({TASKS[t].category for t in tasks})
    lines = ["# dllm-export report", "",
             "Reproduce: `dllm-export report --models " + ",".join(cfg.models) + " --methods " + ",".join(cfg.methods)
             + " --schemes " + ",".join(cfg.schemes) + " --tasks " + ",".join(tasks) + " --calib-masks "
             + ",".join(cfg.calib_masks) + (f" --items {cfg.items}" if cfg.items else "") + " --out DIR`", "",
             "Scores with 95% Wilson intervals; drops = fp - quantized with the 95% interval of the difference "
             "(Newcombe's, paired on the same items where the cells carry per-item outcomes, else unpaired) and "
             "the relative drop; **\\*** = significant (the interval excludes 0). Fidelity against the fp model at "
             f"masked positions of held-out text ({cfg.fidelity_windows} windows per mask ratio 0.15 / 0.5 / 0.85 / "
             "decode): KLD mean +- se (nats), top-1 agreement, ELBO difference (bits/token, quantized - fp).", "",
             "## Per category", "",
             "| model | method | scheme | calib | " + " | ".join(f"{c} score" for c in cats) + " | "
             + " | ".join(f"{c} drop [95% CI] (rel)" for c in cats) + " | KLD | top-1 | dELBO bits |",
             "|---|---|---|---|" + "---:|" * (2 * len(cats) + 3)]
    for r in result["rows"]:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['method']} | {r['scheme']} | {r['calib']} | error: {r['error']} |")
            continue
        sc = " | ".join(f"{r['category_score'].get(c, float('nan')):.3f}" for c in cats)
        dr = " | ".join(_fmt_drop(r, c, "category_") for c in cats)
        lines.append(f"| {r['model']} | {r['method']} | {r['scheme'] or ''} | {r['calib'] or ''} | {sc} | {dr} | "
                     f"{_fmt_fid(r)} |")
    lines += ["", "## Per task", "",
              "| model | method | scheme | calib | " + " | ".join(f"{t} [95% CI]" for t in tasks) + " | "
              + " | ".join(f"drop {t}" for t in tasks) + " |",
              "|---|---|---|---|" + "---:|" * (2 * len(tasks))]
    for r in result["rows"]:
        if r.get("error"):
            continue
        sc = " | ".join(f"{r['scores'][t]:.3f} [{r['ci95'][t][0]:.2f}, {r['ci95'][t][1]:.2f}]" if t in r["scores"]
                        else "" for t in tasks)
        dr = " | ".join(_fmt_drop(r, t) for t in tasks)
        lines.append(f"| {r['model']} | {r['method']} | {r['scheme'] or ''} | {r['calib'] or ''} | {sc} | {dr} |")
    lines += ["", "## Findings (significant differences only)", ""] + [f"- {f}" for f in result["findings"]]
    return "\n".join(lines) + "\n"
