"""GGUF export: exact block packing of PTQ grids (checked with gguf.quants), files llama.cpp loads,
llama.cpp's forward against ours (an independent implementation), decoding traces, bad input."""

import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from dllm_export import InputError, generate, load_model  # noqa: E402
from dllm_export.errors import CheckpointError  # noqa: E402
from dllm_export.exporter import export  # noqa: E402
from dllm_export.exporter.gguf import GgufExportConfig, _permute_rope_rows, export_gguf  # noqa: E402
from dllm_export.models.factory import make_random_checkpoint  # noqa: E402
from dllm_export.models.checkpoint import open_shards  # noqa: E402
from dllm_export.quant import CalibConfig, QuantizeConfig, quantize  # noqa: E402
from dllm_export.quant.load import read_linear, read_manifest  # noqa: E402

CALIB = CalibConfig(n_samples=4, seq_len=32)


def _llama():
    return pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_src")
    return {
        "llada": make_random_checkpoint(root / "llada", family="llada", tokenizer=True, std=0.05, vocab_size=384,
                                        d_model=64, n_heads=4, n_kv_heads=4, max_sequence_length=128),
        "llada_gqa": make_random_checkpoint(root / "llada_gqa", family="llada", tokenizer=True, std=0.05,
                                            vocab_size=384, d_model=64, n_heads=4, n_kv_heads=2,
                                            max_sequence_length=128, seed=1),
        "dream": make_random_checkpoint(root / "dream", family="dream", tokenizer=True, std=0.05, vocab_size=384,
                                        hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128, seed=2),
    }


@pytest.fixture(scope="module")
def f32_exports(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_f32")
    return {name: export_gguf(path, root / name, GgufExportConfig(quant="F32", embed_type="F32", head_type="F32"))
            for name, path in ckpts.items()}


# (quant type, quantize overrides): grids that a block type stores exactly
EXACT = [("Q4_0", dict(bits=4, sym=True)), ("Q5_0", dict(bits=5, sym=True)), ("Q8_0", dict(bits=8, sym=True)),
         ("Q4_1", dict(bits=4, sym=False, zero_kind="float")), ("Q5_1", dict(bits=5, sym=False, zero_kind="float"))]


def _assert_written_exactly(q, out, roles: dict[str, str]) -> None:
    """Every block's linears of `roles` (role -> the GGML type expected) dequantize with gguf.quants
    to exactly our weights (LLaDA's q/k rows put back from llama.cpp's rope order)."""
    tensors = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    handles, layers = open_shards(q), read_manifest(q)["layers"]
    model = load_model(q)
    spec, dims = model.spec, model.config.dims
    gnames = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "up": "ffn_up", "down": "ffn_down"}
    for i in range(dims.n_layers):
        for role, qtype in roles.items():
            name = f"{spec.blocks}.{i}.{spec.linears[role]}"
            t = tensors[f"blk.{i}.{gnames[role]}.weight"]
            assert t.tensor_type.name == qtype, name
            theirs = gguf.quants.dequantize(t.data, t.tensor_type)
            if spec.gguf_rope_permute and role in ("q", "k"):  # undo llama.cpp's NORM-rope row order
                heads = dims.n_heads if role == "q" else dims.n_kv_heads
                theirs = theirs[_permute_rope_rows(np.arange(theirs.shape[0]), heads).argsort()]
            ours = read_linear(handles, name, layers[name], q).qweight.dequantize().numpy()
            assert np.array_equal(theirs, ours), (name, np.abs(theirs - ours).max())


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("qtype,overrides", EXACT, ids=[q for q, _ in EXACT])
def test_ptq_grid_written_exactly(family, qtype, overrides, ckpts, tmp_path):
    q = quantize(ckpts[family], tmp_path / "q", QuantizeConfig(method="gptq", scheme="W4A16", group_size=32,
                                                              calib=CALIB, **overrides), progress=False)
    out = export_gguf(q, tmp_path / "gguf")
    _assert_written_exactly(q, out, {role: qtype for role in ("q", "k", "down", "o")})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["exact_from_ptq"] and manifest["file_type"] == qtype


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """LLaDA with rows of 256 (K-quant super-blocks tile them) and an FFN of 352 (they do not: fallback)."""
    return make_random_checkpoint(tmp_path_factory.mktemp("gguf_k") / "llada", family="llada", tokenizer=True,
                                  std=0.05, vocab_size=384, d_model=256, n_heads=4, n_kv_heads=2, mlp_hidden_size=352,
                                  n_layers=2, max_sequence_length=128)


KQUANT_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@pytest.fixture(scope="module")
def kquant_files(wide_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf_k_out")
    cache = {}

    def get(qtype, method="gptq"):
        if (qtype, method) not in cache:
            q = quantize(wide_ckpt, root / f"q-{qtype}-{method}", QuantizeConfig(method=method, scheme="W4A16",
                                                                                  kquant=qtype, calib=CALIB),
                         progress=False)
            cache[(qtype, method)] = (q, export_gguf(q, root / f"{qtype}-{method}"))
        return cache[(qtype, method)]
    return get


@pytest.mark.parametrize("qtype", list(KQUANT_FALLBACK))
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_kquant_grid_written_exactly(qtype, method, kquant_files):
    """A K-quant PTQ grid (super-blocks of 256, integer group scales under fp16 d / dmin) goes into
    the GGML K-quant blocks bit for bit: gguf.quants dequantizes them to exactly our weights; the
    FFN down projection (width 352) takes the type's fallback block type, exactly too."""
    q, out = kquant_files(qtype, method)
    _assert_written_exactly(q, out, {"q": qtype, "v": qtype, "up": qtype, "down": KQUANT_FALLBACK[qtype]})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["exact_from_ptq"] and manifest["file_type"] == qtype


@pytest.mark.parametrize("qtype", list(KQUANT_FALLBACK))
def test_kquant_grid_edge_rows(qtype):
    """Rows of zeros, of subnormal-fp16 size, with one outlier, or half constant stay on the grid: d
    and dmin read back exactly, no group scale is 0, and the packed blocks dequantize to our weights."""
    from dllm_export.exporter.gguf_kquants import pack_kquant
    from dllm_export.quant.kquant import kquant_grid, super_scales
    from dllm_export.quant.primitives import quantize_weight

    W = torch.randn(6, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    W[1] = 0
    W[2] *= 1e-6  # group scales below fp16's normal range
    W[3, 7] = 5.0
    W[4, :256] = 1e-3
    qw = quantize_weight(W, kquant_grid(qtype))
    parts = super_scales(qw)  # raises unless every scale is an integer times the super-block's fp16 d
    assert parts["d"].dtype == torch.float16 and bool((qw.scales != 0).all())
    t = gguf.GGMLQuantizationType[qtype]
    theirs = gguf.quants.dequantize(pack_kquant(qw, qtype), t)
    assert np.array_equal(theirs, qw.dequantize().numpy())
    assert not theirs[1].any()
    rel = (qw.dequantize() - W)[[0, 5]].norm() / W[[0, 5]].norm()
    assert rel < {"Q2_K": 0.5, "Q3_K": 0.25, "Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[qtype], rel


def test_kquant_settings_refused():
    from dllm_export.quant.primitives import WeightQuantConfig

    with pytest.raises(InputError, match="tile"):
        WeightQuantConfig(bits=4, group_size=48, sym=False, zero_kind="float", scale_dtype=torch.float32,
                          super_group=256, scale_bits=6)
    with pytest.raises(InputError, match="fixes the bits"):
        QuantizeConfig(kquant="Q4_K", bits=3)
    with pytest.raises(InputError, match="weight-only"):
        QuantizeConfig(kquant="Q4_K", scheme="W8A8", method="rtn")
    with pytest.raises(InputError, match="unknown K-quant"):
        QuantizeConfig(kquant="Q7_K")


@pytest.mark.parametrize("qtype", ["Q3_K", "Q4_K", "Q6_K"])
def test_llamacpp_runs_kquant_ptq_files(qtype, kquant_files):
    _llama()
    from dllm_export.runtime.llamacpp import LlamaCppBackend

    q, out = kquant_files(qtype)
    ids = torch.randint(0, 380, (2, 20), generator=torch.Generator().manual_seed(1))
    fake_quant = load_model(q)(ids).float()
    got = LlamaCppBackend(out, threads=2).forward(ids)
    # the same weights; llama.cpp rounds activations to Q8_K blocks for its K-quant dot products and keeps
    # the embedding / head in F16: measured 2.3% of the logits' norm for every K type at this width (a
    # packing error would be of the order of the quantization error itself: 7% for Q6_K, 65% for Q3_K)
    assert (got - fake_quant).norm() < 0.03 * fake_quant.norm(), (got - fake_quant).norm() / fake_quant.norm()


def test_permutation_matches_llama_converter():
    # convert_hf_to_gguf's LLaMA permute: reshape(n_head, 2, rows / n_head / 2, ...).swapaxes(1, 2)
    w = np.arange(16 * 3).reshape(16, 3)
    p = _permute_rope_rows(w, 2)
    assert p[:, 0].tolist()[:8] == [0, 12, 3, 15, 6, 18, 9, 21]


@pytest.mark.parametrize("name", ["llada", "llada_gqa", "dream"])
def test_llamacpp_f32_logits_match_torch(name, ckpts, f32_exports):
    _llama()
    from dllm_export.runtime.llamacpp import LlamaCppBackend

    be = LlamaCppBackend(f32_exports[name], threads=2)
    model = load_model(ckpts[name])
    ids = torch.randint(0, 380, (3, 20), generator=torch.Generator().manual_seed(0))
    ref = model(ids).float()
    got = be.forward(ids)
    # an independent implementation (ggml kernels, its own rope and softmax): agreement to float noise
    assert (got - ref).abs().max() < 1e-4, (got - ref).abs().max()
    am = torch.ones_like(ids)
    am[1, :6] = 0
    ref_p, got_p = model(ids, attention_mask=am).float(), be.forward(ids, am)
    assert (got_p[1, 6:] - ref_p[1, 6:]).abs().max() < 1e-4


@pytest.mark.parametrize("name,sampler", [("llada", "low_confidence"), ("llada_gqa", "low_confidence"),
                                          ("dream", "entropy"), ("dream", "maskgit_plus")])
def test_llamacpp_f32_trace_equals_torch(name, sampler, tiny_dirs, tmp_path):
    _llama()
    from dllm_export.runtime.backends import load_backend

    # the std-0.2 tiny models (peaky logits): float noise between implementations cannot flip a choice
    out = export_gguf(tiny_dirs[name], tmp_path / name, GgufExportConfig(quant="F32", embed_type="F32",
                                                                        head_type="F32"))
    be = load_backend(out / "model.gguf", threads=2)
    assert be.name == "llama.cpp"
    prompts = [[5, 9, 33, 70], [12, 40]]
    kw = dict(gen_length=16, steps=8, block_length=8, temperature=0.0, sampler=sampler)
    a, b = generate(load_model(tiny_dirs[name]), prompts, **kw), generate(be, prompts, **kw)
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(a.commit_step, b.commit_step)
    # infilling: ragged suffixes after the canvas (right padding, which llama.cpp's rows leave out)
    kw["suffix_ids"] = [[80, 91, 17], []]
    a, b = generate(load_model(tiny_dirs[name]), prompts, **kw), generate(be, prompts, **kw)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.commit_step, b.commit_step)
    if sampler == "low_confidence":  # continuous batching: rows joining at block boundaries, other lengths
        from .test_join import drive

        arrivals = [(0, [5, 9, 33], None, 16), (1, [12, 40, 7, 7, 19, 23, 61, 8, 30, 14], [80, 91], 24)]
        sched = dict(gen_length=16, steps=8, block_length=8)
        joined = [drive(m, sched, arrivals)[0] for m in (load_model(tiny_dirs[name]), be)]
        for (ga, ca), (gb, cb) in zip(*joined):
            assert torch.equal(ga, gb) and torch.equal(ca, cb)


@pytest.mark.parametrize("qtype,overrides", [q for q in EXACT if q[0] in ("Q4_0", "Q8_0", "Q4_1")],
                         ids=["Q4_0", "Q8_0", "Q4_1"])
def test_llamacpp_runs_exact_ptq_files(qtype, overrides, ckpts, tmp_path):
    _llama()
    from dllm_export.runtime.llamacpp import LlamaCppBackend

    q = quantize(ckpts["llada"], tmp_path / "q", QuantizeConfig(method="gptq", scheme="W4A16", group_size=32,
                                                              calib=CALIB, **overrides), progress=False)
    out = export_gguf(q, tmp_path / "gguf")
    ids = torch.randint(0, 380, (2, 20), generator=torch.Generator().manual_seed(1))
    fake_quant = load_model(q)(ids).float()
    got = LlamaCppBackend(out, threads=2).forward(ids)
    # same weights; llama.cpp also rounds activations to Q8 blocks for its integer dot products
    # (measured ~0.8% of the logits' norm here, against ~20% for the 4-bit weight error itself)
    assert (got - fake_quant).norm() < 0.02 * fake_quant.norm(), (got - fake_quant).norm() / fake_quant.norm()


def test_kquant_through_llamacpp(ckpts, tmp_path):
    _llama()
    from dllm_export.runtime.llamacpp import LlamaCppBackend

    res = export(ckpts["dream"], tmp_path / "k", target="gguf", quant="Q4_K_M")
    assert res.manifest["file_type"] == "Q4_K_M" and (res.path / "model.gguf").is_file()
    assert not (res.path / "model.gguf.f16").exists()
    ids = torch.randint(0, 380, (1, 12), generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(LlamaCppBackend(res.path, threads=2).forward(ids)).all()


def test_backend_refuses_oversized_batches(f32_exports):
    _llama()
    from dllm_export.runtime.llamacpp import LlamaCppBackend

    be = LlamaCppBackend(f32_exports["llada"], threads=1, max_tokens=16)
    with pytest.raises(InputError, match="n_ubatch"):
        be.forward(torch.zeros(1, 17, dtype=torch.long))
    assert be.forward(torch.zeros(3, 16, dtype=torch.long)).shape == (3, 16, 384)  # one call per row


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_backend_threads_default_to_the_cores(threads, f32_exports, monkeypatch):
    """llama.cpp's context default is 4 threads on any host (1.7x slower a step on 2 cores): the backend
    gives it one per physical core unless told, and says how many it runs."""
    L = _llama()
    from dllm_export.runtime.llamacpp import LlamaCppBackend
    from dllm_export.targets import physical_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    be = LlamaCppBackend(f32_exports["llada"], threads=threads, max_tokens=16)
    want = threads or physical_cores()
    assert be.threads == want == L.llama_n_threads(be.ctx) and 1 <= physical_cores() <= 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(scheme="W8A8"), "GGUF carries weight-only schemes"),
    # a weight-only scheme of another width: it said "quantizes activations"
    (dict(scheme="W2A16"), "GGUF block types carry 4, 5 or 8-bit weights, not W2A16's 2"),
    (dict(quant="Q4_0", group_size=64), "groups of 32"),
    (dict(bits=3), "cannot carry 3-bit"),
    (dict(quant="Q4_0", bits=8), "stores 4-bit weights, not 8-bit"),
    (dict(quant="Q3_X"), "unknown GGUF type"),
])
def test_bad_gguf_requests_leave_nothing(kwargs, match, ckpts, tmp_path):
    out = tmp_path / "art"
    with pytest.raises(InputError, match=match):
        export(ckpts["llada"], out, target="gguf", quantize_options={"calib": CALIB}, **kwargs)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides,match", [
    (dict(scheme="W4A16", group_size=32, sym=False), "integer zero points"),
    (dict(scheme="W4A16", group_size=16), "groups of 32"),
    (dict(scheme="W3A16", group_size=32), "no GGUF block format"),
    (dict(method="quarot", scheme="W4A16", group_size=32), "online rotation"),
    (dict(method="smoothquant", scheme="W8A8"), "activation quantization"),
])
def test_quantized_checkpoints_gguf_cannot_carry(overrides, match, ckpts, tmp_path):
    kw = {"method": "rtn", **overrides}
    q = quantize(ckpts["llada"], tmp_path / "q", QuantizeConfig(calib=CALIB, **kw), progress=False)
    with pytest.raises(InputError, match=match):
        export_gguf(q, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_vocabulary_must_fit_the_embedding(ckpts, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ckpts["llada"], bad)
    tj = json.loads((bad / "tokenizer.json").read_text())
    tj["added_tokens"].append({"id": 500, "content": "<|extra|>", "special": True, "single_word": False,
                               "lstrip": False, "rstrip": False, "normalized": False})
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(CheckpointError, match="embedding has 384 rows"):
        export_gguf(bad, tmp_path / "art")
    assert not (tmp_path / "art").exists()


def test_progressive_grids_have_no_gguf_form():
    """Progressive group scales (integer x channel scale) are refused by name, not rounded to fp16."""
    from dllm_export.exporter.gguf import block_type_for
    from dllm_export.quant.primitives import WeightQuantConfig

    with pytest.raises(InputError, match="progressive group scales .* no exact GGUF form"):
        block_type_for(WeightQuantConfig(4, 32, True, scale_dtype=torch.float32, progressive=True), 64, "blk.0")
