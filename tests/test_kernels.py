"""The torch backend's integer kernels (`kernel="int"`, quant/kernels.py) against fake-quant, the
reference: per layer for every grid, and through quantized checkpoints, the loop and the CLI."""

import json

import pytest
import torch

import dllm_export as D
from dllm_export.models.factory import make_random_checkpoint
from dllm_export.quant import CalibConfig, QuantizeConfig, quantize
from dllm_export.quant.kernels import IntLinear, kernel_counts
from dllm_export.quant.primitives import ActQuantConfig, WeightQuantConfig, quantize_weight, single_thread
from dllm_export.quant.qlinear import QLinear

# fp32 activations: the kernels compute the fake-quant numbers up to fp32 summation order;
# bf16: both paths round activations and weights to bf16, in different places (max error / max |y|)
FP32_TOL, BF16_TOL = 1e-5, 3e-2



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny layers: thread hand-offs cost more than the work (100x on a busy CI host)."""
    with single_thread():
        yield


GRIDS = [  # (weight grid, activation grid, expected kernel)
    (WeightQuantConfig(4, 32, True), None, "int4"),
    (WeightQuantConfig(4, 128, False, "int"), None, "int4"),
    (WeightQuantConfig(4, 64, False, "float"), None, "int4"),
    (WeightQuantConfig(4, 0, True), None, "int4"),  # per channel: the kernel's groups share its scale
    (WeightQuantConfig(3, 32, True), None, "int4"),
    (WeightQuantConfig(2, 64, False), None, "int4"),
    (WeightQuantConfig(8, 0, True), None, "int8"),
    (WeightQuantConfig(6, 0, False), None, "int8"),
    (WeightQuantConfig(8, 128, True), None, "dense"),  # grouped 8-bit: no integer kernel
    (WeightQuantConfig(8, 0, True), ActQuantConfig(8), "w8a8"),
    (WeightQuantConfig(4, 0, True), ActQuantConfig(8), "w8a8"),
    (WeightQuantConfig(4, 0, True), ActQuantConfig(4), "w8a8"),
    (WeightQuantConfig(4, 32, True), ActQuantConfig(8), "int4"),  # act fake-quantized, then the int4 kernel
    (WeightQuantConfig(8, 0, True), ActQuantConfig(8, sym=False), "int8"),
    # progressive groups: group integer x code is the int8 weight of the integer GEMM
    (WeightQuantConfig(4, 32, True, scale_dtype=torch.float32, progressive=True), ActQuantConfig(8), "w8a8"),
    (WeightQuantConfig(3, 64, True, scale_dtype=torch.float32, progressive=True), ActQuantConfig(8), "w8a8"),
    (WeightQuantConfig(4, 32, True, scale_dtype=torch.float32, progressive=True), None, "int4"),
]


@pytest.mark.parametrize("wcfg,act,kernel", GRIDS, ids=lambda v: str(v) if isinstance(v, str) else None)
# int8 weights: the kernel up to 16 rows, widened codes above; int4: the kernel up to 96 rows, widened
# codes above where the outputs come in blocks of 64
@pytest.mark.parametrize("rows,out", [(5, 96), (40, 96), (200, 96), (200, 128)])
def test_int_kernels_compute_the_fake_quant_layer(wcfg, act, kernel, rows, out):
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(out, 256, generator=g) * 0.05, torch.randn(out, generator=g) * 0.1
    x = torch.randn(2, rows // 2 + 1, 256, generator=g)
    qw = quantize_weight(W, wcfg)
    for dtype, tol in ((torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)):
        ref = QLinear(qw, b, act, dtype=dtype)(x.to(dtype)).float()
        m = IntLinear(qw, b, act, None, dtype)
        assert m.kernel == kernel
        y = m(x.to(dtype))
        assert y.dtype == dtype and y.shape == ref.shape
        assert float((y.float() - ref).abs().max() / ref.abs().max()) < tol, dtype


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """Tiny LLaDA / Dream checkpoints quantized by RTN: W4A16 g32 (int4) and W8A8 (int_mm)."""
    root = tmp_path_factory.mktemp("kernels")
    calib = root / "calib.txt"
    calib.write_text("def add(a, b):\n    return a + b\n12+34=46\n7*8=56\n" * 40)
    out = {}
    for fam, kw in (("llada", dict(d_model=64, mlp_hidden_size=128, max_sequence_length=128)),
                    ("dream", dict(hidden_size=64, intermediate_size=128, max_position_embeddings=128))):
        src = make_random_checkpoint(root / fam, fam, vocab_size=384, tokenizer=True, std=0.05, **kw)
        for scheme, g in (("W4A16", 32), ("W8A8", 0)):
            qcfg = QuantizeConfig(method="rtn", scheme=scheme, group_size=g,
                                  calib=CalibConfig(source=str(calib), n_samples=4, seq_len=32))
            out[fam, scheme] = quantize(src, root / f"{fam}-{scheme}", qcfg, progress=False)
    return out


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("scheme,kernel", [("W4A16", "int4"), ("W8A8", "w8a8")])
def test_int_checkpoint_gives_the_fake_quant_logits_and_tokens(quantized, family, scheme, kernel):
    path = quantized[family, scheme]
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    fake, fast = D.load_model(path), D.load_model(path, kernel="int")
    assert kernel_counts(fast) == {kernel: 14} and kernel_counts(fake) == {}
    ref, got = fake(ids), fast(ids)
    assert float((got - ref).abs().max() / ref.abs().max()) < FP32_TOL
    kw = dict(gen_length=16, steps=16, block_length=8)
    for opts in ({}, {"cache": "dual", "threshold": 0.5}):
        a, b = D.generate(fake, [[5, 9, 33]], **kw, **opts), D.generate(fast, [[5, 9, 33]], **kw, **opts)
        assert torch.equal(a.ids, b.ids)
    bf_fake = D.load_model(path, dtype="bfloat16")(ids).float()
    bf_fast = D.load_model(path, dtype="bfloat16", kernel="int")(ids).float()
    assert float((bf_fast - bf_fake).abs().max() / bf_fake.abs().max()) < BF16_TOL


def test_cli_generate_and_bench_with_int_kernels(quantized, capsys):
    from dllm_export.cli import main

    path = str(quantized["llada", "W4A16"])
    assert main(["generate", "--model", path, "--prompt", "def f", "--gen-length", "8", "--kernel", "int",
                 "--dtype", "float32", "--json"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert main(["generate", "--model", path, "--prompt", "def f", "--gen-length", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == fast["ids"]
    from dllm_export.bench import BenchConfig, measure

    row = measure(path, BenchConfig(canvas=16, reps=1, gen_length=8, block_length=8, kernel="int"))
    assert row["kernels"] == {"int4": 14}


def test_bad_kernel_choices_are_clear_errors(quantized):
    from dllm_export.errors import InputError
    from dllm_export.runtime.backends import load_backend

    with pytest.raises(InputError, match="unknown kernel 'int3'"):
        load_backend(quantized["llada", "W8A8"], kernel="int3")
    with pytest.raises(InputError, match="CPU only"):
        load_backend(quantized["llada", "W8A8"], kernel="int", device="cuda")
