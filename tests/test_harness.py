"""The lm-evaluation-harness adapter (`dllm` model): local lm-eval tasks end to end, offline, on tiny
checkpoints of both families; its numbers against the library's own `elbo` and `generate`."""

import json
import math
import os
import re

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow  # lm-eval's evaluator, task loading and sampling

import dllm_export as D  # noqa: E402
from dllm_export.errors import InputError  # noqa: E402
from dllm_export.eval.harness import (DLLM, check_limit, check_results_path, evaluate,  # noqa: E402
                                      parse_gen_kwargs, write_results)
from dllm_export.eval.likelihood import elbo  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

SMALL = dict(mc_num=8, batch=4, gen_length=8, steps=8, block_length=4, disable_tqdm=True)

MC = [
    {"question": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " self", " 12+34"], "label": 0},
    {"question": "12+34=", "choices": ["46", "7", "fox"], "label": 0},
    {"question": "The quick brown fox jumps over the", "choices": [" lazy dog.", " stack", " items"], "label": 0},
]
GEN = [{"question": "def fibonacci(n):", "answer": "\n"}, {"question": "12+34=", "answer": "46"}]
PPL = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "class Stack:\n    def push(self, item):"}]


def _task(name: str, data: str, cache: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {cache}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder of three local lm-eval tasks over JSONL files (multiple choice, generation, rolling)."""
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    cache = d / "hf_cache"
    bodies = {
        "dllm_tiny_mc": (MC, "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: choices\n"
                             "doc_to_target: label\nmetric_list:\n  - metric: acc\n    higher_is_better: true\n"),
        "dllm_tiny_gen": (GEN, "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: answer\n"
                               "generation_kwargs:\n  until: [\"\\n\\n\", \"=\"]\n  max_gen_toks: 6\n"
                               "metric_list:\n  - metric: exact_match\n    higher_is_better: true\n"),
        "dllm_tiny_ppl": (PPL, "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: text\n"
                               "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
    }
    for name, (rows, body) in bodies.items():
        data = d / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / f"{name}.yaml").write_text(_task(name, str(data), str(cache), body))
    return d


@pytest.fixture(scope="module")
def lms(tiny_dirs):
    return {name: DLLM(model=str(tiny_dirs[name]), **SMALL) for name in ("llada", "dream")}


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_local_tasks_end_to_end(tiny_dirs, task_dir, name):
    res = evaluate(str(tiny_dirs[name]), "dllm_tiny_mc,dllm_tiny_gen,dllm_tiny_ppl", model_args=SMALL,
                   include_path=task_dir, include_defaults=False)
    r = res["results"]
    acc = r["dllm_tiny_mc"]["acc,none"]
    assert (acc * len(MC)) == pytest.approx(round(acc * len(MC)), abs=1e-9)  # a count of right items
    # lm-eval's mean stderr (sample std, n - 1) of 0/1 outcomes
    assert r["dllm_tiny_mc"]["acc_stderr,none"] == pytest.approx(math.sqrt(acc * (1 - acc) / (len(MC) - 1)), abs=1e-9)
    em = r["dllm_tiny_gen"]["exact_match,none"]
    assert em * len(GEN) == pytest.approx(round(em * len(GEN)), abs=1e-9)
    assert math.isfinite(r["dllm_tiny_ppl"]["bits_per_byte,none"]) and r["dllm_tiny_ppl"]["word_perplexity,none"] > 1
    assert res["n-samples"]["dllm_tiny_mc"]["effective"] == len(MC)
    assert res["config"]["model"] == "dllm" and res["config"]["model_args"]["mc_num"] == 8


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_loglikelihood_is_the_family_elbo(lms, tiny_dirs, name):
    lm = lms[name]
    tok = D.load_tokenizer(tiny_dirs[name])
    ctx, cont = "def add(a, b):\n    return ", "a + b"  # the trailing space moves to the continuation
    ll, _ = lm.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])[0]
    whole = tok("def add(a, b):\n    return a + b", add_special_tokens=False)["input_ids"]
    c = tok("def add(a, b):\n    return", add_special_tokens=False)["input_ids"]
    want = elbo(D.load_model(tiny_dirs[name]), c, whole[len(c):], mc=8, batch=4, estimator=name, seed=0)
    assert ll == pytest.approx(want.elbo, rel=1e-6, abs=1e-6)
    again = DLLM(model=str(tiny_dirs[name]), **SMALL).loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])
    assert again[0][0] == ll  # same seed, same number
    other = DLLM(model=str(tiny_dirs[name]), **{**SMALL, "seed": 1})
    assert other.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)])[0][0] != ll


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_is_greedy_follows_greedy_unmasking(lms, name):
    lm = lms[name]
    ctx = lm.tok_encode("12+34=")
    # LLaDA's suffix_greedy_prediction = one most-confident commit per step = low_confidence, steps = length
    out = D.generate(lm.backend, [ctx], gen_length=4, steps=4, block_length=4, sampler="low_confidence")
    greedy = out.generated[0].tolist()
    assert lm._is_greedy(ctx, greedy)
    wrong = greedy[:-1] + [(greedy[-1] + 1) % lm.backend.vocab_size]
    assert not lm._is_greedy(ctx, wrong)


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_generate_until_is_generate_truncated(lms, name):
    lm = lms[name]
    prompts = ["def fibonacci(n):", "12+34="]
    got = lm.generate_until([Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 64}), i)
                             for i, p in enumerate(prompts)])
    s = lm.spec
    for p, text in zip(prompts, got):
        out = D.generate(lm.backend, [lm.tok_encode(p)], gen_length=8, steps=8, block_length=4, seed=0)
        ids = out.generated[0].tolist()
        ids = ids[:next((i for i, t in enumerate(ids) if t in (s.eos_id, s.eot_id)), len(ids))]
        assert text == lm.tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0]
    # max_gen_toks below gen_length: a shorter canvas, fewer steps, as many tokens kept
    assert lm.schedule(6) == {"gen_length": 8, "steps": 8, "block_length": 4, "keep": 6}
    assert lm.schedule(3) == {"gen_length": 3, "steps": 3, "block_length": 3, "keep": 3}
    assert lm.generate_until([Instance("generate_until", {}, ("12+34=", {"until": [], "max_gen_toks": 3}), 0)])


def test_rolling_windows_cover_the_text_once(lms):
    lm = lms["dream"]
    lm_max = lm.max_length
    try:
        lm.max_length = 8
        ids = list(range(10, 40))
        wins = lm.rolling_windows(ids)
        assert [t for _, s in wins for t in s] == ids
        assert wins[0][0] == lm.prefix and all(len(c) + len(s) <= 8 and c for c, s in wins)
        assert all(c == ids[ids.index(s[0]) - len(c):ids.index(s[0])] for c, s in wins[1:])
    finally:
        lm.max_length = lm_max


@pytest.mark.parametrize("args,message", [
    ({"mc_num": 10, "batch": 4}, "mc_num (10) must be a positive multiple of batch (4)"),
    ({"nope": 1}, "unknown dllm model arg(s) nope"),
    ({"cache": "bogus"}, "unknown cache 'bogus'"),
    ({"gen_length": 10, "block_length": 4}, "not a multiple of block_length"),
    ({"steps": "many"}, "model arg steps='many' must be int"),
    ({"greedy": "maybe"}, "unknown greedy 'maybe'"),
    # the loop's own rules (Plan.check), as generate applies them
    ({"top_p": 0.5}, "top_p is an option of Dream's samplers"),
    ({"sampler": "low_confidence", "refresh": 2}, "refresh needs a block cache"),
    ({"sampler": "entropy", "threshold": 0.9}, "sampler 'entropy' ranks positions by entropy; threshold decoding"),
    ({"temperature": float("nan")}, "temperature must be >= 0 and finite"),
])
def test_bad_model_args(tiny_dirs, args, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DLLM(model=str(tiny_dirs["llada"]), **args)


def test_unknown_task_is_an_input_error(tiny_dirs, task_dir):
    with pytest.raises(InputError, match="unknown lm-eval task"):
        evaluate(str(tiny_dirs["llada"]), ["no_such_task"], model_args=SMALL, include_path=task_dir,
                 include_defaults=False)


def test_cli_subcommand(tiny_dirs, task_dir, tmp_path, capsys):
    from dllm_export.cli import main

    out = tmp_path / "res" / "results.json"
    rc = main(["lm-eval", "--model", str(tiny_dirs["dream"]), "--tasks", "dllm_tiny_mc", "--include-path",
               str(task_dir), "--limit", "2", "--model-args", "mc_num=4,batch=4,cache=none", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "dllm_tiny_mc" in printed and "acc" in printed and f"wrote {out}" in printed
    res = json.loads(out.read_text())
    acc = res["results"]["dllm_tiny_mc"]["acc,none"]
    assert res["n-samples"]["dllm_tiny_mc"]["effective"] == 2 and acc in (0.0, 0.5, 1.0)  # two items
    assert not list(out.parent.glob(".results.json.*"))  # atomic: no temp file left behind
    assert main(["lm-eval", "--model", str(tiny_dirs["dream"]), "--tasks", "x", "--model-args", "mc_num"]) == 2
    assert "model args must be key=value" in capsys.readouterr().err


def test_create_from_arg_string_types_values(tiny_dirs):
    """lm-eval's `--model_args` path: numbers typed, `none` = the default, lm-eval's extra config accepted
    (its CLI passes device=cuda:0 even without a GPU: the model then stays on the CPU)."""
    import torch

    dev = "cpu" if torch.cuda.is_available() else "cuda:0"
    lm = DLLM.create_from_arg_string(f"pretrained={tiny_dirs['llada']},mc_num=8,batch=4,cache=none,threshold=0.9,"
                                     f"gen_length=8,block_length=4,steps=none,add_bos=true",
                                     {"batch_size": 1, "max_batch_size": None, "device": dev})
    assert lm.args["mc_num"] == 8 and lm.args["threshold"] == 0.9 and lm.args["cache"] == "none"
    assert lm.args["steps"] == 8 and lm.args["add_bos"] is True and lm.model_name == str(tiny_dirs["llada"])
    assert lm.encode_pair("", "ab")[0] == [lm.spec.bos_id]


@pytest.mark.parametrize("limit, expected", [(None, None), (0.5, 0.5), (1, 1), (2.0, 2), (3, 3)])
def test_limit_is_a_fraction_or_a_whole_count(limit, expected):
    got = check_limit(limit)
    assert got == expected and type(got) is type(expected)


BAD_LIMIT = "limit must be a fraction in (0, 1) or a whole number >= 1 of examples per task"


@pytest.mark.parametrize("kwargs, message", [
    # lm-eval failed on these mid-run: islice, "did not find any docs", NaN to int; 2.5 became 2
    *[(dict(limit=v), BAD_LIMIT) for v in (-1, 0, 0.0, float("nan"), float("inf"), 2.5, True, "5")],
    (dict(num_fewshot=-1), "num_fewshot must be an integer >= 0, got -1"),  # was accepted: n-shot -1
    (dict(num_fewshot=1.5), "num_fewshot must be an integer >= 0"),
    (dict(gen_kwargs="garbage"), "gen kwargs must be key=value pairs separated by commas, got 'garbage'"),
    (dict(gen_kwargs="=4"), "gen kwargs must be key=value pairs"),
    (dict(gen_kwargs="until=a,until=b"), "gen kwargs: until given twice"),
    (dict(gen_kwargs="temperature=0.5"), "gen kwarg(s) temperature not read by the dllm model"),
    (dict(gen_kwargs="max_gen_toks=0"), "max_gen_toks must be an integer >= 1, got 0"),
    (dict(gen_kwargs="max_gen_toks=many"), "max_gen_toks must be an integer >= 1, got 'many'"),
    (dict(gen_kwargs={"until": 3}), "gen kwarg until must be a string or a list of strings"),
    (dict(model_args="mc_num=4,mc_num=8"), "model args: mc_num given twice"),
])
def test_bad_run_settings_are_refused_before_the_model_loads(tmp_path, kwargs, message):
    """A missing model and an unknown task would raise too: the settings are checked first."""
    with pytest.raises(InputError, match=re.escape(message)):
        evaluate(str(tmp_path / "no_model"), ["no_such_task"], include_defaults=False, **kwargs)


@pytest.mark.parametrize("text, expected", [
    (None, None), ("", None), ("until=x", {"until": "x"}),
    (" max_gen_toks=4, until=x ", {"max_gen_toks": 4, "until": "x"}),
    ({"until": ["a", "b"]}, {"until": ["a", "b"]}),
])
def test_gen_kwargs_parse(text, expected):
    assert parse_gen_kwargs(text) == expected


@pytest.mark.parametrize("case, message", [
    ("under_file", "f is a file, not a folder"), ("folder", "is a folder, expected a file name"),
])
def test_results_path_is_checked_before_the_run(tmp_path, case, message):
    """`--out FILE/x.json` used to fail with "FILE: File exists" (exit 1) after the whole run."""
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "x.json" if case == "under_file" else tmp_path
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(InputError, match=message):
        check_results_path(out)
    with pytest.raises(InputError, match=message):
        write_results({"results": {}}, out)
    assert sorted(tmp_path.rglob("*")) == before
    assert check_results_path(tmp_path / "new" / "r.json") == tmp_path / "new" / "r.json"
    assert not (tmp_path / "new").exists()  # checked, nothing made


def test_git_commit_is_recorded_quietly(tmp_path, monkeypatch, capfd):
    """lm-eval records `git describe` of the working folder; outside a repository git's "fatal: not a git
    repository" went to stderr on every run. Quiet only while evaluate runs: lm-eval is unchanged after."""
    import lm_eval.evaluator as ev

    from dllm_export.eval.harness import _quiet_git

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    original = ev.get_git_commit_hash
    with _quiet_git():
        assert ev.get_git_commit_hash() is None
    assert ev.get_git_commit_hash is original
    assert "not a git repository" not in capfd.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--limit", "-1"], BAD_LIMIT), (["--limit", "nan"], BAD_LIMIT), (["--num-fewshot", "-1"], "num_fewshot"),
    (["--gen-kwargs", "garbage"], "gen kwargs must be key=value"),
])
def test_cli_bad_run_settings_are_one_line_exit_2(tmp_path, capsys, argv, message):
    from dllm_export.cli import main

    assert main(["lm-eval", "--model", str(tmp_path / "no_model"), "--tasks", "x", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
