"""`dllm-export build`: a deterministic release manifest, and the CI matrix round trip
(--matrix -> one --cell build per cell -> --merge) that gives the same folder as one build."""

import json

import pytest

from dllm_export.cli import main

CONFIG = """
[[models]]
name = "tiny"
path = "{model}"
[[targets]]
name = "onnx-w4"
target = "onnx"
bits = 4
method = "rtn"
group_size = 32
[[targets]]
name = "gguf-q8"
target = "gguf"
quant = "Q8_0"
method = "rtn"
[calibration]
samples = 2
seq_len = 32
[evaluation]
windows = 1
problems = 2
bench = {bench}
[gates]
max_bpt_increase = 1.0
"""


@pytest.fixture
def config(tiny_dirs, tmp_path):
    def make(bench="false"):
        p = tmp_path / "build.toml"
        p.write_text(CONFIG.format(model=tiny_dirs["llada"], bench=bench))
        return p
    return make


def _tree(folder):
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_matrix_round_trip_gives_the_manifest_of_one_build(config, tmp_path, capsys):
    cfg = config(bench="true")
    assert main(["build", str(cfg), "--out", str(tmp_path / "dist")]) == 0
    manifest = (tmp_path / "dist" / "manifest.json").read_bytes()
    m = json.loads(manifest)
    assert m["config"]["name"] == "build.toml" and len(m["config"]["sha256"]) == 64
    # deterministic: no timings, no bench figures, no machine paths
    text = manifest.decode()
    assert str(tmp_path) not in text and "seconds" not in text and "_s\"" not in text and "bench" not in text
    meas = json.loads((tmp_path / "dist" / "measurements.json").read_text())
    assert [c["cell"] for c in meas["cells"]] == ["tiny/onnx-w4", "tiny/gguf-q8"]
    assert all(c["bench"]["step_ms_median"] > 0 and c["export_s"] > 0 for c in meas["cells"])
    # the artifacts' own manifests name their source by folder name and sha256, not by path
    art = json.loads((tmp_path / "dist" / "tiny" / "onnx-w4" / "manifest.json").read_text())
    assert art["source"]["name"] == "llada" and len(art["source"]["sha256"]) == 64
    assert str(tmp_path) not in (tmp_path / "dist" / "tiny" / "gguf-q8" / "manifest.json").read_text()

    capsys.readouterr()
    assert main(["build", str(cfg), "--matrix"]) == 0
    matrix = json.loads(capsys.readouterr().out)
    assert matrix == {"include": [{"cell": "tiny/onnx-w4", "id": "tiny--onnx-w4"},
                                  {"cell": "tiny/gguf-q8", "id": "tiny--gguf-q8"}]}
    parts = []
    for job in reversed(matrix["include"]):  # the jobs of a CI matrix finish in any order
        part = tmp_path / "parts" / job["id"]
        assert main(["build", str(cfg), "--cell", job["cell"], "--out", str(part)]) == 0
        assert [c["cell"] for c in json.loads((part / "manifest.json").read_text())["cells"]] == [job["cell"]]
        parts.append(str(part))
    assert main(["build", str(cfg), "--merge", *parts, "--out", str(tmp_path / "release")]) == 0
    assert (tmp_path / "release" / "manifest.json").read_bytes() == manifest  # byte for byte
    one, merged = _tree(tmp_path / "dist"), _tree(tmp_path / "release")
    assert one.keys() == merged.keys()
    assert all(one[k] == merged[k] for k in one if k != "measurements.json")  # artifacts: same bytes


def test_merge_refuses_missing_foreign_and_tampered_parts(config, tmp_path, capsys):
    cfg = config()
    part = tmp_path / "p1"
    assert main(["build", str(cfg), "--cell", "tiny/gguf-q8", "--out", str(part)]) == 0
    capsys.readouterr()
    assert main(["build", str(cfg), "--merge", str(part), "--out", str(tmp_path / "r")]) == 2
    assert "missing cell(s) tiny/onnx-w4" in capsys.readouterr().err
    assert main(["build", str(cfg), "--merge", str(part), str(part), "--out", str(tmp_path / "r")]) == 2
    assert "is in both" in capsys.readouterr().err
    other = tmp_path / "other.toml"
    other.write_text(cfg.read_text().replace("problems = 2", "problems = 3"))
    assert main(["build", str(other), "--merge", str(part), "--out", str(tmp_path / "r")]) == 2
    assert "built from another config" in capsys.readouterr().err
    assert main(["build", str(cfg), "--cell", "tiny/nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown cell(s) tiny/nope" in capsys.readouterr().err
    assert main(["build", str(cfg)]) == 2
    assert "needs --out" in capsys.readouterr().err
    part2 = tmp_path / "p2"
    assert main(["build", str(cfg), "--cell", "tiny/onnx-w4", "--out", str(part2)]) == 0
    (part / "tiny" / "gguf-q8" / "config.json").write_text("{}")  # a file changed after its build
    capsys.readouterr()
    assert main(["build", str(cfg), "--merge", str(part), str(part2), "--out", str(tmp_path / "r")]) == 2
    assert "files of cell tiny/gguf-q8" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_build_config_names_are_checked(tmp_path, capsys):
    p = tmp_path / "b.toml"
    p.write_text('[[models]]\nname = "a/b"\npath = "default"\n[[targets]]\nname = "t"\ntarget = "onnx"\n')
    assert main(["build", str(p), "--matrix"]) == 2
    assert "a/b" in capsys.readouterr().err


@pytest.mark.parametrize("section, message", [
    ("[calibration]\nsamples = -2", "[calibration] samples must be an integer >= 1, got -2"),
    ("[calibration]\nseq_len = \"x\"", "[calibration] seq_len must be an integer >= 8, got 'x'"),
    ("[calibration]\nsample = 2", "unknown [calibration] key(s) sample (known: samples, seq_len)"),
    ("[evaluation]\nproblems = true", "[evaluation] problems must be an integer >= 1, got True"),
    ("[evaluation]\nbench = 1", "[evaluation] bench must be true or false, got 1"),
])
def test_build_config_settings_are_checked(section, message, tmp_path, capsys):
    """A bad count was a ValueError traceback (`seq_len = "x"`) or a cell failing after the export
    (`samples = -2`); a misspelt key was ignored."""
    p = tmp_path / "b.toml"
    head = '[[models]]\nname = "a"\npath = "default"\n[[targets]]\nname = "t"\ntarget = "onnx"\n'
    p.write_text(head + section + "\n")
    assert main(["build", str(p), "--matrix"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
