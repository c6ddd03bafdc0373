"""The study-style report: models x (method, scheme, calibration) x tasks, against the fp baseline.

Each cell quantizes once (the quantized checkpoint is kept under OUT/cells/ and reused) and
caches its task results (OUT/cells/<cell>/results.json), so an interrupted report resumes where
it stopped. A cell records the sha256 of its source model's files and the item count; a cached cell
whose model changed since (a retrained checkpoint under the same name) or that was scored on another
item count is computed again. Output: report.md and report.csv (score per task, absolute and relative drop per
task and per category), a findings section computed from the numbers, and score_vs_bits.png (score
against weight bits per method, one panel per category).
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import DllmExportError
from ..executors import Cell, Executor, LocalExecutor
from ..fileio import atomic_file
from ..models.loader import BUNDLED, checkpoint_sha256


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


def run_cell(cell: Cell) -> dict:
    """One cell of the grid, from its cache folder when it holds this cell's results: quantize (the
    quantized checkpoint is kept in the folder and reused), then run the tasks not scored yet. A
    method that refuses a scheme is recorded as the row's error (cached: the grid goes on)."""
    from .. import load_model, load_tokenizer
    from ..quant import CalibConfig, QuantizeConfig, quantize
    from .tasks import run_task

    a, folder = cell.args, Path(cell.args["folder"])
    cfg: ReportConfig = a["cfg"]
    cache = folder / "results.json"
    row = json.loads(cache.read_text()) if cache.is_file() else None
    stale = row is not None and (row.get("model_sha256"), row.get("items")) != (a["model_sha256"], cfg.items)
    if row is None or stale:  # new, or the model or the item count changed since: compute the cell again
        row = {"model": Path(str(a["model"])).name, "model_sha256": a["model_sha256"], "items": cfg.items,
               "method": a["method"] or "fp", "scheme": a["scheme"], "calib": a["mask"], "scores": {}, "error": None}
    missing = [t for t in cfg.tasks if t not in row["scores"]]
    if missing and not row["error"]:  # tasks added to a cached cell are run on its checkpoint
        try:
            path = a["model"]
            if a["method"] is not None:
                qdir = folder / "quantized"
                if stale and qdir.exists():
                    shutil.rmtree(qdir)
                for tmp in folder.glob(".quantized.*"):  # left by a worker killed while quantizing
                    shutil.rmtree(tmp, ignore_errors=True)
                if not (qdir / "manifest.json").is_file():
                    quantize(a["model"], qdir, QuantizeConfig(method=a["method"], scheme=a["scheme"], calib=CalibConfig(
                        n_samples=cfg.calib_samples, seq_len=cfg.calib_seq_len, mask=a["mask"])), progress=False)
                path = qdir
            m, tok = load_model(path), load_tokenizer(path)
            for t in missing:
                row["scores"][t] = run_task(m, tok, t, cfg.items)["score"]
        except DllmExportError as e:  # a method that refuses a scheme: recorded, the grid goes on
            row["error"] = str(e)
        with atomic_file(cache) as tmp:
            tmp.write_text(json.dumps(row, indent=2) + "\n")
    return row


def run_report(cfg: ReportConfig, out_dir: str | Path, progress: bool = False,
               executor: Executor | None = None) -> dict:
    """Run (or resume) the grid on `executor` (default: this process); write report.md, report.csv
    and report.json under out_dir. `result["failed"]` lists the cells that raised (not
    cached: a re-run tries them again) with their errors; their rows carry the error too."""
    from .tasks import TASKS

    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    cells = report_cells(cfg, out)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cells), desc="report", unit="cell")
    results = (executor or LocalExecutor()).map(run_cell, cells, on_done=None if bar is None else lambda r: bar.update(1))
    if bar is not None:
        bar.close()
    rows, failed = [], []
    for c, res in zip(cells, results):
        row = res.value
        if res.error is not None:
            failed.append({"cell": c.key, "error": res.error})
            a = c.args
            row = {"model": Path(str(a["model"])).name, "model_sha256": a["model_sha256"], "items": cfg.items,
                   "method": a["method"] or "fp", "scheme": a["scheme"], "calib": a["mask"], "scores": {},
                   "error": f"cell {c.key} failed: {res.error}"}
        rows.append({**row, "scores": {t: row["scores"][t] for t in cfg.tasks if t in row["scores"]}})
    base = {r["model"]: r["scores"] for r in rows if r["method"] == "fp"}
    for r in rows:
        b = base.get(r["model"], {})
        r["drop"] = {t: round(b[t] - s, 4) for t, s in r["scores"].items() if t in b}
        cats: dict[str, list[float]] = {}
        for t, d in r["drop"].items():
            cats.setdefault(TASKS[t].category, []).append(d)
        r["category_drop"] = {c: round(sum(v) / len(v), 4) for c, v in cats.items()}
    result = {"config": asdict(cfg), "rows": rows, "findings": _findings(rows), "failed": failed}
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    _write_csv(out / "report.csv", rows, cfg.tasks)
    (out / "report.md").write_text(_markdown(result, cfg))
    from .plots import plot_report

    plot_report(result, out)
    return result


def _findings(rows: list[dict]) -> list[str]:
    """Best method per scheme (smallest mean drop) and the most fragile category, from the numbers."""
    out = []
    q = [r for r in rows if r["method"] != "fp" and not r.get("error") and r["drop"]]
    for scheme in sorted({r["scheme"] for r in q}):
        cand = [r for r in q if r["scheme"] == scheme]
        best = min(cand, key=lambda r: sum(r["drop"].values()) / len(r["drop"]))
        out.append(f"{scheme}: best method {best['method']} ({best['model']}, calib {best['calib']}), mean drop "
                   f"{sum(best['drop'].values()) / len(best['drop']):+.3f}")
    for scheme in sorted({r["scheme"] for r in q}):  # mask-aware against plain-text calibration
        by = {k: [sum(r["drop"].values()) / len(r["drop"]) for r in q if r["scheme"] == scheme and r["calib"] == k]
              for k in ("uniform", "none")}
        if by["uniform"] and by["none"]:
            mu, mn = (sum(v) / len(v) for v in (by["uniform"], by["none"]))
            better = "mask-aware" if mu < mn else "plain-text" if mn < mu else "neither"
            out.append(f"{scheme}: calibration: mask-aware mean drop {mu:+.3f}, plain-text {mn:+.3f} "
                       f"({better} better, {len(by['uniform'])} cells each)")
    cats: dict[str, list[float]] = {}
    for r in q:
        for c, d in r["category_drop"].items():
            cats.setdefault(c, []).append(d)
    if cats:
        worst = max(cats, key=lambda c: sum(cats[c]) / len(cats[c]))
        out.append(f"most fragile category: {worst} (mean drop {sum(cats[worst]) / len(cats[worst]):+.3f} over "
                   f"{len(cats[worst])} cells)")
    return out


def _write_csv(path: Path, rows: list[dict], tasks) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "method", "scheme", "calib", *tasks, *(f"drop_{t}" for t in tasks), "error"])
        for r in rows:
            w.writerow([r["model"], r["method"], r["scheme"], r["calib"], *(r["scores"].get(t, "") for t in tasks),
                        *(r["drop"].get(t, "") for t in tasks), r.get("error") or ""])


def _markdown(result: dict, cfg: ReportConfig) -> str:
    tasks = cfg.tasks
    lines = ["# dllm-export report", "",
             "Reproduce: `dllm-export report --models " + ",".join(cfg.models) + " --methods " + ",".join(cfg.methods)
             + " --schemes " + ",".join(cfg.schemes) + " --tasks " + ",".join(tasks) + " --calib-masks "
             + ",".join(cfg.calib_masks) + (f" --items {cfg.items}" if cfg.items else "") + " --out DIR`", "",
             "| model | method | scheme | calib | " + " | ".join(tasks) + " | " + " | ".join(f"drop {t}" for t in tasks) + " |",
             "|---|---|---|---|" + "---:|" * (2 * len(tasks))]
    for r in result["rows"]:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['method']} | {r['scheme']} | {r['calib']} | error: {r['error']} |")
            continue
        sc = " | ".join(f"{r['scores'].get(t, float('nan')):.3f}" for t in tasks)
        dr = " | ".join(f"{r['drop'].get(t, 0):+.3f}" for t in tasks)
        lines.append(f"| {r['model']} | {r['method']} | {r['scheme'] or ''} | {r['calib'] or ''} | {sc} | {dr} |")
    lines += ["", "## Findings", ""] + [f"- {f}" for f in result["findings"]]
    return "\n".join(lines) + "\n"
