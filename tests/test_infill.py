"""Infilling with a suffix: `generate(prompt, suffix_ids=...)` decodes the masks between a prompt and
the text after them, with every sampler, cache and decoding rule of the loop."""

import pytest
import torch

import dllm_export as D
from dllm_export import InputError
from dllm_export.runtime import TorchBackend

from .conftest import GOLDEN

PROMPT = [5, 17, 33, 2, 9, 41]
SUFFIX = [7, 61, 23, 88]


@pytest.fixture(scope="module")
def models():
    return {"llada": D.load_model(GOLDEN / "llada_gqa"), "dream": D.load_model(GOLDEN / "dream")}


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_suffix_is_kept_and_the_canvas_before_it_filled(models, family):
    model = models[family]
    out = D.generate(model, [PROMPT], suffix_ids=SUFFIX, gen_length=8, steps=8, block_length=4)
    assert out.ids.shape == (1, 6 + 8 + 4) and out.generated.shape == (1, 8) and out.commit_step.shape == (1, 8)
    assert out.ids[0, :6].tolist() == PROMPT and out.ids[0, -4:].tolist() == SUFFIX
    assert not (out.generated == model.spec.mask_id).any() and (out.commit_step >= 0).all()
    # the suffix is read: the fill differs from the one without it (same prompt, same schedule)
    plain = D.generate(model, [PROMPT], gen_length=8, steps=8, block_length=4)
    assert not torch.equal(plain.generated, out.generated)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_greedy_infill_with_a_suffix_is_infill_of_the_masked_canvas(models, family):
    """One block, one token per step, low_confidence = `infill` of prompt + masks + suffix, an
    independent loop (no quotas, no caches): the same ids, position by position."""
    model = models[family]
    m = model.spec.mask_id
    out = D.generate(model, [PROMPT], suffix_ids=[SUFFIX], gen_length=8, steps=8, sampler="low_confidence")
    ref = D.infill(model, torch.tensor([PROMPT + [m] * 8 + SUFFIX]))
    assert torch.equal(out.ids, ref)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("opts", [{"cache": "prefix", "refresh": 1}, {"cache": "dual", "refresh": 1},
                                  {"cache": "dual", "refresh_tokens": 1}])
def test_caches_refreshed_every_step_give_the_uncached_fill(models, family, opts):
    """The caches keep the suffix's keys/values with the prompt's: refreshed after every step they
    are the reference trace, commit steps included."""
    model = models[family]
    kw = dict(suffix_ids=SUFFIX, gen_length=16, steps=16, block_length=8)
    ref = D.generate(model, [PROMPT], **kw)
    out = D.generate(model, [PROMPT], **kw, **opts)
    assert torch.equal(out.ids, ref.ids) and torch.equal(out.commit_step, ref.commit_step)


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("opts", [{}, {"cache": "dual"}, {"threshold": 0.5, "cache": "prefix"}, {"cfg_scale": 1.0}])
def test_ragged_suffixes_in_a_batch_give_each_rows_own_fill(models, family, opts):
    """Rows with suffixes of other lengths (right-padded, masked) or none decode as they do alone."""
    model = models[family]
    prompts, suffixes = [PROMPT, PROMPT[:3], PROMPT[2:]], [SUFFIX, [], SUFFIX[:2]]
    kw = dict(gen_length=8, steps=8, block_length=4, **opts)
    out = D.generate(model, prompts, suffix_ids=suffixes, **kw)
    assert out.attention_mask[1, -4:].tolist() == [0] * 4 and out.attention_mask[2, -4:].tolist() == [1, 1, 0, 0]
    for i, (p, s) in enumerate(zip(prompts, suffixes)):
        alone = D.generate(model, [p], suffix_ids=[s], **kw)
        assert out.generated[i].tolist() == alone.generated[0].tolist()


def test_one_suffix_row_is_every_rows(models):
    model = models["llada"]
    a = D.generate(model, [PROMPT, PROMPT], suffix_ids=SUFFIX, gen_length=8, steps=8)
    b = D.generate(model, [PROMPT, PROMPT], suffix_ids=[SUFFIX, SUFFIX], gen_length=8, steps=8)
    assert torch.equal(a.ids, b.ids)
    assert torch.equal(D.generate(model, [PROMPT], suffix_ids=[], gen_length=8, steps=8).ids,
                       D.generate(model, [PROMPT], gen_length=8, steps=8).ids)


class _EndsAt(TorchBackend):
    """Ranks the end token first at one position of the canvas, as a model that closes the fill there."""

    def __init__(self, model, position: int):
        super().__init__(model)
        self.position = position

    def forward(self, ids, attention_mask=None, cache=None, rows=None):
        logits = super().forward(ids, attention_mask, cache=cache, rows=rows).clone()
        start = 0 if cache is None or cache.window is None else cache.window[0]
        start += 0 if rows is None else rows[0]
        k = self.position - start
        if 0 <= k < logits.shape[1]:
            logits[:, k, self.spec.eos_id] = 1e4
        return logits


def test_stop_at_eos_fills_up_to_the_suffix_and_keeps_it(models):
    model = models["llada"]
    be = _EndsAt(model, len(PROMPT) + 2)  # the fill ends with its third token
    kw = dict(suffix_ids=SUFFIX, gen_length=16, steps=16, block_length=4)
    ref = D.generate(be, [PROMPT], **kw)
    out = D.generate(be, [PROMPT], stop_at_eos=True, **kw)
    assert ref.generated[0, 2] == model.spec.eos_id
    assert torch.equal(out.generated[0, :4], ref.generated[0, :4]) and out.nfe == 4 < ref.nfe
    assert (out.generated[0, 4:] == model.spec.eos_id).all() and out.ids[0, -4:].tolist() == SUFFIX


@pytest.mark.parametrize("suffix, message", [
    ("abc", "suffix_ids are token ids, got a string"),
    ([1.5, 2], "suffix row 0 must be a list of integer token ids"),
    (torch.ones(2, 2), "suffix_ids must be integer token ids"),
    ([[1], [2], [3]], "suffix_ids has 3 rows for 1 prompt rows"),
    ([1, 1 << 70], "suffix row 0 holds an id beyond 64 bits"),
    ([1, 500], r"suffix token ids must lie in \[0, 128\)"),
    ([-1], r"suffix token ids must lie in \[0, 128\)"),
    ([1] * 60, r"prompt \(6 tokens\) \+ gen_length \(8\) \+ suffix \(60 tokens\) = 74 exceeds the model's context of 64 tokens"),
    (5, "suffix_ids must be a tensor or lists of token ids"),
])
def test_bad_suffixes_are_refused_in_one_line(models, suffix, message):
    with pytest.raises(InputError, match=message):
        D.generate(models["llada"], [PROMPT], suffix_ids=suffix, gen_length=8, steps=8)


def test_a_suffix_of_masks_is_refused(models):
    m = models["dream"].spec.mask_id
    with pytest.raises(InputError, match=f"the suffix holds the mask token \\(id {m}\\)"):
        D.generate(models["dream"], [PROMPT], suffix_ids=[3, m], gen_length=8, steps=8)
