"""Activation outliers at every linear input: where low-bit activation quantization will hurt.

Hooks on the inputs of every block linear record, over calibration windows masked at several
ratios (a dLLM sees canvases from all-masked to nearly clean), per channel and per token the
max |x|, the max over the median, the kurtosis and the top channels, separately for masked
and visible positions. Two kinds of outliers are flagged as the PTQ literature defines them:

* channel outliers: a few channels large for (nearly) every token; SmoothQuant and AWQ move
  them into the weights, rotations spread them;
* massive activations: a few tokens with values orders of magnitude above the rest; per-token
  activation scales absorb them, per-tensor ones cannot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class OutlierConfig:
    """Thresholds (defaults follow the PTQ papers' usual cut-offs).

    Attributes:
        channel_ratio: a channel whose max |x| exceeds `channel_ratio` x the median channel max ...
        channel_persistence: ... and is above 5x its token's median |x| for this fraction of tokens
            is a channel outlier.
        massive_ratio: a token whose max |x| exceeds `massive_ratio` x the median token max ...
        massive_fraction: ... while such tokens are at most this fraction of all is "massive".
        top_k: channels listed per layer.
    """

    channel_ratio: float = 20.0
    channel_persistence: float = 0.5
    massive_ratio: float = 100.0
    massive_fraction: float = 0.01
    top_k: int = 8


class InputStats:
    """Accumulates statistics of one linear's inputs x [..., C], split by a per-token group label."""

    def __init__(self, channels: int):
        self.C = channels
        self.chan_max: dict[str, torch.Tensor] = {}
        self.persist: dict[str, torch.Tensor] = {}
        self.token_max: dict[str, list[torch.Tensor]] = {}
        self.moments: dict[str, torch.Tensor] = {}  # count, sum x, x^2, x^3, x^4 (fp64)

    def add(self, x: torch.Tensor, groups: dict[str, torch.Tensor]) -> None:
        """x [B, L, C]; groups: name -> [B, L] bool selecting the tokens that count for it."""
        x = x.detach().double()
        for g, sel in groups.items():
            xs = x[sel]  # [N, C]
            if not xs.numel():
                continue
            a = xs.abs()
            cmax = a.amax(0)
            self.chan_max[g] = torch.maximum(self.chan_max.get(g, torch.zeros(self.C, dtype=torch.float64)), cmax)
            med = a.median(dim=1, keepdim=True).values.clamp(min=1e-12)
            self.persist[g] = self.persist.get(g, torch.zeros(self.C, dtype=torch.float64)) + (a > 5 * med).sum(0)
            self.token_max.setdefault(g, []).append(a.amax(1))
            m = torch.stack([torch.tensor(float(xs.numel()), dtype=torch.float64), xs.sum(), (xs ** 2).sum(),
                             (xs ** 3).sum(), (xs ** 4).sum()])
            self.moments[g] = self.moments.get(g, torch.zeros(5, dtype=torch.float64)) + m

    def summary(self, cfg: OutlierConfig) -> dict:
        """Per group: max |x|, channel and token max-over-median, kurtosis, top channels, outliers."""
        out = {}
        for g, cmax in self.chan_max.items():
            tmax = torch.cat(self.token_max[g])
            n, s1, s2, s3, s4 = self.moments[g].tolist()
            mean = s1 / n
            var = max(s2 / n - mean ** 2, 1e-300)
            m4 = s4 / n - 4 * mean * s3 / n + 6 * mean ** 2 * s2 / n - 3 * mean ** 4
            chan_med = float(cmax.median().clamp(min=1e-12))
            tok_med = float(tmax.median().clamp(min=1e-12))
            persist = self.persist[g] / len(tmax)
            top = torch.topk(cmax, min(cfg.top_k, self.C))
            channel_outliers = [int(c) for c in torch.nonzero((cmax > cfg.channel_ratio * chan_med)
                                                                 & (persist >= cfg.channel_persistence)).flatten()]
            massive = tmax > cfg.massive_ratio * tok_med
            frac = float(massive.double().mean())
            out[g] = {
                "tokens": len(tmax), "max_abs": round(float(cmax.max()), 6),
                "channel_max_over_median": round(float(cmax.max()) / chan_med, 3),
                "token_max_over_median": round(float(tmax.max()) / tok_med, 3),
                "kurtosis": round(m4 / var ** 2, 3),
                "top_channels": [[int(i), round(float(v), 6)] for v, i in zip(top.values, top.indices)],
                "channel_outliers": channel_outliers,
                "massive_token_fraction": round(frac, 6),
                "massive": bool(0 < frac <= cfg.massive_fraction),
            }
        return out


def analyze(model, ids: torch.Tensor, mask_id: int, ratios=(0.15, 0.5, 0.85), cfg: OutlierConfig = OutlierConfig(),
            seed: int = 0, batch: int = 8, snapshots: dict | None = None,
            snapshot_roles: tuple[str, ...] = ("q", "down"), snapshot_tokens: int = 64) -> dict:
    """Statistics of every block linear's input over `ids` [N, L] masked at each ratio.

    When a dict is passed as `snapshots`, it receives layer name -> the input x [T, C] (float32,
    first `snapshot_tokens` tokens of the first window at the middle ratio) of every linear whose
    role is in `snapshot_roles` (q: the normed residual stream; down: the FFN hidden state, where
    the study found its outliers), for the per-layer pictures of `eval.plots.plot_outliers`.

    Returns {"layers": {name: {"role": ..., "all": ..., "masked": ..., "visible": ..., "ratio_0.5": ...}},
    "by_role": {role: worst channel max/median over blocks}, "flagged": [...]}.
    """
    if not ratios or not all(isinstance(r, (int, float)) and 0 <= r <= 1 for r in ratios):  # NaN fails too
        raise InputError(f"mask ratios must be numbers in [0, 1], got {', '.join(map(str, ratios)) or 'none'}")
    spec = model.spec
    roles = {v: k for k, v in spec.linears.items()}
    stats: dict[str, InputStats] = {}
    groups: dict[str, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        for rel, role in roles.items():
            lin = block.get_submodule(rel)
            name = f"{spec.blocks}.{i}.{rel}"
            stats[name] = InputStats(lin.in_features)
            handles.append(lin.register_forward_pre_hook(lambda m, a, name=name: stats[name].add(a[0], groups)))
            if snapshots is not None and role in snapshot_roles:
                handles.append(lin.register_forward_pre_hook(lambda m, a, name=name: _snap(name, a[0])))
    capture = [False]
    mid = ratios[len(ratios) // 2]

    def _snap(name: str, x: torch.Tensor) -> None:
        if capture[0]:
            snapshots[name] = x[0, :snapshot_tokens].detach().float().clone()

    g = torch.Generator().manual_seed(seed)
    try:
        with torch.inference_mode():
            for r in ratios:
                for s in range(0, len(ids), batch):
                    capture[0] = r == mid and s == 0  # snapshots come from one batch
                    x = ids[s:s + batch].clone()
                    masked = torch.rand(x.shape, generator=g) < r
                    x[masked] = mask_id
                    groups.clear()
                    groups.update({"all": torch.ones_like(masked), "masked": masked, "visible": ~masked,
                                   f"ratio_{r}": torch.ones_like(masked)})
                    model(x)
    finally:
        for h in handles:
            h.remove()
    layers, by_role, flagged = {}, {}, []
    for name, st in stats.items():
        role = roles[name.split(f"{spec.blocks}.", 1)[1].split(".", 1)[1]]
        summ = st.summary(cfg)
        layers[name] = {"role": role, **summ}
        a = summ["all"]
        by_role[role] = max(by_role.get(role, 0.0), a["channel_max_over_median"])
        if a["channel_outliers"] or a["massive"]:
            flagged.append({"layer": name, "role": role, "channel_outliers": a["channel_outliers"][:8],
                            "massive": a["massive"], "channel_max_over_median": a["channel_max_over_median"],
                            "token_max_over_median": a["token_max_over_median"]})
    return {"config": asdict(cfg), "ratios": list(ratios), "windows": len(ids), "seq_len": ids.shape[1],
            "layers": layers, "by_role": dict(sorted(by_role.items(), key=lambda kv: -kv[1])), "flagged": flagged,
            "worst_role": max(by_role, key=by_role.get) if by_role else None}


def to_markdown(result: dict) -> str:
    """Per-layer table of the `all` group plus the flagged layers."""
    lines = ["| layer | role | max abs | channel max/median | token max/median | kurtosis | channel outliers | massive |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for name, lay in result["layers"].items():
        a = lay["all"]
        lines.append(f"| {name} | {lay['role']} | {a['max_abs']:.3g} | {a['channel_max_over_median']:.1f} | "
                     f"{a['token_max_over_median']:.1f} | {a['kurtosis']:.1f} | {a['channel_outliers'][:6]} | "
                     f"{a['massive']} |")
    lines.append("")
    lines.append(f"Largest channel max/median by role: {result['by_role']} (worst: {result['worst_role']}).")
    return "\n".join(lines) + "\n"


__all__ = ["InputStats", "OutlierConfig", "analyze", "to_markdown"]
