"""Task suites: deterministic items from held-out material, and scoring on any backend."""

import json

import pytest

from dllm_export import InputError, load_model, load_tokenizer
from dllm_export.corpus import code_texts
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
])
def test_report_settings_no_cell_could_run_are_refused_up_front(settings, message):
    """Before, such a grid ran to the end with every cell's row an error and exited 0."""
    from dllm_export.eval.report import ReportConfig

    with pytest.raises(InputError, match=message):
        ReportConfig(**settings)
