"""Task suites: deterministic items from held-out material, and scoring on any backend."""

import json

import pytest

from dllm_export import InputError, load_model, load_tokenizer
from dllm_export.corpus import code_texts
from dllm_export.errors import DllmExportError
from dllm_export.eval.tasks import TASKS, _has_tests, cloze_items, executed_lines, infill_items, passes_tests, run_task

needs_cpython_tests = pytest.mark.skipif(not _has_tests("textwrap"), reason="this Python has no test package")


def test_items_are_deterministic_and_well_formed():
    a, b = cloze_items(10, seed=3), cloze_items(10, seed=3)
    assert a == b and len(a) == 10
    for it in a:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4 and 0 <= it["answer"] < 4
    sources = "\n".join(t for _, t in code_texts(held_out=True))
    items = infill_items(10, seed=1)
    assert items == infill_items(10, seed=1) and len(items) == 10
    for it in items:
        assert it["line"].strip() and (it["before"] + it["line"] + it["after"]) in sources


@pytest.mark.parametrize("task", [t if t != "line_infill_exec" else pytest.param(t, marks=needs_cpython_tests)
                                  for t in sorted(TASKS)])
def test_run_task_on_a_tiny_model(task, tiny_dirs):
    model, tok = load_model(tiny_dirs["dream"]), load_tokenizer(tiny_dirs["dream"])
    res = run_task(model, tok, task, n_items=3)
    assert res["n"] == 3 and len(res["outcomes"]) == 3 and set(res["outcomes"]) <= {0, 1}
    assert res["score"] == pytest.approx(sum(res["outcomes"]) / 3, abs=1e-12)  # the score is the outcomes' mean
    lo, hi = res["ci95"]
    assert lo - 1e-12 <= res["score"] <= hi + 1e-12 and hi - lo > 0.3  # three items: a wide Wilson interval
    assert run_task(model, tok, task, n_items=3)["outcomes"] == res["outcomes"]  # deterministic
    assert res["category"] == TASKS[task].category and res["settings"]["name"] == task


@needs_cpython_tests
def test_exec_items_are_lines_the_tests_run_and_catch():
    """pass@1 is meaningful only if the module's tests fail when the line is wrong: the reference
    line passes, a `pass` in its place fails (checked on the first items of the default seed)."""
    executed = executed_lines()
    assert {"textwrap", "heapq", "fractions"} <= set(executed)
    sources = dict(code_texts(held_out=True))
    for it in infill_items(3, seed=0, executed=executed):
        lines = sources[it["module"]].split("\n")
        assert lines[it["lineno"] - 1] == it["line"] and it["lineno"] in executed[it["module"]]
        assert passes_tests(it["module"], "\n".join(lines))
        lines[it["lineno"] - 1] = it["line"][: len(it["line"]) - len(it["line"].lstrip())] + "pass"
        assert not passes_tests(it["module"], "\n".join(lines))


def test_unknown_task():
    with pytest.raises(InputError, match="unknown task"):
        run_task(None, None, "gsm8k")


@pytest.mark.parametrize("n", [0, -2])
def test_item_counts_below_one_are_refused(n):
    """0 read as "the task's default" and -2 as all items but two (a slice): both refused."""
    with pytest.raises(InputError, match=f"items per task must be >= 1, got {n}"):
        run_task(None, None, "arithmetic", n_items=n)


def test_report_grid_is_cached_and_resumable(tiny_dirs, tmp_path):
    from dllm_export.eval.report import ReportConfig, run_report

    cfg = ReportConfig(models=(str(tiny_dirs["llada"]),), methods=("rtn",), schemes=("W4A16", "W4A4"),
                       tasks=("arithmetic",), items=2, calib_samples=2, calib_seq_len=32, fidelity_windows=2)
    res = run_report(cfg, tmp_path)
    assert [(r["method"], r["scheme"]) for r in res["rows"]] == [("fp", None), ("rtn", "W4A16"), ("rtn", "W4A4")]
    assert all("arithmetic" in r["scores"] or r["error"] for r in res["rows"])
    q = res["rows"][1]
    assert q["fidelity"]["kld_mean"] > 0 and 0 <= q["fidelity"]["top1"] <= 1
    lo, hi = q["drop_ci95"]["arithmetic"]
    assert lo <= q["drop"]["arithmetic"] <= hi and q["paired"] and "math" in q["category_drop"]
    md = (tmp_path / "report.md").read_text()
    assert "## Per category" in md and "## Findings (significant differences only)" in md
    cell = json.loads((tmp_path / "cells" / q["cell"] / "results.json").read_text())
    assert len(cell["tasks"]["arithmetic"]["outcomes"]) == 2
    assert "outcomes" not in json.dumps(json.loads((tmp_path / "report.json").read_text()))
    assert (tmp_path / "report.md").read_text().startswith("# dllm-export report")
    assert (tmp_path / "report.csv").read_text().splitlines()[0].startswith("model,method,scheme,calib,arithmetic")
    assert (tmp_path / "score_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = (tmp_path / "cells" / "llada-rtn-w4a16-uniform" / "results.json").stat().st_mtime
    again = run_report(cfg, tmp_path)  # every cell comes from the cache
    assert again["rows"] == res["rows"]
    assert (tmp_path / "cells" / "llada-rtn-w4a16-uniform" / "results.json").stat().st_mtime == stamp


def test_report_recomputes_cells_of_a_changed_model(tiny_dirs, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from dllm_export.eval.report import ReportConfig, run_report

    model = tmp_path / "m"
    shutil.copytree(tiny_dirs["llada"], model)
    cfg = ReportConfig(models=(str(model),), methods=("rtn",), schemes=("W4A16",), tasks=("arithmetic",), items=2,
                       calib_samples=2, calib_seq_len=32)
    first = run_report(cfg, tmp_path / "r")
    cell = tmp_path / "r" / "cells" / "m-rtn-w4a16-uniform"
    row = json.loads((cell / "results.json").read_text())
    (cell / "results.json").write_text(json.dumps({**row, "scores": {"arithmetic": 0.5}}))  # a marker (1 of 2)
    assert run_report(cfg, tmp_path / "r")["rows"][1]["scores"]["arithmetic"] == 0.5  # cached
    (f,) = model.glob("*.safetensors")
    w = load_file(f)
    save_file({k: v * 1.5 if v.dim() == 2 else v for k, v in w.items()}, f, metadata={"format": "pt"})
    again = run_report(cfg, tmp_path / "r")  # the model changed: every cell is computed again
    assert again["rows"][1]["scores"]["arithmetic"] >= 0.0
    assert again["rows"][0]["model_sha256"] != first["rows"][0]["model_sha256"]
    more = run_report(ReportConfig(**{**cfg.__dict__, "tasks": ("arithmetic", "line_infill")}), tmp_path / "r")
    assert set(more["rows"][1]["scores"]) == {"arithmetic", "line_infill"}  # only the new task ran
    assert more["rows"][1]["scores"]["arithmetic"] == again["rows"][1]["scores"]["arithmetic"]


@pytest.mark.parametrize("settings, message", [
    (dict(items=0), "items per task must be >= 1"), (dict(calib_samples=0), "calibration needs n_samples >= 1"),
    (dict(fidelity_windows=1), "fidelity needs windows >= 2"),
    # names no registry knows: each cell's row used to say so while `failed` stayed empty (exit 0)
    (dict(methods=("bogus",)), "unknown method 'bogus'"), (dict(schemes=("W9A16",)), "unknown scheme 'W9A16'"),
    (dict(calib_masks=("bogus",)), "unknown calibration mask 'bogus'"),
    (dict(tasks=("bogus",)), "unknown task 'bogus'"),  # was a KeyError after the whole grid ran
    (dict(models=()), "report models: none given"), (dict(methods=()), "report methods: none given"),
    (dict(tasks=(" ",)), "report tasks: none given"),
    (dict(methods=("rtn", "rtn")), "'rtn' is listed twice"),
    (dict(schemes=("w4a16", "W4A16")), "'W4A16' is listed twice"),
])
def test_report_settings_no_cell_could_run_are_refused_up_front(settings, message):
    """Before, such a grid ran to the end with every cell's row an error and exited 0."""
    from dllm_export.eval.report import ReportConfig

    with pytest.raises(InputError, match=message):
        ReportConfig(**settings)


def test_report_config_names_are_canonical():
    """A string is a comma-separated list; schemes take their registry spelling (cell keys, the bits plotted)."""
    from dllm_export.eval.report import ReportConfig

    cfg = ReportConfig(models="default", methods="rtn, gptq", schemes=("w4a16",), tasks=["arithmetic"])
    assert (cfg.models, cfg.methods, cfg.schemes, cfg.tasks) == (("default",), ("rtn", "gptq"), ("W4A16",),
                                                                  ("arithmetic",))


@pytest.mark.parametrize("case, message", [
    ("missing", "model folder not found"), ("no_weights", "no model.safetensors"),
    ("quantized", "is a quantized checkpoint"), ("same_name", "share the name 'llada'"),
    ("out_file", "exists and is a file"), ("out_under_file", "Not a directory"),
    ("out_not_report", "holds no report"), ("out_taken", "a folder of that name is in the way"),
])
def test_report_refuses_bad_models_and_outputs_before_any_work(tiny_dirs, tmp_path, monkeypatch, case, message):
    """Refused before a cell runs and before the output folder is made (a bad model used to leave
    OUT/cells behind, a file as OUT failed with "OUT/cells: Not a directory", exit 1)."""
    import shutil

    from dllm_export.eval import report

    monkeypatch.setattr(report, "run_cell", lambda cell: pytest.fail("a cell ran"))
    llada, out = str(tiny_dirs["llada"]), tmp_path / "out"
    models = (llada,)
    if case == "missing":
        models = (str(tmp_path / "nope"),)
    elif case in ("no_weights", "quantized", "same_name"):
        m = tmp_path / "m" / "llada"
        shutil.copytree(tiny_dirs["llada"], m)
        models = (llada, str(m)) if case == "same_name" else (str(m),)
        if case == "no_weights":
            for f in m.glob("*.safetensors"):
                f.unlink()
        if case == "quantized":
            (m / "manifest.json").write_text("{}")
    elif case in ("out_file", "out_under_file"):
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" if case == "out_file" else tmp_path / "f" / "r"
    elif case == "out_not_report":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "out_taken":  # an earlier report's folder where a report file's name is a folder
        (out / "cells").mkdir(parents=True)
        (out / "report.md").mkdir()
    before = sorted(tmp_path.rglob("*"))
    cfg = report.ReportConfig(models=models, methods=("rtn",), schemes=("W4A16",), tasks=("arithmetic",), items=2)
    with pytest.raises(DllmExportError, match=message):
        report.run_report(cfg, out)
    assert sorted(tmp_path.rglob("*")) == before  # nothing made, nothing left


@pytest.mark.parametrize("argv, message", [
    (["--methods", "bogus"], "unknown method 'bogus'"), (["--schemes", "W9A16"], "unknown scheme 'W9A16'"),
    (["--calib-masks", "bogus"], "unknown calibration mask 'bogus'"), (["--tasks", "bogus"], "unknown task 'bogus'"),
    (["--models", ","], "report models: none given"), (["--models", "bogus"], "model folder not found: bogus"),
])
def test_report_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, message):
    from dllm_export.cli import main

    assert main(["report", "--out", str(tmp_path / "rp"), "--items", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "rp").exists()
