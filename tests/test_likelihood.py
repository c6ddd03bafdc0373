"""The Monte-Carlo ELBO estimators against the exact expectation, enumerated on a tiny model."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import dllm_export as D
from dllm_export.eval.likelihood import elbo

from .conftest import GOLDEN


def exact_llada_elbo(model, prompt, answer) -> float:
    """E over l ~ U{1..L} and uniformly random l-subsets S of (L / l) sum_{i in S} log p(x_i | x_{not S})."""
    L, P = len(answer), len(prompt)
    seq = torch.tensor(prompt + answer)
    total = 0.0
    for l in range(1, L + 1):
        subsets = list(itertools.combinations(range(L), l))
        x = seq.repeat(len(subsets), 1)
        for r, S in enumerate(subsets):
            x[r, [P + i for i in S]] = model.spec.mask_id
        logits = model(x).double()
        if model.spec.shift_logits:
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        logp = F.log_softmax(logits, dim=-1)
        acc = 0.0
        for r, S in enumerate(subsets):
            acc += sum(float(logp[r, P + i, seq[P + i]]) for i in S)
        total += (L / l) * acc / len(subsets) / L
    return total


@pytest.mark.parametrize("name", ["llada_mha", "dream"])
def test_mc_estimator_matches_exact_expectation(name):
    model = D.load_model(GOLDEN / name)
    prompt, answer = [5, 17, 33], [9, 41, 2, 77]
    exact = exact_llada_elbo(model, prompt, answer)
    est = elbo(model, prompt, answer, mc=512, batch=16, seed=0)
    assert abs(est.elbo - exact) <= 4 * est.stderr, (est, exact)
    again = elbo(model, prompt, answer, mc=512, batch=16, seed=0)
    assert again == est


def test_elbo_is_a_lower_bound_on_single_token_answers():
    """With one answer token the estimator is exact: log p(x | prompt) with the answer masked."""
    model = D.load_model(GOLDEN / "llada_mha")
    x = torch.tensor([[5, 17, 33, model.spec.mask_id]])
    want = float(F.log_softmax(model(x)[0, 3].double(), -1)[9])
    assert math.isclose(elbo(model, [5, 17, 33], [9], mc=16).elbo, want, rel_tol=1e-6)


def test_dream_estimator_runs_and_is_seeded():
    model = D.load_model(GOLDEN / "dream")
    a = elbo(model, [5], [9, 41, 2, 77, 8, 8], mc=64, estimator="dream", seed=3)
    assert a == elbo(model, [5], [9, 41, 2, 77, 8, 8], mc=64, estimator="dream", seed=3)
    assert a.elbo < 0 and a.stderr > 0
