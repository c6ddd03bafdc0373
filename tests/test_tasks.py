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
