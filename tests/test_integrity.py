"""Artifact integrity: bad weights named, verified artifacts, no partial output, one-line errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dllm_export.cli import main
from dllm_export.errors import CalibrationError, CheckpointError
from dllm_export.fileio import remove_stale_temps
from dllm_export.models.checks import check_weight
from dllm_export.models.factory import make_random_checkpoint
from dllm_export.quant.gptq import gptq_quantize
from dllm_export.quant.primitives import WeightQuantConfig

TINY = dict(family="llada", tokenizer=True, vocab_size=384, d_model=64, n_heads=4, n_kv_heads=4,
            max_sequence_length=128)


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and needle in err, err
    return err


@pytest.mark.parametrize("value,needle", [(float("nan"), "NaN"), (float("inf"), "Inf"), (3e5, "magnitude")])
def test_bad_weight_is_named_and_nothing_is_written(tmp_path, capsys, value, needle):
    d = make_random_checkpoint(tmp_path / "m", **TINY)
    sd = load_file(str(d / "model.safetensors"))
    name = "model.transformer.blocks.1.ff_out.weight"
    sd[name][3, 5] = value
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    rc = main(["quantize", "--model", str(d), "--out", str(tmp_path / "q"), "--no-progress",
               "--calib-samples", "2", "--calib-seq-len", "16"])
    assert rc == 2
    _one_line_error(capsys, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no output, no temp folder


def test_check_weight_zero_and_bias():
    with pytest.raises(CheckpointError, match="all zeros"):
        check_weight("x.weight", torch.zeros(4, 4))
    check_weight("x.bias", torch.zeros(4))  # a zero bias is fine
    check_weight("x.qweight", torch.zeros(4, 4, dtype=torch.uint8))  # packed codes are not checked


def test_gptq_hessian_failure_names_layer_and_cause():
    cfg = WeightQuantConfig(bits=4, group_size=0, sym=True)
    W = torch.randn(8, 2)
    with pytest.raises(CalibrationError, match=r"blk\.ff_out: GPTQ: .*only 1 calibration tokens"):
        gptq_quantize(W, torch.tensor([[1.0, 3.0], [3.0, 1.0]]), cfg, name="blk.ff_out", n_tokens=1)
    with pytest.raises(CalibrationError, match="NaN / Inf"):
        gptq_quantize(W, torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), cfg, name="blk.ff_out")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("art")
    d = make_random_checkpoint(root / "m", **TINY)
    for target in ("onnx", "gguf"):
        assert main(["--target", target, "--model", str(d), "--out", str(root / target)]) == 0
    return root


@pytest.mark.parametrize("target", ["onnx", "gguf"])
def test_verify_detects_a_flipped_byte_in_every_file(artifacts, capsys, target):
    art = artifacts / target
    manifest = json.loads((art / "manifest.json").read_text())
    assert set(manifest["files"]) | {"manifest.json"} == {f.name for f in art.iterdir()}
    assert manifest["reference"]["backend"] in ("onnxruntime", "llama.cpp")
    assert main(["verify", str(art)]) == 0
    capsys.readouterr()
    for f in sorted(art.iterdir()):
        raw = f.read_bytes()
        for pos in (0, len(raw) // 2, len(raw) - 2):
            b = bytearray(raw)
            b[pos] ^= 0x01
            f.write_bytes(bytes(b))
            try:
                assert main(["verify", str(art)]) == 2, (f.name, pos)
            finally:
                f.write_bytes(raw)
            _one_line_error(capsys, str(art))
    assert main(["verify", str(art)]) == 0


@pytest.mark.parametrize("target,file", [("onnx", "model.onnx.data"), ("gguf", "model.gguf")])
def test_truncated_artifact_one_line_error(artifacts, tmp_path, capsys, target, file):
    import shutil

    art = tmp_path / target
    shutil.copytree(artifacts / target, art)
    raw = (art / file).read_bytes()
    (art / file).write_bytes(raw[:-100])
    assert main(["generate", "--model", str(art), "--prompt", "x", "--gen-length", "4"]) == 2
    _one_line_error(capsys, f"{file}: {len(raw) - 100} bytes, the manifest says {len(raw)}")


@pytest.mark.parametrize("target", ["onnx", "gguf", "quantized"])
@pytest.mark.parametrize("version,needle", [(2, "v2 by a newer dllm-export; this one reads up to v1"),
                                            ("1", "manifest without a valid version (got '1')")])
def test_a_manifest_of_a_newer_format_version_is_refused(artifacts, tmp_path, capsys, target, version, needle):
    """A folder written by a newer dllm-export (its layout may mean what this one would misread) is
    refused by every reader with one line, as llama.cpp refuses a GGUF version it does not know."""
    import shutil

    from dllm_export.fileio import write_manifest

    art = tmp_path / target
    if target == "quantized":
        assert main(["quantize", "--model", str(artifacts / "m"), "--method", "rtn", "--calib-samples", "2",
                     "--calib-seq-len", "32", "--out", str(art), "--no-progress"]) == 0
    else:
        shutil.copytree(artifacts / target, art)
    write_manifest(art, {**json.loads((art / "manifest.json").read_text()), "version": version})  # resealed
    capsys.readouterr()
    for argv in (["verify", str(art)], ["generate", "--model", str(art), "--prompt", "x", "--gen-length", "4"]):
        assert main(argv) == 2, argv
        _one_line_error(capsys, needle)


def test_the_device_runner_reads_the_format_version_of_the_exporters():
    """ondevice.py stands alone on a device, with its own copy of the version it reads."""
    from dllm_export import ondevice
    from dllm_export.formats import FORMAT_VERSIONS, GGUF_FORMAT, ONNX_FORMAT

    assert FORMAT_VERSIONS[ONNX_FORMAT] == FORMAT_VERSIONS[GGUF_FORMAT] == ondevice.FORMAT_VERSION


def test_stale_temp_folders_of_dead_runs_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{dead}-abc"
    nested = tmp_path / f"..out.tmp-{dead}-abc.tmp-{dead}-def"
    mine = tmp_path / f".out.tmp-{os.getpid()}-xyz"
    other = tmp_path / f".other.tmp-{dead}-abc"
    for p in (stale, nested, mine, other):
        p.mkdir()
    assert sorted(remove_stale_temps(tmp_path / "out")) == sorted([stale, nested])
    assert mine.is_dir() and other.is_dir()
