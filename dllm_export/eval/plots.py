"""PNG plots of the outlier analysis, the study report and the bench, with matplotlib's Agg backend.

Every function takes the JSON-able result its command already writes (plus, for the outlier
pictures, the activation snapshots `analyze` can capture), writes PNG files atomically and returns
their paths. matplotlib is imported inside the functions so that importing the package never
loads it.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..fileio import atomic_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display; the same bytes on every machine
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def _block_index(name: str) -> int:
    m = re.search(r"\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def plot_outliers(result: dict, out_dir: str | Path, snapshots: dict | None = None) -> list[Path]:
    """outlier_curves.png: per-layer max |x| and channel / token max-over-median, one line per linear
    role, visible and masked positions apart; plus outlier_<layer>.png: the |x| surface over tokens x
    channels of each captured snapshot (the study's per-layer picture)."""
    plt = _pyplot()
    out = Path(out_dir)
    roles = sorted({lay["role"] for lay in result["layers"].values()})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = (("max_abs", "max |x|"), ("channel_max_over_median", "channel max / median"),
              ("token_max_over_median", "token max / median"))
    colors = {r: f"C{i}" for i, r in enumerate(roles)}
    for ax, (key, title) in zip(axes, panels):
        for role in roles:
            lays = sorted(((n, v) for n, v in result["layers"].items() if v["role"] == role),
                          key=lambda kv: _block_index(kv[0]))
            xs = [_block_index(n) for n, _ in lays]
            for group, style in (("visible", "-"), ("masked", "--")):
                ys = [v[group][key] if group in v else float("nan") for _, v in lays]
                ax.plot(xs, ys, style, color=colors[role], marker="o", ms=3,
                        label=f"{role} ({group})" if key == "max_abs" else None)
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.legend(loc="center right", fontsize=7, bbox_to_anchor=(1.06, 0.5))
    fig.suptitle(f"linear inputs over {result['windows']} windows x mask ratios {result['ratios']} "
                 "(q/k/v and gate/up read the same input)")
    paths = [_save(fig, out / "outlier_curves.png")]
    for name, x in (snapshots or {}).items():
        paths.append(_surface(plt, x, name, out / f"outlier_{name.replace('.', '_')}.png"))
    return paths


def _surface(plt, x, name: str, path: Path) -> Path:
    """|x| [tokens, channels] as a 3-D surface; channels max-pooled to at most 256 columns so peaks survive."""
    import numpy as np

    a = np.abs(np.asarray(x, dtype=np.float32))
    T, C = a.shape
    bins = min(C, 256)
    edges = np.linspace(0, C, bins + 1).astype(int)
    pooled = np.stack([a[:, edges[i]:max(edges[i + 1], edges[i] + 1)].max(1) for i in range(bins)], 1)
    cx, ty = np.meshgrid(edges[:-1], np.arange(T))
    fig = plt.figure(figsize=(7, 5))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(cx, ty, pooled, cmap="coolwarm", linewidth=0, antialiased=False)
    ax.set_xlabel("channel")
    ax.set_ylabel("token")
    ax.set_zlabel("|x|")
    ax.set_title(f"{name}: max |x| {a.max():.3g}")
    return _save(fig, path)


def _bits(scheme: str | None) -> float | None:
    m = re.match(r"W(\d+)A(\d+)", scheme or "")
    return float(m.group(1)) if m else None


def plot_report(result: dict, out_dir: str | Path) -> list[Path]:
    """score_vs_bits.png: mean score per category against weight bits, one line per (model, method,
    calibration), the fp baseline dashed; one panel per category."""
    from .tasks import TASKS

    plt = _pyplot()
    rows = [r for r in result["rows"] if not r.get("error")]
    cats = sorted({TASKS[t].category for r in rows for t in r["scores"] if t in TASKS})
    if not cats:
        return []
    fig, axes = plt.subplots(1, len(cats), figsize=(5 * len(cats), 4), squeeze=False)
    models = sorted({r["model"] for r in rows})
    for ax, cat in zip(axes[0], cats):
        def score(r, cat=cat):
            v = [s for t, s in r["scores"].items() if t in TASKS and TASKS[t].category == cat]
            return sum(v) / len(v) if v else None
        for mi, model in enumerate(models):
            base = next((score(r) for r in rows if r["model"] == model and r["method"] == "fp"), None)
            if base is not None:
                ax.axhline(base, color=f"C{mi}", ls=":", lw=1, label=f"{model} fp")
            lines: dict[tuple, list] = {}
            for r in rows:
                if r["model"] == model and r["method"] != "fp" and score(r) is not None and _bits(r["scheme"]):
                    act = re.match(r"W\d+A(\d+)", r["scheme"]).group(1)
                    lines.setdefault((r["method"], r["calib"], act), []).append((_bits(r["scheme"]), score(r)))
            for k, ((method, calib, act), pts) in enumerate(sorted(lines.items())):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="os^vDP*x"[k % 8],
                        ls="-" if mi == 0 else "--", color=f"C{(mi * 5 + k + 1) % 10}",
                        label=f"{model} {method} A{act} ({calib})")
        ax.set_xlabel("weight bits")
        ax.set_ylabel("score")
        ax.set_title(cat)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", fontsize=7, ncol=3, bbox_to_anchor=(0.5, 0.0))
    return [_save(fig, Path(out_dir) / "score_vs_bits.png")]


def plot_bench(result: dict, path: str | Path) -> list[Path]:
    """One PNG with a bar panel per figure (tokens/s, step latency median and p90, load time, peak
    RSS, file size) for every artifact of a bench run."""
    plt = _pyplot()
    arts = [a for a in result["artifacts"] if "error" not in a]
    if not arts:
        return []
    names = [Path(a["path"]).name or a["path"] for a in arts]
    panels = [(k, t) for k, t in (("tokens_per_s", "tokens/s (end to end)"), ("step_ms_median", "step ms (median)"),
                                  ("step_ms_p90", "step ms (p90)"), ("load_s", "load s"),
                                  ("peak_rss_mib", "peak RSS MiB"), ("size_mib", "size MiB"))
              if any(k in a for a in arts)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        vals = [a.get(key, 0) or 0 for a in arts]
        ax.bar(range(len(arts)), vals, color=[f"C{i}" for i in range(len(arts))])
        ax.set_xticks(range(len(arts)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return [_save(fig, Path(path))]


__all__ = ["plot_bench", "plot_outliers", "plot_report"]
