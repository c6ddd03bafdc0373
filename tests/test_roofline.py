"""runtime.roofline: the bytes and FLOPs of a step, its floor, and the precision of each artifact kind."""

import pytest

from dllm_export.exporter import export
from dllm_export.models.spec import Dims
from dllm_export.quant import CalibConfig
from dllm_export.runtime.roofline import HostLimits, Precision, artifact_precision, floor_s, step_cost

# the 478M LLaDA shape of shared/research/anchors.md (FLOPs per 288-token step: 276.3 G)
ANCHOR = Dims(d_model=1536, n_layers=16, n_heads=12, n_kv_heads=12, head_dim=128, mlp_hidden=4096, vocab_rows=8192,
              context=4096, rope_theta=5e5, norm_eps=1e-5, qkv_bias=False, tied_head=False)
CALIB = {"calib": CalibConfig(n_samples=2, seq_len=32)}


def test_step_cost_matches_the_anchor_figures():
    fp32 = Precision(32, 32, 32, "fp32")
    full = step_cost(ANCHOR, fp32, rows=288, keys=288, head_rows=288, cached=False)
    assert full.flops == pytest.approx(276.3e9, rel=1e-3)  # 268.2 G in the linears and head + 8.15 G attention
    assert full.parts["linear_weights"] == pytest.approx(453.0e6 * 4, rel=1e-3) and full.parts["kv_cache"] == 0
    # the head on 32 rows: so are the last block's q, o and MLP (k / v still on all 288)
    rows32 = step_cost(ANCHOR, fp32, rows=288, keys=288, head_rows=32, cached=False)
    last = 1536 * 1536 * 2 + 3 * 1536 * 4096
    want = full.flops - 2 * 256 * last - 4 * 256 * 288 * 1536 - 2 * 256 * 1536 * 8192
    assert rows32.flops == pytest.approx(want) and rows32.attention_flops == pytest.approx(8.15e9 * (15 + 32 / 288) / 16,
                                                                                             rel=1e-3)
    w4 = step_cost(ANCHOR, Precision(4.25, 9, 9, "int8"), rows=32, keys=288, head_rows=32, cached=True)
    assert w4.parts["linear_weights"] == pytest.approx(453.0e6 * 4.25 / 8, rel=1e-3)
    assert w4.parts["kv_cache"] == 2 * 16 * 256 * 1536 * 4  # the past keys and values of every layer
    assert w4.parts["head_weights"] == pytest.approx(1536 * 8192 * 9 / 8)


@pytest.mark.parametrize("bw,rate,bound", [(10.0, 100.0, "memory"), (1000.0, 0.001, "compute")])
def test_floor_is_the_larger_limit(bw, rate, bound):
    host = HostLimits(bw, {"fp32": rate}, (1, 1, 1), (), 1)
    cost = step_cost(ANCHOR, Precision(32, 32, 32, "fp32"), rows=32, keys=288, head_rows=32, cached=True)
    f = floor_s(cost, host, "int8")  # an unmeasured kind falls back to fp32's rate
    assert f["bound"] == bound and f["floor_s"] == max(f["memory_s"], f["compute_s"])
    assert f["memory_s"] == pytest.approx(cost.bytes / (bw * 1e9))


@pytest.mark.parametrize("attention,rates", [("fp32", {"fp32": 0.2, "int8": 0.8}), ("bf16", {"fp32": 0.2, "bf16": 0.4, "int8": 0.8})])
def test_attention_runs_at_its_own_kinds_peak(attention, rates):
    host = HostLimits(1e6, rates, (1, 1, 1), (), 1)  # compute-bound
    full = step_cost(ANCHOR, Precision(8, 9, 9, "int8"), rows=288, keys=288, head_rows=288, cached=False)
    assert full.attention_flops == pytest.approx(8.15e9, rel=1e-3)
    f = floor_s(full, host, "int8", attention)
    want = (full.flops - full.attention_flops) / 0.8e12 + full.attention_flops / (rates[attention] * 1e12)
    assert f["compute_s"] == pytest.approx(want) and f["compute_s"] > full.flops / 0.8e12


@pytest.mark.parametrize("kwargs,want", [
    (dict(target="onnx", method=None), Precision(32, 32, 32, "fp32")),  # a float export rounds nothing
    (dict(target="onnx", scheme="W8A8", device="x86-avx512-vnni"), Precision(8, 9, 9, "int8")),
    (dict(target="onnx", scheme="W4A8", group_size=32), Precision(5, 32, 32, "int8")),  # + an fp32 scale per 32
    (dict(target="onnx", bits=4, group_size=32), Precision(5, 32, 32, "fp32")),
    (dict(target="gguf", quant="Q8_0"), None),
])
def test_artifact_precision(kwargs, want, tiny_dirs, tmp_path):
    res = export(tiny_dirs["llada"], tmp_path / "a", quantize_options=CALIB, **{"method": "rtn", **kwargs})
    path = res.path / "model.gguf" if kwargs["target"] == "gguf" else res.path
    got = artifact_precision(path)
    if want is None:  # Q8_0: 34 bytes per block of 32
        assert got.linear_bits == pytest.approx(8.5) and got.compute == "int8"
    else:
        assert got == want


def test_checkpoint_precision_follows_the_dtype(tiny_dirs):
    assert artifact_precision(tiny_dirs["llada"], "bfloat16") == Precision(16, 16, 16, "bf16", kv_bytes=2,
                                                                           attention="bf16")
    assert artifact_precision(tiny_dirs["llada"]).compute == "fp32"
