"""QuaRot: Hadamard constructions, the fast transform, exactness of the rotations, and the full pass."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import dllm_export as D
from dllm_export.errors import InputError
from dllm_export.models.factory import make_random_checkpoint
from dllm_export.quant import CalibConfig, QuantizeConfig, quantize
from dllm_export.quant.hadamard import (HadamardTransform, hadamard_factorization, hadamard_matrix,
                                        hadamard_transform, paley1, paley2, random_hadamard, random_signs,
                                        supported_orders, sylvester)
from dllm_export.quant.qlinear import QLinear
from dllm_export.quant.quarot import OnlineTransformLinear, QuaRot, rotate_model
from dllm_export.quant.transforms import transform_from_spec
from dllm_export.tokenizer import SAMPLE_TEXT

PALEY1_Q = (3, 7, 11, 19, 23, 31, 43, 47)       # orders q + 1
PALEY2_Q = (5, 13, 17, 29, 37, 41, 53, 61, 73)  # orders 2(q + 1)

# tiny models: d_model 64 (Sylvester), MLP 96 = 12 * 8 (Paley I x Sylvester) or 128, MHA and GQA
TINY_SHAPES = {
    "llada_mha_mlp96": dict(family="llada", d_model=64, n_heads=4, n_kv_heads=4, mlp_hidden_size=96),
    "llada_gqa_mlp128": dict(family="llada", d_model=64, n_heads=4, n_kv_heads=2, mlp_hidden_size=128),
    "dream_gqa_mlp96": dict(family="dream", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=96),
}


def _ids(vocab: int = 120, shape=(2, 16)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- Hadamard matrices ------------------------------------------------------------------------------

@pytest.mark.parametrize("q", PALEY1_Q)
def test_paley1_is_hadamard(q):
    H = paley1(q)
    n = q + 1
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("q", PALEY2_Q)
def test_paley2_is_hadamard(q):
    H = paley2(q)
    n = 2 * (q + 1)
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", supported_orders(256))
def test_every_supported_order_is_hadamard(n):
    """H H^T = n I exactly, with +-1 entries, for every order <= 256 the module claims."""
    H = hadamard_matrix(n)
    assert H.shape == (n, n) and bool((H.abs() == 1).all())
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def test_supported_orders_list():
    """The orders <= 256 covered by Sylvester x Paley I/II (multiples of 4 missing: 52, 92, 100, 116,
    156, 172, 184, 188, 232, 236, 244)."""
    assert supported_orders(256) == [
        1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 56, 60, 64, 68, 72, 76, 80, 84, 88, 96, 104, 108,
        112, 120, 124, 128, 132, 136, 140, 144, 148, 152, 160, 164, 168, 176, 180, 192, 196, 200, 204, 208,
        212, 216, 220, 224, 228, 240, 248, 252, 256]


@pytest.mark.parametrize("n, m, p, construction, q", [
    (12288, 12, 1024, "paley1", 11),   # LLaDA-8B MLP
    (18944, 148, 128, "paley2", 73),   # Dream-7B MLP
    (3584, 28, 128, "paley2", 13),     # Dream-7B hidden
    (28, 28, 1, "paley2", 13),         # Dream-7B heads
    (4096, 1, 4096, "one", 0),         # LLaDA-8B hidden
    (96, 12, 8, "paley1", 11),         # the tiny test MLP
])
def test_factorization_of_model_widths(n, m, p, construction, q):
    f = hadamard_factorization(n)
    assert (f.m, f.p, f.construction, f.q) == (m, p, construction, q)
    Hm = f.small_matrix()
    assert torch.equal(Hm @ Hm.T, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 6, 10, 52, 100, 668])
def test_unsupported_order_names_n(n):
    with pytest.raises(InputError, match=f"n={n}"):
        hadamard_factorization(n)


@pytest.mark.parametrize("n", [1, 2, 8, 12, 28, 96, 148, 256, 384, 1536])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fast_transform_equals_dense(n, dtype, tol):
    """hadamard_transform(x) = x @ H_n / sqrt(n) (Kronecker + butterfly vs dense), and keeps norms."""
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    dense = x @ hadamard_matrix(n) / math.sqrt(n)
    y = hadamard_transform(x.to(dtype))
    assert y.dtype == dtype
    assert float((y.double() - dense).abs().max()) <= tol * max(1.0, float(dense.abs().max()))
    assert float((y.double().norm(dim=-1) - x.norm(dim=-1)).abs().max()) <= tol * 10


@pytest.mark.parametrize("n", [1, 12, 64, 96, 148, 1024, 1536])
def test_kronecker_factors_multiply_to_the_matrix(n):
    """The per-axis factors the fast transform uses multiply (Kronecker) to H_m (x) Sylvester(2^k)."""
    f = hadamard_factorization(n)
    K = torch.ones(1, 1, dtype=torch.float64)
    for M in f.factors():
        K = torch.kron(K, M)
    assert torch.equal(K, torch.kron(f.small_matrix(), sylvester(f.p)))


@pytest.mark.parametrize("n", [64, 96])
def test_random_hadamard(n):
    """Q = diag(s) H / sqrt(n) is orthogonal, applies as hadamard_transform(x * s), and is seeded."""
    Q = random_hadamard(n, seed=3)
    assert float((Q @ Q.T - torch.eye(n, dtype=torch.float64)).abs().max()) <= 1e-12
    x = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert float((x @ Q - hadamard_transform(x * random_signs(n, 3))).abs().max()) <= 1e-12
    assert torch.equal(Q, random_hadamard(n, seed=3))
    assert not torch.equal(Q, random_hadamard(n, seed=4))


@pytest.mark.parametrize("n, inner", [(96, 1), (12, 1), (4, 16), (12, 8)])
def test_hadamard_transform_module(n, inner):
    """T = (H_n (x) I_inner) / sqrt(n): orthogonal, rebuilt from its manifest spec, no stored tensors."""
    T = HadamardTransform(n, inner)
    M = T.matrix()
    expected = torch.kron(hadamard_matrix(n), torch.eye(inner, dtype=torch.float64)) / math.sqrt(n)
    assert float((M - expected).abs().max()) <= 1e-12
    assert float((M @ M.T - torch.eye(n * inner, dtype=torch.float64)).abs().max()) <= 1e-12
    assert T.tensors() == {}
    spec = json.loads(json.dumps(T.spec()))
    assert spec == {"kind": "hadamard", "size": n * inner, "n": n, "inner": inner}
    T2 = transform_from_spec(spec, {})
    x = torch.randn(2, 7, n * inner, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    assert T2(x).dtype == torch.bfloat16 and torch.equal(T2(x), T(x))


# ---- exact rotations ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TINY_SHAPES))
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-3)])
def test_rotate_model_keeps_logits(tmp_path, name, dtype, tol):
    """The rotated model computes the same function: max |diff| measured ~2e-14 (fp64), ~1e-5 (fp32)."""
    path = make_random_checkpoint(tmp_path / name, vocab_size=128, **TINY_SHAPES[name])
    model = D.load_model(path, dtype=dtype)
    ids = _ids()
    ref = model(ids)
    rotate_model(model, seed=1)
    assert float((model(ids) - ref).abs().max()) <= tol


def test_rotate_model_structure(tmp_path):
    """Norm weights become ones; o and down carry their online Hadamards (across heads / full MLP)."""
    path = make_random_checkpoint(tmp_path / "m", vocab_size=128, **TINY_SHAPES["dream_gqa_mlp96"])
    model = rotate_model(D.load_model(path))
    spec = model.spec
    for block in model.blocks:
        for norm in spec.norms.values():
            assert torch.equal(block.get_submodule(norm).weight, torch.ones(64))
        o, down = block.get_submodule(spec.linears["o"]), block.get_submodule(spec.linears["down"])
        assert isinstance(o, OnlineTransformLinear) and isinstance(down, OnlineTransformLinear)
        assert o.input_transform.spec() == {"kind": "hadamard", "size": 64, "n": 4, "inner": 16}
        assert down.input_transform.spec() == {"kind": "hadamard", "size": 96, "n": 96, "inner": 1}
    assert torch.equal(model.get_submodule(spec.final_norm).weight, torch.ones(64))


def _with_outlier_channels(src, dst, channels=(3, 40), factor=30.0):
    """A copy of a checkpoint whose block norms amplify a few channels (activation outliers)."""
    import shutil

    shutil.copytree(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    for k in sd:
        if k.endswith(("attn_norm.weight", "ff_norm.weight", "input_layernorm.weight",
                       "post_attention_layernorm.weight")):
            sd[k][list(channels)] *= factor
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("role", ["q", "gate"])
def test_rotation_removes_activation_outliers(tmp_path, role):
    """The paper's point: rotated linear inputs have no outlier channels. Peak-to-RMS per token of the
    q / gate inputs drops from ~7.5 (two 30x channels) to < 4 (measured ~2.9)."""
    path = make_random_checkpoint(tmp_path / "m", vocab_size=128, **TINY_SHAPES["llada_mha_mlp96"])
    path = _with_outlier_channels(path, tmp_path / "outlier")
    model = D.load_model(path)
    name = model.spec.linears[role]
    ids = _ids(shape=(4, 32))

    def peak_ratio():
        seen = []
        h = model.blocks[1].get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        model(ids)
        h.remove()
        x = seen[0]
        return float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean())

    before = peak_ratio()
    rotate_model(model)
    after = peak_ratio()
    assert before > 6.0 and after < 4.0


def test_tied_embeddings_refused(tmp_path):
    path = make_random_checkpoint(tmp_path / "tied", vocab_size=128, weight_tying=True,
                                  **TINY_SHAPES["llada_mha_mlp96"])
    model = D.load_model(path)
    with pytest.raises(InputError, match="tied embeddings"):
        rotate_model(model)
    with pytest.raises(InputError, match="tied embeddings"):
        QuaRot(QuantizeConfig(method="quarot", scheme="W8A8"), model.spec, model.config)


def test_width_without_hadamard_refused(tmp_path):
    path = make_random_checkpoint(tmp_path / "m", vocab_size=128, **dict(TINY_SHAPES["llada_mha_mlp96"],
                                                                         mlp_hidden_size=100))
    with pytest.raises(InputError, match=r"mlp = 100.*n=100"):
        rotate_model(D.load_model(path))


@pytest.mark.parametrize("name", ["llada_mha_mlp96", "dream_gqa_mlp96"])
def test_gptq_hessian_sees_the_online_hadamard(tmp_path, name):
    """process_block rounds o / down with GPTQ on the Hessian of their transformed inputs x T: on those
    inputs GPTQ beats RTN (a Hessian of x instead of x T makes GPTQ worse than RTN here)."""
    import copy

    path = make_random_checkpoint(tmp_path / name, vocab_size=128, **TINY_SHAPES[name])
    model = rotate_model(D.load_model(path))
    spec, block = model.spec, model.blocks[0]
    ids = _ids(shape=(8, 32))
    X = model.get_submodule(spec.embedding)(ids)
    ctx = model.block_context(ids.shape[1], torch.float32)
    names = [spec.linears["o"], spec.linears["down"]]
    inputs = {}
    handles = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0]))
               for n in names]
    block(X, *ctx)
    for h in handles:
        h.remove()
    errs = {}
    for rounding in ("gptq", "rtn"):
        qcfg = QuantizeConfig(method="quarot", scheme="W4A16", group_size=0, weight_method=rounding)
        b = copy.deepcopy(block)
        QuaRot(qcfg, spec, model.config).process_block(b, X, ctx, 0)
        for n in names:
            fp, q = block.get_submodule(n), b.get_submodule(n)
            xt = fp.input_transform(inputs[n])
            errs[rounding, n] = _rel(xt @ q.weight.T, xt @ fp.weight.T)
    for n in names:
        assert errs["gptq", n] < 0.9 * errs["rtn", n]


# ---- the full pass ------------------------------------------------------------------------------------

@pytest.fixture()
def calib_txt(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text(SAMPLE_TEXT * 4)
    return f


def _quarot(src, out, calib_txt, scheme="W8A8", **kw):
    calib = CalibConfig(source=str(calib_txt), n_samples=4, seq_len=32)
    return quantize(src, out, QuantizeConfig(method="quarot", scheme=scheme, calib=calib, **kw), progress=False)


@pytest.mark.parametrize("name", ["llada", "llada_gqa", "dream"])
def test_quarot_w8a8_end_to_end(tiny_dirs, tmp_path, calib_txt, name):
    """GPTQ W8A8 after rotation: reloads with the online Hadamards rebuilt from the manifest; logits
    within 10% relative L2 of fp (measured 6.5% LLaDA, 6.0% Dream; plain W8A16 per-channel RTN alone
    gives ~3.5% on these peaky random models)."""
    src = tiny_dirs[name]
    out = _quarot(src, tmp_path / "q", calib_txt)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "quarot"
    model = D.load_model(out)
    spec, ids = model.spec, _ids(vocab=300, shape=(2, 32))
    ref = D.load_model(src)(ids)
    logits = model(ids)
    assert _rel(logits, ref) < 0.10
    for i, block in enumerate(model.blocks):
        prefix = f"{spec.blocks}.{i}."
        down, o = spec.linears["down"], spec.linears["o"]
        assert manifest["layers"][prefix + down]["input_transform"] == {"kind": "hadamard", "size": 96, "n": 96,
                                                                        "inner": 1}
        assert manifest["layers"][prefix + o]["input_transform"]["kind"] == "hadamard"
        for role, lname in spec.linears.items():
            layer = block.get_submodule(lname)
            assert isinstance(layer, QLinear) and layer.act.bits == 8 and layer.act.sym
            assert layer.qweight.cfg.bits == 8 and layer.qweight.cfg.sym
            assert isinstance(layer.input_transform, HadamardTransform) == (role in ("o", "down"))
    # the online transforms are needed: without them the weights (which absorbed T^T) are wrong
    for block in model.blocks:
        for role in ("o", "down"):
            block.get_submodule(spec.linears[role]).input_transform = None
    assert _rel(model(ids), ref) > 3 * _rel(logits, ref)


@pytest.mark.parametrize("scheme, bound", [("W4A8", 0.9), ("W8A8", 0.10)])
def test_quarot_rtn_weights(tiny_dirs, tmp_path, calib_txt, scheme, bound):
    """RTN weight rounding after rotation (measured rel. L2 logit error: W8A8 4.7%, W4A8 51%)."""
    src = tiny_dirs["llada"]
    out = _quarot(src, tmp_path / "q", calib_txt, scheme=scheme, weight_method="rtn")
    ids = _ids(vocab=300, shape=(2, 32))
    assert _rel(D.load_model(out)(ids), D.load_model(src)(ids)) < bound


def test_quarot_beats_plain_rounding_with_outliers(tiny_dirs, tmp_path, calib_txt):
    """With 30x outlier channels, W8A8 QuaRot (RTN weights) has well under half the logit error of plain
    W8A8 RTN (measured 7.7% vs 18.9% relative L2)."""
    src = _with_outlier_channels(tiny_dirs["llada"], tmp_path / "outlier")
    calib = CalibConfig(source=str(calib_txt), n_samples=4, seq_len=32)
    ids = _ids(vocab=300, shape=(2, 32))
    ref = D.load_model(src)(ids)
    errs = {}
    for method in ("quarot", "rtn"):
        rounding = {"weight_method": "rtn"} if method == "quarot" else {}  # rtn rounds to nearest anyway
        out = quantize(src, tmp_path / method, QuantizeConfig(method=method, scheme="W8A8", calib=calib, **rounding),
                       progress=False)
        errs[method] = _rel(D.load_model(out)(ids), ref)
    assert errs["quarot"] < 0.6 * errs["rtn"]


def test_head_count_without_hadamard_skips_only_the_across_heads_transform(tmp_path):
    """6 heads have no Hadamard matrix: o_proj keeps its offline per-head rotation, no online one."""
    path = make_random_checkpoint(tmp_path / "m", "dream", vocab_size=128, hidden_size=96, num_attention_heads=6,
                                  num_key_value_heads=2, intermediate_size=128)
    model = D.load_model(path, dtype=torch.float64)
    ids = _ids()
    ref = model(ids)
    rotate_model(model, seed=0)
    assert float((model(ids) - ref).abs().max()) <= 1e-9
    block = model.blocks[0]
    assert not isinstance(block.get_submodule(model.spec.linears["o"]), OnlineTransformLinear)
    assert isinstance(block.get_submodule(model.spec.linears["down"]), OnlineTransformLinear)
