"""Token trees in sampling sessions: the device draws each position's candidates from q without replacement,
the cloud decides them by recursive rejection sampling with its own draft copy's q, and the output follows
the target's distribution (the rule itself is tested on synthetic p, q in `test_sampling.py`)."""

from __future__ import annotations

import pytest
import torch

from flexspec_serve.engine.generate import speculative_generate
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.engine.sampling import SamplingParams, probs
from flexspec_serve.engine.verifier import Verifier, VerifyRequest
from flexspec_serve.transport import LocalTransport
from flexspec_serve.tree import on_chain
from flexspec_serve.engine.generate import reference_greedy
from test_sampling import chi_square_p_value

N_SESSIONS = 1500


@pytest.mark.parametrize("tree", ["second", "branches"])
def test_sampled_trees_emit_the_targets_first_token_distribution(family_models, humaneval_prompts, tree):
    """N sessions of one prompt, each with its own seed: the first token out follows p. (At this prompt and
    temperature, a verifier that tries every candidate against the same p and q fails this test: p ~ 1e-6.)"""
    prompt = humaneval_prompts[5][:40]
    params = SamplingParams(0.7, 1.0, 5)
    with torch.inference_mode():
        ids = torch.tensor([prompt], device=family_models["v2"].device)
        p_row = probs(family_models["v2"](input_ids=ids).logits[0, -1:], params)[0].cpu()  # [V]
    clients = speculative_generate(DraftProposer(family_models["draft"]),
                                   Verifier(family_models["v2"], family_models["draft"]),
                                   [prompt] * N_SESSIONS, 4, 3, sampling=params, tree=tree)
    firsts = [c.rounds[0] for c in clients]
    assert all(r.path is not None for r in firsts)  # every first round was a tree of K = 3
    assert sum(bool(r.path) and not on_chain(r.path) for r in firsts) > N_SESSIONS // 20  # runner-ups do get in
    counts = torch.bincount(torch.tensor([c.tokens[0] for c in clients]), minlength=p_row.numel()).float()
    assert chi_square_p_value(counts, p_row) > 1e-3


def test_a_vanishing_top_p_decodes_a_sampled_tree_as_greedy_and_never_takes_a_runner_up(family_models,
                                                                                       humaneval_prompts):
    """q keeps one token only, so the device has no runner-up to draw and sends another token, which the cloud
    must never accept: the output is the target's greedy one and every path stays on the chain."""
    prompts = humaneval_prompts[:6]
    want = [reference_greedy(family_models["v1"], p, 16) for p in prompts]
    clients = speculative_generate(DraftProposer(family_models["draft"]),
                                   Verifier(family_models["v1"], family_models["draft"]), prompts, 16, 3,
                                   sampling=SamplingParams(1.0, 1e-9, 3), tree="branches")
    assert [c.tokens for c in clients] == want
    assert all(on_chain(list(r.path)) for c in clients for r in c.rounds if r.path is not None)
    assert any(r.path is not None for c in clients for r in c.rounds)


def _sampled_requests(proposer, sessions, prompts, seq, ks, params, tree="branches"):
    props = proposer.propose(sessions, ks, tree=tree)
    return props, [VerifyRequest(s.session_id, seq, tuple(pr.tokens),
                                 full_context=tuple(p) if seq == 0 else None, sampling=params(i),
                                 parents=None if pr.parents is None else tuple(pr.parents))
                   for i, (s, p, pr) in enumerate(zip(sessions, prompts, props))]


def test_sampled_tree_rounds_batched_equal_one_at_a_time_and_keep_both_caches_true(family_models,
                                                                                   humaneval_prompts, needs_variety):
    """Ragged K, trees and chains mixed (K = 0 sends none); afterwards every cache covers exactly the committed
    tokens but the last, so the next round's q and p are a fresh session's."""
    prompts = [p[: 9 + 5 * i] for i, p in enumerate(humaneval_prompts[:5])]
    params = lambda i: SamplingParams(0.9, 1.0, i)  # noqa: E731
    runs = []
    for one_at_a_time in (True, False):
        proposer = DraftProposer(family_models["draft"])
        verifier = Verifier(family_models["v2"], family_models["draft"])
        sessions = [proposer.start(f"s{i}", p, params(i)) for i, p in enumerate(prompts)]
        log = []
        for seq in range(4):
            props, reqs = _sampled_requests(proposer, sessions, prompts, seq, [(i + seq) % 5 for i in range(5)],
                                            params)
            outs = [verifier.verify([r])[0] for r in reqs] if one_at_a_time else verifier.verify(reqs)
            for s, pr, o in zip(sessions, props, outs):
                path = list(o.path) if o.path is not None else list(range(o.accepted))
                if pr.parents is None:
                    proposer.apply(s, pr.tokens, o.accepted, o.token)
                else:
                    proposer.apply_tree(s, [pr.tokens[j] for j in path], o.token)
                log.append((tuple(pr.tokens), o.path, o.token))
                held = verifier.sessions[s.session_id]
                assert held.tokens == s.tokens
                assert held.target.length == held.draft.length == len(s.tokens) - 1 or pr.parents is None
        runs.append(log)
    assert runs[0] == runs[1]
    needs_variety(any(path and not on_chain(list(path)) for _, path, _ in runs[0]), "a round that accepts a runner-up")


def test_a_sampled_tree_session_resynced_mid_run_continues_identically(family_models, humaneval_prompts):
    prompts = humaneval_prompts[4:8]
    params = SamplingParams(0.8, 1.0, 11)

    class Evicting(LocalTransport):
        calls = 0

        def round_trip(self, rounds):
            self.calls += 1
            if self.calls == 4:
                for r in rounds:
                    self.verifier.drop_session(r.session_id)
            return super().round_trip(rounds)

    def run(transport_cls):
        verifier = Verifier(family_models["v3"], family_models["draft"])
        return speculative_generate(DraftProposer(family_models["draft"]), transport_cls(verifier), prompts, 24, 3,
                                    sampling=params, tree="branches")

    plain, evicted = run(LocalTransport), run(Evicting)
    assert [c.tokens for c in plain] == [c.tokens for c in evicted]
    assert sum(c.resyncs for c in evicted) == len(prompts) and not any(c.resyncs for c in plain)


@pytest.mark.parametrize("path, ahead", [("clean", "pipeline"), ("flaky", "draft")])
def test_sampling_fleet_devices_send_trees_and_every_round_the_cloud_decided_is_used(family_models,
                                                                                     humaneval_prompts, path, ahead):
    from flexspec_serve.transport import AsyncLocalTransport
    from tests.test_fleet import assert_all_completed, FlakyTransport, WireSpy, run_shard, small_fleet

    prompts = [p[-40:] for p in humaneval_prompts[:6]]
    spec = small_fleet(tree="branches", ahead=ahead, max_new_tokens=24, devices=8, temperature=0.8,
                       policy="fixed-2")  # always pipelines: the adaptive one may learn that sampled guesses rarely hit
    verifier = Verifier(family_models["v1"], family_models["draft"], name="v1")
    inner = AsyncLocalTransport(verifier)
    spy = WireSpy(FlakyTransport(inner) if path == "flaky" else inner)
    res = run_shard(spec, prompts, family_models, transport=spy, verifier=verifier)
    sent = spy.sent  # what went on the wire
    assert_all_completed(res)
    assert all(len(s["tokens"]) == 24 for s in res.sessions)
    assert all(r.tree_parents for r in sent if r.draft_tokens)  # sampling devices send trees too
    decided = sum(verifier.session_stats(s["session"]).rounds for s in res.sessions)
    assert decided == len(res.rounds)  # a retried round is answered from the stored outcome, not decided again
    if ahead == "pipeline":
        assert any(r["pipelined"] for r in res.rounds)
