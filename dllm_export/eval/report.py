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
    import hashlib

    from ..models.loader import resolve_model_path

    folder = resolve_model_path(str(model))
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.name == "config.json" or f.suffix == ".safetensors":
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()


def run_report(cfg: ReportConfig, out_dir: str | Path, progress: bool = False) -> dict:
    """Run (or resume) the grid; write report.md, report.csv and report.json under out_dir."""
    from .. import load_model, load_tokenizer
    from ..quant import CalibConfig, QuantizeConfig, quantize
    from .tasks import TASKS, run_task

    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    rows = []
    cells = [(m, None, None, None) for m in cfg.models]
    cells += [(m, me, s, k) for m in cfg.models for s in cfg.schemes for me in cfg.methods for k in cfg.calib_masks]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cells), desc="report", unit="cell")
    prints = {m: model_fingerprint(m) for m in cfg.models}
    for model, method, scheme, mask in cells:
        name = f"{Path(model).name}-fp" if method is None else _cell_name(model, method, scheme, mask)
        cache = out / "cells" / name / "results.json"
        row = json.loads(cache.read_text()) if cache.is_file() else None
        stale = row is not None and (row.get("model_sha256"), row.get("items")) != (prints[model], cfg.items)
        if row is None or stale:  # new, or the model or the item count changed since: compute the cell again
            row = {"model": Path(str(model)).name, "model_sha256": prints[model], "items": cfg.items,
                   "method": method or "fp", "scheme": scheme, "calib": mask, "scores": {}, "error": None}
        missing = [t for t in cfg.tasks if t not in row["scores"]]
        if missing and not row["error"]:  # tasks added to a cached cell are run on its checkpoint
            try:
                path = model
                if method is not None:
                    qdir = out / "cells" / name / "quantized"
                    if stale and qdir.exists():
                        shutil.rmtree(qdir)
                    if not (qdir / "manifest.json").is_file():
                        quantize(model, qdir, QuantizeConfig(method=method, scheme=scheme, calib=CalibConfig(
                            n_samples=cfg.calib_samples, seq_len=cfg.calib_seq_len, mask=mask)), progress=False)
                    path = qdir
                m, tok = load_model(path), load_tokenizer(path)
                for t in missing:
                    row["scores"][t] = run_task(m, tok, t, cfg.items)["score"]
            except DllmExportError as e:  # a method that refuses a scheme: recorded, the grid goes on
                row["error"] = str(e)
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(row, indent=2) + "\n")
        rows.append({**row, "scores": {t: row["scores"][t] for t in cfg.tasks if t in row["scores"]}})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    base = {r["model"]: r["scores"] for r in rows if r["method"] == "fp"}
    for r in rows:
        b = base.get(r["model"], {})
        r["drop"] = {t: round(b[t] - s, 4) for t, s in r["scores"].items() if t in b}
        cats: dict[str, list[float]] = {}
        for t, d in r["drop"].items():
            cats.setdefault(TASKS[t].category, []).append(d)
        r["category_drop"] = {c: round(sum(v) / len(v), 4) for c, v in cats.items()}
    result = {"config": asdict(cfg), "rows": rows, "findings": _findings(rows)}
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
