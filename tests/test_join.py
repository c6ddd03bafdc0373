"""Continuous batching in the loop: rows that join a running `Decoding` at a block boundary, and rows
retired when done, decode the tokens they get alone (whatever their lengths), on the
bundled models, under every schedule whose rows are independent (`Plan.rows_independent`)."""

import pytest
import torch

import dllm_export as D
from dllm_export.errors import InputError
from dllm_export.runtime.loop import Decoding

TEXTS = ["12+34=", "def fibonacci(n):", "7*8=", "class Stack:\n    def push(self, item):", "90-45=", "import os\n"]


@pytest.fixture(scope="module")
def bundled():
    return {"llada": D.load_model("default"), "dream": D.load_model("default-dream")}


@pytest.fixture(scope="module")
def toks():
    return {"llada": D.load_tokenizer("default"), "dream": D.load_tokenizer("default-dream")}


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def drive(model, kw: dict, arrivals: list[tuple]):
    """Decode `arrivals` (block index at which a row joins, prompt, suffix[, gen_length]) in one
    Decoding as a server would: rows join at block boundaries and are retired once ended. Returns
    each row's (generated ids, commit steps) in arrival order and the widest canvas seen."""
    dec = Decoding.create(model, **kw)
    todo = sorted(enumerate(arrivals), key=lambda a: a[1][0])
    owners, done, blk, widest = [], {}, 0, 0
    while todo or owners:
        while todo and (todo[0][1][0] <= blk or not owners):
            i, (_, p, s, *length) = todo.pop(0)
            dec.admit([p], None if s is None else [s], gen_length=length[0] if length else None)
            owners.append(i)
        widest = max(widest, dec.x.shape[1])
        dec.run_block()
        blk += 1
        keep = ~dec.ended
        for r in (~keep).nonzero().flatten().tolist():
            n = int(dec.length[r])
            done[owners[r]] = (dec.generated[r, :n].clone(), dec.commit[r, :n].clone())
        if not bool(keep.all()):
            dec.retire(keep)
            owners = [o for o, k in zip(owners, keep.tolist()) if k]
    return [done[i] for i in range(len(arrivals))], widest


def assert_as_alone(model, kw, arrivals):
    """Each row's tokens equal its decoding alone. (The commit order within a block may differ
    where two positions' confidences tie to float rounding: LLaDA's positions count from the
    canvas start, so a row that moves is rotated by other, equivalent angles.)"""
    rows, _ = drive(model, kw, arrivals)
    per_block = kw["steps"] // (kw["gen_length"] // kw["block_length"])
    for (gen, _), (_, p, s, *length) in zip(rows, arrivals):
        G = length[0] if length else kw["gen_length"]
        own = {**kw, "gen_length": G, "steps": G // kw["block_length"] * per_block}
        alone = D.generate(model, [p], suffix_ids=None if s is None else [s], **own)
        assert torch.equal(gen, alone.generated[0]), (own, p, s)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("opts", [
    {"cache": "none", "steps": 32},                             # the reference loop (LLaDA's fixed quota)
    {"cache": "dual", "threshold": 0.9},
    {"cache": "prefix", "threshold": 0.9, "refresh_tokens": 2},
    {"cache": "dual", "threshold": 0.99, "refresh_tokens": 16, "stop_at_eos": True},  # the edge preset
    {"cache": "dual", "factor": 1.0, "cfg_scale": 1.0},
])
def test_rows_that_join_at_block_boundaries_decode_as_alone(bundled, toks, family, opts):
    """Three rows join a running decoding after 0, 1 and 2 of its blocks (one with a prompt longer
    than the columns before the boundary, which moves the canvas; one with a suffix), generating
    32, 16 and 40 tokens, and leave when done: each has its tokens alone."""
    if family == "dream" and "steps" in opts:
        opts = {**opts, "threshold": 0.9}  # Dream's fixed-step samplers share a batch-mean quota: no joining
    tok = toks[family]
    kw = {"gen_length": 32, "block_length": 8, "steps": 32, **opts}
    arrivals = [(0, ids(tok, "12+34="), None), (1, ids(tok, TEXTS[3] + "\n        self.items"), None, 16),
                (2, ids(tok, "def f(x):\n    "), ids(tok, "\n\nprint(f(2))"), 40)]
    assert Decoding.create(bundled[family], **kw).plan.rows_independent
    assert_as_alone(bundled[family], kw, arrivals)


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_full_forwards_run_once_per_admission_without_the_padding(bundled, toks, cache):
    """Rows that joined at other times sit on the shared grid with padding on both sides: a block's
    full forward runs once per admission over the columns its rows span (with the cache, at their
    canvas positions, the caches put together after), and each row still gets its tokens alone.
    Rows admitted together (ragged prompts of one `generate` call) keep one forward."""
    from dllm_export.runtime.backends import TorchBackend
    from dllm_export.runtime.loop import _real_span

    calls = []

    class Counting(TorchBackend):
        def forward(self, ids, attention_mask=None, cache=None, rows=None):
            if cache is None or cache.window is None or cache.fill:
                calls.append(tuple(ids.shape))
            return super().forward(ids, attention_mask, cache=cache, rows=rows)

    tok, model = toks["llada"], bundled["llada"]
    kw = {"gen_length": 16, "block_length": 8, "steps": 16, "cache": cache}
    long, short = ids(tok, TEXTS[3]), ids(tok, "7*8=")
    dec = Decoding.create(Counting(model), **kw)
    dec.admit([long, ids(tok, "12+34=")])
    dec.run_block()
    assert calls[0] == (2, dec.x.shape[1]) and (dec.am == 0).any()  # ragged prompts: one forward
    dec.admit([short], gen_length=32)
    spans = [_real_span(dec.am[dec.cohort == c]) for c in (0, 1)]
    assert dec.cohort.tolist() == [0, 0, 1]
    assert sum(n * (e - a) for n, (a, e) in zip((2, 1), spans)) < 3 * dec.x.shape[1]  # padding is spared
    calls.clear()
    dec.run_block()
    assert calls[:2] == [(2, spans[0][1] - spans[0][0]), (1, spans[1][1] - spans[1][0])]
    while not dec.done:
        dec.run_block()
    alone = D.generate(model, [short], **{**kw, "gen_length": 32, "steps": 32})
    assert torch.equal(dec.generated[2], alone.generated[0])


def test_the_canvas_moves_and_shrinks_with_its_rows(bundled, toks):
    """A prompt longer than the columns before the boundary moves the running rows right; retiring
    rows cuts the padding every row has: a lone row left has its own canvas's width."""
    tok, model = toks["llada"], bundled["llada"]
    kw = {"gen_length": 16, "block_length": 8, "steps": 16}
    dec = Decoding.create(model, **kw)
    short, long = ids(tok, "7*8="), ids(tok, "class Stack:\n    def push(self, item):\n        self.items.append(")
    dec.admit([short])
    dec.run_block()
    assert dec.hi == len(short) + 8 < len(long)
    dec.admit([long])
    assert dec.start.tolist() == [len(long) - 8, len(long)] and dec.hi == len(long)
    assert dec.x.shape[1] == len(long) + 16 and dec.am[0, :len(long) - 8 - len(short)].sum() == 0
    dec.run_block()
    assert dec.ended.tolist() == [True, False]
    dec.retire(~dec.ended)
    assert dec.x.shape == (1, len(long) + 16) and dec.start.tolist() == [len(long)]
    dec.run_block()
    alone = D.generate(model, [long], **kw)
    assert torch.equal(dec.generated[0], alone.generated[0]) and dec.done


def test_a_row_that_would_outgrow_the_context_is_refused_whole(bundled, toks):
    """A row that fits the context alone but not beside rows decoding since long before (its
    masks start at the boundary, theirs ended earlier) is refused, and nothing changes."""
    tok, model = toks["llada"], bundled["llada"]
    kw = {"gen_length": 512, "block_length": 64, "steps": 8}
    dec = Decoding.create(model, **kw)
    dec.admit([[5] * 400])
    dec.run_block()
    dec.run_block()
    before = [t.clone() for t in (dec.x, dec.am, dec.start, dec.commit)]
    assert dec.hi + 512 > model.config.max_sequence_length
    with pytest.raises(InputError, match="beyond the model's context"):
        dec.admit([ids(tok, "1+1=")])
    assert all(torch.equal(a, b) for a, b in zip(before, (dec.x, dec.am, dec.start, dec.commit)))


def test_fuzzed_arrivals_decode_each_row_as_alone(bundled, toks):
    """Differential fuzz (hypothesis, derandomized): rows of the bundled models' prompts generating
    8 to 24 tokens, joining at random block boundaries under random greedy schedules, each decode
    as alone."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=25, deadline=None, derandomize=True, database=None,
                         phases=(hypothesis.Phase.generate,), suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(family=st.sampled_from(["llada", "dream"]),
                      arrivals=st.lists(st.tuples(st.integers(0, 4), st.sampled_from(TEXTS),
                                                  st.sampled_from([None, "\n", " = 0"]), st.sampled_from([8, 16, 24])),
                                        min_size=2, max_size=4),
                      blocks=st.sampled_from([1, 2, 3]), rule=st.sampled_from([{"threshold": 0.9}, {"factor": 1.0},
                                                                               {}]),
                      cache=st.sampled_from(["none", "prefix", "dual"]), stop_at_eos=st.booleans())
    def one(family, arrivals, blocks, rule, cache, stop_at_eos):
        if family == "dream" and not rule:
            rule = {"threshold": 0.5}
        tok = toks[family]
        kw = dict(gen_length=8 * blocks, steps=8 * blocks, block_length=8, cache=cache, stop_at_eos=stop_at_eos,
                  **rule)
        assert_as_alone(bundled[family], kw, [(b, ids(tok, t), None if s is None else ids(tok, s), n)
                                              for b, t, s, n in arrivals])

    one()


@pytest.mark.parametrize("gen_length", [12, 4, 0, 8.0, "16"])
def test_joining_rows_generate_whole_blocks(bundled, gen_length):
    dec = Decoding.create(bundled["llada"], gen_length=16, block_length=8, steps=16)
    with pytest.raises(InputError, match="must be a positive multiple of the block length 8"):
        dec.admit([[5, 6]], gen_length=gen_length)
    assert dec.x.shape[0] == 0


def test_recording_started_as_a_row_joins_gives_its_logprobs_alone(bundled, toks):
    """A decoding that recorded no logprobs starts recording when a row that asks for them joins:
    that row's logprobs are those it gets alone (rows admitted before hold NaN for earlier commits)."""
    from dllm_export.runtime.loop import Logprobs

    tok, model = toks["llada"], bundled["llada"]
    kw = {"gen_length": 16, "block_length": 8, "steps": 16, "cache": "dual"}
    dec = Decoding.create(model, **kw)
    dec.admit([ids(tok, "def fibonacci(n):")])
    dec.run_block()
    record = Logprobs(3)
    dec.start_recording(record)
    dec.admit([ids(tok, "12+34=")])
    while not dec.done:
        dec.run_block()
    alone = D.generate(model, [ids(tok, "12+34=")], logprobs=3, **kw)
    assert torch.allclose(record.token[1], alone.logprobs[0], atol=1e-5, equal_nan=True)
    assert torch.equal(record.top_ids[1], alone.top_logprobs[1][0])
    assert bool(record.token[0, :8].isnan().all())  # committed before recording started
