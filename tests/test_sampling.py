"""Speculative sampling follows the target distribution (and a wrong rule is caught by the same test)."""

from __future__ import annotations

import math

import pytest
import torch

from flexspec_serve.engine import sampling as S

N_SAMPLES = 20_000


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; cells with small expectation are pooled into one."""
    expected = probs * counts.sum()
    small = expected < min_expected
    obs = torch.cat([counts[~small], counts[small].sum(0, keepdim=True)])
    exp = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return _chi2_sf(stat, dof)


def _chi2_sf(x: float, k: int) -> float:
    """Survival function of chi-square via the Wilson-Hilferty normal approximation (good for k >= 3)."""
    z = ((x / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def wrong_rule(p, q, draft, generator):
    """A plausible bug: on rejection, resample from p instead of normalize(max(0, p - q))."""
    k = len(draft)
    u = torch.rand(k, generator=generator)
    for i, d in enumerate(draft):
        if u[i] > p[i, d] / q[i, d]:
            return i, S.sample(p[i], generator)
    return k, S.sample(p[k], generator)


def emitted_first_two(rule, p_row, q_row, k, n, seed):
    """Run rounds with context-free p, q until two tokens are out; return their joint counts [V, V]."""
    gen = torch.Generator().manual_seed(seed)
    v = p_row.numel()
    p, q = p_row.expand(k + 1, v), q_row.expand(k, v)
    counts = torch.zeros(v, v)
    for _ in range(n):
        out: list[int] = []
        while len(out) < 2:
            draft = [S.sample(q_row, gen) for _ in range(k)]
            accepted, token = rule(p, q, draft, gen)
            out += draft[:accepted] + [token]
        counts[out[0], out[1]] += 1
    return counts.flatten()


def _skewed_pair(v=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(v, generator=g) * 1.5, 0)
    q = torch.softmax(torch.randn(v, generator=g) * 1.5, 0)
    return p, q


def test_speculative_sampling_emits_tokens_iid_from_target():
    p, q = _skewed_pair()
    counts = emitted_first_two(S.accept_sampling, p, q, k=3, n=N_SAMPLES, seed=1)
    assert chi_square_p_value(counts, torch.outer(p, p).flatten()) > 1e-3


def test_wrong_acceptance_rule_fails_the_same_test():
    p, q = _skewed_pair()
    counts = emitted_first_two(wrong_rule, p, q, k=3, n=N_SAMPLES, seed=1)
    assert chi_square_p_value(counts, torch.outer(p, p).flatten()) < 1e-6


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_first_token_follows_real_target_distribution(family_models, humaneval_prompts, top_p):
    """Real draft and target at a fixed position of a HumanEval prompt, temperature 1."""
    params = S.SamplingParams(1.0, top_p, 0)
    ids = torch.tensor([humaneval_prompts[2][:40]])
    with torch.inference_mode():
        p_row = S.probs(family_models["v2"](input_ids=ids).logits[0, -1:], params)[0]
        q_row = S.probs(family_models["draft"](input_ids=ids).logits[0, -1:], params)[0]
    gen = torch.Generator().manual_seed(2)
    k = 2
    q = q_row.expand(k, -1)
    counts = torch.zeros_like(p_row)
    for _ in range(N_SAMPLES):
        draft = torch.multinomial(q_row, k, replacement=True, generator=gen).tolist()
        accepted, token = S.accept_sampling(p_row.expand(k + 1, -1), q, draft, gen)
        counts[draft[0] if accepted else token] += 1
    tv = 0.5 * (counts / N_SAMPLES - p_row).abs().sum().item()
    assert chi_square_p_value(counts, p_row) > 1e-3
    assert tv < 0.05, tv


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = S.probs(logits, S.SamplingParams(1.0, 0.7, 0))[0]
    assert out[2] == 0 and out[3] == 0
    torch.testing.assert_close(out[:2], torch.tensor([0.625, 0.375]))


@pytest.mark.parametrize("top_p", [5e-324, 2.1e-79, 1e-12])
def test_a_vanishing_top_p_keeps_the_most_likely_token(top_p):  # found by the schemathesis run
    logits = torch.tensor([[0.1, 2.0, 0.3, 1.9], [0.0, 0.0, 0.0, 0.0]])
    x = S.probs(logits, S.SamplingParams(10.0, top_p, 0))
    assert torch.isfinite(x).all() and x[0].tolist() == [0.0, 1.0, 0.0, 0.0] and x[1].sum() == 1.0


def test_greedy_acceptance_counts_the_matching_prefix():
    logits = torch.full((4, 5), -1.0)
    for pos, tok in enumerate([2, 4, 1, 3]):
        logits[pos, tok] = 1.0
    assert S.accept_greedy(logits, [2, 4, 0]) == (2, 1)
    assert S.accept_greedy(logits, [2, 4, 1]) == (3, 3)  # bonus
    assert S.accept_greedy(logits[:1], []) == (0, 2)


def test_sampling_params_reject_bad_values():
    with pytest.raises(ValueError, match="top_p"):
        S.SamplingParams(1.0, 0.0, 0)
    with pytest.raises(ValueError, match="temperature"):
        S.SamplingParams(-1.0)
