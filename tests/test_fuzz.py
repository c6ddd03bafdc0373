"""Fuzzed inputs (hypothesis): CLI arguments, corrupted config.json, safetensors headers and
manifest.json. Whatever the input, the CLI (called in-process) succeeds or exits 2 with a
one-line message (argparse: its usage, then one error line), never a traceback, and leaves no
partial artifact or temporary folder. Deterministic: derandomized, no example database."""

import hashlib
import io
import json
import re
import shutil
import struct
from contextlib import redirect_stderr, redirect_stdout

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: E402

from dllm_export.cli import main  # noqa: E402
from dllm_export.models.factory import make_random_checkpoint  # noqa: E402


def fuzz(n):
    # no shrinking phase: a failure is reported as found, so the test time stays bounded
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))


JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.integers(-3, 3),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                        st.lists(st.integers(-2, 2), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                                  max_size=2))


def _call(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, err.getvalue()


def _assert_clean(rc, err, *outs):
    """exit 0, or 2 with one error line (argparse prints its usage before it); nothing partial."""
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err, err
    if rc == 2:
        lines = err.strip().splitlines()
        assert lines and "error: " in lines[-1], err
        ours = [line for line in lines if line.startswith("dllm-export: error:")]
        assert ours in ([], [lines[-1]]) and (not ours or len(lines) == 1), err
    for out in outs:
        assert rc == 0 or not out.exists(), f"partial artifact {out} after exit {rc}"
        left = [p.name for p in out.parent.iterdir() if p.name.startswith("." + out.name)]
        assert left == [], f"temporary folders left: {left}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("fuzz") / "llada", family="llada", tokenizer=True,
                                  vocab_size=384, d_model=64, n_heads=4, n_kv_heads=4, max_sequence_length=128)


@pytest.fixture(scope="module")
def qart(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz_q") / "q"
    assert main(["quantize", "--model", str(ckpt), "--method", "rtn", "--out", str(out), "--no-progress"]) == 0
    return out


@fuzz(12)
@given(method=st.sampled_from(["rtn", "gptq", "awq", "bogus", ""]), bits=st.one_of(st.none(), st.integers(-3, 40)),
       group=st.one_of(st.none(), st.integers(-64, 200)),
       scheme=st.one_of(st.none(), st.sampled_from(["W4A16", "W8A8", "w4a4", "W9A16", "x"])),
       samples=st.integers(-2, 3), seq_len=st.integers(-4, 40))
def test_quantize_arguments(ckpt, tmp_path_factory, method, bits, group, scheme, samples, seq_len):
    out = tmp_path_factory.mktemp("fq") / "out"
    argv = ["quantize", "--model", str(ckpt), "--method", method, "--out", str(out), "--no-progress",
            "--calib-samples", str(samples), "--calib-seq-len", str(seq_len)]
    argv += ["--bits", str(bits)] if bits is not None else []
    argv += ["--group-size", str(group)] if group is not None else []
    argv += ["--scheme", scheme] if scheme is not None else []
    _assert_clean(*_call(argv), out)


@fuzz(30)
@given(prompt=st.text(max_size=30), gen=st.integers(-4, 140), steps=st.integers(-2, 70),
       block=st.one_of(st.none(), st.integers(-2, 70)), temperature=st.one_of(st.floats(-1, 3), st.just(float("nan"))),
       sampler=st.sampled_from(["low_confidence", "random", "entropy", "maskgit_plus", "topk_margin", "bogus"]),
       top_p=st.one_of(st.none(), st.floats(-1, 2), st.just(float("nan"))), cache=st.sampled_from([None, "prefix", "dual", "x"]))
def test_generate_arguments(ckpt, prompt, gen, steps, block, temperature, sampler, top_p, cache):
    argv = ["generate", "--model", str(ckpt), "--prompt", prompt, "--gen-length", str(gen), "--steps", str(steps),
            "--temperature", str(temperature), "--sampler", sampler, "--no-progress"]
    argv += ["--block-length", str(block)] if block is not None else []
    argv += ["--top-p", str(top_p)] if top_p is not None else []
    argv += ["--cache", cache] if cache is not None else []
    _assert_clean(*_call(argv))


ONNX_OPTIONS = dict(weight_format=[None, "qdq", "matmulnbits"], accuracy_level=[None, 0, 4],
                    act_kernel=["auto", "integer", "nbits", "simulate"], embed_head=[None, "fp32", "int8"])
GGUF_OPTIONS = dict(quant=[None, "Q4_0", "Q8_0", "Q4_1", "Q4_K", "Q6_K", "F16", "Q4_K_M"])


def _maybe(values):
    return st.one_of(st.just(values[0]), st.sampled_from(values))  # the unset value about half the time


@fuzz(150)
@given(data=st.data(), quantized=st.booleans(), target=st.sampled_from(["onnx", "gguf"]),
       bits=_maybe([None, 2, 3, 4, 5, 8, 16]), scheme=_maybe([None, "W4A16", "W8A8", "W4A8", "W8A16", "W2A16"]),
       method=_maybe([None, "rtn", "awq", "smoothquant"]), group_size=_maybe([None, 0, 16, 32, 64]),
       device=_maybe([None, "x86-avx512-vnni", "arm64-dotprod"]), progressive=_maybe([None, True, False]))
def test_an_export_plan_reads_every_option_given(ckpt, qart, tmp_path_factory, data, quantized, target, bits, scheme,
                                                 method, group_size, device, progressive):
    """Any mix of export options is refused in one line, or planned so that each option given is
    the one the plan carries: none is dropped without a word (`--bits 8` on a W4 checkpoint wrote
    W4; `--method awq` on a float export rounded nothing)."""
    from dllm_export import DllmExportError
    from dllm_export.exporter import ExportRequest, plan_export
    from dllm_export.quant import get_scheme

    target_opts = {k: data.draw(_maybe(v)) for k, v in (ONNX_OPTIONS if target == "onnx" else GGUF_OPTIONS).items()}
    req = ExportRequest(target=target, bits=bits, scheme=scheme, method=method, group_size=group_size, device=device,
                        quantize_options={} if progressive is None else {"progressive": progressive}, **target_opts)
    try:
        plan = plan_export(qart if quantized else ckpt, tmp_path_factory.getbasetemp() / "never", req)
    except DllmExportError as e:
        assert "\n" not in str(e)
        return
    q = plan.qcfg
    ptq = {"method": method, "scheme": scheme, "group_size": group_size, "progressive": progressive or None,
           "bits": bits if bits is not None and bits < 16 else None}
    if q is None:  # a quantized checkpoint as it is, or float weights: no PTQ option may have been given
        assert all(v is None for v in ptq.values()), ptq
    else:
        assert method is None or q.method == method
        assert group_size is None or q.group_size == group_size
        assert ptq["bits"] is None or (q.bits or get_scheme(q.scheme).w_bits) == bits
        assert scheme is None or q.scheme.upper() == scheme.upper()
        assert progressive is None or q.progressive == progressive
    for name, value in target_opts.items():  # the target's own options reach its writer's config
        if value not in (None, "auto") and target == "onnx":
            assert getattr(plan.config, name) == value, (name, value, plan.config)
    if target == "gguf" and target_opts["quant"] is not None:
        grid = plan.config.quant if q is None else (q.kquant or f"Q{q.bits or 4}_{1 if q.sym is False else 0}")
        assert grid == target_opts["quant"], (grid, target_opts["quant"])


def _config_classes():
    from dllm_export.bench import BenchConfig
    from dllm_export.eval.fidelity import FidelityConfig
    from dllm_export.eval.outliers import OutlierConfig
    from dllm_export.eval.report import ReportConfig
    from dllm_export.eval.sensitivity import SensitivityConfig
    from dllm_export.exporter.gguf import GgufExportConfig
    from dllm_export.exporter.onnx import OnnxExportConfig
    from dllm_export.quant import CalibConfig, QuantizeConfig
    from dllm_export.quant.duquant import DuQuantConfig
    from dllm_export.quant.primitives import ActQuantConfig, WeightQuantConfig
    from dllm_export.serve.app import ServeConfig

    return [QuantizeConfig, CalibConfig, FidelityConfig, OnnxExportConfig, GgufExportConfig, WeightQuantConfig,
            ActQuantConfig, DuQuantConfig, SensitivityConfig, OutlierConfig, ReportConfig, BenchConfig, ServeConfig]


API_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, width=32),
                       st.text(max_size=4), st.sampled_from([[1], (2,), {"a": 1}, b"x", "rtn", "W4A16", "int", "qdq"]))


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_config_constructors_take_any_value(cls):
    """The Python API's config objects, given any mix of field values (the wrong type, None where a
    value is required, a number where a list goes), construct or raise a DllmExportError naming the
    field: never a TypeError or AttributeError from inside (`percdamp=None`, `layer_bits=8`)."""
    import dataclasses

    from dllm_export import DllmExportError

    names = [f.name for f in dataclasses.fields(cls)]

    @fuzz(150)
    @given(kwargs=st.fixed_dictionaries({}, optional={n: API_VALUES for n in names}))
    def one(kwargs):
        try:
            cls(**kwargs)
        except DllmExportError as e:
            assert "\n" not in str(e)

    one()


@fuzz(150)
@given(data=st.data())
def test_export_requests_take_any_value(ckpt, tmp_path_factory, data):
    """An `ExportRequest` of any field values (`export()`'s arguments) plans or raises a
    DllmExportError naming the field (`target=[1]`, `quantize_options=None`, an unknown option)."""
    import dataclasses

    from dllm_export import DllmExportError
    from dllm_export.exporter import ExportRequest, plan_export

    values = st.one_of(API_VALUES, st.sampled_from(["onnx", "gguf", "Q4_0", "x86-avx2", {"foo": 1}, {"bits": 4}]))
    kwargs = data.draw(st.fixed_dictionaries({}, optional={f.name: values for f in dataclasses.fields(ExportRequest)}))
    try:
        plan_export(ckpt, tmp_path_factory.getbasetemp() / "never", ExportRequest(**kwargs))
    except DllmExportError as e:
        assert "\n" not in str(e)


GENERATE_FIELDS = ("gen_length", "steps", "block_length", "sampler", "temperature", "cfg_scale", "top_k", "top_p",
                   "alg_temp", "eps", "threshold", "seed", "cache", "refresh", "refresh_tokens", "refresh_blocks",
                   "factor",
                   "stop_at_eos", "logprobs")


@fuzz(150)
@given(kwargs=st.fixed_dictionaries({}, optional={n: st.one_of(API_VALUES, st.integers(1, 16),
                                                                st.sampled_from(["dual", "low_confidence", "entropy"]))
                                                  for n in GENERATE_FIELDS}),
       prompt=st.sampled_from([[[5, 9, 33]], [5, 9], [], [[-1]], "hi", [[5.0]]]))
def test_generate_takes_any_value(ckpt, kwargs, prompt):
    """`generate` from the Python API with any mix of argument values decodes or raises a
    DllmExportError naming the argument (`temperature=None` was a TypeError from math.isfinite)."""
    from dllm_export import DllmExportError, generate, load_model

    try:
        generate(load_model(ckpt), prompt, **{"gen_length": 8, **kwargs})
    except DllmExportError as e:
        assert "\n" not in str(e)


SUFFIXES = st.one_of(API_VALUES, st.lists(st.integers(-2, 400), max_size=4),
                    st.lists(st.lists(st.one_of(st.integers(0, 383), st.floats(width=32), st.integers(2**63, 2**70)),
                                      max_size=3), max_size=3),
                    st.sampled_from(["<bool>", "<3-d>", "<numpy>", "<float>", [[1], [2, 3]], [[]], [1, [2]]]))


@fuzz(80)
@given(suffix=SUFFIXES, prompt=st.sampled_from([[[5, 9, 33]], [[5, 9], [7]]]), cache=st.sampled_from(["none", "dual"]))
def test_generate_takes_any_suffix(ckpt, suffix, prompt, cache):
    """`generate(suffix_ids=...)` with any value infills after the canvas or raises a one-line
    DllmExportError (a string, floats, ids past 64 bits or the vocabulary, rows that do not match)."""
    import numpy as np
    import torch

    from dllm_export import DllmExportError, generate, load_model

    arrays = {"<bool>": torch.ones(2, 2, dtype=torch.bool), "<3-d>": torch.ones(1, 2, 2, dtype=torch.long),
              "<numpy>": np.array([3, 4]), "<float>": torch.tensor([[5.0]])}
    suffix = arrays.get(suffix, suffix) if isinstance(suffix, str) else suffix
    try:
        out = generate(load_model(ckpt), prompt, gen_length=4, steps=4, cache=cache, suffix_ids=suffix)
    except DllmExportError as e:
        assert "\n" not in str(e)
        return
    assert out.generated.shape == (len(prompt), 4)


def _mutate(data, tree):
    """A copy of JSON `tree` with one value somewhere inside replaced (or its key deleted)."""
    tree = json.loads(json.dumps(tree))
    node = tree
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        if isinstance(node, dict) and data.draw(st.integers(0, 4)) == 0:
            del node[key]
        else:
            node[key] = data.draw(JSON_VALUES)
        return tree


def _commands(model, tmp):
    out = tmp / "out"
    return [(["info", "--model", str(model)], ()),
            (["generate", "--model", str(model), "--prompt", "hi", "--gen-length", "4", "--steps", "2",
              "--no-progress"], ()),
            (["quantize", "--model", str(model), "--method", "rtn", "--out", str(out), "--no-progress"], (out,))]


@fuzz(15)
@given(data=st.data())
def test_corrupt_config_json(ckpt, tmp_path_factory, data):
    bad = tmp_path_factory.mktemp("fc") / "m"
    shutil.copytree(ckpt, bad)
    config = json.loads((bad / "config.json").read_text())
    kind = data.draw(st.sampled_from(["value", "value", "value", "bytes", "truncated"]))
    if kind == "value":
        (bad / "config.json").write_text(json.dumps(_mutate(data, config)))
    elif kind == "bytes":
        (bad / "config.json").write_bytes(data.draw(st.binary(max_size=40)))
    else:
        raw = json.dumps(config).encode()
        (bad / "config.json").write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1))])
    for argv, outs in _commands(bad, bad.parent)[: 2 if kind == "value" and data.draw(st.booleans()) else 3]:
        _assert_clean(*_call(argv), *outs)


@fuzz(20)
@given(data=st.data())
def test_corrupt_safetensors_header(ckpt, tmp_path_factory, data):
    bad = tmp_path_factory.mktemp("fs") / "m"
    shutil.copytree(ckpt, bad)
    raw = (bad / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    kind = data.draw(st.sampled_from(["field", "field", "length", "bytes"]))
    if kind == "field":
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = data.draw(st.one_of(JSON_VALUES, st.sampled_from(["F16", "BF16", "I8", "U8"]),
                                                  st.lists(st.integers(0, 70000), min_size=1, max_size=3)))
        h = json.dumps(header).encode()
        raw = struct.pack("<Q", len(h)) + h + raw[8 + n:]
    elif kind == "length":
        raw = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + raw[8:]
    else:
        i = data.draw(st.integers(0, 8 + n - 1))
        raw = raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255))]) + raw[i + 1:]
    (bad / "model.safetensors").write_bytes(raw)
    for argv, outs in _commands(bad, bad.parent)[1:]:
        _assert_clean(*_call(argv), *outs)


def _reseal(folder, manifest):
    """Write manifest.json with a valid manifest_sha256 (the digest of its bytes with that value
    zeroed), so the corruption reaches the readers behind the digest check."""
    raw = (json.dumps({**manifest, "manifest_sha256": "0" * 64}, indent=2) + "\n").encode()
    digest = hashlib.sha256(raw).hexdigest()
    (folder / "manifest.json").write_bytes(re.sub(rb'"manifest_sha256": "0{64}"',
                                                  f'"manifest_sha256": "{digest}"'.encode(), raw, count=1))


@fuzz(20)
@given(data=st.data())
def test_corrupt_manifest_json(qart, tmp_path_factory, data):
    bad = tmp_path_factory.mktemp("fm") / "q"
    shutil.copytree(qart, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    if data.draw(st.integers(0, 5)) == 0:  # edited without resealing: the digest names it
        raw = (bad / "manifest.json").read_bytes()
        i = data.draw(st.integers(0, len(raw) - 1))
        (bad / "manifest.json").write_bytes(raw[:i] + bytes([raw[i] ^ 0x20]) + raw[i + 1:])
    else:
        _reseal(bad, _mutate(data, {k: v for k, v in manifest.items() if k != "manifest_sha256"}))
    for argv in (["verify", str(bad)],
                 ["generate", "--model", str(bad), "--prompt", "hi", "--gen-length", "4", "--steps", "2",
                  "--no-progress"]):
        _assert_clean(*_call(argv))
