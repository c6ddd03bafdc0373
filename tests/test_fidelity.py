"""Fidelity metrics (KLD, top-1 agreement, SQNR, ELBO difference) and the score intervals."""

import math
import random

import pytest
import torch

from dllm_export import InputError, load_model, load_tokenizer
from dllm_export.eval.fidelity import (DECODE, FidelityConfig, _decode_masks, build_reference, compare,
                                       decode_mask_ratios, paired_difference, to_markdown)
from dllm_export.eval.stats import paired_difference as paired_scores
from dllm_export.eval.stats import score_difference, unpaired_difference, wilson

CFG = FidelityConfig(ratios=(0.15, 0.5, DECODE), windows=6, window=48, gen_length=16, block_length=8,
                     decode_prompts=2)


@pytest.fixture(scope="module")
def llada(tiny_dirs):
    return load_model(tiny_dirs["llada"]), load_tokenizer(tiny_dirs["llada"])


@pytest.fixture(scope="module")
def reference(llada):
    return build_reference(llada[0], llada[1], CFG)


def _noisy(model, std: float, seed: int = 0, only: str | None = None):
    """A copy of `model` with Gaussian noise (relative `std`) on its block linears (or one of them)."""
    import copy

    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2 and "blocks" in name and (only is None or only in name):
                p.add_(torch.randn(p.shape, generator=g) * std * p.std())
    return m


def test_model_against_itself_is_zero(llada, reference):
    res = compare(llada[0], reference)
    s = res["summary"]
    assert s["kld_mean"] == 0 and s["kld_p99"] == 0 and s["top1"] == 1 and s["sqnr_db"] == math.inf
    assert s["elbo_diff_bits"] == 0 and s["positions"] == sum(r["positions"] for k, r in res["sets"].items()
                                                              if k != "elbo")
    assert set(res["sets"]) == {"t=0.15", "t=0.5", DECODE, "elbo"}
    assert "| **all** |" in to_markdown(res)


def test_deterministic_for_a_seed_and_masks_as_asked(llada, reference):
    again = build_reference(llada[0], llada[1], CFG)
    for k, s in reference.sets.items():
        assert torch.equal(s["mask"], again.sets[k]["mask"]) and torch.equal(s["logits"], again.sets[k]["logits"])
        assert not s["mask"][:, 0].any()  # position 0 always visible (Dream's shifted logits need it)
    assert (reference.sets["t=0.5"]["mask"].sum(1) == round(0.5 * 47)).all()  # exact counts
    other = build_reference(llada[0], llada[1], FidelityConfig(**{**CFG.__dict__, "seed": 1}))
    assert not torch.equal(other.sets["t=0.5"]["mask"], reference.sets["t=0.5"]["mask"])


def test_kld_grows_with_the_perturbation_and_pairs_tighter(llada, reference):
    small, big = (compare(_noisy(llada[0], s), reference) for s in (0.02, 0.2))
    a, b = small["summary"], big["summary"]
    assert 0 < a["kld_mean"] < b["kld_mean"] and a["top1"] >= b["top1"] and a["sqnr_db"] > b["sqnr_db"]
    assert b["kld_p99"] >= b["kld_mean"] and b["kld_se"] > 0 and b["elbo_diff_bits"] < a["elbo_diff_bits"] + 1e-9
    d = paired_difference(big, small)
    assert d["diff"] > 0 and d["significant"] and d["se"] < b["kld_se"]
    assert paired_difference(small, small) == {"diff": 0.0, "se": 0.0, "z": 0.0, "significant": False}


def test_decode_ratios_and_canvases(llada):
    model, tok = llada
    ratios = decode_mask_ratios(model, [[5, 6, 7]], gen_length=8, block_length=4)
    assert sorted(ratios, reverse=True) == [1 - i / 8 for i in range(8)]  # one commit per step
    masks = _decode_masks([1.0, 0.5, 0.25, 0.125], 20, 8, 4, torch.Generator().manual_seed(0))
    assert masks[:, :12].sum() == 0 and masks[0, 12:].all() and masks[1, 16:].all() and not masks[1, 12:16].any()
    assert masks[2, 16:].sum() == 2 and not masks[2, 12:16].any() and masks[3, 16:].sum() == 1
    assert masks.sum(1).tolist() == [8, 4, 2, 1]


def test_an_onnx_artifact_against_its_source(tiny_dirs, reference, tmp_path):
    pytest.importorskip("onnxruntime")
    from dllm_export.exporter.onnx import export_onnx
    from dllm_export.runtime.backends import load_backend

    export_onnx(tiny_dirs["llada"], tmp_path / "onnx")
    s = compare(load_backend(tmp_path / "onnx"), reference)["summary"]
    assert s["kld_mean"] < 1e-6 and s["top1"] > 0.99 and s["sqnr_db"] > 60


def test_bad_configs():
    with pytest.raises(InputError, match="mask ratio"):
        FidelityConfig(ratios=(1.5,))
    with pytest.raises(InputError, match="mask ratio"):
        FidelityConfig.parse_ratios("0.5,half")
    assert FidelityConfig.parse_ratios("0.15, decode") == (0.15, DECODE)
    with pytest.raises(InputError, match="ratios must be a list, got None"):  # 'NoneType' is not iterable
        FidelityConfig(ratios=None)
    with pytest.raises(InputError, match="windows must be an integer, got '8'"):
        FidelityConfig(windows="8")


# ---- intervals -------------------------------------------------------------------------------------

def test_wilson_known_values():
    lo, hi = wilson(0, 10)
    assert lo == 0 and abs(hi - 0.27753) < 1e-4  # the textbook value
    lo, hi = wilson(81, 263)
    assert abs(lo - 0.2553) < 1e-3 and abs(hi - 0.3662) < 1e-3  # Newcombe (1998) table I
    assert wilson(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("n", [20, 50, 100, 200])
def test_wilson_covers_the_truth_at_the_stated_rate(n):
    """Exact coverage (binomial sums, no simulation noise) over p = 0.01 .. 0.99: 95% on average,
    never far below (Wilson's known dips are ~0.91-0.93, the normal interval's reach 0.6)."""
    from math import comb

    cover = []
    for i in range(1, 100):
        p = i / 100
        cover.append(sum(comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)
                         if wilson(k, n)[0] <= p <= wilson(k, n)[1]))
    assert abs(sum(cover) / len(cover) - 0.95) < 0.006 and min(cover) > 0.9


@pytest.mark.parametrize("p_a,p_b,rho", [(0.9, 0.8, 0.5), (0.5, 0.5, 0.8), (0.7, 0.6, 0.0)])
def test_paired_difference_covers_the_truth(p_a, p_b, rho):
    """Correlated paired outcomes (a shared latent per item): the interval covers p_a - p_b ~95%,
    and is narrower than the unpaired one when the items are correlated."""
    rng = random.Random(1)
    n, trials, hit, widths = 100, 1000, 0, []
    for _ in range(trials):
        a, b = [], []
        for _ in range(n):
            u = rng.random()
            ua = u if rng.random() < rho else rng.random()
            ub = u if rng.random() < rho else rng.random()
            a.append(int(ua < p_a))
            b.append(int(ub < p_b))
        d = paired_scores(a, b)
        hit += d.lo <= p_a - p_b <= d.hi
        widths.append((d.hi - d.lo, (u := unpaired_difference(sum(a), n, sum(b), n)).hi - u.lo))
    assert 0.93 <= hit / trials <= 0.98
    if rho > 0:
        assert sum(w[0] for w in widths) < sum(w[1] for w in widths)


def test_difference_significance():
    same = [1] * 60 + [0] * 40
    assert not paired_scores(same, same).significant and paired_scores(same, same).diff == 0
    worse = [1] * 40 + [0] * 60  # 20 items lost, none gained
    d = score_difference({"score": 0.6, "n": 100, "outcomes": same}, {"score": 0.4, "n": 100, "outcomes": worse})
    assert d.paired and d.significant and abs(d.diff - 0.2) < 1e-12 and d.lo > 0
    u = score_difference({"score": 0.6, "n": 100}, {"score": 0.58, "n": 100})
    assert not u.paired and not u.significant
    with pytest.raises(InputError, match="same items"):
        paired_scores([1, 0], [1])


def test_eval_cli_fidelity(tiny_dirs, tmp_path, capsys):
    import json

    from dllm_export.cli import main

    d = str(tiny_dirs["dream"])
    out = tmp_path / "f.json"
    assert main(["eval", "--model", d, "--fidelity", "--reference", d, "--ratios", "0.5", "--windows", "2",
                 "--tasks", "arithmetic", "--items", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| t=0.5 |" in text and "arithmetic" in text and "[" in text
    res = json.loads(out.read_text())
    assert res["fidelity"]["summary"]["kld_mean"] == 0 and len(res["results"][0]["outcomes"]) == 2
    assert main(["eval", "--model", d, "--fidelity"]) == 2  # no manifest, no --reference
    assert "pass --reference" in capsys.readouterr().err
    assert main(["eval", "--model", d, "--fidelity", "--reference", d, "--ratios", "2"]) == 2
