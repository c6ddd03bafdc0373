"""Task suites: deterministic items from held-out material, and scoring on any backend."""

import pytest

from dllm_export import InputError, load_model, load_tokenizer
from dllm_export.corpus import code_texts
from dllm_export.eval.tasks import TASKS, cloze_items, infill_items, run_task


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


@pytest.mark.parametrize("task", sorted(TASKS))
def test_run_task_on_a_tiny_model(task, tiny_dirs):
    model, tok = load_model(tiny_dirs["dream"]), load_tokenizer(tiny_dirs["dream"])
    res = run_task(model, tok, task, n_items=3)
    assert res["n"] == 3 and 0.0 <= res["score"] <= 1.0
    assert res["category"] == TASKS[task].category and res["settings"]["name"] == task


def test_unknown_task():
    with pytest.raises(InputError, match="unknown task"):
        run_task(None, None, "gsm8k")


def test_report_grid_is_cached_and_resumable(tiny_dirs, tmp_path):
    from dllm_export.eval.report import ReportConfig, run_report

    cfg = ReportConfig(models=(str(tiny_dirs["llada"]),), methods=("rtn",), schemes=("W4A16", "W4A4"),
                       tasks=("arithmetic",), items=2, calib_samples=2, calib_seq_len=32)
    res = run_report(cfg, tmp_path)
    assert [(r["method"], r["scheme"]) for r in res["rows"]] == [("fp", None), ("rtn", "W4A16"), ("rtn", "W4A4")]
    assert all("arithmetic" in r["scores"] or r["error"] for r in res["rows"])
    assert (tmp_path / "report.md").read_text().startswith("# dllm-export report")
    assert (tmp_path / "report.csv").read_text().splitlines()[0].startswith("model,method,scheme,calib,arithmetic")
    stamp = (tmp_path / "cells" / "llada-rtn-w4a16-uniform" / "results.json").stat().st_mtime
    again = run_report(cfg, tmp_path)  # every cell comes from the cache
    assert again["rows"] == res["rows"]
    assert (tmp_path / "cells" / "llada-rtn-w4a16-uniform" / "results.json").stat().st_mtime == stamp
