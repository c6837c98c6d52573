"""Speculative sampling follows the target distribution (and a wrong rule is caught by the same test)."""

from __future__ import annotations

import math

import pytest
import torch

from flexspec_serve.engine import sampling as S

N_SAMPLES = 20_000
N_TREE_SAMPLES = 8_000  # a tree round costs more to draw; the wrong tree rule still scores p ~ 1e-35 at this size


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
    ids = torch.tensor([humaneval_prompts[2][:40]], device=family_models["v2"].device)
    with torch.inference_mode():
        p_row = S.probs(family_models["v2"](input_ids=ids).logits[0, -1:], params)[0].cpu()
        q_row = S.probs(family_models["draft"](input_ids=ids).logits[0, -1:], params)[0].cpu()
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


# --------------------------------------------------------------------------- token trees


def draw_tree(q_row, k, shape, gen):
    """A K-step tree as a sampling device draws it (context-free q): d_i ~ q, s_i ~ q without d_i, branch
    tokens ~ q; nodes and parents in wire order (`flexspec_serve.tree`)."""
    from flexspec_serve.tree import Tree, continuations, tree_parents

    conts = continuations(k, Tree(shape))
    chain = [S.sample(q_row, gen) for _ in range(k)]
    grown = [[S.sample_without(q_row, [d], gen)] + [S.sample(q_row, gen) for _ in range(n)]
             for d, n in zip(chain, conts)]
    return chain + [t for b in grown for t in b], tree_parents(k, [len(b) - 1 for b in grown])


def wrong_tree_rule(p, q, draft, parents, generator):
    """A plausible bug: every candidate is tried against the same p and q (no residual, q keeps the
    rejected candidates)."""
    u = torch.rand(len(draft), generator=generator)
    path, at = [], -1
    while True:
        kids = [j for j, parent in enumerate(parents) if parent == at]
        nxt = next((j for j in kids if u[j] <= p[at + 1, draft[j]] / q[at + 1, draft[j]]), None)
        if nxt is None:
            return path, S.sample(S.residual(p[at + 1], q[at + 1]), generator)
        path.append(nxt)
        at = nxt


def emitted_first_two_from_trees(rule, p_row, q_row, k, shape, n, seed):
    """`emitted_first_two` for token-tree rounds: [V*V] joint counts of the first two tokens out."""
    gen = torch.Generator().manual_seed(seed)
    v = p_row.numel()
    counts = torch.zeros(v, v)
    for _ in range(n):
        out: list[int] = []
        while len(out) < 2:
            draft, parents = draw_tree(q_row, k, shape, gen)
            rows = len(draft) + 1
            path, token = rule(p_row.expand(rows, v), q_row.expand(rows, v), draft, parents, gen)
            out += [draft[j] for j in path] + [token]
        counts[out[0], out[1]] += 1
    return counts.flatten()


@pytest.mark.parametrize("shape", ["second", "branches"])
def test_tree_sampling_emits_tokens_iid_from_target(shape):
    p, q = _skewed_pair()
    counts = emitted_first_two_from_trees(S.accept_sampling_tree, p, q, k=3, shape=shape, n=N_TREE_SAMPLES, seed=1)
    assert chi_square_p_value(counts, torch.outer(p, p).flatten()) > 1e-3


def test_wrong_tree_rule_fails_the_same_test():
    p, q = _skewed_pair()
    counts = emitted_first_two_from_trees(wrong_tree_rule, p, q, k=3, shape="second", n=N_TREE_SAMPLES, seed=1)
    assert chi_square_p_value(counts, torch.outer(p, p).flatten()) < 1e-6


def test_a_candidate_q_cannot_have_drawn_is_rejected_and_leaves_p_whole():
    """q puts all its mass on token 0, so the device has nothing left to draw a runner-up from and sends
    another token; the output still follows p."""
    p = torch.tensor([0.2, 0.5, 0.3])
    q = torch.tensor([1.0, 0.0, 0.0])
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(3)
    for _ in range(N_SAMPLES):
        path, token = S.accept_sampling_tree(p.expand(3, 3), q.expand(3, 3), [0, 2], [-1, -1], gen)
        counts[[0, 2][path[0]] if path else token] += 1
        assert path != [1]  # the runner-up q gives no mass is never accepted
    assert chi_square_p_value(counts, p) > 1e-3


def test_a_chain_decided_as_a_tree_matches_the_chain_rule():
    """The two rules draw the same random numbers, so on a chain they give the same answer."""
    p, q = _skewed_pair()
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        draft = [S.sample(q, gen) for _ in range(3)]
        a = S.accept_sampling(p.expand(4, -1), q.expand(3, -1), draft, torch.Generator().manual_seed(seed))
        path, token = S.accept_sampling_tree(p.expand(4, -1), q.expand(4, -1), draft, [-1, 0, 1],
                                             torch.Generator().manual_seed(seed))
        assert a == (len(path), token) and path == list(range(len(path)))
