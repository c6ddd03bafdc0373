"""ONNX export: graph validity, parity with torch (float and quantized), exact weight storage,
decoding traces on onnxruntime, the fusions onnxruntime applies, and bad input."""

import json
import re

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from dllm_export import InputError, generate, load_model  # noqa: E402
from dllm_export.exporter import export  # noqa: E402
from dllm_export.exporter.onnx import OnnxExportConfig, export_onnx  # noqa: E402
from dllm_export.models.factory import make_random_checkpoint  # noqa: E402
from dllm_export.quant import CalibConfig, QuantizeConfig, quantize  # noqa: E402
from dllm_export.quant.load import read_linear, read_manifest  # noqa: E402
from dllm_export.models.checkpoint import open_shards  # noqa: E402
from dllm_export.runtime.backends import load_backend  # noqa: E402
from dllm_export.runtime.ort import OrtBackend  # noqa: E402

CALIB = CalibConfig(n_samples=4, seq_len=32)


@pytest.fixture(scope="module")
def float_exports(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_float")
    return {name: export_onnx(path, root / name) for name, path in tiny_dirs.items()}


@pytest.fixture(scope="module")
def small_ckpts(tmp_path_factory):
    """Tiny checkpoints with std 0.05 weights (logits ~1, so quantized errors stay readable)."""
    root = tmp_path_factory.mktemp("onnx_small")
    return {
        "llada": make_random_checkpoint(root / "llada", family="llada", tokenizer=True, std=0.05, vocab_size=384,
                                        d_model=64, n_heads=4, n_kv_heads=2, max_sequence_length=128),
        "dream": make_random_checkpoint(root / "dream", family="dream", tokenizer=True, std=0.05, vocab_size=384,
                                        hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128),
    }


def _ids(B=2, L=24, seed=0):
    return torch.randint(0, 380, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["llada", "llada_gqa", "dream"])
def test_float_export_matches_torch(name, tiny_dirs, float_exports):
    out = float_exports[name]
    onnx.checker.check_model(str(out / "model.onnx"))
    model, be = load_model(tiny_dirs[name]), OrtBackend(out)
    ids = _ids()
    ref = model(ids).float()
    assert (be.forward(ids) - ref).abs().max() < 1e-4
    # a left-padded batch: real rows agree, pad rows are finite
    am = torch.ones_like(ids)
    am[1, :7] = 0
    ref_p, got_p = model(ids, attention_mask=am).float(), be.forward(ids, am)
    assert (got_p[0] - ref_p[0]).abs().max() < 1e-4
    assert (got_p[1, 7:] - ref_p[1, 7:]).abs().max() < 1e-4
    assert torch.isfinite(got_p).all()
    # logit_positions: the head runs only on the requested rows
    pos = torch.tensor([[0, 5, 23], [2, 2, 9]])
    got = be.forward(ids, None, pos)
    assert got.shape == (2, 3, ref.shape[-1])
    assert (got - ref.gather(1, pos[..., None].expand(-1, -1, ref.shape[-1]))).abs().max() < 1e-4
    # ... and the last block computes only those rows, the keys of every row still in (left padding too)
    pos = torch.tensor([[0, 5, 23], [7, 9, 23]])
    got_p = be.forward(ids, am, pos)
    assert (got_p - ref_p.gather(1, pos[..., None].expand(-1, -1, ref.shape[-1]))).abs().max() < 1e-4


@pytest.mark.parametrize("name,sampler", [("llada", "low_confidence"), ("llada_gqa", "low_confidence"),
                                          ("dream", "entropy"), ("dream", "maskgit_plus")])
def test_float_trace_equals_torch(name, sampler, tiny_dirs, float_exports):
    model, be = load_model(tiny_dirs[name]), load_backend(float_exports[name])
    assert isinstance(be, OrtBackend)
    prompts = [[5, 9, 33, 70], [12, 40]]
    kw = dict(gen_length=16, steps=8, block_length=8, temperature=0.0, sampler=sampler)
    a, b = generate(model, prompts, **kw), generate(be, prompts, **kw)
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.commit_step, b.commit_step)


# (method, scheme, quantize overrides, export config, tolerance kind)
QUANT_CASES = [
    ("rtn", "W4A16", dict(group_size=32), dict(weight_format="qdq"), "exact"),
    ("rtn", "W4A16", dict(group_size=32), dict(weight_format="matmulnbits"), "exact"),
    ("gptq", "W4A16", dict(group_size=32, sym=False), dict(weight_format="qdq"), "exact"),
    ("gptq", "W4A16", dict(group_size=32, sym=False), dict(weight_format="matmulnbits"), "exact"),
    ("rtn", "W3A16", dict(group_size=16), dict(weight_format="qdq"), "exact"),
    ("rtn", "W8A16", dict(group_size=0), dict(weight_format="qdq"), "exact"),
    ("rtn", "W2A16", dict(group_size=16, sym=False), dict(weight_format="matmulnbits"), "exact"),
    # 8-bit activations: the codes are exact only while the float input of each rounding is; onnxruntime's
    # GEMMs sum in another order than torch's (1e-7), and on some CPUs (measured on an AVX-512 BF16 host) an
    # activation then rounds to the neighbouring code, which bidirectional attention spreads over its sequence
    ("rtn", "W8A8", {}, {}, "rounding"),  # integer GEMM, symmetric activations
    ("smoothquant", "W8A8", {}, {}, "rounding"),  # integer GEMM, asymmetric activations
    ("smoothquant", "W8A8", dict(act_granularity="per_tensor"), {}, "rounding"),  # static Q/DQ
    ("awq", "W4A16", dict(group_size=32), dict(weight_format="matmulnbits"), "exact"),
    ("quarot", "W4A8", {}, {}, "rounding"),  # online Hadamards: a few activation roundings flip
    ("duquant", "W4A8", {}, {}, "rounding"),  # block rotations + permutation
    ("rtn", "W4A8", dict(sym=False), {}, "rounding"),  # uint4 codes + zero points, widened at load
    ("quarot", "W4A4", {}, {}, "rounding"),  # simulation graph
    ("rtn", "W4A8", dict(group_size=32), {}, "acc4"),  # MatMulNBits quantizes activations per K-block
    # progressive groups: the int8 weight (group integer x int4 / 3-bit code) rebuilt at load, integer GEMM
    ("gptq", "W4A8", dict(group_size=32, progressive=True), {}, "rounding"),
    ("awq", "W4A8", dict(bits=3, group_size=16, progressive=True), {}, "rounding"),
    ("quarot", "W4A8", dict(group_size=32, progressive=True), {}, "rounding"),  # + online Hadamards
    ("rtn", "W4A16", dict(group_size=32, progressive=True), dict(weight_format="matmulnbits"), "exact"),
]


@pytest.fixture(scope="module")
def quantized(small_ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_q")
    cache = {}

    def get(family, method, scheme, overrides):
        key = (family, method, scheme, tuple(sorted(overrides.items())))
        if key not in cache:
            out = root / f"{family}-{method}-{scheme}-{len(cache)}"
            cache[key] = quantize(small_ckpts[family], out, QuantizeConfig(method=method, scheme=scheme, calib=CALIB,
                                                                            **overrides), progress=False)
        return cache[key]
    return get


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("method,scheme,overrides,ecfg,tol", QUANT_CASES,
                         ids=[f"{m}-{s}-{'-'.join(f'{k}{v}' for k, v in o.items())}-{e.get('weight_format', 'qdq')}"
                              for m, s, o, e, _ in QUANT_CASES])
def test_quantized_export_matches_fake_quant(family, method, scheme, overrides, ecfg, tol, quantized, small_ckpts,
                                             tmp_path):
    q = quantized(family, method, scheme, overrides)
    out = export_onnx(q, tmp_path / "onnx", OnnxExportConfig(**ecfg))
    ids = _ids()
    ref = load_model(q)(ids).float()
    quant_err = (ref - load_model(small_ckpts[family])(ids).float()).norm()
    for optimize in (True, False):  # onnxruntime's fused graph and the graph as written
        got = OrtBackend(out, optimize=optimize).forward(ids)
        row_err = (got - ref).abs().amax(-1)
        if tol == "exact":  # same codes, same grids: float summation order only
            assert row_err.max() < 1e-5, row_err.max()
        elif tol == "rounding":
            # float sums in another order (rotations, or another GEMM), so a few activations round to the
            # neighbouring code and bidirectional attention spreads that: far below the quantization error
            assert (got - ref).norm() < 0.2 * quant_err, ((got - ref).norm(), quant_err)
        else:  # acc4: int8 activations per K-block instead of per token
            assert (got - ref).norm() < 0.5 * quant_err, ((got - ref).norm(), quant_err)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scheme"] == scheme and manifest["method"] == method
    assert manifest["simulated"] == (scheme == "W4A4")


@pytest.mark.parametrize("fmt", ["qdq", "matmulnbits"])
def test_weight_only_graph_runs_matmulnbits(fmt, quantized, tmp_path):
    q = quantized("llada", "rtn", "W4A16", dict(group_size=32))
    out = export_onnx(q, tmp_path / fmt, OnnxExportConfig(weight_format=fmt))
    ops = OrtBackend(out).optimized_op_types()
    assert ops.get("MatMulNBits") == 7 * 2  # every block linear, 2 layers; the head stays float
    assert "DequantizeLinear" not in ops


@pytest.mark.parametrize("scheme,overrides,stored,casts", [
    ("W8A8", {}, "INT8", 0), ("W4A8", {}, "INT4", 1), ("W4A8", dict(sym=False), "UINT4", 1),
    # progressive: int4 codes x int8 group integers, Cast / Reshape / Mul / Reshape / Cast folded at load
    ("W4A8", dict(group_size=32, progressive=True), "INT4", 3)])
def test_integer_scheme_runs_integer_kernels(quantized, tmp_path, scheme, overrides, stored, casts):
    out = export_onnx(quantized("llada", "rtn", scheme, overrides), tmp_path / scheme)
    ops = OrtBackend(out).optimized_op_types()
    # symmetric per-token activations: the GEMM and the weight scales in one kernel
    assert ops.get("MatMulIntegerToFloat", 0) == 14 and "MatMulInteger" not in ops and "MatMulNBits" not in ops
    # per-token codes once per activation: q/k/v share one, gate/up another (4 per block, not 7)
    assert json.loads((out / "manifest.json").read_text())["ops"]["ReduceMax"] == 4 * 2
    # 4-bit codes stay 4-bit in the file; onnxruntime widens them at load (the Cast is folded away)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    types = {onnx.TensorProto.DataType.Name(t.data_type) for t in m.graph.initializer if t.name.endswith(".qweight")}
    assert types == {stored}
    assert ops.get("Cast", 0) == json.loads((out / "manifest.json").read_text())["ops"]["Cast"] - 14 * casts
    if overrides.get("progressive"):  # after folding: the per-channel W4A8 graph, node for node
        plain = export_onnx(quantized("llada", "rtn", scheme, {}), tmp_path / "plain")
        assert ops == OrtBackend(plain).optimized_op_types()
    # no dead nodes: every value a node writes is read by another or is a graph output (the last
    # block's float rows are not written where its q layer reads their integer codes)
    read = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    assert all(o in read for n in m.graph.node for o in n.output)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_activation_codes_equal_quantize_act(sym, clip, tmp_path):
    """The graph's per-token 8-bit codes are `quantize_act`'s bit for bit (round half to even, the
    same scale arithmetic), on rows with exact ties, an all-zero row and outliers."""
    from dllm_export.exporter.onnx import OPSET, _Builder, _Graph
    from dllm_export.quant.primitives import ActQuantConfig, quantize_act

    a, K = ActQuantConfig(bits=8, sym=sym, clip=clip), 96
    g = _Graph(tmp_path / "data")
    codes = _Builder(g, OnnxExportConfig())._act_codes("x", a, K, "t")["codes"]
    g.close()
    TP, h = onnx.TensorProto, onnx.helper
    graph = h.make_graph(g.nodes, "codes", [h.make_tensor_value_info("x", TP.FLOAT, ["B", "L", K])],
                         [h.make_tensor_value_info(codes, TP.UINT8, None)], initializer=g.initializers)
    sess = ort.InferenceSession(h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)]).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 400, K, generator=gen) * torch.logspace(-3, 3, 400).view(1, -1, 1)
    x[0, 0] = 0.0
    x[1, :, 0] = 127.0  # absmax 127 (sym): x / s lands on exact halves below
    x[1, :, 1:40] = torch.arange(-19.5, 19.5)
    x[2, :, 5] *= 50.0  # an outlier channel
    got = torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]).float()
    q, _, z = quantize_act(x, a)
    want = q + 128 if z is None else q
    assert torch.equal(got, want), (got != want).sum()


def _stored_dequant_onnx(out, name: str, fmt: str) -> np.ndarray:
    """Dequantize one layer's weight with onnxruntime from the stored initializers: the DQ node run
    alone (qdq), or MatMulNBits applied to the identity (matmulnbits), each with the nodes that
    rebuild its inputs from the file (fp16 scales, dense bit planes); returns [N, K]."""
    m = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}

    def upstream(names: list[str]) -> list:
        nodes, todo = [], list(names)
        while todo:
            n = producer.get(todo.pop())
            if n is not None and n not in nodes:
                nodes.append(n)
                todo += list(n.input)
        return nodes[::-1]

    if fmt == "qdq":
        nodes, out_name, extra = upstream([f"{name}.weight"]), f"{name}.weight", []
    else:
        node = next(n for n in m.graph.node if n.op_type == "MatMulNBits" and n.output[0] == name)
        K = next(a.i for a in node.attribute if a.name == "K")
        extra = [onnx.numpy_helper.from_array(np.eye(K, dtype=np.float32), "eye")]
        node = onnx.helper.make_node("MatMulNBits", ["eye", *node.input[1:]], ["y"], domain="com.microsoft",
                                     **{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
        nodes, out_name = upstream(list(node.input[1:])) + [node], "y"
    used = {i for n in nodes for i in n.input}
    graph = onnx.helper.make_graph(nodes, "dq", [], [onnx.helper.make_tensor_value_info(out_name, 1, None)],
                                   initializer=extra + [t for k, t in inits.items() if k in used])
    model = onnx.helper.make_model(graph, opset_imports=m.opset_import, functions=m.functions)
    model.ir_version = m.ir_version
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    y = ort.InferenceSession(model.SerializeToString(), opts).run(None, {})[0]
    return y.T  # DQ gives [K, N]; I @ W^T gives [K, N]


@pytest.mark.parametrize("fmt", ["qdq", "matmulnbits"])
@pytest.mark.parametrize("overrides", [dict(group_size=32), dict(group_size=32, sym=False), dict(group_size=0)],
                         ids=["sym-g32", "asym-g32", "per-channel"])
def test_gptq_codes_stored_exactly(fmt, overrides, quantized, tmp_path):
    if fmt == "matmulnbits" and overrides["group_size"] == 0:
        pytest.skip("MatMulNBits has no per-channel form for K = 96 (a power-of-two block is required)")
    q = quantized("llada", "gptq", "W4A16", overrides)
    out = export_onnx(q, tmp_path / fmt, OnnxExportConfig(weight_format=fmt))
    handles, layers = open_shards(q), read_manifest(q)["layers"]
    for name in ["model.transformer.blocks.0.q_proj", "model.transformer.blocks.1.ff_out"]:
        ours = read_linear(handles, name, layers[name], q).qweight.dequantize()
        theirs = torch.from_numpy(_stored_dequant_onnx(out, name, fmt))
        assert torch.equal(theirs, ours), (name, (theirs - ours).abs().max())


@pytest.mark.parametrize("bits,overrides", [(2, dict(group_size=16, sym=False)), (3, dict(group_size=16)),
                                           (5, dict(group_size=32)), (6, dict(group_size=32, sym=False))])
def test_low_bit_codes_stored_densely(bits, overrides, quantized, tmp_path):
    """2/3/5/6-bit codes take bits / 8 bytes per weight in the file (bit planes) and dequantize,
    through onnxruntime's own ops, to exactly our weights; onnxruntime folds the planes at load."""
    q = quantized("llada", "rtn", f"W{bits}A16", overrides)
    out = export_onnx(q, tmp_path / "onnx")
    handles, layers = open_shards(q), read_manifest(q)["layers"]
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    stored = {t.name: t for t in m.graph.initializer}
    for name in ["model.transformer.blocks.0.q_proj", "model.transformer.blocks.1.ff_out"]:
        ours = read_linear(handles, name, layers[name], q).qweight.dequantize()
        assert torch.equal(torch.from_numpy(_stored_dequant_onnx(out, name, "qdq")), ours), name
        planes = stored[f"{name}.qweight.planes"]
        assert list(planes.dims) == [bits, -(-ours.numel() // 8), 1]  # bits x ceil(N * K / 8) bytes
    # one call of a local function per stored tensor in the file; inlined and folded at load
    calls = [n for n in m.graph.node if n.domain == "dllm_export"]
    assert {n.op_type for n in m.graph.node} & {"BitShift", "BitwiseAnd"} == set() and len(calls) >= 2
    ops = OrtBackend(out).optimized_op_types()
    assert not {"BitShift", "BitwiseAnd", "ReduceSum", *(n.op_type for n in calls)} & set(ops)
    ref = load_model(q)(_ids()).float()
    assert (OrtBackend(out).forward(_ids()) - ref).abs().max() < 1e-5


def test_export_cli_flow_and_generate(tmp_path, capsys):
    from dllm_export.cli import main

    out = tmp_path / "w4"
    assert main(["--target", "onnx", "--bits", "4", "--method", "rtn", "--model", "default", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "W4A16 rtn" in text and "MiB" in text
    assert "portable: no --device, so fp32 arithmetic on every host; " in text  # and what --device would change
    assert (out / "model.onnx").is_file() and (out / "tokenizer.json").is_file()
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    props = {p.key: p.value for p in m.metadata_props}
    assert json.loads(props["dllm_export.manifest"])["scheme"] == "W4A16"
    assert main(["generate", "--model", str(out), "--prompt", "1+1=", "--gen-length", "8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["backend"] == "onnxruntime" and len(res["ids"][0]) == res["prompt_length"] + 8


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=3, weight_format="matmulnbits"), "2, 4 or 8-bit"),
    (dict(bits=4, group_size=8, weight_format="matmulnbits", method="rtn"), "power-of-two block"),
    (dict(scheme="W8A8", weight_format="matmulnbits", method="rtn"), "power-of-two block"),
    (dict(bits=4, method="rtn", quantize_options=dict(sym=False, zero_kind="float")), "float minimums"),
    (dict(bits=12), "cannot carry 12-bit"),
    (dict(bits=4, target="tflite"), "unknown export target"),
])
def test_bad_export_requests_leave_nothing(kwargs, match, small_ckpts, tmp_path):
    out = tmp_path / "art"
    with pytest.raises(InputError, match=match):
        export(small_ckpts["llada"], out, **kwargs)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temp folders left behind either


def test_export_refuses_non_empty_folder(small_ckpts, tmp_path):
    (tmp_path / "x.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty"):
        export_onnx(small_ckpts["llada"], tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


@pytest.mark.parametrize("name", ["llada", "llada_gqa", "dream"])
def test_block_step_graph_matches_torch_cache(name, tiny_dirs, float_exports):
    """The block-step inputs: a full pass fills the cache from `present.*`, windowed passes
    (dual: the block; prefix: block to the end) feed it back as `past.*`."""
    from dllm_export.models.layers import KVCache

    model, be = load_model(tiny_dirs[name]), OrtBackend(float_exports[name])
    assert be.supports_cache
    ids = _ids()
    am = torch.ones_like(ids)
    am[1, :5] = 0
    ref = model(ids, attention_mask=am).float()
    kv = KVCache()
    full = be.forward(ids, am, cache=kv)
    assert len(kv.k) == model.config.dims.n_layers and kv.length == ids.shape[1]
    assert (full[0] - ref[0]).abs().max() < 1e-4
    for window in [(8, 16), (8, 24)]:
        kv.window = window
        part = be.forward(ids[:, window[0]:window[1]], am, cache=kv)
        assert (part - ref[:, window[0]:window[1]]).abs().max() < 1e-4
    # a window that renews the cache over new tokens stores what the torch model's renewal stores
    torch_kv = KVCache()
    model(ids, attention_mask=am, cache=torch_kv)
    new = ids.clone()
    new[:, 8:24] = (new[:, 8:24] * 7 + 3) % 300
    for c in (kv, torch_kv):
        c.window, c.update = (8, 24), True
    part = be.forward(new[:, 8:24], am, cache=kv)
    assert (part - model(new[:, 8:24], attention_mask=am, cache=torch_kv).float()).abs().max() < 1e-4
    for mine, theirs in zip(kv.k + kv.v, torch_kv.k + torch_kv.v):  # (padding keys are masked: left out)
        assert mine.shape == tuple(theirs.shape)
        assert (torch.as_tensor(mine) - theirs).transpose(1, 2)[am.bool()].abs().max() < 1e-4


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
@pytest.mark.parametrize("name", ["llada", "llada_gqa", "dream"])
def test_fill_forward_equals_the_padded_forward(name, runtime, tiny_dirs, float_exports):
    """A cached forward with `fill` over the columns [a, e) of rows padded outside them (a row that
    joined a running batch) gives the padded full forward's logits on those columns and its
    keys/values there, at the canvas positions (LLaDA's RoPE counts the padding), on the torch
    model and on the block-step graph; its cache then serves a block step as the padded one does."""
    from dllm_export.models.layers import KVCache
    from dllm_export.runtime.backends import TorchBackend

    model = load_model(tiny_dirs[name])
    be = TorchBackend(model) if runtime == "torch" else OrtBackend(float_exports[name])
    ids, (a, e) = _ids(), (5, 21)
    am = torch.zeros_like(ids)
    am[:, a:e] = 1
    am[1, a:a + 2] = 0  # a shorter prompt inside the group: padding within its span too
    ref_kv = KVCache()
    ref = TorchBackend(model).forward(ids, am, cache=ref_kv)
    kv = KVCache()
    kv.fill, kv.window, kv.length = True, (a, e), ids.shape[1]
    part = be.forward(ids[:, a:e], am, cache=kv)
    real = am[:, a:e].bool()
    assert (part - ref[:, a:e])[real].abs().max() < 1e-4
    for mine, theirs in ((kv.k, ref_kv.k), (kv.v, ref_kv.v)):
        for layer, full in zip(mine, theirs):
            diff = torch.as_tensor(layer) - full[:, :, a:e]
            assert diff.transpose(1, 2)[real].abs().max() < 1e-4
    # put into the canvas's layout (zeros on the padding), it serves a block step as the padded cache
    kv.k = [torch.nn.functional.pad(torch.as_tensor(t), (0, 0, a, ids.shape[1] - e)) for t in kv.k]
    kv.v = [torch.nn.functional.pad(torch.as_tensor(t), (0, 0, a, ids.shape[1] - e)) for t in kv.v]
    if runtime == "onnxruntime":
        kv.k, kv.v = [t.numpy() for t in kv.k], [t.numpy() for t in kv.v]
    kv.fill, kv.window = False, (8, 16)
    ref_kv.window = (8, 16)
    step = be.forward(ids[:, 8:16], am, cache=kv)
    assert (step - TorchBackend(model).forward(ids[:, 8:16], am, cache=ref_kv)).abs().max() < 1e-4


@pytest.mark.parametrize("name,sampler", [("llada", "low_confidence"), ("dream", "entropy")])
@pytest.mark.parametrize("cache,parallel", [("prefix", {}), ("dual", {}), ("dual", {"threshold": 0.5}),
                                            ("prefix", {"refresh_blocks": 2}),
                                            ("dual", {"threshold": 0.5, "refresh_blocks": 2})])
def test_cached_traces_equal_torch(name, sampler, cache, parallel, tiny_dirs, float_exports):
    prompts = [[5, 9, 33, 70], [12, 40]]
    kw = dict(gen_length=16, steps=16, block_length=8, temperature=0.0, cache=cache, **parallel,
              sampler=None if parallel else sampler)  # threshold decoding ranks by top-1 probability
    a = generate(load_model(tiny_dirs[name]), prompts, **kw)
    b = generate(OrtBackend(float_exports[name]), prompts, **kw)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.commit_step, b.commit_step)


@pytest.mark.parametrize("name", ["llada_gqa", "dream"])
@pytest.mark.parametrize("opts", [{}, {"cache": "prefix"}, {"cache": "dual"}, {"cache": "dual", "threshold": 0.5},
                                  {"cache": "dual", "refresh_blocks": 2}])
def test_infill_traces_equal_torch(name, opts, tiny_dirs, float_exports):
    """Ragged prompts before the canvas and ragged suffixes after it (left- and right-padded, masked):
    the same fill on the graph as on the torch model, cached or not."""
    prompts, suffixes = [[5, 9, 33, 70], [12, 40]], [[80, 91, 17], []]
    kw = dict(gen_length=16, steps=16, block_length=8, suffix_ids=suffixes, **opts)
    a = generate(load_model(tiny_dirs[name]), prompts, **kw)
    b = generate(OrtBackend(float_exports[name]), prompts, **kw)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.commit_step, b.commit_step)
    assert a.ids[0, -3:].tolist() == [80, 91, 17]


@pytest.mark.parametrize("name", ["llada_gqa", "dream"])
@pytest.mark.parametrize("opts", [{}, {"cache": "prefix"}, {"cache": "dual"}, {"cache": "dual", "threshold": 0.5},
                                  {"cache": "dual", "factor": 1.0, "cfg_scale": 1.0}])
def test_joined_decodings_equal_torch(name, opts, tiny_dirs, float_exports):
    """Continuous batching on the graph: rows joining a running decoding at block boundaries (a
    longer prompt that moves the canvas, a suffix, other lengths) and retired when done decode the
    same tokens and commit steps on onnxruntime as on the torch model (full forwards once per
    admission, caches put together, with guidance's doubled rows too)."""
    from .test_join import drive

    arrivals = [(0, [5, 9, 33], None, 16), (1, [12, 40, 7, 7, 19, 23, 61, 8, 30, 14, 15, 16], [80, 91], 24),
                (2, [44, 45], None, 8)]
    kw = dict(gen_length=16, steps=16, block_length=8, **opts)
    a, _ = drive(load_model(tiny_dirs[name]), kw, arrivals)
    b, _ = drive(OrtBackend(float_exports[name]), kw, arrivals)
    for (ga, ca), (gb, cb) in zip(a, b):
        assert torch.equal(ga, gb) and torch.equal(ca, cb)


def test_fuzzed_schedules_decode_alike_on_torch_and_onnxruntime(tiny_dirs, float_exports):
    """Differential fuzz (hypothesis, derandomized): random ragged prompts of plain tokens and
    schedules (blocks, steps, samplers, threshold, caches with refresh by commits, stop at EOS,
    guidance, sampled temperature) give the same ids and commit steps on the fp32 graph as on the
    torch model, or the same refusal. (Prompts of mask tokens are left out: an all-mask canvas ranks
    its positions on exact ties, which the two runtimes' last bits break differently. The traces
    are robust to 3e-5 of noise on every logit, measured on these examples; the runtimes differ by
    ~3e-6.)"""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    models = {name: load_model(path) for name, path in tiny_dirs.items()}
    backends = {name: OrtBackend(path) for name, path in float_exports.items()}

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None,
                         phases=(hypothesis.Phase.generate,), suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(name=st.sampled_from(sorted(tiny_dirs)), blocks=st.sampled_from([1, 2, 4]),
                      block=st.sampled_from([2, 4, 8]), per_block=st.sampled_from([1, 2, 4]),
                      prompts=st.lists(st.lists(st.integers(10, 60), min_size=1, max_size=6), min_size=1, max_size=3),
                      sampler=st.sampled_from([None, "low_confidence", "maskgit_plus", "topk_margin", "entropy",
                                               "origin", "random"]),
                      threshold=st.sampled_from([None, None, 0.3, 0.9]),
                      cache=st.sampled_from(["none", "prefix", "dual"]),
                      refresh_tokens=st.sampled_from([None, None, 1, 3]),
                      refresh_blocks=st.sampled_from([None, None, 2]),
                      stop_at_eos=st.booleans(),
                      cfg_scale=st.sampled_from([0.0, 0.0, 1.0]), temperature=st.sampled_from([0.0, 0.0, 0.7]))
    def one(name, blocks, block, per_block, prompts, sampler, threshold, cache, refresh_tokens, refresh_blocks, **kw):
        kw.update(gen_length=blocks * block, block_length=block, steps=blocks * per_block, sampler=sampler,
                  threshold=threshold, cache=cache, refresh_tokens=None if cache == "none" else refresh_tokens,
                  refresh_blocks=None if cache == "none" else refresh_blocks, seed=3)
        try:
            a = generate(models[name], prompts, **kw)
        except InputError as e:
            with pytest.raises(InputError, match=re.escape(str(e))):
                generate(backends[name], prompts, **kw)
            return
        b = generate(backends[name], prompts, **kw)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.commit_step, b.commit_step), (name, prompts, kw)

    one()


def test_graph_without_cache_inputs_refuses_caches(tiny_dirs, tmp_path):
    out = export_onnx(tiny_dirs["llada"], tmp_path / "plain", OnnxExportConfig(kv_cache=False))
    be = OrtBackend(out)
    assert not be.supports_cache
    with pytest.raises(InputError, match="no KV cache"):
        generate(be, [[5, 9]], gen_length=8, steps=8, cache="dual")
    assert torch.isfinite(be.forward(_ids())).all()


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_int8_embedding_and_head(name, small_ckpts, tmp_path):
    """embed_head='int8': the graph computes exactly the model whose embedding and head are the
    dequantized 8-bit rows (blocks of 32), and the files shrink."""
    from dllm_export.exporter.onnx import HEAD_GRID
    from dllm_export.quant.primitives import quantize_weight

    out = export_onnx(small_ckpts[name], tmp_path / "int8", OnnxExportConfig(embed_head="int8"))
    ref_out = export_onnx(small_ckpts[name], tmp_path / "fp32")
    model = load_model(small_ckpts[name])
    with torch.no_grad():
        emb = model.get_submodule(model.spec.embedding)
        emb.weight.copy_(quantize_weight(emb.weight.float(), HEAD_GRID).dequantize())
        head = model.head_weight()
        head.copy_(quantize_weight(head.float(), HEAD_GRID).dequantize())
    ids = _ids()
    assert (OrtBackend(out).forward(ids) - model(ids).float()).abs().max() < 1e-5
    size = lambda p: sum(f.stat().st_size for f in p.iterdir() if f.name.startswith("model"))  # noqa: E731
    assert size(out) < size(ref_out)


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_int8_head_accuracy_level_4_within_its_rounding_bound(name, small_ckpts, tmp_path):
    """head_accuracy_level=4 rounds the head's input to int8 per block of 32 (scale max|x|/127): each
    logit then differs from the dequantized 8-bit head by at most sum_blocks scale/2 * sum |w|, plus
    the kernel's own float rounding (scales, block sums: up to 3e-4 of the row's largest logit
    against an exact per-block simulation), allowed as 1e-3 of it."""
    from dllm_export.exporter.onnx import HEAD_GRID
    from dllm_export.quant.primitives import quantize_weight

    out = export_onnx(small_ckpts[name], tmp_path / "acc4", OnnxExportConfig(embed_head="int8", head_accuracy_level=4))
    model = load_model(small_ckpts[name])
    hidden = {}
    with torch.no_grad():
        emb = model.get_submodule(model.spec.embedding)
        emb.weight.copy_(quantize_weight(emb.weight.float(), HEAD_GRID).dequantize())
        head = model.head_weight()
        head.copy_(quantize_weight(head.float(), HEAD_GRID).dequantize())
        model.get_submodule(model.spec.final_norm).register_forward_hook(lambda m, i, o: hidden.update(x=o.float()))
        ids = _ids()
        ref = model(ids).float()
    x = hidden["x"]  # [B, L, D], the head's input
    B, L, D = x.shape
    scale = x.reshape(B, L, D // 32, 32).abs().amax(-1) / 127  # [B, L, D/32]
    wabs = head.float().abs().reshape(head.shape[0], D // 32, 32).sum(-1)  # [V, D/32]
    bound = torch.einsum("blg,vg->blv", scale / 2, wabs) + 1e-3 * ref.abs().amax(-1, keepdim=True)
    got = OrtBackend(out).forward(ids)
    assert ((got - ref).abs() <= bound).all(), ((got - ref).abs() - bound).max()
    assert json.loads((out / "manifest.json").read_text())["layers"]["lm_head"] == "nbits-acc4"
