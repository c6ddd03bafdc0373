"""PTQ: quantizer grids, packing, GPTQ vs RTN, exact smoothing transforms, the streamed driver,
quantized checkpoints and their error contract."""

import dataclasses
import functools
import json
import re

import pytest
import torch

import dllm_export as D
from dllm_export.models.factory import make_random_checkpoint
from dllm_export.quant import CalibConfig, QuantizeConfig, WeightQuantConfig, quantize
from dllm_export.quant.base import METHODS
from dllm_export.quant.calibrate import calibration_ids
from dllm_export.quant.gptq import HessianStats, gptq_quantize
from dllm_export.quant.primitives import (ActQuantConfig, fake_quantize_act, int8_form, pack_codes,
                                          progressive_scales, quantize_weight, sqnr_db, unpack_codes)
from dllm_export.quant.rtn import rtn_quantize

# SQNR floors (dB) of RTN on N(0, 1) weights, per bits, group 128 (measured ~6.02 dB/bit + offset)
SQNR_FLOOR = {8: 40.0, 6: 29.0, 5: 23.5, 4: 17.5, 3: 11.5, 2: 5.0}


def _W(out=128, n=512, seed=0):
    return torch.randn(out, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sym,zero_kind", [(True, "int"), (False, "int"), (False, "float")])
@pytest.mark.parametrize("bits", sorted(SQNR_FLOOR))
def test_rtn_sqnr_floor(bits, sym, zero_kind):
    W = _W()
    qw = rtn_quantize(W, WeightQuantConfig(bits=bits, group_size=128, sym=sym, zero_kind=zero_kind))
    assert qw.codes.min() >= qw.cfg.qmin and qw.codes.max() <= qw.cfg.qmax
    assert sqnr_db(W, qw.dequantize()) >= SQNR_FLOOR[bits]


@pytest.mark.parametrize("group_size", [0, 32, 64, 128])
def test_smaller_groups_and_mse_clip_do_not_hurt(group_size):
    W = _W()
    cfg = WeightQuantConfig(bits=4, group_size=group_size)
    plain = sqnr_db(W, rtn_quantize(W, cfg).dequantize())
    assert sqnr_db(W, rtn_quantize(W, cfg, mse_clip=True).dequantize()) >= plain - 1e-6
    if group_size:
        assert plain >= sqnr_db(W, rtn_quantize(W, WeightQuantConfig(bits=4, group_size=0)).dequantize())


def test_symmetric_grid_hits_the_largest_weight_exactly():
    """The largest-magnitude weight of a group maps onto the most negative code (GGUF Q4_0's rule)."""
    W = _W(4, 32)
    qw = quantize_weight(W, WeightQuantConfig(bits=4, group_size=32))
    i = W.abs().argmax(dim=1)
    assert (qw.codes[torch.arange(4), i] == -8).all()
    assert qw.scales.dtype == torch.float16


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_round_trip_is_exact(bits, sym):
    cfg = WeightQuantConfig(bits=bits, group_size=0, sym=sym)
    codes = torch.randint(cfg.qmin, cfg.qmax + 1, (16, 64), dtype=torch.int16)
    packed = pack_codes(codes, cfg)
    assert packed.dtype == torch.uint8 and packed.shape[1] == (32 if bits <= 4 else 64)
    assert torch.equal(unpack_codes(packed, cfg), codes)


@pytest.mark.parametrize("sym", [True, False])
def test_activation_fake_quant(sym):
    x = torch.randn(4, 16, 256) * torch.linspace(0.1, 10, 256)
    for bits, floor in [(8, 35.0), (4, 12.0)]:
        assert sqnr_db(x, fake_quantize_act(x, ActQuantConfig(bits=bits, sym=sym))) >= floor
    assert torch.equal(fake_quantize_act(x, ActQuantConfig(bits=16)), x)


@pytest.mark.parametrize("cfg", [WeightQuantConfig(4, 128, True), WeightQuantConfig(4, 64, False),
                                 WeightQuantConfig(3, 0, True), WeightQuantConfig(4, 32, False, "float")],
                         ids=["w4g128sym", "w4g64asym", "w3chan", "w4g32min"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_calibration_inputs(cfg, act_order):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 256, generator=g)
    X = torch.randn(2048, 256, generator=g) @ torch.randn(256, 256, generator=g) * 0.3 + 2 * torch.randn(256, generator=g)
    st = HessianStats(256)
    st.update(X)
    err = lambda q: float((X @ W.T - X @ q.dequantize().T).pow(2).mean())  # noqa: E731
    qg, _ = gptq_quantize(W, st.H, cfg, act_order=act_order)
    assert err(qg) < 0.7 * err(rtn_quantize(W, cfg))


# ---- model passes -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text((
        "def add(a, b):\n    return a + b\n\n12+34=46\n7*8=56\nThe parser reads one token at a time.\n"
        "class Node:\n    def __init__(self, value):\n        self.value = value\n        self.next = None\n") * 20)
    return f


@pytest.fixture(scope="module")
def tiny_q(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyq")
    return {
        "llada": make_random_checkpoint(root / "llada", "llada", vocab_size=384, tokenizer=True, std=0.05, n_kv_heads=2,
                                        d_model=64, mlp_hidden_size=128, max_sequence_length=128),
        "dream": make_random_checkpoint(root / "dream", "dream", vocab_size=384, tokenizer=True, std=0.05,
                                        hidden_size=64, intermediate_size=128, max_position_embeddings=128),
    }


def _calib(calib_file, **kw):
    return CalibConfig(source=str(calib_file), n_samples=6, seq_len=48, **kw)


@pytest.mark.parametrize("reader", ["quantize", "--scheme auto", "a sensitivity scan"])
def test_runs_that_read_float_weights_refuse_a_quantized_checkpoint(tiny_q, calib_file, tmp_path, reader,
                                                                    monkeypatch, capsys):
    """Quantizing a quantized checkpoint failed on a missing tensor; `--scheme auto` scanned its
    fake-quant weights for minutes before the export refused it. Each names it at once, with the
    source its manifest records, and writes nothing."""
    import dllm_export.eval.sensitivity as sensitivity
    from dllm_export.cli import main

    q = quantize(tiny_q["llada"], tmp_path / "q", QuantizeConfig(method="rtn", calib=_calib(calib_file)),
                 progress=False)
    monkeypatch.setattr(sensitivity, "sensitivity_scan", lambda *a, **k: pytest.fail("scanned a quantized model"))
    message = f"{q} is a quantized checkpoint: {reader} reads float weights, those of the checkpoint it was made from"
    out = tmp_path / "out"
    if reader == "a sensitivity scan":  # the CLI: one line, exit 2
        assert main(["analyze", "--sensitivity", "--model", str(q), "--out", str(out)]) == 2
        assert capsys.readouterr().err.startswith(f"dllm-export: error: {message} (llada)")
    else:
        with pytest.raises(D.InputError, match=re.escape(message)):
            quantize(q, out, QuantizeConfig(method="rtn"), progress=False) if reader == "quantize" else \
                sensitivity.auto_recipe(q, 4.5)
    assert not out.exists()


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("method", ["smoothquant", "awq"])
def test_scale_folding_is_exact(tiny_q, family, method):
    """SmoothQuant's and AWQ's scales, folded without rounding, leave the logits unchanged."""
    from dllm_export.quant.awq import search_scales
    from dllm_export.quant.base import collect_inputs, forward_block
    from dllm_export.quant.smoothquant import expand_kv_scales, fold_scales, heads, kv_group_scales, smooth_block

    for dtype, tol in [(torch.float64, 1e-9), (torch.float32, 1e-3)]:
        model = D.load_model(tiny_q[family], dtype=dtype)
        ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
        ref = model(ids)
        m = METHODS[method](QuantizeConfig(method=method, scheme="W4A8"), model.spec, model.config)
        X = model.model.embed_tokens(ids) if family == "dream" else model.model.transformer.wte(ids)
        ctx = model.block_context(24, dtype)
        for block in model.blocks:
            if method == "smoothquant":
                smooth_block(m, block, X, ctx, 0.5)
            else:  # AWQ's searched scales, folded, without its final rounding
                n_heads, n_kv = heads(model.config)
                for prev, consumers in model.spec.smooth_pairs:
                    xs = []
                    collect_inputs(block, X, ctx, [consumers[0]], lambda n, x: xs.append(x.reshape(-1, x.shape[-1])))
                    x = torch.cat(xs).float()
                    Ws = [block.get_submodule(c).weight.float() for c in consumers]
                    expand, x_mean = None, None
                    if Ws[0].shape[1] != block.get_submodule(prev).weight.shape[0]:
                        x_mean = kv_group_scales(x.abs().mean(0), n_heads, n_kv, reduce=torch.mean)
                        expand = functools.partial(expand_kv_scales, n_heads=n_heads, n_kv=n_kv)
                    s, _ = search_scales(x, Ws, m.wcfg, expand=expand, x_mean=x_mean)
                    assert not torch.allclose(s, torch.ones_like(s))
                    fold_scales(block, prev, list(consumers), s.to(dtype), n_heads, n_kv)
            X = forward_block(block, X, ctx)
        assert (model(ids) - ref).abs().max().item() <= tol


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_streamed_driver_equals_in_memory(tiny_q, calib_file, tmp_path, method):
    from safetensors.torch import load_file

    qcfg = QuantizeConfig(method=method, scheme="W4A16", group_size=32, calib=_calib(calib_file))
    a = quantize(tiny_q["llada"], tmp_path / "streamed", qcfg, progress=False)
    b = quantize(tiny_q["llada"], tmp_path / "memory", qcfg, source_model=D.load_model(tiny_q["llada"]), progress=False)
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    # the manifest identifies the weights: the same bytes for the same result, no timings, no paths
    text = (a / "manifest.json").read_text()
    assert text == (b / "manifest.json").read_text()
    assert "seconds" not in text and str(tmp_path) not in text


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_collect_inputs_stops_each_batch_at_the_last_input_asked(tiny_q, family):
    """Inputs taken from a forward stopped after the last asked-for layer equal those of a whole forward,
    and the layers after it do not run."""
    from dllm_export.quant.base import collect_inputs, linear_names

    model = D.load_model(tiny_q[family])
    block, ctx, names = model.blocks[0], model.block_context(24, torch.float32), linear_names(model.spec)
    X = torch.randn(5, 24, block.get_submodule(names[0]).in_features, generator=torch.Generator().manual_seed(1))
    full: dict[str, list] = {n: [] for n in names}
    handles = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: full[n].append(a[0].clone()))
               for n in names]
    for i in range(0, 5, 2):
        block(X[i:i + 2], *ctx)
    for h in handles:
        h.remove()
    ran = []
    last = block.get_submodule(names[-1])
    hook = last.register_forward_hook(lambda m, a, y: ran.append(True))
    for upto in (names[:1], names[3:5], names[:-1]):
        got: dict[str, list] = {n: [] for n in upto}
        collect_inputs(block, X, ctx, upto, lambda n, x: got[n].append(x), batch_size=2)
        assert all(torch.equal(torch.cat(got[n]), torch.cat(full[n])) for n in upto)
    hook.remove()
    assert not ran  # the down projection (after every asked-for input) never ran


@pytest.mark.parametrize("bits,group_size,sym", [(4, 32, False), (3, 64, True), (4, 0, False)])
def test_awq_clip_search_by_gram_equals_the_output_error(bits, group_size, sym):
    """AWQ's clip search scores each group by d^T (x^T x) d: the same error as summing its outputs'
    squares over the tokens (llm-awq's form, computed here independently), so the same ratios."""
    from dllm_export.quant.awq import _fake_quant, search_clip
    from dllm_export.quant.primitives import WeightQuantConfig

    g = torch.Generator().manual_seed(bits + group_size)
    x = torch.randn(300, 128, generator=g) * torch.linspace(0.1, 3, 128)  # uneven channels, as activations are
    W = torch.randn(48, 128, generator=g)
    cfg = WeightQuantConfig(bits, group_size, sym)
    got = search_clip(x, W, cfg)
    G = cfg.groups(128)
    ratios = [1 - i / 20 for i in range(10)]
    errs = torch.stack([((x.double().reshape(300, 1, G, -1) * (W - _fake_quant(W, cfg, r)).double().reshape(1, 48, G, -1))
                         .sum(-1) ** 2).sum(0) for r in ratios])  # [ratio, out, G]
    want = torch.tensor(ratios)[errs.argmin(0)]
    assert torch.equal(got, want.float())


@pytest.mark.parametrize("method,scheme,extra,data_free", [
    ("rtn", "W4A16", {"group_size": 32}, True), ("rtn", "W8A8", {}, True),
    ("quarot", "W4A8", {"weight_method": "rtn"}, True), ("rtn", "W8A8", {"act_granularity": "per_tensor"}, False),
    ("gptq", "W4A16", {"group_size": 32}, False), ("quarot", "W4A8", {}, False), ("smoothquant", "W8A8", {}, False)])
def test_data_free_runs_push_only_the_diagnostic_sequences(tiny_q, calib_file, tmp_path, monkeypatch, method, scheme,
                                                          extra, data_free):
    """RTN on dynamic activations reads no calibration statistics: the driver pushes only the sequences its error
    figures read, and writes the weights the whole set would give."""
    from safetensors.torch import load_file

    from dllm_export.quant.base import QuantMethod

    calib = CalibConfig(source=str(calib_file), n_samples=10, seq_len=64)  # error figures: 256 rows, 4 sequences
    qcfg = QuantizeConfig(method=method, scheme=scheme, calib=calib, **extra)
    model = D.load_model(tiny_q["llada"])
    assert METHODS[method](qcfg, model.spec, model.config).reads_calibration() is not data_free
    if not data_free:
        return
    fast = quantize(tiny_q["llada"], tmp_path / "fast", qcfg, progress=False)
    monkeypatch.setattr(QuantMethod, "reads_calibration", lambda self: True)
    full = quantize(tiny_q["llada"], tmp_path / "full", qcfg, progress=False)
    ta, tb = load_file(fast / "model.safetensors"), load_file(full / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    calib = json.loads((fast / "manifest.json").read_text())["calibration"]
    assert calib["reads_calibration"] is False and calib["windows_run"] == 4 < calib["windows"]
    assert "windows_run" not in json.loads((full / "manifest.json").read_text())["calibration"]


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("method,scheme,tol", [("rtn", "W8A16", 0.02), ("gptq", "W8A16", 0.02), ("awq", "W8A16", 0.02),
                                               ("rtn", "W8A8", 0.05), ("smoothquant", "W8A8", 0.05),
                                               ("gptq", "W4A16", 0.6)])
def test_quantized_checkpoint_round_trip(tiny_q, calib_file, tmp_path, family, method, scheme, tol):
    out = quantize(tiny_q[family], tmp_path / "q", QuantizeConfig(method=method, scheme=scheme, calib=_calib(calib_file),
                                                                  group_size=32 if scheme.endswith("A16") else 0),
                   progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == method and manifest["scheme"] == scheme and len(manifest["layers"]) == 14
    assert all(b["out_rel_err"] < 1 for b in manifest["blocks"])
    assert manifest["calibration"]["mask"] == "uniform" and 0 < manifest["calibration"]["mask_ratio_mean"] < 1
    fp, q = D.load_model(tiny_q[family]), D.load_model(out)
    assert q.spec == fp.spec
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    rel = ((q(ids) - fp(ids)).norm() / fp(ids).norm()).item()
    assert rel < tol
    out_gen = D.generate(q, [5, 6, 7], gen_length=8, steps=8)
    assert out_gen.ids.shape == (1, 11)


def test_mask_aware_calibration(tiny_q, calib_file):
    tok = D.load_tokenizer(tiny_q["llada"])
    spec = D.load_model(tiny_q["llada"]).spec
    ids, summary = calibration_ids(tok, spec, CalibConfig(source=str(calib_file), n_samples=32, seq_len=64), 128)
    frac = (ids == spec.mask_id).float().mean(1)
    assert ids.shape == (32, 64) and 0.25 < summary["mask_ratio_mean"] < 0.55
    assert frac.min() < 0.15 and frac.max() > 0.6  # stratified over the set: nearly clean to nearly masked
    plain, _ = calibration_ids(tok, spec, CalibConfig(source=str(calib_file), n_samples=32, seq_len=64, mask="none"), 128)
    assert not (plain == spec.mask_id).any()
    again, _ = calibration_ids(tok, spec, CalibConfig(source=str(calib_file), n_samples=32, seq_len=64), 128)
    assert torch.equal(ids, again)


@pytest.mark.parametrize("kwargs,message", [
    (dict(method="sparsegpt"), "unknown method 'sparsegpt'"),
    (dict(scheme="W5A5"), "unknown scheme 'W5A5'"),
    (dict(group_size=48), "group size 48 does not divide the input width 64"),
    (dict(bits=9), "weight bits must lie in 2..8"),
    (dict(calib=CalibConfig(source="/nonexistent.txt"), group_size=32), "calibration file not found"),
    (dict(calib="EMPTY"), "calibration file is empty"),
    (dict(calib="BINARY"), r"is not UTF-8 text \(a binary file\?\)"),  # calibrated on its bytes without a word
])
def test_bad_input_gives_clear_error_and_no_output(tiny_q, tmp_path, kwargs, message):
    if kwargs.get("calib") in ("EMPTY", "BINARY"):
        f = tmp_path / "calib.txt"
        f.write_bytes(b"  \n" if kwargs["calib"] == "EMPTY" else bytes(range(256)) * 8)
        kwargs = dict(calib=CalibConfig(source=str(f)), group_size=32)
    with pytest.raises(D.InputError, match=message):
        quantize(tiny_q["llada"], tmp_path / "out", QuantizeConfig(**kwargs), progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_quantize_then_generate(tiny_q, calib_file, tmp_path, capsys):
    from dllm_export.cli import main

    out = tmp_path / "w4"
    assert main(["quantize", "--model", str(tiny_q["dream"]), "--method", "gptq", "--scheme", "W4A16", "--group-size",
                 "32", "--calib", str(calib_file), "--calib-samples", "4", "--calib-seq-len", "32", "--out",
                 str(out)]) == 0
    assert "gptq W4A16, 14 quantized layers" in capsys.readouterr().out
    assert main(["generate", "--model", str(out), "--prompt", "def f", "--gen-length", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 8
    assert main(["quantize", "--model", str(tiny_q["dream"]), "--scheme", "W3A3", "--out", str(tmp_path / "x")]) == 2
    assert "unknown scheme" in capsys.readouterr().err


def test_scheme_group_size_shrinks_to_fit_but_an_explicit_one_does_not():
    from dllm_export.quant.driver import fit_group_size

    assert fit_group_size(QuantizeConfig(scheme="W4A16"), [256, 704]).group_size == 64
    assert fit_group_size(QuantizeConfig(scheme="W4A16", group_size=128), [704]).group_size == 128
    assert fit_group_size(QuantizeConfig(scheme="W8A8"), [704]).group_size is None  # per channel


@pytest.mark.parametrize("method", ["rtn", "smoothquant", "awq", "quarot", "duquant"])
def test_static_per_tensor_activations(tiny_q, calib_file, tmp_path, method):
    """per_tensor activations: one calibrated (scale, zero) per layer, saved and reloaded."""
    from dllm_export.quant.qlinear import QLinear

    rounding = {"weight_method": "rtn"} if "weight_method" in METHODS[method].options else {}
    qcfg = QuantizeConfig(method=method, scheme="W8A8", act_granularity="per_tensor", calib=_calib(calib_file),
                          **rounding)
    out = quantize(tiny_q["llada"], tmp_path / "q", qcfg, progress=False)
    q = D.load_model(out)
    layers = [m for m in q.modules() if isinstance(m, QLinear)]
    assert len(layers) == 14 and all(m.act.granularity == "per_tensor" and m.act_scale > 0 for m in layers)
    fp = D.load_model(tiny_q["llada"])
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    # measured: rtn 0.034, smoothquant 0.079, awq 0.083, quarot 0.024, duquant 0.18 (its 0.8 weight clip)
    assert ((q(ids) - fp(ids)).norm() / fp(ids).norm()).item() < 0.25


@pytest.mark.parametrize("n", [1, 7, 128, 300])
def test_inverse_upper_cholesky_is_gptqs_hinv(n):
    """One Cholesky of the reversed H plus a triangular solve gives the paper's
    chol(chol_inverse(chol(H)), upper): U upper triangular, U^T U = H^-1."""
    from dllm_export.quant.gptq import inverse_upper_cholesky

    g = torch.Generator().manual_seed(n)
    X = torch.randn(2 * n + 3, n, generator=g, dtype=torch.float64)
    H = X.T @ X
    H.diagonal().add_(0.01 * H.diagonal().mean())
    U = inverse_upper_cholesky(H)
    assert torch.equal(U, U.triu()) and (U.diagonal() > 0).all()
    torch.testing.assert_close(U.T @ U @ H, torch.eye(n, dtype=torch.float64), atol=1e-9, rtol=0)
    paper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    torch.testing.assert_close(U, paper, atol=1e-10 * float(paper.abs().max()), rtol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("scheme,bits,sym", [("W4A8", 3, None), ("W4A16", 6, True), ("W8A8", 5, False)])
def test_every_method_rounds_to_the_requested_grid(tiny_q, method, scheme, bits, sym):
    """--bits / --sym reach every method's weight grid (DuQuant used to rebuild it and drop the bits)."""
    model = D.load_model(tiny_q["llada"])
    qcfg = QuantizeConfig(method=method, scheme=scheme, bits=bits, sym=sym, group_size=0)
    m = METHODS[method](qcfg, model.spec, model.config)
    assert m.wcfg == qcfg.weight_config()
    assert m.wcfg.bits == bits and m.wcfg.group_size == 0
    default = METHODS[method].default_weight_sym
    assert m.wcfg.sym == (sym if sym is not None else default if default is not None else True)  # schemes: sym
    acfg = qcfg.act_config()
    assert (acfg is None) == scheme.endswith("A16")
    if acfg is not None:
        assert acfg.bits == 8 and acfg.sym == METHODS[method].default_act_sym


def test_duquant_bits_reach_the_checkpoint(tiny_q, calib_file, tmp_path):
    out = quantize(tiny_q["llada"], tmp_path / "dq", QuantizeConfig(method="duquant", scheme="W4A8", bits=3,
                                                                    weight_method="rtn", calib=_calib(calib_file)),
                   progress=False)
    layers = json.loads((out / "manifest.json").read_text())["layers"]
    assert len(layers) == 14 and {e["weight"]["bits"] for e in layers.values()} == {3}


@pytest.mark.parametrize("qmax", [3, 15, 31])
def test_scale_min_search_never_worse_than_the_range(qmax):
    """The K-quant group fit (weighted least squares over stretched grids) keeps s > 0 and m <= 0 and
    has at most the weighted error of the plain min/max grid on every group, less on average."""
    from dllm_export.quant.primitives import scale_min_search

    Wg = torch.randn(64, 8, 32, generator=torch.Generator().manual_seed(0)) * 0.05
    Wg[0, 0] = 0.0  # an all-zero group
    Wg[1, 1] += 0.2  # a group with no negative weight: m = 0
    lo, hi = Wg.amin(-1).clamp(max=0), Wg.amax(-1).clamp(min=0)
    s, m = scale_min_search(Wg, lo, hi, qmax)
    assert bool((s > 0).all()) and bool((m <= 0).all())

    def weighted_error(s, m):
        w = Wg.pow(2).mean(-1, keepdim=True).sqrt() + Wg.abs()
        q = torch.round((Wg - m[..., None]) / s[..., None]).clamp(0, qmax)
        return (w * (s[..., None] * q + m[..., None] - Wg) ** 2).sum(-1)

    s0 = ((hi - lo) / qmax).clamp(min=1e-30)
    e, e0 = weighted_error(s, m), weighted_error(s0, lo)
    assert bool((e <= e0 * (1 + 1e-5) + 1e-12).all())
    assert float(e.sum()) < 0.97 * float(e0.sum())


@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 32), (3, 64), (2, 64)])
@pytest.mark.parametrize("rounding", ["rtn", "rtn-mse", "gptq", "gptq-act-order"])
def test_progressive_grid_is_an_exact_int8_weight(bits, group_size, rounding):
    """QServe's progressive groups: integer group scales x one channel scale (each row's largest at the
    top integer), integer x code within int8, `int8_form` exactly the dequantized weight, and an output
    error within 5 % of the same grid with float group scales (measured: 0.994-1.018x, 1.039x with the
    MSE clip at groups of 32)."""
    W = _W()
    W[5, 7] = 12.0  # an outlier: its group's scale is 12 sigma, the row's others stay small
    X = torch.randn(1024, 512, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.2, 3, 512)
    cfg = WeightQuantConfig(bits, group_size, True, scale_dtype=torch.float32, progressive=True)
    plain = dataclasses.replace(cfg, progressive=False)
    if rounding.startswith("rtn"):
        q, ref = (rtn_quantize(W, c, mse_clip=rounding == "rtn-mse") for c in (cfg, plain))
    else:
        H = 2 * X.T @ X / X.shape[0]
        q, ref = (gptq_quantize(W, H, c, act_order=rounding == "gptq-act-order")[0] for c in (cfg, plain))
    d, ints = progressive_scales(q)
    S = cfg.progressive_max
    assert S == 127 // 2 ** (bits - 1) and (ints != 0).all() and (ints.abs().amax(1) == S).all()
    assert torch.equal(d[:, None] * ints, q.scales)
    wide = q.codes.to(torch.int32) * ints.repeat_interleave(group_size, dim=1)
    assert wide.abs().max() <= 127  # the product never saturates int8
    c, s = int8_form(q)
    assert torch.equal(c.to(torch.int32), wide) and torch.equal(c.float() * s[:, None], q.dequantize())

    def out_err(qw):
        return float((X @ (W - qw.dequantize()).T).norm() / (X @ W.T).norm())
    assert out_err(q) <= 1.05 * out_err(ref)


@pytest.mark.parametrize("kwargs", [dict(sym=False), dict(bits=5), dict(group_size=0), dict(scale_dtype=torch.float16)])
def test_progressive_grid_refuses_what_int8_cannot_hold(kwargs):
    base = dict(bits=4, group_size=128, sym=True, scale_dtype=torch.float32, progressive=True)
    with pytest.raises(D.InputError, match="progressive group scales"):
        WeightQuantConfig(**{**base, **kwargs})
    with pytest.raises(D.InputError, match="not integers x one channel scale"):  # scales of another quantizer
        progressive_scales(dataclasses.replace(quantize_weight(_W(), WeightQuantConfig(4, 128)),
                                               cfg=WeightQuantConfig(**base)))


def test_progressive_quantize_config():
    """A method's asymmetric default gives way to the symmetric progressive grid; an explicit --asym,
    a K-quant or a per-layer mix is refused."""
    w = QuantizeConfig(method="awq", scheme="W4A8", group_size=128, progressive=True).weight_config()
    assert w.progressive and w.sym and w.scale_dtype == torch.float32
    for bad in (dict(sym=False), dict(kquant="Q4_K"), dict(layer_bits={"model.layers.0.mlp.up_proj": 3})):
        with pytest.raises(D.InputError, match="progressive"):
            QuantizeConfig(method="rtn", scheme="W4A16", group_size=128, progressive=True, **bad)


def test_progressive_grid_fuzzed():
    """Any weights (rows of zeros, groups 1e-40..1e30 apart, subnormal ones): the integers stay in
    [-S, S] and non-zero, the int8 weight never saturates and equals the dequantized weight exactly."""
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @hyp.given(bits=st.sampled_from([2, 3, 4]), group=st.sampled_from([16, 32]), G=st.integers(1, 5),
               out=st.integers(1, 6), exps=st.lists(st.integers(-40, 30), min_size=30, max_size=30),
               seed=st.integers(0, 2**16))
    def check(bits, group, G, out, exps, seed):
        W = torch.randn(out, G * group, generator=torch.Generator().manual_seed(seed))
        scale = torch.tensor([10.0 ** e for e in exps[:out * G]])  # out * G <= 30 exponents
        W = (W.view(out, G, group) * scale.view(out, G, 1)).view(out, G * group)
        W[0, :group] = 0.0  # an all-zero group
        if out > 1:
            W[1] = 0.0  # and an all-zero row
        cfg = WeightQuantConfig(bits, group, True, scale_dtype=torch.float32, progressive=True)
        q = quantize_weight(W, cfg)
        d, ints = progressive_scales(q)
        assert (ints != 0).all() and ints.abs().max() <= cfg.progressive_max
        wide = q.codes.to(torch.int32) * ints.repeat_interleave(group, dim=1)
        assert wide.abs().max() <= 127
        c, s = int8_form(q)
        assert torch.equal(c.float() * s[:, None], q.dequantize())

    check()


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="rtn", act_order=True), "act_order is a GPTQ option; method rtn does not round with GPTQ"),
    (dict(method="awq", act_order=True, percdamp=0.1), "act_order, percdamp are GPTQ options; method awq"),
    (dict(method="duquant", scheme="W4A8", weight_method="rtn", act_order=True),
     "method duquant with weight_method rtn does not round with GPTQ"),
    (dict(method="awq", mse_clip=True), "mse_clip is the RTN / GPTQ grid's clip search; method awq rounds with a clip"),
    (dict(method="gptq", alpha=0.3), "alpha is an option of duquant, smoothquant; method gptq does not read it"),
    (dict(method="rtn", weight_method="rtn"), "weight_method is an option of duquant, quarot, smoothquant"),
    (dict(method="rtn", act_granularity="per_tensor"), "scheme W4A16 quantizes no activations"),
])
def test_options_a_method_does_not_read_are_refused(kwargs, message):
    """Each was dropped without a word (`quantize --method rtn --act-order` rounded to nearest)."""
    with pytest.raises(D.InputError, match=message):
        QuantizeConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(method="gptq", act_order=True, mse_clip=True),
                                    dict(method="smoothquant", scheme="W8A8", alpha=0.7, weight_method="rtn",
                                         mse_clip=True),
                                    dict(method="quarot", scheme="W8A8", act_order=True),
                                    dict(method="duquant", scheme="W4A8", alpha=0.6, mse_clip=True)])
def test_options_the_method_reads_are_taken(kwargs):
    assert QuantizeConfig(**kwargs).method == kwargs["method"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch_size and block_size must be >= 1"),  # range() arg 3 must not be zero, mid-run
    (dict(block_size=-1), "batch_size and block_size must be >= 1"),  # was blamed on a NaN Hessian
    (dict(percdamp=0.0), "percdamp must be > 0 and finite"),  # was blamed on too few calibration tokens
    (dict(percdamp=float("nan")), "percdamp must be > 0 and finite"),
    (dict(bits=4.0), "bits must be an integer, got 4.0"),
    (dict(group_size="64"), "group_size must be an integer"),
    (dict(sym="no"), "sym must be true or false, got 'no'"),  # was taken as True
    (dict(calib={"n_samples": 2}), "calib must be a CalibConfig, got dict"),
    (dict(calib=CalibConfig(n_samples=2, seq_len=32), seed=1.5), "seed must be an integer"),
    # found by fuzzing the constructors: a TypeError / AttributeError from inside before
    (dict(percdamp=None), "percdamp must be a number, got None"),  # None passes only where it is the default
    (dict(scheme=None), "scheme must be a name (a string), got None"),
    (dict(method=4), "method must be a name (a string), got 4"),
    (dict(layer_bits=8), "layer_bits maps layer names to bits (a dict, or (name, bits) pairs), got 8"),
    (dict(layer_bits="uniform"), "layer_bits maps layer names to bits"),
    # settings the run would drop without a word (the same bytes as without them)
    (dict(method="rtn", act_sym=True), "act_sym sets the activation grid; scheme W4A16 quantizes no activations"),
    (dict(method="awq", sym=True, zero_kind="float"), "zero_kind float sets an asymmetric grid's zero point"),
])
def test_quantize_config_types_and_ranges(kwargs, message):
    from dllm_export.quant import QuantizeConfig

    with pytest.raises(D.InputError, match=re.escape(message)):
        QuantizeConfig(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_prefix=2.0), "max_prefix must lie in [0, 1], got 2.0"),  # nothing left to mask, silently
    (dict(max_prefix=float("nan")), "max_prefix must lie in [0, 1], got nan"),
    (dict(n_samples=2.5), "n_samples must be an integer, got 2.5"),
    (dict(seq_len="32"), "seq_len must be an integer"),
    (dict(decode_ratios=None), "decode_ratios must be a list, got None"),
    (dict(decode_ratios=0.5), "decode_ratios must be a list, got 0.5"),
    (dict(decode_ratios=["a"]), "decode mask ratios must be numbers, got ['a']"),
    (dict(mask=None), "mask must be a name (a string), got None"),
])
def test_calib_config_types_and_ranges(kwargs, message):
    with pytest.raises(D.InputError, match=re.escape(message)):
        CalibConfig(**kwargs)
