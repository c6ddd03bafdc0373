"""The unmasking loop's API: shapes, batching, backends, determinism and input validation."""

import numpy as np
import pytest
import torch

import dllm_export as D
from dllm_export import InputError, generate, load_model
from dllm_export.runtime import TorchBackend
from dllm_export.runtime.samplers import SAMPLERS, get_num_transfer_tokens

from .conftest import GOLDEN


@pytest.fixture(scope="module")
def llada():
    return D.load_model(GOLDEN / "llada_gqa")


@pytest.fixture(scope="module")
def dream():
    return D.load_model(GOLDEN / "dream")


PROMPT = [[5, 17, 33, 2, 9, 41]]


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("block_length", [None, 8])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_every_sampler_decodes_everything(llada, dream, family, sampler, block_length):
    model = llada if family == "llada" else dream
    out = D.generate(model, PROMPT, gen_length=16, steps=16, block_length=block_length, sampler=sampler, seed=0)
    assert out.ids.shape == (1, 6 + 16) and out.commit_step.shape == (1, 16)
    assert out.ids[:, :6].tolist() == PROMPT
    assert not (out.generated == model.spec.mask_id).any()
    assert (out.commit_step >= 0).all() and (out.commit_step < out.nfe).all()
    if block_length:  # blocks are decoded left to right
        assert out.commit_step[0, :8].max() < out.commit_step[0, 8:].min()


def test_commit_step_counts_tokens_per_step(llada):
    out = D.generate(llada, PROMPT, gen_length=32, steps=8, block_length=8)
    counts = torch.bincount(out.commit_step[0], minlength=8)
    assert counts.tolist() == [4] * 8 and out.nfe == 8


def test_get_num_transfer_tokens_puts_extras_first():
    sched = get_num_transfer_tokens(torch.tensor([[True] * 10, [True] * 3 + [False] * 7]), 4)
    assert sched.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


def test_threshold_commits_several_tokens_per_step(llada):
    out = D.generate(llada, PROMPT, gen_length=32, block_length=8, threshold=0.1)
    assert out.nfe < 32 and not (out.generated == llada.spec.mask_id).any()


def test_ragged_batch_is_left_padded_and_matches_single_rows(llada):
    """Row-wise results of a padded batch equal the unpadded single-row runs' tokens where no pad is involved."""
    rows = [[5, 17, 33, 2, 9, 41], [7, 8, 9]]
    out = D.generate(llada, rows, gen_length=8, steps=8)
    assert out.attention_mask[1, :3].tolist() == [0, 0, 0]
    assert out.ids[1, :3].tolist() == [llada.spec.pad_id] * 3
    single = D.generate(llada, rows[0], gen_length=8, steps=8)
    assert out.ids[0].tolist() == single.ids[0].tolist()


def test_seeded_sampling_is_reproducible(dream):
    a = D.generate(dream, PROMPT, gen_length=16, steps=16, temperature=0.8, top_p=0.9, seed=7)
    b = D.generate(dream, PROMPT, gen_length=16, steps=16, temperature=0.8, top_p=0.9, seed=7)
    c = D.generate(dream, PROMPT, gen_length=16, steps=16, temperature=0.8, top_p=0.9, seed=8)
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)


class NumpyBackend:
    """A foreign backend: numpy in, numpy out, as onnxruntime or llama.cpp adapters are."""

    def __init__(self, model):
        self.inner = TorchBackend(model)
        self.spec, self.vocab_size, self.max_length = self.inner.spec, self.inner.vocab_size, self.inner.max_length
        self.calls = 0

    def forward(self, ids, attention_mask=None):
        self.calls += 1
        logits = self.inner.forward(torch.from_numpy(ids.numpy()), attention_mask).numpy()
        return torch.from_numpy(logits)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_any_backend_gives_the_same_trace(llada, dream, family):
    model = llada if family == "llada" else dream
    backend = NumpyBackend(model)
    a = D.generate(model, PROMPT, gen_length=16, steps=8, block_length=8, cfg_scale=0.5)
    b = D.generate(backend, PROMPT, gen_length=16, steps=8, block_length=8, cfg_scale=0.5)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.commit_step, b.commit_step)
    assert backend.calls == b.nfe == 8


class _OwnThreads(NumpyBackend):
    """A backend with a thread pool of its own (as onnxruntime's): records torch's thread count
    during each forward, and can fail one."""

    own_threads = True

    def __init__(self, model, fail_at: int | None = None):
        super().__init__(model)
        self.threads, self.fail_at = [], fail_at

    def forward(self, ids, attention_mask=None):
        self.threads.append(torch.get_num_threads())
        if self.calls == self.fail_at:
            raise RuntimeError("backend failed")
        return super().forward(ids, attention_mask)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_loop_ops_on_one_thread_beside_a_backend_pool(llada, dream, family):
    """With an own-threads backend the loop's ops run on one torch thread (no two pools on the same
    cores), the tokens are the same, and torch's thread count is restored, after a failure too."""
    model = llada if family == "llada" else dream
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        be = _OwnThreads(model)
        a = D.generate(model, PROMPT, gen_length=16, steps=8, block_length=8)
        b = D.generate(be, PROMPT, gen_length=16, steps=8, block_length=8)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.commit_step, b.commit_step)
        assert be.threads == [1] * 8 and torch.get_num_threads() == 2
        ids = a.ids.clone()
        ids[0, -3:] = model.spec.mask_id
        assert torch.equal(D.infill(_OwnThreads(model), ids), D.infill(model, ids))
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="backend failed"):
            D.generate(_OwnThreads(model, fail_at=3), PROMPT, gen_length=16, steps=8, block_length=8)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_infilling_masks_in_the_prompt(llada):
    m = llada.spec.mask_id
    out = D.generate(llada, [[5, m, 33, m, 9]], gen_length=8, steps=8)
    assert not (out.ids == m).any()


class _PredictsMask(NumpyBackend):
    """A backend whose first forward ranks the mask token first everywhere, as an untrained model may:
    the step that commits it leaves its positions masked."""

    def forward(self, ids, attention_mask=None):
        logits = super().forward(ids, attention_mask)
        if self.calls == 1:
            logits[..., self.spec.mask_id] = 100.0
        return logits


@pytest.mark.parametrize("rule", [{"threshold": 0.9}, {"factor": 1.0}])
def test_parallel_decoding_runs_past_a_step_that_commits_the_mask_id(llada, rule):
    """Threshold / factor decoding runs a block until it is decoded; a step that writes the mask id
    back made it need one more step than the schedule, and the loop indexed the schedule's quotas
    past their end (IndexError). Such a block now takes that step and ends decoded."""
    out = D.generate(_PredictsMask(llada), PROMPT, gen_length=4, steps=1, block_length=4, **rule)
    assert (out.generated != llada.spec.mask_id).all() and out.nfe > 1


class _NoRows:
    """A torch backend that hides `supports_rows`: the loop then asks for every row's logits."""

    def __init__(self, model):
        self.inner = TorchBackend(model)
        self.spec, self.vocab_size, self.max_length = self.inner.spec, self.inner.vocab_size, self.inner.max_length
        self.supports_cache = True

    def forward(self, ids, attention_mask=None, cache=None):
        return self.inner.forward(ids, attention_mask, cache=cache)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("opts", [{}, {"cache": "prefix"}, {"cache": "dual"}, {"threshold": 0.5, "cache": "dual"},
                                  {"sampler": "random", "seed": 3}])
def test_head_on_block_rows_only_gives_the_same_trace(llada, dream, family, opts):
    """Greedy samplers read only the block's eligible columns, so the loop asks a `supports_rows`
    backend for those rows: token-identical to computing every row (sampled ones take all rows)."""
    model = {"llada": llada, "dream": dream}[family]
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    full = model(ids)
    torch.testing.assert_close(model(ids, rows=(5, 13)), full[:, 5:13], atol=1e-5, rtol=0)
    kw = dict(gen_length=16, steps=16, block_length=8, **opts)
    a = D.generate(TorchBackend(model), [PROMPT[0], PROMPT[0][:4]], **kw)
    b = D.generate(_NoRows(model), [PROMPT[0], PROMPT[0][:4]], **kw)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.commit_step, b.commit_step)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_infill_is_the_one_block_low_confidence_loop(llada, dream, family):
    """infill over trailing masks = generate with one block, one token per step, low_confidence;
    `check` stops it at the first commit it rejects."""
    model = {"llada": llada, "dream": dream}[family]
    m = model.spec.mask_id
    ref = D.generate(model, PROMPT, gen_length=8, steps=8, sampler="low_confidence")
    got = D.infill(model, torch.tensor([PROMPT[0] + [m] * 8]))
    assert torch.equal(got, ref.ids)
    inner = D.infill(model, torch.tensor([[5, m, 33, m, m, 9]]))
    assert not (inner == m).any() and inner[0, [0, 2, 5]].tolist() == [5, 33, 9]
    seen = []
    assert D.infill(model, torch.tensor([PROMPT[0] + [m] * 8]), check=lambda p, t: seen.append(p) or len(seen) < 3) is None
    assert len(seen) == 3


@pytest.mark.parametrize("kwargs,message", [
    (dict(gen_length=60), "exceeds the model's context of 64"),
    (dict(gen_length=12, block_length=8), "not a multiple of block_length"),
    (dict(gen_length=16, steps=3, block_length=8), "must be a multiple of the number of blocks"),
    (dict(sampler="greedy"), "unknown sampler 'greedy'"),
    (dict(threshold=0.9, sampler="random"), "has none"),
    (dict(threshold=1.5), "threshold must lie in"),
    (dict(top_p=0.0), "top_p must lie in"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0 and finite, got nan"),
    (dict(cfg_scale=-1.0), "cfg_scale must be >= 0"),
    (dict(cfg_scale=float("inf")), "cfg_scale must be >= 0 and finite"),
    (dict(sampler="entropy", alg_temp=-1.0), "alg_temp must be >= 0"),
])
def test_bad_arguments_raise_clear_errors(llada, kwargs, message):
    with pytest.raises(D.InputError, match=message):
        D.generate(llada, PROMPT, **{"gen_length": 16, **kwargs})


@pytest.mark.parametrize("prompt,message", [([[5, 500]], r"must lie in \[0, 128\)"), ([[5, -1]], "must lie in"),
                                            ([], "empty"), ("hello", "got a string: encode text"),
                                            ([[5.7, 6.0]], "prompt row 0 must be a list of integer token ids"),
                                            (torch.tensor([[5.0, 6.0]]), "integer token ids, got torch.float32"),
                                            ([[True, False]], "prompt row 0 must be a list of integer token ids"),
                                            (np.array([[5.0, 6.0]]), "integer token ids, got torch.float64"),
                                            ([[5, 1 << 70]], "beyond 64 bits"),
                                            ([[[5, 6]]], "prompt row 0 must be a list of integer token ids"),
                                            ({5: 6}, "must be a tensor or lists of token ids, got dict"),
                                            (torch.zeros(1, 0, dtype=torch.long), "length >= 1")])
def test_bad_prompts_raise_clear_errors(llada, prompt, message):
    with pytest.raises(D.InputError, match=message):
        D.generate(llada, prompt, gen_length=8)
    if not isinstance(prompt, (str, dict)) and len(prompt):
        with pytest.raises(D.InputError, match=message):  # infill reads prompts the same way
            D.infill(llada, prompt)


def test_infill_check_must_be_a_function(llada):
    with pytest.raises(D.InputError, match="check must be a function or None, got 5"):
        D.infill(llada, [[5, llada.spec.mask_id]], check=5)


@pytest.mark.parametrize("mask,message", [
    (torch.full((1, 3), 0.5), "values other than 0 and 1"),  # .long() made it 0: the whole prompt masked
    (torch.full((1, 3), 2), "values other than 0 and 1"),
    (torch.zeros(1, 3), "masks every token of a prompt row"),
    (torch.ones(3, 1), r"the prompt's shape \(1, 3\), got \(3, 1\)"),
    (torch.ones(2, 4), r"the prompt's shape \(1, 3\), got \(2, 4\)"),
])
def test_bad_attention_masks_raise_clear_errors(llada, mask, message):
    with pytest.raises(D.InputError, match=message):
        D.generate(llada, torch.tensor([[5, 6, 7]]), gen_length=8, attention_mask=mask)
    with pytest.raises(D.InputError, match="attention_mask goes with a"):  # a list prompt's mask is its padding
        D.generate(llada, [[5, 6, 7]], gen_length=8, attention_mask=torch.ones(1, 3))


@pytest.mark.parametrize("kwargs,message", [
    (dict(gen_length=8.0), "gen_length must be an integer, got 8.0"),
    (dict(gen_length=True), "gen_length must be an integer, got True"),
    (dict(steps="8"), "steps must be an integer"),
    (dict(refresh=1.5, cache="dual"), "refresh must be an integer, got 1.5"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(temperature="0.5"), "temperature must be a number"),
    (dict(eps=-1.0), r"eps must lie in \(0, 1\)"),
    (dict(eps=float("nan")), r"eps must lie in \(0, 1\)"),
    (dict(temperature=None), "temperature must be a number, got None"),  # a TypeError from math.isfinite
    (dict(callback=5), "callback must be a function or None, got 5"),  # "'int' object is not callable" mid-loop
    (dict(gen_length=None), "gen_length must be an integer, got None"),
    (dict(eps=None), "eps must be a number, got None"),
    (dict(block_length=1, steps=3, threshold=0.9), "steps 3 is fewer than the number of blocks 8"),
    (dict(block_length=1, steps=3, factor=1.0), "steps 3 is fewer than the number of blocks 8"),
])
def test_bad_argument_types_raise_clear_errors(llada, kwargs, message):
    with pytest.raises(D.InputError, match=message):
        D.generate(llada, [[5, 6, 7]], **{"gen_length": 8, **kwargs})


def test_numpy_prompts_and_seeds_are_taken(llada):
    """numpy arrays and integers are what many callers hold: the same tokens as torch's."""
    want = D.generate(llada, torch.tensor([[5, 6, 7]]), gen_length=8, temperature=1.0, seed=3).ids
    got = D.generate(llada, np.array([[5, 6, 7]]), gen_length=8, temperature=1.0, seed=np.int64(3)).ids
    assert torch.equal(want, got)
    assert torch.equal(D.generate(llada, [[np.int64(5), 6, 7]], gen_length=8).ids,
                       D.generate(llada, [[5, 6, 7]], gen_length=8).ids)


def test_forward_rejects_out_of_vocab_ids(llada):
    with pytest.raises(D.InputError, match="token ids must lie in"):
        llada(torch.tensor([[1, 128]]))


def test_stops_early_when_nothing_is_left_to_unmask(llada):
    """More steps than tokens: the reference runs idle forwards; the loop skips them, same tokens."""
    out = D.generate(llada, PROMPT, gen_length=16, steps=32, block_length=8)
    assert out.nfe == 16
    ref = D.generate(llada, PROMPT, gen_length=16, steps=16, block_length=8)
    assert torch.equal(out.ids, ref.ids)


# ---------------------------------------------------------------------------------- block caches

@pytest.mark.parametrize("name", ["llada", "llada_gqa", "dream"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("update", [False, True])
def test_windowed_forward_reuses_cache_exactly(name, padded, update, tiny_dirs):
    """A window forward over unchanged tokens, attending to cached keys/values of the rest,
    reproduces the full forward's rows (the cache mechanism, free of staleness); one that renews
    the cache (`update`) stores the keys/values the full forward stored."""
    from dllm_export.models.layers import KVCache

    model = load_model(tiny_dirs[name])
    ids = torch.randint(0, 380, (2, 24), generator=torch.Generator().manual_seed(0))
    am = None
    if padded:
        am = torch.ones_like(ids)
        am[1, :5] = 0
    kv = KVCache()
    full = model(ids, attention_mask=am, cache=kv).float()
    stored = [t.clone() for t in kv.k + kv.v]
    kv.update = update
    for window in [(8, 16), (8, 24), (0, 4)]:
        kv.window = window
        part = model(ids[:, window[0]:window[1]], attention_mask=am, cache=kv).float()
        assert all((a - b).abs().max() < 1e-5 for a, b in zip(kv.k + kv.v, stored))
        ref = full[:, window[0]:window[1]]
        if padded:  # pad query rows are never read
            assert (part[0] - ref[0]).abs().max() < 1e-5
            real = slice(max(0, 5 - window[0]), None)
            if part[1, real].numel():
                assert (part[1, real] - ref[1, real]).abs().max() < 1e-5
        else:
            assert (part - ref).abs().max() < 1e-5


@pytest.mark.parametrize("name,sampler", [("llada", "low_confidence"), ("dream", "entropy")])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_with_refresh_every_step_is_the_reference(name, sampler, cache, tiny_dirs):
    model = load_model(tiny_dirs[name])
    kw = dict(gen_length=16, steps=16, block_length=8, sampler=sampler)
    ref = generate(model, [[5, 9, 33], [12, 40, 7]], **kw)
    out = generate(model, [[5, 9, 33], [12, 40, 7]], cache=cache, refresh=1, **kw)
    assert torch.equal(ref.ids, out.ids) and torch.equal(ref.commit_step, out.commit_step)


@pytest.mark.parametrize("name,sampler", [("llada", "low_confidence"), ("dream", "entropy")])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("parallel", [{}, {"threshold": 0.3}])
def test_cache_refreshed_after_every_commit_is_the_reference(name, sampler, cache, parallel, tiny_dirs):
    """refresh_tokens=1: every step commits at least one token, so every step is a full forward."""
    model = load_model(tiny_dirs[name])
    kw = dict(gen_length=16, steps=16, block_length=8, sampler=None if parallel else sampler, **parallel)
    ref = generate(model, [[5, 9, 33], [12, 40, 7]], **kw)
    out = generate(model, [[5, 9, 33], [12, 40, 7]], cache=cache, refresh_tokens=1, **kw)
    assert torch.equal(ref.ids, out.ids) and torch.equal(ref.commit_step, out.commit_step)


class _WindowLog:
    """A backend wrapper that records, per forward, whether it was a full forward (no cache window)
    and its (window, update)."""

    def __init__(self, inner):
        self.inner, self.full, self.windows = inner, [], []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, ids, attention_mask=None, **kw):
        self.full.append(kw["cache"].window is None)
        self.windows.append((kw["cache"].window, kw["cache"].update))
        return self.inner.forward(ids, attention_mask, **kw)


@pytest.mark.parametrize("refresh_tokens", [2, 3, 5, 100])
def test_refresh_tokens_refills_the_cache_once_enough_tokens_were_committed(refresh_tokens, tiny_dirs):
    """A row's step is a full forward iff it starts a block or the row's commits since its last full
    forward reach refresh_tokens (replayed from commit_step): all rows full -> one full forward, none
    -> one cached forward, some -> the cached forward, then the full one. A row whose block is
    decoded sits out the block's next steps (threshold decoding, independent rows)."""
    from dllm_export.runtime.backends import TorchBackend

    be = _WindowLog(TorchBackend(load_model(tiny_dirs["llada"])))
    out = generate(be, [[5, 9, 33], [12, 40, 7]], gen_length=24, block_length=8, cache="dual", threshold=0.2,
                   refresh_tokens=refresh_tokens)
    want, since, block = [], torch.zeros(2, dtype=torch.long), -1
    for step in range(out.nfe):
        blk = int((out.commit_step < step).all(0).view(3, 8).all(1).sum())  # blocks decoded before this step
        live = (out.commit_step[:, 8 * blk:8 * blk + 8] >= step).any(1)  # rows whose block is not decoded
        rows = (torch.full((2,), blk != block) | (since >= refresh_tokens)) & live
        block = blk
        want += [True] if torch.equal(rows, live) else [False] if not bool(rows.any()) else [False, True]
        since[rows] = 0
        since += (out.commit_step == step).sum(1)
    assert be.full == want
    assert sum(want) > 3 if refresh_tokens < 8 else sum(want) == 3  # 3 blocks: 3 full forwards at least


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("refresh_blocks", [None, 1, 2, 3, 100])
def test_refresh_blocks_renews_the_cache_from_the_block_before(cache, refresh_blocks, tiny_dirs):
    """Every refresh_blocks-th block (the first included) starts with the full forward; the others
    start with a window from the block before's start to the block's end (prefix: the canvas end)
    that renews the cache there; every other step is the cache's own window, kept as it is."""
    from dllm_export.runtime.backends import TorchBackend

    be = _WindowLog(TorchBackend(load_model(tiny_dirs["llada"])))
    out = generate(be, [[5, 9, 33], [12, 40, 7]], gen_length=32, steps=16, block_length=8, cache=cache,
                   refresh_blocks=refresh_blocks)
    want, L = [], 3 + 32
    for b in range(4):
        lo, hi = 3 + 8 * b, 11 + 8 * b
        end = L if cache == "prefix" else hi
        want.append((None, False) if b % (refresh_blocks or 1) == 0 else ((lo - 8, end), True))
        want += [((lo, end), False)] * 3
    assert be.windows == want and out.nfe == 16
    assert (out.generated != be.spec.mask_id).all()


@pytest.mark.parametrize("opts", [{"stop_at_eos": True}, {"threshold": 0.9, "stop_at_eos": True},
                                  {"refresh_tokens": 8}])
def test_refresh_blocks_rows_in_a_batch_decode_as_alone(opts):
    """With refresh_blocks the rows stay in the batch's forwards to the end (ended ones and those
    whose block is decoded too: the renewed cache lives across blocks), so every row keeps the
    schedule it has alone and decodes its tokens."""
    from dllm_export import load_tokenizer
    from dllm_export.runtime.backends import TorchBackend

    model, tok = load_model("default"), load_tokenizer("default")
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("38+32=", "def fibonacci(n):", "7*8=")]
    kw = dict(gen_length=64, block_length=16, cache="dual", refresh_blocks=3, **opts)
    logged = _WindowLog(TorchBackend(model))
    batch = generate(logged, prompts, **kw)
    refills = []  # each row's full forwards and renewals alone
    for r, p in enumerate(prompts):
        alone = _WindowLog(TorchBackend(model))
        assert batch.generated[r].tolist() == generate(alone, [p], **kw).generated[0].tolist()
        refills.append([w for w in alone.windows if w[0] is None or w[1]])
    if opts.get("stop_at_eos"):  # the arithmetic rows end in the first block: the code row's schedule goes on
        assert len(refills[0]) == 1 and [w for w in logged.windows if w[0] is None or w[1]] == refills[1]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("model,backend", [("default", "torch"), ("default", "onnxruntime"),
                                           ("default-dream", "torch")])
def test_refresh_tokens_rows_in_a_batch_decode_as_alone(cache, model, backend, tmp_path):
    """A batch whose rows need their caches refreshed at different steps (an arithmetic prompt's EOS
    burst, a code prompt's one-token steps) gives every row the tokens it gets decoding alone."""
    from dllm_export import load_tokenizer
    from dllm_export.runtime.backends import TorchBackend, load_backend

    tok = load_tokenizer(model)
    if backend == "torch":
        be = TorchBackend(load_model(model))
    else:
        from dllm_export.exporter.onnx import export_onnx

        be = load_backend(str(export_onnx(model, tmp_path / "onnx")), threads=1)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("38+32=", "def fibonacci(n):", "7*8=")]
    kw = dict(gen_length=64, block_length=32, cache=cache, threshold=0.99, refresh_tokens=8)
    logged = _WindowLog(be)
    batch = generate(logged, prompts, **kw)
    assert len(logged.full) > batch.nfe  # some steps refreshed only some rows (both forwards ran)
    for r, p in enumerate(prompts):
        alone = generate(be, [p], **kw)
        assert batch.generated[r].tolist() == alone.generated[0].tolist()  # (its steps: the batch waits for all)


@pytest.mark.parametrize("name", ["llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("parallel", [{}, {"threshold": 0.5}, {"factor": 1.0}])
def test_cached_decoding_runs_and_fills_every_position(name, cache, parallel, tiny_dirs):
    model = load_model(tiny_dirs[name])
    out = generate(model, [[5, 9, 33, 70]], gen_length=24, steps=24, block_length=8, cache=cache, **parallel)
    assert (out.generated != model.spec.mask_id).all()
    assert (out.commit_step >= 0).all() and out.nfe <= 24
    # within each block, commits only ever go to that block's positions, in order of blocks
    blocks = out.commit_step.view(-1, 3, 8)
    assert (blocks[:, 1].min() >= blocks[:, 0].max()) and (blocks[:, 2].min() >= blocks[:, 1].max())


def test_factor_rule_matches_fast_dllm():
    from dllm_export.runtime.samplers import factor_step

    # confidences (top-1 probabilities) 0.99, 0.9, 0.6, 0.5 over 4 eligible positions, factor 1:
    # thresholds for n = 1..4 are -1, 1 - 1/3, 1 - 1/4, 1 - 1/5 -> the 3rd fails -> commit the top 2
    probs = torch.tensor([0.99, 0.9, 0.6, 0.5], dtype=torch.float64)
    V = 8
    logits = torch.full((1, 4, V), -30.0, dtype=torch.float64)
    for i, p in enumerate(probs):
        rest = (1 - p) / (V - 1)
        logits[0, i] = torch.log(torch.full((V,), rest))
        logits[0, i, i + 1] = torch.log(p)
    x = torch.zeros(1, 4, dtype=torch.long)
    eligible = torch.ones(1, 4, dtype=torch.bool)
    transfer = factor_step(logits, x, eligible, 1.0, 0.0, None)
    assert transfer.tolist() == [[True, True, False, False]]
    assert x.tolist() == [[1, 2, 0, 0]]


@pytest.mark.parametrize("kwargs,match", [
    (dict(cache="triple"), "unknown cache"),
    (dict(threshold=0.9, factor=1.0), "threshold or factor"),
    (dict(factor=0.0), "factor must be > 0"),
    (dict(factor=float("nan")), "factor must be > 0 and finite, got nan"),
    (dict(refresh=2), "refresh needs a block cache: set cache to 'prefix' or 'dual'"),
    (dict(refresh=2, refresh_tokens=4), "refresh and refresh_tokens need a block cache"),
    (dict(top_p=0.5), "top_p is an option of Dream's samplers .*; LLaDA's sampler 'low_confidence' does not read it"),
    (dict(top_k=3, alg_temp=0.1), "top_k, alg_temp are options of Dream's samplers"),
    (dict(sampler="maskgit_plus", top_k=3, threshold=0.9), "threshold decoding does not read it"),
    # the rules rank by top-1 probability: another sampler's ranking was dropped (the family default is replaced)
    (dict(sampler="entropy", threshold=0.9), "sampler 'entropy' ranks positions by entropy; threshold decoding"),
    (dict(sampler="topk_margin", factor=1.0), "sampler 'topk_margin' ranks positions by their top-2 margin; factor"),
    (dict(cache="dual", refresh=0), "refresh must be >= 1"),
    (dict(cache="dual", refresh_tokens=0), "refresh_tokens must be >= 1"),
])
def test_bad_cache_arguments(kwargs, match, tiny_dirs):
    with pytest.raises(InputError, match=match):
        generate(load_model(tiny_dirs["llada"]), [[5, 9]], gen_length=8, steps=8, **kwargs)


def test_backends_declare_their_capabilities(llada):
    """name / supports_cache / supports_rows are part of the Backend protocol; a forward-only object
    gets a plain forward's (no cache, no rows) from as_backend, named by its class."""
    from dllm_export.runtime.backends import Backend, as_backend
    from dllm_export.runtime.llamacpp import LlamaCppBackend
    from dllm_export.runtime.ort import OrtBackend

    for cls, caps in ((TorchBackend, ("torch", True, True)), (LlamaCppBackend, ("llama.cpp", False, False))):
        assert (cls.name, cls.supports_cache, cls.supports_rows) == caps
    assert OrtBackend.name == "onnxruntime" and OrtBackend.supports_rows and not OrtBackend.supports_cache
    plain = as_backend(NumpyBackend(llada))
    assert isinstance(plain, Backend) and (plain.name, plain.supports_cache, plain.supports_rows) == (
        "NumpyBackend", False, False)
    assert as_backend(_NoRows(llada)).supports_cache and not as_backend(_NoRows(llada)).supports_rows
    with pytest.raises(D.InputError, match="the NumpyBackend backend has no KV cache"):
        D.generate(NumpyBackend(llada), PROMPT, gen_length=8, steps=8, cache="prefix")


class _CountRows(TorchBackend):
    """A torch backend that records the rows of every forward."""

    def __init__(self, model):
        super().__init__(model)
        self.rows = []

    def forward(self, ids, attention_mask=None, cache=None, rows=None):
        self.rows.append(ids.shape[0])
        return super().forward(ids, attention_mask, cache=cache, rows=rows)


@pytest.fixture(scope="module")
def bundled():
    return {"llada": D.load_model("default"), "dream": D.load_model("default-dream")}


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("opts", [{"cache": "dual"}, {"cache": "prefix", "refresh_tokens": 2}, {},
                                  {"cache": "dual", "cfg_scale": 1.0}, {"factor": 1.0, "cache": "dual"}])
def test_rows_whose_block_is_decoded_sit_out_its_next_steps(bundled, family, opts):
    """Threshold / factor decoding runs a block until every row has decoded it; a row done early
    (an arithmetic answer's EOS tail beside code) leaves the block's next forwards (its cached keys /
    values cut out of the batch's) and comes back at the next block's full forward. Each row's ids,
    commit steps within each block and logprobs are its own alone (the batch's steps count on while
    a row waits for the others)."""
    model = bundled[family]
    tok = D.load_tokenizer("default" if family == "llada" else "default-dream")
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("12+34=", "def fibonacci(n):", "7*8=")]
    rule = {} if "factor" in opts else {"threshold": 0.9}
    kw = dict(gen_length=32, steps=32, block_length=16, logprobs=1, **rule, **opts)
    be = _CountRows(model)
    out = D.generate(be, prompts, **kw)
    per_row = 2 if opts.get("cfg_scale") else 1
    assert max(be.rows) == 3 * per_row and min(be.rows) < 3 * per_row  # some steps ran without a row
    for i, p in enumerate(prompts):
        alone = D.generate(model, [p], **kw)
        assert torch.equal(out.generated[i], alone.generated[0])
        in_block = [c.view(2, 16) - c.view(2, 16).min(1, keepdim=True).values for c in (out.commit_step[i],
                                                                                     alone.commit_step[0])]
        assert torch.equal(*in_block)
        assert torch.allclose(out.logprobs[i], alone.logprobs[0], atol=1e-5, equal_nan=True)


def test_fuzzed_batches_decode_each_row_as_alone(bundled):
    """Differential fuzz (hypothesis, derandomized): ragged batches of the bundled models' prompts under
    greedy schedules (blocks, threshold / factor, caches with refresh by commits, stop at EOS,
    guidance, suffixes) give each row the tokens and in-block commit order it gets alone, whatever
    rows sit out which forwards."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    toks = {f: D.load_tokenizer("default" if f == "llada" else "default-dream") for f in bundled}
    pool = ["12+34=", "def fibonacci(n):", "7*8=", "import os\n", "90-45=", "class Stack:"]

    @hypothesis.settings(max_examples=30, deadline=None, derandomize=True, database=None,
                         phases=(hypothesis.Phase.generate,), suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(family=st.sampled_from(["llada", "dream"]), texts=st.lists(st.sampled_from(pool), min_size=2,
                                                                                   max_size=4),
                      blocks=st.sampled_from([1, 2, 3]), rule=st.sampled_from([{"threshold": 0.9}, {"threshold": 0.5},
                                                                               {"factor": 1.0}]),
                      cache=st.sampled_from(["none", "prefix", "dual"]), refresh_tokens=st.sampled_from([None, 4]),
                      stop_at_eos=st.booleans(), cfg_scale=st.sampled_from([0.0, 0.0, 1.0]),
                      suffix=st.sampled_from([None, "\n", " = 0"]))
    def one(family, texts, blocks, rule, cache, refresh_tokens, stop_at_eos, cfg_scale, suffix):
        tok = toks[family]
        prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        sfx = None if suffix is None else [tok(suffix, add_special_tokens=False)["input_ids"]]
        kw = dict(gen_length=8 * blocks, steps=8 * blocks, block_length=8, cache=cache, stop_at_eos=stop_at_eos,
                  refresh_tokens=None if cache == "none" else refresh_tokens, cfg_scale=cfg_scale, suffix_ids=sfx,
                  **rule)
        out = D.generate(bundled[family], prompts, **kw)
        for i, p in enumerate(prompts):
            alone = D.generate(bundled[family], [p], **kw)
            assert torch.equal(out.generated[i], alone.generated[0]), (family, texts, kw, i)
            order = [torch.argsort(c.view(blocks, 8), stable=True) for c in (out.commit_step[i], alone.commit_step[0])]
            assert torch.equal(*order), (family, texts, kw, i)

    one()
