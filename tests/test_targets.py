"""Device profiles: detection from CPU flags, and the choices they fill in an export."""

import json

import pytest

from dllm_export import InputError
from dllm_export.exporter import export
from dllm_export.quant import CalibConfig
from dllm_export.targets import PROFILES, detect, get_profile


@pytest.mark.parametrize("machine,flags,want", [
    ("x86_64", {"avx2", "fma"}, "x86-avx2"),
    ("x86_64", {"avx2", "fma", "avx512f", "avx512_vnni", "amx_tile"}, "x86-avx512-vnni"),
    ("aarch64", {"fp", "asimd", "asimddp"}, "arm64-dotprod"),
    ("arm64", {"asimddp", "i8mm", "sve"}, "arm64-i8mm"),
])
def test_detect_picks_the_most_capable_profile(machine, flags, want):
    assert detect(flags, machine).name == want


def test_unknown_device_and_host():
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        get_profile("tpu")
    with pytest.raises(InputError, match="no device profile matches"):
        detect({"sse2"}, "x86_64")


def test_profiles_are_consistent():
    for p in PROFILES.values():
        assert p.group_size % 32 == 0 and p.onnx_format in ("qdq", "matmulnbits")
        assert set(p.targets) <= {"onnx", "gguf"}


@pytest.mark.parametrize("device", ["arm64-dotprod", "x86-avx512-vnni"])
def test_device_fills_the_open_choices(device, tiny_dirs, tmp_path):
    res = export(tiny_dirs["llada"], tmp_path / "a", target="onnx", device=device, method="rtn",
                 quantize_options={"calib": CalibConfig(n_samples=2, seq_len=32)})
    m = json.loads((res.path / "manifest.json").read_text())
    profile = PROFILES[device]
    assert m["device"]["name"] == device and m["scheme"] == profile.scheme
    if profile.scheme.endswith("A16"):
        assert m["quantize_settings"]["group_size"] == 32 and m["accuracy_level"] == profile.accuracy_level
    # edge profiles: an 8-bit embedding and head by default, the head on the kernel the profile measured
    assert m["export"]["embed_head"] == profile.embed_head == "int8"
    assert m["export"]["head_accuracy_level"] == profile.head_accuracy_level


@pytest.mark.parametrize("device,kw,want", [
    ("x86-avx512-vnni", dict(scheme="W4A8", group_size=32), True),  # grouped W4A8: the integer GEMM
    ("x86-avx512-vnni", dict(scheme="W4A8", group_size=32, quantize_options={"progressive": False}), False),
    # the scheme's per-channel grid left open: the profile fills its groups (same kernel, less KLD)
    ("x86-avx512-vnni", dict(scheme="W4A8"), True),
    ("x86-avx512-vnni", dict(scheme="W4A8", group_size=0), False),  # per channel asked: already an int8 weight
    ("x86-avx512-vnni", dict(scheme="W4A8", quantize_options={"progressive": False}), False),
    ("x86-avx512-vnni", dict(scheme="W4A16", group_size=32), False),  # weight-only: MatMulNBits
    ("x86-avx512-vnni", dict(scheme="W8A8", group_size=32), False),  # 8-bit weights: no room for the integers
    ("arm64-dotprod", dict(scheme="W4A8", group_size=32), False),  # not measured there
    (None, dict(scheme="W4A8", group_size=32, quantize_options={"progressive": True}), True),
])
def test_profile_progressive_default(device, kw, want, tiny_dirs, tmp_path):
    from dllm_export.exporter import ExportRequest, plan_export

    plan = plan_export(tiny_dirs["llada"], tmp_path / "a", ExportRequest(target="onnx", device=device, **kw))
    assert plan.qcfg.weight_config().progressive is want
    if "group_size" not in kw and kw["scheme"] == "W4A8":  # filled (the tiny widths fit 32) or the scheme's channel
        assert plan.qcfg.weight_config().group_size == (32 if want else 0)


def test_bits_override_the_scheme(tiny_dirs, tmp_path):
    """`bits` with a scheme sets its weight bits (the scheme keeps its activations)."""
    from dllm_export.exporter import ExportRequest, plan_export

    plan = plan_export(tiny_dirs["llada"], tmp_path / "a", ExportRequest(target="onnx", bits=3, scheme="W4A8"))
    assert plan.qcfg.weight_config().bits == 3 and plan.qcfg.act_config().bits == 8
