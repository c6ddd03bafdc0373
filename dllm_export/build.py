"""`dllm-export build CONFIG.toml`: a matrix of artifacts (models x targets) with quality gates.

Every cell is exported with `verify.export_verified` (deterministic: same inputs, same bytes), scored
against its float model (held-out bits/token and arithmetic exact match, through the artifact's
own runtime) and benchmarked; `manifest.json` in the output folder lists each artifact's files
with sha256 and size, its scheme, method, calibration, quality deltas and bench figures. A cell
whose quality drops past a gate makes the build fail (exit code 1), naming the cell.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import InputError

FORMAT = "dllm-export/build"
# keys a [[targets]] entry may carry: export() arguments
_TARGET_KEYS = {"name", "target", "bits", "method", "scheme", "group_size", "weight_format", "accuracy_level",
                "act_kernel", "quant", "device"}


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


def read_config(path: str | Path) -> BuildConfig:
    """Parse and check a build TOML (see examples/build.toml)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise InputError("dllm-export build needs Python 3.11+ (tomllib)") from None
    p = Path(path)
    if not p.is_file():
        raise InputError(f"build config not found: {p}")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{p}: not valid TOML ({e})") from None
    models, targets = raw.get("models", []), raw.get("targets", [])
    if not models or not targets:
        raise InputError(f"{p}: needs at least one [[models]] and one [[targets]]")
    names = set()
    for t in targets:
        unknown = set(t) - _TARGET_KEYS
        if unknown or "name" not in t or "target" not in t:
            raise InputError(f"{p}: target {t.get('name', '?')!r} needs name and target; unknown keys: "
                             f"{', '.join(sorted(unknown)) or 'none'}")
        names.add(t["name"])
    if len(names) != len(targets):
        raise InputError(f"{p}: target names must be unique")
    for m in models:
        if "name" not in m or "path" not in m:
            raise InputError(f"{p}: every [[models]] needs name and path")
    cal, ev = raw.get("calibration", {}), raw.get("evaluation", {})
    return BuildConfig(models=models, targets=targets, calib_samples=int(cal.get("samples", 32)),
                       calib_seq_len=int(cal.get("seq_len", 128)), eval_windows=int(ev.get("windows", 8)),
                       problems=int(ev.get("problems", 50)), bench=bool(ev.get("bench", True)),
                       gates=Gates(**raw.get("gates", {})))


def _quality(backend, tok, cfg: BuildConfig) -> dict:
    """Held-out bits/token (stdlib modules never trained on) and arithmetic exact match."""
    from .eval.quality import quick_quality

    return quick_quality(backend, tok, windows=cfg.eval_windows, problems=cfg.problems)


def _files(folder: Path) -> dict:
    return {f.name: {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "bytes": f.stat().st_size}
            for f in sorted(folder.iterdir()) if f.is_file()}


def build(config_path: str | Path, out_dir: str | Path, progress: bool = False) -> dict:
    """Build every (model, target) cell of the config into `out_dir`; returns the build manifest
    (also written to out_dir/manifest.json). `manifest["failed"]` lists the cells that broke a gate."""
    from . import load_tokenizer
    from .bench import BenchConfig, measure
    from .verify import export_verified
    from .quant import CalibConfig
    from .runtime.backends import load_backend

    cfg = read_config(config_path)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    calib = CalibConfig(n_samples=cfg.calib_samples, seq_len=cfg.calib_seq_len)
    manifest = {"format": FORMAT, "config": str(config_path), "gates": asdict(cfg.gates), "cells": [], "failed": []}
    for m in cfg.models:
        tok = load_tokenizer(m["path"])
        base = _quality(load_backend(m["path"]), tok, cfg)
        for t in cfg.targets:
            cell = f"{m['name']}/{t['name']}"
            kwargs = {k: v for k, v in t.items() if k != "name"}
            # written, then verified (hashes, checker, smoke forward) before it takes its name
            res, _ = export_verified(m["path"], out / m["name"] / t["name"], quantize_options={"calib": calib},
                                     progress=progress, **kwargs)
            quality = _quality(load_backend(res.path), tok, cfg)
            deltas = {"arith_em_drop": round(base["arith_em"] - quality["arith_em"], 4),
                      "bpt_increase": round(quality["bits_per_token"] / base["bits_per_token"] - 1, 4)}
            entry = {"cell": cell, "path": str(res.path.relative_to(out)), "target": t["target"],
                     "scheme": res.manifest.get("scheme"), "method": res.manifest.get("method"),
                     "file_type": res.manifest.get("file_type"), "calibration": asdict(calib),
                     "files": _files(res.path), "quality": quality, "float_quality": base, "deltas": deltas}
            if cfg.bench:
                entry["bench"] = measure(str(res.path), BenchConfig(reps=3, gen_length=32, block_length=32))
            failures = []
            if cfg.gates.max_drop is not None and deltas["arith_em_drop"] > cfg.gates.max_drop:
                failures.append(f"arithmetic exact match drops {deltas['arith_em_drop']:.3f} > {cfg.gates.max_drop}")
            if cfg.gates.max_bpt_increase is not None and deltas["bpt_increase"] > cfg.gates.max_bpt_increase:
                failures.append(f"bits/token rise {deltas['bpt_increase']:.3f} > {cfg.gates.max_bpt_increase}")
            entry["gate"] = "fail: " + "; ".join(failures) if failures else "pass"
            if failures:
                manifest["failed"].append(cell)
            manifest["cells"].append(entry)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


__all__ = ["BuildConfig", "Gates", "build", "read_config"]
