"""Training data: arithmetic as SFT-style problem rows (prompt visible, answer + EOS padding maskable)."""

import torch
from tokenizers import Tokenizer

from dllm_export.corpus import CorpusRecipe
from dllm_export.models.checkpoint import resolve_model_path
from dllm_export.train import WindowSampler


def _data():
    tj = (resolve_model_path("default") / "tokenizer.json").read_text()
    tok = Tokenizer.from_str(tj)
    lines = ["12+34=46\n", "5*6=30\n", "90-45=45\n"] * 50
    ids = tok.encode("".join(lines), add_special_tokens=False).ids
    starts = torch.tensor([0] + [len(x) for x in lines[:-1]]).cumsum(0)
    code = torch.arange(1000, 1000 + 4096, dtype=torch.int32)
    return tok, {"tokenizer_files": {"tokenizer.json": tj}, "ids": {"eos_token_id": 1},
                 "streams": {"code": code, "english": code, "arithmetic": torch.tensor(ids, dtype=torch.int32)},
                 "arithmetic_starts": starts}


def test_problem_rows_keep_the_prompt_visible_and_pad_with_eos():
    tok, data = _data()
    s = WindowSampler(data, CorpusRecipe(code=0.5, arithmetic=0.5, english=0.0), 48, True, arithmetic_rows=12)
    groups = s.sample(8, torch.Generator().manual_seed(0))
    rows = [g for g in groups if g[0].shape[1] == 12]
    assert len(rows) == 1 and rows[0][0].shape[0] % 4 == 0  # 48 // 12 problems per arithmetic window
    for x, m in zip(*rows[0]):
        text = tok.decode(x[~m].tolist())
        assert text.endswith("=") and text in ("12+34=", "5*6=", "90-45=")
        answer = tok.decode([t for t in x[m].tolist() if t != 1])
        assert answer in ("46", "30", "45") and x[-1] == 1  # EOS padding, maskable


def test_row_lengths_longer_than_a_window_keep_the_arithmetic_token_share():
    tok, data = _data()
    s = WindowSampler(data, CorpusRecipe(code=0.0, arithmetic=1.0, english=0.0), 48, True, arithmetic_rows=(12, 96))
    gen = torch.Generator().manual_seed(0)
    tokens = {12: 0, 96: 0}
    for _ in range(200):
        for x, m in s.sample(8, gen):
            tokens[x.shape[1]] += x.numel()
            assert (x[m.logical_not()] != 1).all() and (x[:, -1] == 1).all()  # prompt visible, EOS-padded tail
    total = 200 * 8 * 48
    assert abs(sum(tokens.values()) - total) / total < 0.05  # stochastic rounding keeps the budget
    assert 0.4 < tokens[96] / total < 0.6  # each length gets about half the windows


def _tiny_run(tmp_path, name):
    """A run folder with a ready data.pt (the test's streams), so train() skips the corpus build."""
    from dllm_export.train import _save

    out = tmp_path / name
    out.mkdir()
    data = _data()[1]
    data["ids"] = {"mask_token_id": 2, "eos_token_id": 1, "pad_token_id": 1}
    data["summary"] = {"test": True}
    code = torch.arange(10, 4010, dtype=torch.int32)  # inside the 4096-token vocabulary
    data["streams"].update(code=code, english=code)
    _save(out / "data.pt", data)
    return out


def test_a_resumed_run_replays_the_uninterrupted_one_bit_for_bit(tmp_path):
    from dllm_export.train import RunOptions, TrainConfig, train

    cfg = TrainConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden=64, seq_len=32, batch_size=4,
                      warmup_steps=2, steps=6, arithmetic_rows=16)
    whole = torch.load(train(_tiny_run(tmp_path, "whole"), cfg, opts=RunOptions(log_every=100)), weights_only=False)
    part = _tiny_run(tmp_path, "part")
    train(part, cfg, opts=RunOptions(until_step=3, log_every=100))
    assert torch.load(part / "ckpt.pt", weights_only=False)["step"] == 3
    resumed = torch.load(train(part, cfg, resume=True, opts=RunOptions(log_every=100)), weights_only=False)
    assert resumed["step"] == whole["step"] == 6
    assert resumed["tokens"] == whole["tokens"] > 0
    for k, v in whole["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert whole["mix_history"] == resumed["mix_history"]


SCOPED_SOURCE = '''
"""Module doc."""
import sys
if sys.platform == "x":
    def a():
        """In an if."""
else:
    class B:
        """In an else."""
        def m(self):
            """A method."""
            return [lambda: 1 for _ in ()]
try:
    def c():
        """In a try."""
except ValueError:
    async def d():
        """In a handler."""
finally:
    def e():
        """In a finally."""
match sys.argv:
    case [x]:
        def f():
            """In a case."""
with open(__file__) as fh:
    for line in fh:
        def g():
            """In a loop in a with."""
    else:
        def h():
            """In a for's else."""
'''


def test_docstring_scopes_come_in_ast_walks_order():
    """The corpus walks only statement lists for docstrings; it must meet the same scopes in the same
    order as ast.walk (the English sentences' order seeds their shuffle)."""
    import ast
    import random

    from dllm_export.corpus import _SCOPES, _scopes, code_texts

    sources = [SCOPED_SOURCE] + [t for _, t in random.Random(0).sample(code_texts(held_out=False), 25)]
    for src in sources:
        tree = ast.parse(src)
        assert list(_scopes(tree)) == [n for n in ast.walk(tree) if isinstance(n, _SCOPES)]
    assert len(list(_scopes(ast.parse(SCOPED_SOURCE)))) == 10  # the module and nine defs


def test_arithmetic_lines_are_one_stream():
    """Calibration builds only the arithmetic lines it reads: the first k lines of a longer stream."""
    from dllm_export.corpus import arithmetic_lines

    assert arithmetic_lines(300) == arithmetic_lines(3000)[:300]
