"""The unmasking loop's API: shapes, batching, backends, determinism and input validation."""

import pytest
import torch

import dllm_export as D
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


def test_infilling_masks_in_the_prompt(llada):
    m = llada.spec.mask_id
    out = D.generate(llada, [[5, m, 33, m, 9]], gen_length=8, steps=8)
    assert not (out.ids == m).any()


@pytest.mark.parametrize("kwargs,message", [
    (dict(gen_length=60), "exceeds the model's context of 64"),
    (dict(gen_length=12, block_length=8), "not a multiple of block_length"),
    (dict(gen_length=16, steps=3, block_length=8), "must be a multiple of the number of blocks"),
    (dict(sampler="greedy"), "unknown sampler 'greedy'"),
    (dict(threshold=0.9, sampler="random"), "has none"),
    (dict(threshold=1.5), "threshold must lie in"),
    (dict(top_p=0.0), "top_p must lie in"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
])
def test_bad_arguments_raise_clear_errors(llada, kwargs, message):
    with pytest.raises(D.InputError, match=message):
        D.generate(llada, PROMPT, **{"gen_length": 16, **kwargs})


@pytest.mark.parametrize("prompt,message", [([[5, 500]], r"must lie in \[0, 128\)"), ([[5, -1]], "must lie in"),
                                            ([], "empty")])
def test_bad_prompts_raise_clear_errors(llada, prompt, message):
    with pytest.raises(D.InputError, match=message):
        D.generate(llada, prompt, gen_length=8)


def test_forward_rejects_out_of_vocab_ids(llada):
    with pytest.raises(D.InputError, match="token ids must lie in"):
        llada(torch.tensor([[1, 128]]))


def test_stops_early_when_nothing_is_left_to_unmask(llada):
    """More steps than tokens: the reference runs idle forwards; the loop skips them, same tokens."""
    out = D.generate(llada, PROMPT, gen_length=16, steps=32, block_length=8)
    assert out.nfe == 16
    ref = D.generate(llada, PROMPT, gen_length=16, steps=16, block_length=8)
    assert torch.equal(out.ids, ref.ids)
