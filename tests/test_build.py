"""`dllm-export build`: a deterministic release manifest, and the CI matrix round trip
(--matrix -> one --cell build per cell -> --merge) that gives the same folder as one build."""

import json
from pathlib import Path

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
    def make(bench="false", gate="max_bpt_increase = 1.0"):
        p = tmp_path / "build.toml"
        p.write_text(CONFIG.format(model=tiny_dirs["llada"], bench=bench).replace("max_bpt_increase = 1.0", gate))
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


@pytest.mark.parametrize("gate,rc", [("max_bpt_increase = 1.0", 0), ("max_bpt_increase = -1.0", 1)])
def test_build_gate(gate, rc, config, tmp_path, capsys):
    """A cell over its quality gate still lands in the manifest, listed as failed, and the build exits 1."""
    assert main(["build", str(config(gate=gate)), "--out", str(tmp_path / "dist")]) == rc
    m = json.loads((tmp_path / "dist" / "manifest.json").read_text())
    assert [c["cell"] for c in m["cells"]] == ["tiny/onnx-w4", "tiny/gguf-q8"]
    assert all(len(f["sha256"]) == 64 for c in m["cells"] for f in c["files"].values())
    if rc:
        assert m["failed"] == ["tiny/onnx-w4", "tiny/gguf-q8"]
        assert "quality gate failed: tiny/onnx-w4, tiny/gguf-q8" in capsys.readouterr().err


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


def _config(top="", model="", target="", tail=""):
    """A minimal valid config (the bundled model, one ONNX target), with text added in each place."""
    return (f'{top}\n[[models]]\nname = "a"\npath = "default"\n{model}\n'
            f'[[targets]]\nname = "t"\ntarget = "onnx"\nbits = 4\nmethod = "rtn"\n{target}\n'
            f'[calibration]\nsamples = 4\nseq_len = 32\n[evaluation]\nwindows = 1\nproblems = 1\nbench = false\n{tail}')


@pytest.mark.parametrize("text, message", [
    (b"\xff\xfe[[models]]\n", "not UTF-8 text (byte 0xff at offset 0)"),
    ('models = "default"\ntargets = 3\n', "models must be [[models]] tables, got models = 'default'"),
    ('models = [1]\ntargets = [2]\n', "models must be [[models]] tables, got models = [1]"),
    ('[[models]]\nname = "a"\npath = "default"\n', "needs at least one [[targets]] table"),
    (_config(top="calibration = 3").replace("[calibration]\nsamples = 4\nseq_len = 32\n", ""),
     "[calibration] must be a table, got calibration = 3"),
    (_config(top="gates = [1]"), "[gates] must be a table, got gates = [1]"),
    (_config(tail='[gates]\nmax_drop = "abc"'), "[gates] max_drop must be a number from 0 to 1, got 'abc'"),
    (_config(tail="[gates]\nmax_drop = nan"), "[gates] max_drop must be a number from 0 to 1, got nan"),
    (_config(tail="[gates]\nmax_drop = 1.5"), "[gates] max_drop must be a number from 0 to 1, got 1.5"),
    (_config(tail="[gates]\nmax_bpt_increase = -1.5"), "[gates] max_bpt_increase must be a number >= -1, got -1.5"),
    (_config(tail="[gates]\nmax_bpt_increase = true"), "[gates] max_bpt_increase must be a number >= -1, got True"),
    (_config(tail="[gates]\nmax_dorp = 0.1"), "unknown [gates] key(s) max_dorp (known: max_drop, max_bpt_increase); "
                                               "did you mean max_drop?"),
    (_config(model='colour = "red"'), "unknown [[models]] 'a' key(s) colour (known: name, path)"),
    (_config(model="path2 = 1").replace('path = "default"\n', ""), "unknown [[models]] 'a' key(s) path2"),
    ('[[models]]\nname = "a"\n[[targets]]\nname = "t"\ntarget = "onnx"\n', "[[models]] 'a' needs path"),
    (_config(model="").replace('name = "a"', "name = 3"), "[[models]] #1 name must be a string, got 3"),
    (_config(target='bits = "4"').replace("bits = 4\n", ""), "[[targets]] 't' bits must be an integer, got '4'"),
    (_config(target="metod = 'rtn'"), "unknown [[targets]] 't' key(s) metod (known: name, target, bits, method"),
    (_config(tail="[evaluaton]\nwindows = 1"), "unknown section(s) evaluaton (known: models, targets, calibration, "
                                               "evaluation, gates); did you mean evaluation?"),
    (_config(top="bench = true"), "unknown section(s) bench"),
    (_config().replace('target = "onnx"', 'target = "bogus"'), "cell a/t: unknown export target 'bogus'"),
    (_config().replace('path = "default"', 'path = "no-such-model"'), "cell a/t: model folder not found"),
    (_config().replace("method = \"rtn\"", "method = \"bogus\""), "cell a/t: unknown method 'bogus'"),
])
@pytest.mark.parametrize("mode", ["matrix", "build"])
def test_bad_configs_are_refused_up_front_in_one_line(text, message, mode, tmp_path, monkeypatch, capsys):
    """Each was a traceback (wrong types, a non-UTF-8 file), passed unnoticed (unknown keys, a bad
    target or model in --matrix), or failed after cells were built, leaving a half-written folder."""
    monkeypatch.chdir(tmp_path)  # relative model paths resolve here
    p = tmp_path / "b.toml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    argv = ["build", str(p), "--matrix"] if mode == "matrix" else ["build", str(p), "--out", str(tmp_path / "dist")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["b.toml"]  # nothing made, not even a temp folder


def test_the_minimal_config_is_accepted(tmp_path, capsys):
    p = tmp_path / "b.toml"
    p.write_text(_config(tail="[gates]\nmax_drop = 0\nmax_bpt_increase = 0.5"))
    assert main(["build", str(p), "--matrix"]) == 0
    assert json.loads(capsys.readouterr().out) == {"include": [{"cell": "a/t", "id": "a--t"}]}


def test_an_unknown_cell_leaves_no_folder(tmp_path, capsys):
    p = tmp_path / "b.toml"
    p.write_text(_config())
    assert main(["build", str(p), "--out", str(tmp_path / "bx"), "--cell", "bogus/cell"]) == 2
    assert "unknown cell(s) bogus/cell" in capsys.readouterr().err
    assert sorted(f.name for f in tmp_path.iterdir()) == ["b.toml"]


def _fake_cell(fail_at=None):
    """A stand-in for run_build_cell: writes a file into the cell's folder; raises at cell `fail_at`."""
    calls = []

    def run(cell):
        calls.append(cell.key)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        out = Path(cell.args["out"])
        out.mkdir(parents=True)
        (out / "model.onnx").write_bytes(b"x")
        return {"entry": {"cell": cell.key, "path": cell.key, "target": "onnx", "gate": "pass"},
                "measurements": {"cell": cell.key}}
    return run


TWO = _config(tail='[[targets]]\nname = "t2"\ntarget = "onnx"\nbits = 8\nmethod = "rtn"\n')


@pytest.mark.parametrize("where", ["second cell", "writing the manifest"])
def test_an_interrupted_build_leaves_nothing(where, tmp_path, monkeypatch):
    """An interrupt after the first cell left dist/a/t (a whole cell) and no manifest, so that a
    re-run was refused ("exists and is not empty")."""
    from dllm_export import build as build_mod

    p = tmp_path / "b.toml"
    p.write_text(TWO)
    if where == "second cell":
        monkeypatch.setattr(build_mod, "run_build_cell", _fake_cell(fail_at=2))
    else:
        monkeypatch.setattr(build_mod, "run_build_cell", _fake_cell())
        monkeypatch.setattr(build_mod, "_write_outputs", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build_mod.build(p, tmp_path / "dist")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["b.toml"]  # no dist, no .dist.tmp-*


def test_a_build_is_staged_and_renamed_into_place(tmp_path, monkeypatch):
    """The cells are written in a temp folder beside the output (a dead run's is removed first)."""
    from dllm_export import build as build_mod

    p = tmp_path / "b.toml"
    p.write_text(TWO)
    stale = tmp_path / ".dist.tmp-4194305-x"  # a killed run's (no such process)
    (stale / "a" / "t").mkdir(parents=True)
    monkeypatch.setattr(build_mod, "run_build_cell", _fake_cell())
    m = build_mod.build(p, tmp_path / "dist", cells=["a/t2"])
    assert [c["cell"] for c in m["cells"]] == ["a/t2"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["b.toml", "dist"]
    assert sorted(str(f.relative_to(tmp_path / "dist")) for f in (tmp_path / "dist").rglob("*")) == \
        ["a", "a/t2", "a/t2/model.onnx", "manifest.json", "measurements.json"]


@pytest.mark.parametrize("cells, message", [
    ([{"cell": "a/t", "path": "../../evil", "files": {}}], "malformed cell list"),
    ({"a/t": {}}, "malformed cell list"),
    ([["a/t"]], "malformed cell list"),
])
def test_merge_refuses_malformed_parts(cells, message, tmp_path, capsys):
    """A part's entry path was joined to the merged folder as is (`../..` wrote outside it); a
    malformed cell list was a KeyError / TypeError traceback."""
    import hashlib

    p = tmp_path / "b.toml"
    p.write_text(_config())
    part = tmp_path / "part"
    part.mkdir()
    source = {"name": "b.toml", "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    (part / "manifest.json").write_text(json.dumps({"format": "dllm-export/build", "version": 2, "config": source,
                                                    "cells": cells}))
    assert main(["build", str(p), "--merge", str(part), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists() and not any(tmp_path.glob(".r.tmp-*"))
