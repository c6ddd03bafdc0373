"""The one-call export: same inputs give the same bytes, for every target."""

import hashlib

import pytest
import torch

from dllm_export.exporter import export
from dllm_export.quant import CalibConfig


def _digests(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("target,kwargs", [
    ("onnx", dict(bits=4, method="gptq", group_size=32)),
    ("onnx", dict(scheme="W8A8", method="smoothquant")),
    ("gguf", dict(quant="Q4_0", method="gptq")),
    ("gguf", dict(quant="F16")),
])
def test_export_is_deterministic(target, kwargs, tiny_dirs, tmp_path):
    opts = {"calib": CalibConfig(n_samples=4, seq_len=32)}
    a = export(tiny_dirs["dream"], tmp_path / "a", target=target, quantize_options=opts, **kwargs)
    b = export(tiny_dirs["dream"], tmp_path / "b", target=target, quantize_options=opts, **kwargs)
    assert _digests(a.path) == _digests(b.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp folders left


def test_bench_times_the_preset_decode(tiny_dirs, tmp_path, capsys):
    """`bench --preset edge` times the edge decode (each row records what it ran), own options winning."""
    import json

    from dllm_export.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", str(tiny_dirs["llada"]), "--canvas", "16", "--reps", "1", "--decode-reps", "1", "--gen-length",
               "16", "--block-length", "8", "--no-roofline", "--preset", "edge", "--threshold", "0.5", "--json", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and capsys.readouterr().out.startswith("| path |")
    assert res["config"]["preset"] == "edge" and res["config"]["threshold"] == 0.5
    assert res["artifacts"][0]["decode_settings"] == {"cache": "dual", "threshold": 0.5, "refresh_tokens": 16,
                                            "stop_at_eos": True}
    assert 0 < res["artifacts"][0]["nfe"] <= 16


@pytest.mark.slow
def test_bench_side_by_side(tiny_dirs, tmp_path, capsys):
    import json

    from dllm_export.cli import main

    art = export(tiny_dirs["llada"], tmp_path / "onnx", target="onnx").path
    out = tmp_path / "bench.json"
    rc = main(["bench", str(tiny_dirs["llada"]), str(art), str(tmp_path / "missing"), "--canvas", "16", "--reps", "2",
               "--gen-length", "8", "--block-length", "8", "--quality", "--json", str(out), "--plot", str(tmp_path / "b.png")])
    assert rc == 2  # the missing artifact is reported, the others measured
    res = json.loads(out.read_text())
    ok = [r for r in res["artifacts"] if "error" not in r]
    assert [r["backend"] for r in ok] == ["torch", "onnxruntime"]
    for r in ok:
        for key in ("load_s", "step_ms_median", "step_ms_p90", "tokens_per_s", "peak_rss_mib", "size_mib", "arith_em",
                    "bits_per_token", "arith_em_drop", "bpt_increase"):
            assert r[key] is not None
    for r in ok:  # decoding warmed up, then timed --decode-reps times: the median with its spread
        assert r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"] and r["host_cores"] >= 1
    assert ok[0]["threads"] >= 1  # the torch threads the figures were taken with
    assert ok[0]["bpt_increase"] == ok[0]["arith_em_drop"] == 0  # deltas are to the first artifact
    assert res["host"]["bandwidth_gbs"] > 0 and res["host"]["gemm_tflops"]["fp32"] > 0
    for r in ok:  # the step against its floor on this host
        assert r["floor_ms"] > 0 and r["x_floor"] == pytest.approx(r["step_ms_median"] / r["floor_ms"], rel=0.01)
    assert ok[0]["compute"] == ok[1]["compute"] == "fp32" and ok[0]["step_gflop"] == ok[1]["step_gflop"]
    assert abs(ok[1]["bpt_increase"]) < 0.01  # fp32 ONNX scores as torch
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "model folder not found" in res["artifacts"][2]["error"]
    assert "| path | backend |" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("target,kwargs", [("onnx", dict(bits=4, method="rtn", group_size=32)),
                                           ("gguf", dict(quant="Q8_0", method="rtn"))])
def test_ondevice_runner_needs_no_torch(target, kwargs, tiny_dirs, tmp_path):
    """The single-file runner measures an artifact with numpy + the runtime only, and reports the
    same figures as `dllm-export bench`."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import dllm_export.ondevice as runner

    if target == "gguf":
        pytest.importorskip("llama_cpp")
    art = export(tiny_dirs["llada"], tmp_path / "art", target=target,
                 quantize_options={"calib": CalibConfig(n_samples=2, seq_len=32)}, **kwargs).path
    blocker = tmp_path / "no_torch" / "torch"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('torch is not on the device')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker.parent))
    done = subprocess.run([sys.executable, Path(runner.__file__).name, str(art), "--canvas", "24", "--reps", "2",
                           "--gen-length", "16", "--block-length", "8", "--threads", "1"],
                          cwd=Path(runner.__file__).parent, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert res["nfe"] == 16 and res["backend"] in ("onnxruntime", "llama.cpp")
    for key in ("load_s", "step_ms_median", "step_ms_p90", "tokens_per_s", "peak_rss_mib", "size_mib"):
        assert res[key] > 0


@pytest.fixture(scope="module")
def w8_onnx(tiny_dirs, tmp_path_factory):
    """A W8 ONNX artifact of the tiny LLaDA (RTN: quick)."""
    return export(tiny_dirs["llada"], tmp_path_factory.mktemp("w8") / "onnx", target="onnx", bits=8, method="rtn",
                  quantize_options={"calib": CalibConfig(n_samples=2, seq_len=32)}).path


def test_info_on_an_artifact_reads_its_manifest(w8_onnx, capsys):
    """`info` describes an exported artifact from its manifest (it said "no model.safetensors")."""
    import json

    from dllm_export.cli import main

    assert main(["info", "--model", str(w8_onnx)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{w8_onnx}: ONNX artifact (dllm-export/onnx v1) of ") and "rtn W8A16" in out
    assert "file model.onnx" in out and "dims.n_layers" in out
    assert main(["info", "--model", str(w8_onnx), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "onnx" and info["scheme"] == "W8A16" and info["files"]["model.onnx"] > 0


def test_backend_options_are_the_runtimes_own(w8_onnx):
    """An option of another runtime is named with the ones this backend takes (llama.cpp's
    max_tokens given to onnxruntime raised a TypeError from its constructor)."""
    from dllm_export import InputError, load_backend

    with pytest.raises(InputError, match="backend option.s. max_tokens: the onnxruntime backend takes accuracy_level, "
                                         "optimize, providers, spinning"):
        load_backend(w8_onnx, max_tokens=64)


def test_an_artifact_is_not_a_checkpoint(w8_onnx, tmp_path):
    """Exporting or quantizing an artifact read its manifest as a quantized checkpoint's ("is not a
    dllm-export quantized manifest"); now it is named for what it is."""
    from dllm_export import CheckpointError, load_model
    from dllm_export.quant import QuantizeConfig, quantize

    message = f"{w8_onnx} is an ONNX artifact, not a checkpoint"
    with pytest.raises(CheckpointError, match=message):
        export(w8_onnx, tmp_path / "again", target="gguf", quant="Q8_0")
    with pytest.raises(CheckpointError, match=message):
        quantize(w8_onnx, tmp_path / "q", QuantizeConfig(method="rtn"), progress=False)
    with pytest.raises(CheckpointError, match=message):
        load_model(w8_onnx)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="model.gguf is a GGUF artifact"):
        load_model(tmp_path / "model.gguf")
    assert not (tmp_path / "again").exists() and not (tmp_path / "q").exists()


@pytest.mark.parametrize("kwargs", [dict(dtype="bfloat16"), dict(kernel="int")])
def test_torch_options_on_an_artifact_are_refused(kwargs, w8_onnx):
    """--dtype / --kernel choose a checkpoint's torch compute; on an ONNX artifact they were dropped."""
    from dllm_export import InputError, load_backend
    from dllm_export.runtime.backends import backend_kind

    assert backend_kind(w8_onnx) == "onnxruntime" and backend_kind("default") == "torch"
    with pytest.raises(InputError, match="dtype and kernel choose a torch checkpoint's compute; onnxruntime runs"):
        load_backend(w8_onnx, **kwargs)
    with pytest.raises(InputError, match="unknown backend 'tflite'"):
        load_backend(w8_onnx, backend="tflite")


@pytest.mark.parametrize("args, message", [
    (["MISSING"], "not a dllm-export artifact (manifest.json: FileNotFoundError"),
    (["ART", "--reps", "0"], "--reps must be >= 1, got 0"),
    (["ART", "--gen-length", "12", "--block-length", "8"], "--gen-length 12 is not a multiple of --block-length 8"),
    (["ART", "--canvas", "100000"], "a canvas of 100000 tokens exceeds the model's context of"),
    (["ART", "--threads", "-1"], "--threads must be >= 0, got -1"),
    (["ART", "--threads", "100000"], "--threads 100000 on"),
    (["ART", "--dump", "MISSING/x.npz"], "give a file name in an existing folder"),  # not after the whole run
    (["TRUNCATED"], "bytes, the manifest says"),  # a truncated model.gguf crashed llama.cpp (SIGSEGV)
    (["NEWER"], "manifest version 2; this runner reads v1"),  # a newer layout, which it could misread
])
def test_ondevice_runner_bad_input_is_one_line(args, message, w8_onnx, tmp_path, capsys):
    """The device runner answers as the CLI does: one line, exit 2 (a missing manifest was a
    FileNotFoundError traceback, --reps 0 a StatisticsError)."""
    import dllm_export.ondevice as runner

    import shutil

    cut = tmp_path / "cut"
    if args == ["TRUNCATED"]:
        shutil.copytree(w8_onnx, cut)
        data = cut / "model.onnx.data"
        data.write_bytes(data.read_bytes()[:-100])
    if args == ["NEWER"]:
        import json

        from dllm_export.fileio import write_manifest

        shutil.copytree(w8_onnx, cut)
        write_manifest(cut, {**json.loads((cut / "manifest.json").read_text()), "version": 2})
    args = [a.replace("MISSING", str(tmp_path / "missing")) if "MISSING" in a else str(w8_onnx) if a == "ART"
            else str(cut) if a in ("TRUNCATED", "NEWER") else a for a in args]
    assert runner.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ondevice: error: ") and message in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def dream_bpe_files(tiny_dirs, tmp_path_factory):
    """The tiny Dream checkpoint as Dream ships its tokenizer: vocab.json + merges.txt, no tokenizer.json."""
    import json
    import shutil

    src = tiny_dirs["dream"]
    dst = tmp_path_factory.mktemp("dream_bpe") / "dream"
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text())
    (dst / "tokenizer.json").unlink()
    (dst / "vocab.json").write_text(json.dumps(tj["model"]["vocab"], ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return dst


@pytest.mark.parametrize("target,kwargs", [("onnx", {}), ("onnx", dict(bits=4, method="rtn", group_size=32))])
def test_export_carries_a_vocab_and_merges_tokenizer(target, kwargs, dream_bpe_files, tmp_path):
    """A checkpoint with only vocab.json + merges.txt (as Dream ships) exports with its tokenizer,
    float or through a quantized checkpoint (one list of tokenizer files: formats.TOKENIZER_FILES)."""
    from dllm_export import load_tokenizer

    art = export(dream_bpe_files, tmp_path / "art", target=target,
                 quantize_options={"calib": CalibConfig(n_samples=2, seq_len=32)}, **kwargs).path
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (art / name).read_bytes() == (dream_bpe_files / name).read_bytes(), name
    text = "def f(x):\n    return 12+34"
    assert load_tokenizer(art)(text)["input_ids"] == load_tokenizer(dream_bpe_files)(text)["input_ids"]


@pytest.mark.parametrize("model,target,kwargs,message", [
    ("bpe", "gguf", dict(quant="Q4_0"), "has no tokenizer.json: GGUF needs the vocabulary"),
    ("dream", "gguf", dict(quant="Q4_0", group_size=64), "GGUF block formats hold groups of 32 weights, not 64"),
    ("dream", "onnx", dict(bits=3, weight_format="matmulnbits"), "--format matmulnbits stores 2, 4 or 8-bit weights"),
    ("dream", "onnx", dict(scheme="W4A16", group_size=24, weight_format="matmulnbits"),
     "MatMulNBits needs a power-of-two block size >= 16"),
    # options the graph would not read
    ("dream", "onnx", dict(weight_format="matmulnbits", accuracy_level=4),
     "--format / --accuracy-level set how quantized weights run; this export keeps float weights"),
    ("dream", "onnx", dict(bits=4, act_kernel="integer"), "--act-kernel runs a scheme's 8-bit activations; W4A16"),
])
def test_export_plan_refuses_before_any_calibration(model, target, kwargs, message, dream_bpe_files, tiny_dirs,
                                                    tmp_path, monkeypatch):
    """One plan per target checks bits, groups, MatMulNBits rules and the tokenizer files first."""
    import dllm_export.quant as quant
    from dllm_export import DllmExportError

    def no_calibration(*a, **k):
        raise AssertionError("quantize ran before the request was checked")

    monkeypatch.setattr(quant, "quantize", no_calibration)
    with pytest.raises(DllmExportError, match=message):
        export(dream_bpe_files if model == "bpe" else tiny_dirs["dream"], tmp_path / "art", target=target, **kwargs)
    assert not (tmp_path / "art").exists()


@pytest.fixture(scope="module")
def rtn_w4_checkpoint(tiny_dirs, tmp_path_factory):
    """A quantized checkpoint (RTN W4A16, group 32) of the tiny LLaDA."""
    from dllm_export.quant import QuantizeConfig, quantize

    return quantize(tiny_dirs["llada"], tmp_path_factory.mktemp("q") / "q",
                    QuantizeConfig(method="rtn", scheme="W4A16", group_size=32,
                                   calib=CalibConfig(n_samples=2, seq_len=32)), progress=False)


@pytest.mark.parametrize("target,kwargs,flags", [
    ("onnx", dict(bits=8), "--bits"),  # a W8 request wrote the W4 grid
    ("onnx", dict(scheme="W8A8", group_size=0), "--scheme / --group-size"),
    ("gguf", dict(method="gptq"), "--method"),
])
def test_a_quantized_checkpoint_refuses_another_grid(rtn_w4_checkpoint, target, kwargs, flags, tmp_path):
    """A quantized checkpoint is exported on its own grid: options that would choose another one are
    refused by name instead of dropped; without them it exports as is."""
    from dllm_export import InputError

    with pytest.raises(InputError, match=f"is a quantized checkpoint, exported on its own grid: drop {flags} "):
        export(rtn_w4_checkpoint, tmp_path / "art", target=target, **kwargs)
    assert not (tmp_path / "art").exists()
    art = export(rtn_w4_checkpoint, tmp_path / "ok", target="onnx")
    assert art.manifest["scheme"] == "W4A16" and art.manifest["method"] == "rtn"


@pytest.mark.parametrize("target,kwargs,given,message", [
    ("onnx", {}, dict(method="awq"), "--method awq: nothing reads it: this export keeps float weights"),
    ("onnx", dict(bits=16), dict(group_size=32, method="rtn"), "--method rtn / --group-size 32: nothing reads them"),
    ("onnx", {}, dict(quantize_options={"progressive": True}), "--progressive: nothing reads it"),
    ("gguf", dict(quant="F16"), dict(scheme="W4A16"), "--scheme W4A16: nothing reads it: --quant F16 keeps float"),
    ("gguf", dict(quant="Q4_K_M"), dict(bits=8), "--bits 8: nothing reads it: --quant Q4_K_M is llama.cpp's recipe"),
])
def test_ptq_options_without_ptq_are_refused(tiny_dirs, target, kwargs, given, message, tmp_path):
    """A PTQ method, grid or group size on a float export (or a llama.cpp recipe, which its own
    quantizer rounds) was dropped without a word: the plan refuses it, before anything is written."""
    from dllm_export import InputError
    from dllm_export.exporter import ExportRequest, plan_export

    with pytest.raises(InputError, match=message):
        plan_export(tiny_dirs["llada"], tmp_path / "art", ExportRequest(target=target, **kwargs, **given))
    assert plan_export(tiny_dirs["llada"], tmp_path / "art", ExportRequest(target=target, **kwargs)).qcfg is None


@pytest.mark.parametrize("ids,mask,message", [
    (torch.tensor([[1, -3, 2]]), None, r"token ids must lie in \[0, "),  # onnxruntime's Gather wrapped it: row V-3
    (torch.tensor([[1, 100000, 2]]), None, r"token ids must lie in \[0, "),
    (torch.zeros(1, 0, dtype=torch.long), None, r"length >= 1"),
    (torch.tensor([1, 5, 2]), None, r"shape \[batch, length >= 1\]"),
    (torch.tensor([[1.0, 5.0]]), None, "integer tensor"),
    ([[1, 5, 2]], None, "must be a torch tensor"),
    (torch.ones(1, 5000, dtype=torch.long), None, "tokens exceed the model's context of"),
    (torch.tensor([[1, 5, 2]]), torch.ones(1, 5), r"attention_mask must have the ids' shape \(1, 3\)"),
])
def test_artifact_backends_check_their_ids(w8_onnx, tiny_dirs, tmp_path_factory, ids, mask, message):
    """A backend's forward (the runtime's protocol) refuses what the graph would wrap, truncate or
    fail on deep inside, as the torch model does."""
    from dllm_export import InputError, load_backend

    gguf = tmp_path_factory.getbasetemp() / "ids-gguf"
    if not gguf.exists():
        export(tiny_dirs["llada"], gguf, target="gguf", quant="Q8_0", method="rtn",
               quantize_options={"calib": CalibConfig(n_samples=2, seq_len=32)})
    for be in (load_backend(w8_onnx), load_backend(gguf)):
        if be.name == "llama.cpp" and "context" in message:
            continue  # llama.cpp's limit is its batch (n_ubatch), with a message of its own
        with pytest.raises(InputError, match=message):
            be.forward(ids, mask)
