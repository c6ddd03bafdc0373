"""The one-call export: same inputs give the same bytes, for every target."""

import hashlib

import pytest

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
