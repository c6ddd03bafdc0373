"""`generate(logprobs=k)`: each generated token's log-probability under the step that committed it."""

import math

import pytest
import torch

import dllm_export as D
from dllm_export import InputError

from .conftest import GOLDEN

PROMPT = [5, 17, 33, 2, 9, 41]


@pytest.fixture(scope="module")
def models():
    return {"llada": D.load_model(GOLDEN / "llada_gqa"), "dream": D.load_model(GOLDEN / "dream")}


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("opts", [{}, {"sampler": "random", "temperature": 0.8, "seed": 3}, {"threshold": 0.3},
                                  {"suffix_ids": [7, 61, 23]}])
def test_logprobs_are_the_committing_steps_distribution(models, family, opts):
    """Replayed independently: the canvas before step s (positions committed at steps < s), one full
    forward, the family's alignment, log-softmax at the committed token; top-k of the same row."""
    model = models[family]
    out = D.generate(model, [PROMPT], gen_length=8, steps=8, block_length=4, logprobs=3, **opts)
    P, m = len(PROMPT), model.spec.mask_id
    top, top_ids = out.top_logprobs
    for j in range(8):
        s = int(out.commit_step[0, j])
        canvas = out.ids.clone()
        canvas[0, P:P + 8][out.commit_step[0] >= s] = m
        lp = torch.log_softmax(model.spec.align_logits(model(canvas))[0, P + j].double(), -1)
        tok = int(out.ids[0, P + j])
        assert math.isclose(float(out.logprobs[0, j]), float(lp[tok]), abs_tol=1e-5)  # the loop runs the head on the block rows only: float noise
        want_v, want_i = lp.topk(3)
        assert torch.allclose(top[0, j], want_v, atol=1e-5) and torch.equal(top_ids[0, j], want_i)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cached_logprobs_are_the_uncached_ones(models, cache):
    model = models["llada"]
    kw = dict(gen_length=16, steps=16, block_length=8, logprobs=2)
    ref = D.generate(model, [PROMPT, PROMPT[:3]], **kw)
    out = D.generate(model, [PROMPT, PROMPT[:3]], cache=cache, refresh=1, **kw)
    assert torch.equal(out.ids, ref.ids)
    assert torch.allclose(out.logprobs, ref.logprobs, atol=1e-5)
    assert torch.allclose(out.top_logprobs[0], ref.top_logprobs[0], atol=1e-5)


def test_greedy_tokens_are_their_steps_top_token_and_none_is_recorded_unasked(models):
    model = models["dream"]
    out = D.generate(model, [PROMPT], gen_length=8, steps=8, sampler="maskgit_plus", logprobs=1)
    assert torch.equal(out.top_logprobs[1][..., 0], out.generated)
    assert torch.equal(out.top_logprobs[0][..., 0], out.logprobs) and (out.logprobs <= 0).all()
    zero = D.generate(model, [PROMPT], gen_length=8, steps=8, sampler="maskgit_plus", logprobs=0)
    assert zero.top_logprobs is None and torch.equal(zero.logprobs, out.logprobs)
    plain = D.generate(model, [PROMPT], gen_length=8, steps=8, sampler="maskgit_plus")
    assert plain.logprobs is None and plain.top_logprobs is None and torch.equal(plain.ids, out.ids)


def test_positions_filled_by_stop_at_eos_have_no_logprob(models):
    from .test_infill import _EndsAt

    be = _EndsAt(models["llada"], len(PROMPT) + 1)
    out = D.generate(be, [PROMPT], gen_length=16, steps=16, block_length=4, stop_at_eos=True, logprobs=0)
    assert not out.logprobs[0, :4].isnan().any() and out.logprobs[0, 4:].isnan().all()


@pytest.mark.parametrize("value", [-1, 21, 1.5, True, "2"])
def test_bad_logprobs_are_refused(models, value):
    with pytest.raises(InputError, match="logprobs must be an integer in 0..20"):
        D.generate(models["llada"], [PROMPT], gen_length=8, steps=8, logprobs=value)
