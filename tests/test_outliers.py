"""Outlier statistics on synthetic activations with planted outliers, and the analysis of a model."""

import json

import pytest
import torch

from dllm_export import load_model
from dllm_export.eval.outliers import InputStats, OutlierConfig, analyze


def _gaussian(n=4096, c=64, seed=0):
    return torch.randn(1, n, c, generator=torch.Generator().manual_seed(seed))


def _summary(x):
    st = InputStats(x.shape[-1])
    st.add(x, {"all": torch.ones(x.shape[:2], dtype=torch.bool)})
    return st.summary(OutlierConfig())["all"]


def test_gaussian_has_no_outliers_and_kurtosis_three():
    s = _summary(_gaussian())
    assert s["channel_outliers"] == [] and not s["massive"]
    assert abs(s["kurtosis"] - 3.0) < 0.2


def test_planted_channel_outliers_are_found():
    x = _gaussian()
    x[..., [5, 40]] *= 60  # two channels large for every token
    s = _summary(x)
    assert s["channel_outliers"] == [5, 40]
    assert {c for c, _ in s["top_channels"][:2]} == {5, 40}
    assert not s["massive"]


def test_planted_massive_tokens_are_found():
    x = _gaussian()
    x[0, [7, 900, 3000], 11] = 5000.0  # three tokens, one huge value each
    s = _summary(x)
    assert s["massive"] and s["massive_token_fraction"] == pytest.approx(3 / 4096, abs=1e-6)
    assert s["channel_outliers"] == []  # not persistent over tokens
    assert s["kurtosis"] > 100


def test_analyze_model_splits_masked_and_visible(tiny_dirs, tmp_path, capsys):
    from dllm_export.cli import main

    model = load_model(tiny_dirs["dream"])
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    snapshots = {}
    res = analyze(model, ids, model.spec.mask_id, ratios=(0.2, 0.8), batch=2, snapshots=snapshots, snapshot_tokens=16)
    assert len(res["layers"]) == 7 * model.config.dims.n_layers
    n_layers, d = model.config.dims.n_layers, model.config.dims.d_model
    assert sorted(snapshots) == sorted([f"model.layers.{i}.self_attn.q_proj" for i in range(n_layers)]
                                       + [f"model.layers.{i}.mlp.down_proj" for i in range(n_layers)])
    assert snapshots["model.layers.0.self_attn.q_proj"].shape == (16, d)
    lay = res["layers"]["model.layers.0.mlp.down_proj"]
    assert lay["role"] == "down"
    assert lay["all"]["tokens"] == lay["masked"]["tokens"] + lay["visible"]["tokens"] == 2 * 4 * 32
    assert lay["ratio_0.2"]["tokens"] == lay["ratio_0.8"]["tokens"] == 4 * 32
    assert set(res["by_role"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert main(["analyze", "--model", str(tiny_dirs["llada"]), "--out", str(tmp_path / "a"), "--samples", "2",
                 "--seq-len", "32"]) == 0
    assert json.loads((tmp_path / "a" / "outliers.json").read_text())["worst_role"] in res["by_role"]
    pngs = sorted(f.name for f in (tmp_path / "a").glob("*.png"))
    assert "outlier_curves.png" in pngs and "outlier_model_transformer_blocks_0_ff_out.png" in pngs
    assert sum(n.endswith("q_proj.png") for n in pngs) == 1  # the worst q input only
