"""Layer sensitivity scan, the mixed-precision allocator, per-layer bits through quantize and both
exporters, and timestep-aware calibration."""

import itertools
import json
import random
import re

import numpy as np
import pytest
import torch

from dllm_export import InputError, load_model, load_tokenizer
from dllm_export.cli import main
from dllm_export.eval.fidelity import FidelityConfig
from dllm_export.eval import sensitivity
from dllm_export.eval.sensitivity import SensitivityConfig, allocate_bits, scan_plan, sensitivity_scan
from dllm_export.models.factory import make_random_checkpoint
from dllm_export.quant import CalibConfig, QuantizeConfig, quantize
from dllm_export.quant import mixed
from dllm_export.quant.calibrate import calibration_ids, stratified_quantiles
from dllm_export.quant.mixed import allocate, weight_bytes
from dllm_export.quant.primitives import WeightQuantConfig
from dllm_export.quant.qlinear import QLinear

FID = FidelityConfig(ratios=(0.5, 0.85), windows=4, window=32, elbo=False, gen_length=16, block_length=8)



@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    """A small local calibration file (the bundled corpus recipe takes ~20 s to build on 2 cores)."""
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text("\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # the {i}th line" for i in range(400)))
    return str(f)


@pytest.fixture(scope="module")
def CALIB(calib_text):
    return CalibConfig(source=calib_text, n_samples=4, seq_len=32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("sens") / "llada", family="llada", tokenizer=True, std=0.05,
                                  vocab_size=384, d_model=64, n_heads=4, n_kv_heads=4, max_sequence_length=128)


def _brute(costs, values, budget):
    units = list(costs)
    best = None
    for combo in itertools.product(*(sorted(costs[u]) for u in units)):
        c = sum(costs[u][o] for u, o in zip(units, combo))
        v = sum(values[u][o] for u, o in zip(units, combo))
        if c <= budget and (best is None or v < best - 1e-12):
            best = v
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("solver", ["dp", "lagrangian"])
def test_allocator_respects_the_budget_exactly(seed, solver, monkeypatch):
    rng = random.Random(seed)
    costs, values = {}, {}
    for u in range(6):
        n = rng.choice([64, 128, 256]) * 64
        costs[f"l{u}"] = {b: weight_bytes(64, n // 64, WeightQuantConfig(bits=b, group_size=32)) for b in (2, 3, 4, 8)}
        scale = rng.uniform(0.1, 10)
        values[f"l{u}"] = {b: scale * 4.0 ** -b * rng.uniform(0.5, 1.5) for b in (2, 3, 4, 8)}
    if solver == "lagrangian":
        monkeypatch.setattr(mixed, "DP_MAX_CELLS", 0)
    least, most = (sum(f(c.values()) for c in costs.values()) for f in (min, max))
    for frac in (0.0, 0.3, 0.55, 1.0):
        budget = int(least + frac * (most - least))
        res = allocate(costs, values, budget)
        assert res["solver"] == solver
        assert res["bytes"] == sum(costs[u][b] for u, b in res["choice"].items()) <= budget
        opt = _brute(costs, values, budget)
        if solver == "dp":  # exact
            assert res["value"] == pytest.approx(opt, rel=1e-12)
        else:  # the hull plus greedy fill: feasible, never better than the optimum
            assert res["value"] >= opt - 1e-12
    with pytest.raises(InputError, match="below the smallest allocation"):
        allocate(costs, values, least - 1)


def test_weight_bytes_are_gguf_and_nbits_sizes():
    assert weight_bytes(64, 64, WeightQuantConfig(bits=4, group_size=32)) == 64 * 2 * 18  # Q4_0: 18 B / 32
    assert weight_bytes(64, 64, WeightQuantConfig(bits=5, group_size=32)) == 64 * 2 * 22  # Q5_0
    assert weight_bytes(64, 64, WeightQuantConfig(bits=8, group_size=32)) == 64 * 2 * 34  # Q8_0
    # 2-bit asymmetric: a 2-bit zero point per group too
    assert weight_bytes(8, 64, WeightQuantConfig(bits=2, group_size=64, sym=False)) == (8 * 64 * 2 + 8 * 18) / 8


def _plant(model, block: int) -> str:
    """A sensitive attention output projection with the float function unchanged: every 32nd input
    channel of o scaled 30x and the matching output row of v scaled 1/30 (attention mixes positions,
    not channels), so o's groups each hold an outlier that crushes the other weights' grid."""
    b, spec = model.blocks[block], model.spec
    b.get_submodule(spec.linears["o"]).weight.data[:, ::32] *= 30
    b.get_submodule(spec.linears["v"]).weight.data[::32, :] /= 30
    return f"{spec.blocks}.{block}.{spec.linears['o']}"


@pytest.mark.parametrize("granularity", ["layer", "role"])
def test_planted_sensitive_layer_is_found(granularity, ckpt):
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    ids = torch.randint(0, 380, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = model(ids)
    planted = _plant(model, 1)
    assert (model(ids) - ref).abs().max() < 1e-5  # the same float model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = SensitivityConfig(bits=(2, 4, 8), granularity=granularity, method="rtn", group_size=32, fidelity=FID)
    scan = sensitivity_scan(model, tok, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights restored
    assert scan["ranking"][0] == (planted if granularity == "layer" else "o")
    for u, e in scan["units"].items():  # fewer bits, more KLD (8 bits: close to nothing)
        assert e["bits"][2]["kld"] >= e["bits"][4]["kld"] >= e["bits"][8]["kld"] >= 0, u
        assert e["bits"][8]["kld"] < 1e-3
    if granularity == "layer":
        assert len(scan["units"]) == len(model.blocks) * 7
        alloc = allocate_bits(scan, avg_bits=4.5)
        assert alloc["bytes"] <= alloc["budget_bytes"] and alloc["avg_bits"] <= 4.5
        assert alloc["layer_bits"][planted] == max(alloc["layer_bits"].values())  # the planted layer keeps bits


def test_gptq_scan_and_mixed_quantize_and_exports(ckpt, CALIB, tmp_path):
    """Scan with GPTQ on the GGUF grid, allocate at 5 bits, quantize: per-layer grids in the manifest
    and the fake-quant model; GGUF stores each layer exactly (Q4_0 / Q5_0 / Q8_0) and ONNX matches."""
    gguf = pytest.importorskip("gguf")
    from dllm_export.exporter.gguf import export_gguf
    from dllm_export.exporter.onnx import export_onnx
    from dllm_export.models.checkpoint import open_shards
    from dllm_export.quant.load import read_linear, read_manifest
    from dllm_export.runtime.ort import OrtBackend

    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    cfg = SensitivityConfig(bits=(4, 5, 8), granularity="role", method="gptq", group_size=32, sym=True, calib=CALIB,
                            fidelity=FID)
    alloc = allocate_bits(sensitivity_scan(model, tok, cfg), avg_bits=5.2)
    assert len(set(alloc["layer_bits"].values())) > 1  # a real mix
    qcfg = QuantizeConfig(method="gptq", scheme="W4A16", group_size=32, sym=True, calib=CALIB,
                          layer_bits=alloc["layer_bits"], avg_bits=5.2)
    q = quantize(ckpt, tmp_path / "q", qcfg, progress=False)
    man = read_manifest(q)
    assert man["scheme"] == "auto" and man["allocation"]["avg_bits"] <= 5.2
    assert man["allocation"]["bytes"] == alloc["bytes"]
    assert {n: e["weight"]["bits"] for n, e in man["layers"].items()} == alloc["layer_bits"]
    qm = load_model(q)
    assert {n: m.qweight.cfg.bits for n, m in qm.named_modules() if isinstance(m, QLinear)} == alloc["layer_bits"]

    out = export_gguf(q, tmp_path / "gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    handles = open_shards(q)
    types = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}
    for i in range(len(qm.blocks)):
        for role, gname in [("v", "attn_v"), ("o", "attn_output"), ("gate", "ffn_gate"), ("down", "ffn_down")]:
            name = f"{qm.spec.blocks}.{i}.{qm.spec.linears[role]}"
            t = tensors[f"blk.{i}.{gname}.weight"]
            assert t.tensor_type.name == types[alloc["layer_bits"][name]]
            ours = read_linear(handles, name, man["layers"][name], q).qweight.dequantize().numpy()
            assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), ours)

    onnx_out = export_onnx(q, tmp_path / "onnx")
    ids = torch.randint(0, 380, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = qm(ids).float()
    assert (OrtBackend(onnx_out).forward(ids) - ref).abs().max() < 1e-4


def test_group_size_choices_scan_allocate_and_export(ckpt, CALIB, tmp_path):
    """Options "{bits}g{size}" beside the bits: the scan measures them where the groups tile a unit,
    the allocation mixes group sizes, the quantized layers take them, ONNX carries them exactly."""
    from dllm_export.exporter.onnx import export_onnx
    from dllm_export.quant.load import read_manifest
    from dllm_export.quant.mixed import linear_shapes, parse_option
    from dllm_export.runtime.ort import OrtBackend

    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    cfg = SensitivityConfig(bits=(2, 3, 4), granularity="role", method="rtn", group_size=32, group_sizes=(16, 64),
                            calib=CALIB, fidelity=FID)
    scan = sensitivity_scan(model, tok, cfg)
    shapes = linear_shapes(model)
    for e in scan["units"].values():
        widths = {shapes[n][1] for n in e["layers"]}
        want = {str(b) for b in (2, 3, 4)} | {f"{b}g{g}" for b in (2, 3, 4) for g in (16, 64)
                                               if all(w % g == 0 for w in widths)}
        assert {str(k) for k in e["bits"]} == want
        for k, v in e["bits"].items():  # bytes follow each option's grid
            b, g = parse_option(k)
            grid = WeightQuantConfig(bits=b, group_size=g or 32, sym=b > 2)
            assert v["bytes"] == sum(weight_bytes(*shapes[n], grid) for n in e["layers"])
    alloc = allocate_bits(json.loads(json.dumps(scan)), avg_bits=3.3)  # through JSON, as a reused scan
    assert any(isinstance(o, str) for o in alloc["layer_bits"].values())  # group options are taken
    q = quantize(ckpt, tmp_path / "q", QuantizeConfig(method="rtn", scheme="W4A16", group_size=32, calib=CALIB,
                                                       layer_bits=alloc["layer_bits"], avg_bits=3.3), progress=False)
    man = read_manifest(q)
    assert man["allocation"]["bytes"] == alloc["bytes"] <= alloc["budget_bytes"]
    for name, option in alloc["layer_bits"].items():
        b, g = parse_option(option)
        assert (man["layers"][name]["weight"]["bits"], man["layers"][name]["weight"]["group_size"]) == (b, g or 32)
    ids = torch.randint(0, 380, (2, 24), generator=torch.Generator().manual_seed(0))
    assert (OrtBackend(export_onnx(q, tmp_path / "onnx")).forward(ids) - load_model(q)(ids).float()).abs().max() < 1e-4


def test_mixed_layer_bits_are_checked(ckpt, CALIB, tmp_path):
    with pytest.raises(InputError, match="rtn or gptq"):
        QuantizeConfig(method="awq", layer_bits={"x": 4})
    with pytest.raises(InputError, match="2..8"):
        QuantizeConfig(method="rtn", layer_bits={"x": 9})
    with pytest.raises(InputError, match="bits and group size"):
        QuantizeConfig(method="rtn", layer_bits={"x": "3x128"})
    with pytest.raises(InputError, match="no group sizes in a K-quant mix"):
        QuantizeConfig(method="rtn", kquant="Q4_K", layer_bits={"x": "3g128"})
    with pytest.raises(InputError, match="K-quant family fixes groups"):
        SensitivityConfig(kquant=True, bits=(2, 3), group_sizes=(64,))
    assert dict(QuantizeConfig(method="rtn", layer_bits={"x": "3", "y": "4g64"}).layer_bits) == {"x": 3, "y": "4g64"}
    with pytest.raises(InputError, match="does not have"):
        quantize(ckpt, tmp_path / "q", QuantizeConfig(method="rtn", calib=CALIB, layer_bits={"nope.q": 4}),
                 progress=False)
    assert not (tmp_path / "q").exists()
    from dllm_export.exporter import export

    spec = load_model(ckpt).spec
    with pytest.raises(InputError, match="stores 2, 4 or 8-bit weights, not 3-bit"):
        export(ckpt, tmp_path / "o", target="onnx", scheme="W4A16", weight_format="matmulnbits", group_size=32,
               quantize_options={"layer_bits": {f"{spec.blocks}.0.{spec.linears['q']}": 3}})
    assert not (tmp_path / "o").exists()  # refused before any calibration


def test_timestep_aware_calibration_canvases(ckpt, calib_text):
    tok, spec = load_tokenizer(ckpt), load_model(ckpt).spec
    with pytest.raises(InputError, match="decode mask ratios"):
        CalibConfig(mask="decode")
    cfg = CalibConfig(source=calib_text, n_samples=8, seq_len=64, mask="decode", decode_ratios=(0.25, 0.5, 1.0), gen_length=32,
                      block_length=16)
    ids, summary = calibration_ids(tok, spec, cfg, 128)
    masked = ids == spec.mask_id
    assert not masked[:, :32].any()  # the prompt stays visible
    want = sorted(max(1, round(r * 32)) for r in stratified_quantiles(cfg.decode_ratios, 8))
    assert sorted(masked.sum(1).tolist()) == want  # the measured ratios' quantiles, of the generated region
    assert masked[:, -16:].sum(1).min() >= masked[:, 32:48].sum(1).max() - 16  # later blocks masked first
    again, _ = calibration_ids(tok, spec, cfg, 128)
    assert torch.equal(ids, again) and summary["gen_length"] == 32


def test_cli_sensitivity_then_auto_quantize(ckpt, calib_text, tmp_path, capsys):
    rc = main(["analyze", "--sensitivity", "--model", str(ckpt), "--out", str(tmp_path / "s"), "--method", "rtn",
               "--bits-choices", "2,4,8", "--group-size", "32", "--group-choices", "64", "--windows", "2", "--ratios",
               "0.5", "--no-progress"])
    assert rc == 0
    scan = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert "4g64" in scan["units"][f"{load_model(ckpt).spec.blocks}.0.{load_model(ckpt).spec.linears['q']}"]["bits"]
    assert (tmp_path / "s" / "sensitivity.md").read_text().startswith("| unit |")
    rc = main(["quantize", "--model", str(ckpt), "--method", "rtn", "--scheme", "auto", "--avg-bits", "3.5",
               "--sensitivity", str(tmp_path / "s" / "sensitivity.json"), "--calib", calib_text, "--calib-samples", "2",
               "--calib-seq-len", "32", "--out", str(tmp_path / "q"), "--no-progress"])
    assert rc == 0
    man = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert man["allocation"]["avg_bits"] <= 3.5 and man["allocation"]["avg_bits_budget"] == 3.5
    assert man["allocation"]["bytes"] == allocate_bits(scan, 3.5)["bytes"]
    pytest.importorskip("gguf")
    rc = main(["--target", "gguf", "--model", str(ckpt), "--method", "rtn", "--scheme", "auto", "--avg-bits", "6",
               "--sensitivity", str(tmp_path / "s" / "sensitivity.json"), "--out", str(tmp_path / "g"), "--no-progress"])
    assert rc == 0
    man = json.loads((tmp_path / "g" / "manifest.json").read_text())
    # the scan's group-size options are ONNX's: GGUF's block types keep groups of 32
    assert man["allocation"]["avg_bits"] <= 6 and set(man["allocation"]["layer_bits"].values()) <= {4, 8}
    assert man["quantize_settings"]["layer_bits"] == man["allocation"]["layer_bits"]
    assert sum(man["tensor_types"].get(t, 0) for t in ("Q4_0", "Q8_0")) == 14
    capsys.readouterr()
    assert main(["quantize", "--model", str(ckpt), "--scheme", "auto", "--out", str(tmp_path / "x")]) == 2
    assert "--avg-bits" in capsys.readouterr().err
    assert main(["quantize", "--model", str(ckpt), "--avg-bits", "4", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.parametrize("argv", [["--target", "onnx"], ["--target", "gguf"], ["quantize"]])
def test_auto_budget_too_small_fails_before_the_scan(argv, ckpt, tmp_path, capsys, monkeypatch):
    """A budget no allocation fits is refused in a line before minutes of scanning, nothing written."""
    monkeypatch.setattr(sensitivity, "sensitivity_scan", lambda *a, **k: pytest.fail("scanned for an infeasible budget"))
    rc = main([*argv, "--model", str(ckpt), "--scheme", "auto", "--avg-bits", "1", "--mix-embed-head",
               "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--avg-bits 1.0: the smallest allocation" in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_embedding_and_head_in_the_mix(method, ckpt, CALIB, tmp_path):
    """`embed_head`: the scan has units `embedding` and `head` with a float option; a recipe that
    quantizes them stores them as every layer is (manifest layers + allocation, 16 bits for float),
    the fake-quant model computes with them, and ONNX / GGUF (through llama.cpp) carry them exactly."""
    gguf = pytest.importorskip("gguf")
    from dllm_export.exporter.gguf import export_gguf
    from dllm_export.exporter.onnx import export_onnx
    from dllm_export.quant.load import read_manifest
    from dllm_export.quant.primitives import quantize_weight
    from dllm_export.runtime.ort import OrtBackend

    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    spec = model.spec
    cfg = SensitivityConfig(bits=(4, 8), granularity="role", method=method, group_size=32, sym=True, calib=CALIB,
                            fidelity=FID, embed_head=True)
    scan = sensitivity_scan(model, tok, cfg)
    for unit in ("embedding", "head"):
        opts = scan["units"][unit]["bits"]
        assert sorted(int(b) for b in opts) == [4, 8, mixed.FLOAT_BITS]
        assert opts[mixed.FLOAT_BITS]["kld"] == 0 and opts[4]["kld"] > opts[8]["kld"] > 0
        assert opts[mixed.FLOAT_BITS]["bytes"] == 2 * 384 * 64
    assert scan["weights"] == sum(a * b for a, b in mixed.linear_shapes(model).values()) + 2 * 384 * 64
    plan, _ = scan_plan(model, cfg)  # what auto_recipe checks a budget on before scanning: the scan's bytes
    assert {u: e["bytes"] for u, e in plan.items()} == {u: {b: v["bytes"] for b, v in e["bits"].items()}
                                                         for u, e in scan["units"].items()}
    for budget in (4.6, 6.0):  # the budget covers embedding and head: all-float would not fit either
        alloc = allocate_bits(scan, avg_bits=budget)
        assert alloc["bytes"] <= alloc["budget_bytes"] and alloc["avg_bits"] <= budget
        # ONNX writes a float embedding / head in fp32: that option costs twice as much there
        onnx_alloc = allocate_bits(scan, avg_bits=budget, float_bits=32)
        onnx_bytes = sum(2 * 384 * 64 * 2 if b == mixed.FLOAT_BITS else scan["units"][u]["bits"][b]["bytes"]
                         for u, b in onnx_alloc["unit_bits"].items())
        assert onnx_alloc["bytes"] == onnx_bytes <= onnx_alloc["budget_bytes"]
    # a recipe with both quantized (embedding 4-bit, head 8-bit), the block linears at 4 / 8 bits
    layer_bits = {**alloc["layer_bits"], spec.embedding: 4, spec.head: 8}
    qcfg = QuantizeConfig(method=method, scheme="W4A16", group_size=32, sym=True, calib=CALIB, layer_bits=layer_bits,
                          avg_bits=6.0, mix_embed_head=True)
    q = quantize(ckpt, tmp_path / "q", qcfg, progress=False)
    man = read_manifest(q)
    assert {n: e["weight"]["bits"] for n, e in man["layers"].items()} == layer_bits
    assert man["allocation"]["layers"][spec.embedding] == {"bits": 4, "bytes": 384 * 64 // 32 * 18,  # = Q4_0 bytes
                                                            "group_size": 32}
    assert man["allocation"]["layers"][spec.head] == {"bits": 8, "bytes": 384 * 64 // 32 * 34,  # = Q8_0 bytes
                                                      "group_size": 32}
    assert spec.embedding not in man["high_precision"] and spec.head not in man["high_precision"]
    qm = load_model(q)
    W_emb = model.get_submodule(spec.embedding).weight.float()
    want = quantize_weight(W_emb, WeightQuantConfig(bits=4, group_size=32, sym=True)).dequantize()
    assert torch.equal(qm.get_submodule(spec.embedding).weight.float(), want)  # RTN, exactly
    assert isinstance(qm.get_submodule(spec.head), QLinear) and qm.get_submodule(spec.head).qweight.cfg.bits == 8

    ids = torch.randint(0, 380, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = qm(ids).float()
    assert not torch.allclose(ref, model(ids).float(), atol=1e-3)  # the quantized tensors are used
    onnx_out = export_onnx(q, tmp_path / "onnx")
    assert (OrtBackend(onnx_out).forward(ids) - ref).abs().max() < 1e-4
    from dllm_export.runtime.backends import TorchBackend

    int_head = load_model(q, kernel="int")  # the quantized head on the integer kernels too
    assert (TorchBackend(int_head).forward(ids) - ref).abs().max() < 1e-3

    out = export_gguf(q, tmp_path / "gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    assert tensors["token_embd.weight"].tensor_type.name == "Q4_0"
    assert tensors["output.weight"].tensor_type.name == "Q8_0"
    assert np.array_equal(gguf.quants.dequantize(tensors["token_embd.weight"].data, tensors["token_embd.weight"].tensor_type),
                          want.numpy())
    try:
        pytest.importorskip("llama_cpp")
    except pytest.skip.Exception:
        return
    from dllm_export.runtime.llamacpp import LlamaCppBackend

    got = LlamaCppBackend(out, threads=2).forward(ids)
    # llama.cpp rounds activations to Q8 blocks for its integer dot products (see test_gguf)
    assert (got - ref).norm() < 0.02 * ref.norm(), (got - ref).norm() / ref.norm()


def test_cli_mix_embed_head(ckpt, tmp_path):
    """`analyze --sensitivity --mix-embed-head` then `--scheme auto` from that scan: the embedding and
    head are in the allocation (quantized, or at 16 bits), and the budget covers them."""
    pytest.importorskip("gguf")
    rc = main(["analyze", "--sensitivity", "--model", str(ckpt), "--out", str(tmp_path / "s"), "--method", "rtn",
               "--grid", "gguf", "--windows", "2", "--ratios", "0.5", "--mix-embed-head", "--no-progress"])
    assert rc == 0
    scan = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert {"embedding", "head"} <= set(scan["units"]) and scan["config"]["embed_head"] is True
    rc = main(["--target", "gguf", "--model", str(ckpt), "--method", "rtn", "--scheme", "auto", "--avg-bits", "5",
               "--sensitivity", str(tmp_path / "s" / "sensitivity.json"), "--out", str(tmp_path / "g"), "--no-progress"])
    assert rc == 0
    man = json.loads((tmp_path / "g" / "manifest.json").read_text())
    alloc = allocate_bits(scan, 5)
    assert {"embedding", "head"} <= set(man["allocation"]["unit_bits"]) and man["quantize_settings"]["mix_embed_head"]
    assert man["allocation"]["bytes"] == alloc["bytes"] <= alloc["budget_bytes"]
    assert man["allocation"]["avg_bits"] <= 5
    spec = load_model(ckpt).spec
    types = {"token_embd.weight": alloc["unit_bits"]["embedding"], "output.weight": alloc["unit_bits"]["head"]}
    names = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0", 16: "F16"}
    from gguf import GGUFReader

    got = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "g" / "model.gguf")).tensors}
    assert {n: got[n] for n in types} == {n: names[b] for n, b in types.items()}
    assert spec.embedding in alloc["layer_bits"] or alloc["unit_bits"]["embedding"] == 16


def test_kquant_mix_scan_allocate_and_gguf(CALIB, tmp_path):
    """The K-quant family (--grid gguf-k): the scan rounds each layer on Q{b}_K (Q8_0 at 8 bits), or
    on llama.cpp's fallback where 256 does not divide its width; a 3.5-bit mix quantizes with those
    grids, the GGUF file holds each layer in its type exactly, and the allocation's bytes are the
    file's tensor bytes."""
    gguf = pytest.importorskip("gguf")
    from dllm_export.exporter.gguf import export_gguf
    from dllm_export.models.checkpoint import open_shards
    from dllm_export.quant.load import read_linear, read_manifest

    ckpt = make_random_checkpoint(tmp_path / "wide", family="dream", tokenizer=True, std=0.05, vocab_size=384,
                                  hidden_size=256, intermediate_size=352, num_attention_heads=4,
                                  num_key_value_heads=2, num_hidden_layers=1, max_position_embeddings=128)
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    scan = sensitivity_scan(model, tok, SensitivityConfig(bits=(2, 3, 4, 6), method="gptq", calib=CALIB,
                                                          fidelity=FID, kquant=True))
    down = next(n for n in scan["units"] if n.endswith("down_proj"))
    q_proj = next(n for n in scan["units"] if n.endswith("q_proj"))
    # q_proj (256 wide) at Q2_K / Q3_K / Q4_K / Q6_K sizes; down_proj (352 wide) on the fallbacks Q4_0 / Q5_0 / Q8_0
    assert [scan["units"][q_proj]["bits"][b]["bytes"] * 8 / (256 * 256) for b in (2, 3, 4, 6)] == \
        [2.625, 3.4375, 4.5, 6.5625]
    assert [scan["units"][down]["bits"][b]["bytes"] * 8 / (256 * 352) for b in (2, 3, 4, 6)] == [4.5, 4.5, 5.5, 8.5]
    alloc = allocate_bits(scan, avg_bits=3.5)
    assert alloc["bytes"] <= alloc["budget_bytes"] and len(set(alloc["layer_bits"].values())) > 1
    q = quantize(ckpt, tmp_path / "q", QuantizeConfig(method="gptq", scheme="W4A16", kquant="Q4_K", calib=CALIB,
                                                      layer_bits=alloc["layer_bits"], avg_bits=3.5), progress=False)
    man = read_manifest(q)
    assert man["allocation"]["bytes"] == alloc["bytes"]
    out = export_gguf(q, tmp_path / "gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    handles, names = open_shards(q), {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                                      "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                                      "down_proj": "ffn_down"}
    file_bytes = 0
    for layer, bits in alloc["layer_bits"].items():
        t = tensors[f"blk.0.{names[layer.rsplit('.', 1)[1]]}.weight"]
        fallback = {2: "Q4_0", 3: "Q4_0", 4: "Q5_0", 6: "Q8_0"}
        want = fallback[bits] if layer == down else {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 6: "Q6_K"}[bits]
        assert t.tensor_type.name == want, layer
        ours = read_linear(handles, layer, man["layers"][layer], q).qweight.dequantize().numpy()
        assert np.array_equal(gguf.quants.dequantize(t.data, t.tensor_type), ours), layer
        file_bytes += t.n_bytes
    assert file_bytes == alloc["bytes"]
    # the same through the CLI: a gguf-k scan, then --scheme auto --kquants from it
    rc = main(["analyze", "--sensitivity", "--model", str(ckpt), "--out", str(tmp_path / "s"), "--method", "rtn",
               "--grid", "gguf-k", "--bits-choices", "2,3,4,6", "--windows", "2", "--ratios", "0.5", "--no-progress"])
    assert rc == 0
    rc = main(["--target", "gguf", "--model", str(ckpt), "--method", "rtn", "--scheme", "auto", "--kquants",
               "--avg-bits", "3.5", "--sensitivity", str(tmp_path / "s" / "sensitivity.json"),
               "--out", str(tmp_path / "g"), "--no-progress"])
    assert rc == 0
    m = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert m["quantize_settings"]["kquant"] == "Q4_K" and m["allocation"]["avg_bits"] <= 3.5
    assert set(m["tensor_types"]) & {"Q2_K", "Q3_K", "Q4_K", "Q6_K"}
    rc = main(["--target", "gguf", "--model", str(ckpt), "--method", "rtn", "--scheme", "auto", "--avg-bits", "5",
               "--sensitivity", str(tmp_path / "s" / "sensitivity.json"), "--out", str(tmp_path / "g2"),
               "--no-progress"])
    assert rc == 2 and not (tmp_path / "g2").exists()  # a K-quant scan for a Q4_0 / Q5_0 / Q8_0 recipe


def test_group_choice_that_tiles_no_layer_is_refused(ckpt, tmp_path, capsys):
    rc = main(["analyze", "--sensitivity", "--model", str(ckpt), "--out", str(tmp_path / "s"), "--method", "rtn",
               "--group-size", "32", "--group-choices", "4096", "--windows", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "group size 4096 tiles no scanned unit's input widths" in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("avg_bits", [float("nan"), 0.0, -1.0, float("inf"), 1e308, 33.0])
def test_budgets_outside_0_32_bits_are_refused(avg_bits):
    """NaN reached int() as a ValueError traceback, and so did 1e308 (its byte budget overflows to inf);
    inf would allocate everything at its widest."""
    from dllm_export.errors import InputError

    with pytest.raises(InputError, match=r"--avg-bits must be a number of bits per weight in \(0, 32\]"):
        allocate_bits({"weights": 1, "units": {}}, avg_bits)


@pytest.mark.parametrize("content,message", [
    (b"not json", "not a JSON sensitivity scan"),
    (b"\xff\xfe", "not a JSON sensitivity scan"),
    (b"[1, 2]", "expected a JSON object"),
    (b"{}", "no 'config' dict"),
    (b'{"config": {"method": "rtn", "sym": null}, "grid": {"group_size": null}, "units": {"a": {}}, "weights": 8}',
     "unit 'a' lacks layers / weights / bits"),
    (b'{"config": {"method": "rtn", "sym": null}, "grid": {"group_size": null}, "weights": 8, '
     b'"units": {"a": {"layers": [], "weights": 8, "bits": {"4": {"kld": 0.1}}}}}', "a bit-width without kld / bytes"),
])
def test_a_bad_sensitivity_file_is_one_line(tmp_path, content, message):
    """--sensitivity F: a file that is not a scan is named with what is wrong, before any allocation."""
    from dllm_export.errors import InputError
    from dllm_export.eval.sensitivity import read_scan

    f = tmp_path / "s.json"
    f.write_bytes(content)
    with pytest.raises(InputError, match=re.escape(message)):
        read_scan(f)

