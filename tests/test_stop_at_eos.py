"""`stop_at_eos` only trims the EOS tail: the blocks up to the first ended one are those of the full
loop, the rest is EOS, and fewer forwards run. Dream's dual cache keeps its reference semantics."""

import dataclasses

import pytest
import torch

import dllm_export as D
from dllm_export import InputError
from dllm_export.runtime import TorchBackend

from .conftest import GOLDEN

PROMPT = [5, 17, 33, 2, 9, 41]
P = len(PROMPT)


@pytest.fixture(scope="module")
def models():
    return {"llada": D.load_model(GOLDEN / "llada_gqa"), "dream": D.load_model(GOLDEN / "dream")}


class EosAt:
    """A torch backend that makes the end token the certain choice at one absolute position
    (`pos`, None = every position) of batch row `row` (with pos None: of the rows without left
    padding, which stay those rows when a batch drops its ended rows), so a random model writes an
    EOS there."""

    def __init__(self, model, pos: int | None, row: int = 0):
        self.inner = TorchBackend(model)
        self.spec, self.vocab_size, self.max_length = self.inner.spec, self.inner.vocab_size, self.inner.max_length
        self.name, self.supports_cache, self.supports_rows = "eos-at", True, True
        self.pos, self.row = pos, row
        self.token = self.spec.eos_id

    def forward(self, ids, attention_mask=None, cache=None, rows=None):
        out = self.inner.forward(ids, attention_mask, cache=cache, rows=rows).clone()
        if self.pos is None:
            unpadded = [r for r in range(out.shape[0]) if attention_mask is None or bool(attention_mask[r].all())]
            out[unpadded, :, self.token] += 100.0
            return out
        # raw row r predicts token r + shift; the output's first row is the absolute position `first`
        first = (0 if cache is None or cache.window is None else cache.window[0]) + (0 if rows is None else rows[0])
        r = self.pos - int(self.spec.shift_logits) - first
        if 0 <= r < out.shape[1]:
            out[self.row, r, self.token] += 100.0
        return out


@pytest.mark.parametrize("family", ["llada", "dream"])
@pytest.mark.parametrize("opts", [{}, {"threshold": 0.5}, {"cache": "dual", "threshold": 0.5}, {"cache": "prefix"}])
def test_stop_at_eos_only_trims_the_tail(models, family, opts):
    """An end token decoded in block 1 (of 3): with stop_at_eos blocks 0-1 are token- and
    step-identical to the full loop, block 2 is EOS, and the loop runs fewer forwards."""
    be = EosAt(models[family], pos=P + 11)
    kw = dict(gen_length=24, steps=24, block_length=8, **opts)
    ref = D.generate(be, [PROMPT], **kw)
    out = D.generate(be, [PROMPT], stop_at_eos=True, **kw)
    assert ref.generated[0, 11] == be.token  # the forced end token sits in block 1
    assert torch.equal(out.generated[:, :16], ref.generated[:, :16])
    assert torch.equal(out.commit_step[:, :16], ref.commit_step[:, :16])
    assert (out.generated[:, 16:] == models[family].spec.eos_id).all()
    assert out.nfe == int(ref.commit_step[0, :16].max()) + 1 < ref.nfe
    assert (out.commit_step[:, 16:] == out.nfe - 1).all()
    assert out.settings["stop_at_eos"] is True and ref.settings["stop_at_eos"] is False


def test_stop_at_eos_ends_rows_independently(models):
    """In a batch, a row that ended is filled with EOS; the other rows decode exactly as without."""
    be = EosAt(models["llada"], pos=None, row=0)
    kw = dict(gen_length=24, steps=24, block_length=8, cache="dual", threshold=0.5)
    ref = D.generate(be, [PROMPT, PROMPT[:4]], **kw)
    out = D.generate(be, [PROMPT, PROMPT[:4]], stop_at_eos=True, **kw)
    eos = models["llada"].spec.eos_id
    assert (out.generated[0] == eos).all() and torch.equal(out.generated[1], ref.generated[1])
    assert torch.equal(out.commit_step[1], ref.commit_step[1])


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_stop_at_eos_without_an_end_token_changes_nothing(models, family):
    """A trace with no end token (or one followed by text in the same block's tail) runs in full."""
    model = models[family]
    kw = dict(gen_length=16, steps=16, block_length=8)
    ref = D.generate(model, [PROMPT], **kw)
    ends = [i for i in (model.spec.eos_id, model.spec.eot_id) if i is not None]
    assert not torch.isin(ref.generated, torch.tensor(ends)).any()
    out = D.generate(model, [PROMPT], stop_at_eos=True, **kw)
    assert torch.equal(out.ids, ref.ids) and out.nfe == ref.nfe


def test_end_rows_needs_a_decoded_end_and_masks_after(models):
    """Infilling: masks left in the prompt region are decoded with the first block, so a block ends
    the row only once everything before it is decoded."""
    from dllm_export.runtime.loop import end_rows

    spec = dataclasses.replace(models["llada"].spec, eot_id=100)
    m, e = spec.mask_id, spec.eos_id
    x = torch.tensor([[1, 2, 3, e, m, m], [1, m, 3, e, m, m], [1, 2, 3, 4, m, m], [1, 2, 3, e, 7, m],
                      [1, 2, 100, 4, m, m], [e, 2, 3, 4, m, m]])
    # ended: an EOS / an end of turn in the generated part, all decoded, masks after (not: an EOS in the prompt)
    assert end_rows(x, 2, 4, spec, m).tolist() == [True, False, False, False, True, False]


@pytest.mark.parametrize("sampler", ["entropy", "maskgit_plus"])
def test_dream_dual_cache_decodes_the_block_from_block_rows(models, sampler):
    """Dream (shifted logits) with the dual cache: refresh every step is the reference; without
    refresh it still fills every position, block by block, in fewer full forwards."""
    model = models["dream"]
    kw = dict(gen_length=24, steps=24, block_length=8, sampler=sampler)
    ref = D.generate(model, [PROMPT, PROMPT[:3]], **kw)
    same = D.generate(model, [PROMPT, PROMPT[:3]], cache="dual", refresh=1, **kw)
    assert torch.equal(ref.ids, same.ids) and torch.equal(ref.commit_step, same.commit_step)
    fast = D.generate(model, [PROMPT, PROMPT[:3]], cache="dual", threshold=0.3, **{**kw, "sampler": None})
    assert (fast.generated != model.spec.mask_id).all() and fast.nfe <= ref.nfe


def test_with_preset_fills_open_options_by_backend():
    from dllm_export.runtime.loop import with_preset

    assert with_preset("edge", {"threshold": None}) == {"cache": "dual", "threshold": 0.99, "refresh_tokens": 16,
                                                        "stop_at_eos": True}
    assert with_preset("edge", {}, supports_cache=False) == {"threshold": 0.99, "stop_at_eos": True}
    # the preset's cache refresh goes with its cache; one asked for is kept (and refused by the plan)
    assert with_preset("edge", {"cache": "none", "stop_at_eos": False}) == {"cache": "none", "stop_at_eos": False,
                                                                          "threshold": 0.99}
    assert with_preset("edge", {"cache": "none", "refresh_tokens": 4})["refresh_tokens"] == 4
    assert with_preset("edge", {"factor": 1.0}) == {"factor": 1.0}  # a factor excludes the preset's threshold
    assert with_preset("reference", {"cache": None}) == {}
    with pytest.raises(InputError, match="unknown preset 'fast'"):
        with_preset("fast", {})


@pytest.mark.parametrize("extra,want", [
    ([], dict(cache="none", threshold=None, refresh_tokens=None, stop_at_eos=False)),
    (["--preset", "edge"], dict(cache="dual", threshold=0.99, refresh_tokens=16, stop_at_eos=True)),
    (["--preset", "edge", "--cache", "prefix", "--threshold", "0.5", "--refresh-tokens", "4"],
     dict(cache="prefix", threshold=0.5, refresh_tokens=4, stop_at_eos=True)),
    (["--stop-at-eos"], dict(cache="none", threshold=None, stop_at_eos=True)),
])
def test_cli_preset_fills_only_the_options_left_open(tiny_dirs, capsys, extra, want):
    import json

    from dllm_export.cli import main

    rc = main(["generate", "--model", str(tiny_dirs["llada"]), "--prompt", "12+34=", "--gen-length", "16",
               "--block-length", "8", "--json", "--no-progress", *extra])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and {k: out["settings"][k] for k in want} == want
    assert out["timings"]["tokens_per_step"] == pytest.approx(16 / out["nfe"], abs=1e-3)


class _Rows(EosAt):
    """EosAt that records the rows of every forward."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rows = []

    def forward(self, ids, attention_mask=None, cache=None, rows=None):
        self.rows.append(ids.shape[0])
        return super().forward(ids, attention_mask, cache=cache, rows=rows)


@pytest.mark.parametrize("opts", [{}, {"cache": "dual", "threshold": 0.5}, {"cache": "prefix"}, {"cfg_scale": 1.0}])
def test_a_batch_drops_its_ended_rows(models, opts):
    """Once a row has ended (stop_at_eos), the next blocks' forwards leave it out: the other rows
    decode as they do alone, the hooks still see the whole batch's canvas, logprobs land in the
    right rows, and the forwards after the first block carry the two rows left (four with guidance)."""
    be = _Rows(models["llada"], pos=None)  # the unpadded row ends at once
    prompts = [PROMPT, PROMPT[:4], PROMPT[1:]]
    kw = dict(gen_length=24, steps=24, block_length=8, stop_at_eos=True, logprobs=1, **opts)
    seen = []
    out = D.generate(be, prompts, on_canvas=lambda x: seen.append(x.clone()), **kw)
    assert (out.generated[0] == be.token).all() and torch.equal(seen[-1], out.ids) and seen[0].shape[0] == 3
    per_row = 2 if opts.get("cfg_scale") else 1
    assert set(be.rows[-4:]) == {2 * per_row}  # rows 1 and 2 (padded) decode on
    for i in (1, 2):
        alone = D.generate(TorchBackend(models["llada"]), [prompts[i]], **kw)
        assert torch.equal(out.generated[i], alone.generated[0]), i
        assert torch.allclose(out.logprobs[i], alone.logprobs[0], atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("opts", [{"sampler": "maskgit_plus"}, {"sampler": "random", "seed": 1},
                                  {"temperature": 0.5, "seed": 1}])
def test_rows_that_share_draws_or_a_quota_stay_in_the_batch(models, opts):
    """Dream's batch-mean quota and shared random draws tie a row's tokens to its batch: there the
    ended rows stay in every forward (the traces are those of the reference loops)."""
    model = models["dream"] if opts.get("sampler") == "maskgit_plus" else models["llada"]
    be = _Rows(model, pos=None)
    D.generate(be, [PROMPT, PROMPT[:4]], gen_length=24, steps=24, block_length=8, stop_at_eos=True, **opts)
    assert set(be.rows) == {2}
