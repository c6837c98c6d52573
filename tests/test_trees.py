"""Token trees: a round whose draft tokens form a tree (several candidates per position), verified in one
forward pass with a tree attention mask; greedy decoding stays the target's own."""

from __future__ import annotations

import pytest
import torch

from flexspec_serve.engine.ragged import CachedSequence, run_ragged
from flexspec_serve.engine.generate import reference_greedy

CTX_A, CTX_B = [5, 6, 7, 8, 9, 10], [11, 12]


def _chain_logits(model, context, path):
    """Logits after each token of context + path, computed as a plain sequence."""
    return run_ragged(model, [CachedSequence()], [context + path])[0]


def test_each_tree_node_sees_only_its_ancestors_in_a_ragged_batch(family_models):
    model = family_models["v1"]
    a, b = CachedSequence(), CachedSequence()
    run_ragged(model, [a], [CTX_A[:-1]])
    run_ragged(model, [b], [CTX_B])
    # session a: the last context token, then the tree 3 -> 4, 3 -> 20, 21 (a second root child)
    tree_a = [3, 4, 20, 21]
    parents_a = [-1, 0, 0, -1]
    out = run_ragged(model, [a, b], [[CTX_A[-1]] + tree_a, [13, 14]], trees=[parents_a, None])
    ref_34, ref_320, ref_21 = (_chain_logits(model, CTX_A, p) for p in ([3, 4], [3, 20], [21]))
    for got, want in ((out[0][0], ref_34[-3]), (out[0][1], ref_34[-2]), (out[0][2], ref_34[-1]),
                      (out[0][3], ref_320[-1]), (out[0][4], ref_21[-1])):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], _chain_logits(model, CTX_B, [13, 14])[-2:], atol=1e-4, rtol=1e-4)
    assert a.length == len(CTX_A) + 4 and b.length == len(CTX_B) + 2


def test_keeping_the_accepted_path_leaves_the_cache_of_that_path_alone(family_models):
    model = family_models["v1"]
    tree = CachedSequence()
    run_ragged(model, [tree], [CTX_A[:-1]])
    run_ragged(model, [tree], [[CTX_A[-1], 3, 4, 20]], trees=[[-1, 0, 0]])
    tree.keep(len(CTX_A), [0, 2])  # accepted 3 -> 20
    plain = CachedSequence()
    run_ragged(model, [plain], [CTX_A + [3, 20]])
    assert tree.length == plain.length == len(CTX_A) + 2
    nxt_tree = run_ragged(model, [tree], [[30]])[0]
    nxt_plain = run_ragged(model, [plain], [[30]])[0]
    torch.testing.assert_close(nxt_tree, nxt_plain, atol=1e-4, rtol=1e-4)


def test_a_node_whose_parent_comes_later_is_refused(family_models):
    with pytest.raises(ValueError, match="parent"):
        run_ragged(family_models["v1"], [CachedSequence()], [[1, 2, 3]], trees=[[-1, 1]])


# --------------------------------------------------------------------------- rounds with second choices

VERSIONS = ("v1", "v2", "v3")
MAX_NEW = 20


def _generate(family_models, prompts, version, k, tree, transport=None):
    from flexspec_serve.engine.generate import speculative_generate
    from flexspec_serve.engine.proposer import DraftProposer
    from flexspec_serve.engine.verifier import Verifier

    verifier = Verifier(family_models[version], family_models["draft"])
    return speculative_generate(DraftProposer(family_models["draft"]), transport or verifier, prompts, MAX_NEW, k,
                                tree=tree), verifier


@pytest.mark.parametrize("version, tree", [(v, t) for v in VERSIONS for t in ("second", "branches")])
def test_token_trees_keep_greedy_output_and_add_tokens_per_round(family_models, humaneval_prompts, version, tree,
                                                                 needs_variety):
    from flexspec_serve.transport import LocalTransport
    from flexspec_serve.tree import on_chain

    prompts = humaneval_prompts[:16]
    want = [reference_greedy(family_models[version], p, MAX_NEW) for p in prompts]
    chain, _ = _generate(family_models, prompts, version, 3, "chain")
    trees, verifier = _generate(family_models, prompts, version, 3, tree)
    assert [c.tokens for c in trees] == [c.tokens for c in chain] == want
    off_chain = [r.path for c in trees for r in c.rounds if not on_chain(r.path)]  # through a runner-up
    assert all(r.accepted == len(r.path) for c in trees for r in c.rounds if r.path is not None)
    needs_variety(bool(off_chain), "a round that accepts a runner-up")
    # K = 3: nodes 0-2 are the chain; a second-choices tree has 3 runner-ups, a branches tree their continuations
    assert max(p[-1] for p in off_chain) > (5 if tree == "branches" else 2)
    assert sum(len(c.rounds) for c in trees) < sum(len(c.rounds) for c in chain)
    over_the_wire, _ = _generate(family_models, prompts[:4], version, 3, tree,
                                 transport=LocalTransport(verifier))  # compact encoding both ways
    assert [c.tokens for c in over_the_wire] == want[:4]


def test_batched_tree_verification_equals_one_at_a_time(family_models, humaneval_prompts):
    from flexspec_serve.engine.proposer import DraftProposer
    from flexspec_serve.engine.sampling import SamplingParams
    from flexspec_serve.engine.verifier import Verifier, VerifyRequest

    proposer = DraftProposer(family_models["draft"])
    prompts = [p[: 9 + 5 * i] for i, p in enumerate(humaneval_prompts[:5])]  # different context lengths
    sessions = [proposer.start(f"s{i}", p, SamplingParams()) for i, p in enumerate(prompts)]
    props = proposer.propose(sessions, [1, 2, 3, 4, 0], tree="branches")
    reqs = [VerifyRequest(f"s{i}", 0, tuple(pr.tokens), full_context=tuple(p),
                          parents=None if pr.parents is None else tuple(pr.parents))
            for i, (p, pr) in enumerate(zip(prompts, props))]
    batched = Verifier(family_models["v2"]).verify(reqs)
    alone = Verifier(family_models["v2"])
    one_by_one = [alone.verify([r])[0] for r in reqs]
    strip = lambda o: (o.accepted, o.token, o.bonus, o.path, o.context_len)  # noqa: E731 (timings differ)
    assert [strip(o) for o in batched] == [strip(o) for o in one_by_one]
    assert [o.path is None for o in batched] == [False, False, False, False, True]  # K = 0 sends no tree


@pytest.mark.parametrize("parents, why", [([-1, 0], "one parent per draft token"), ([-1, 0, 2], "earlier node"),
                                          ([0, -1, -1], "earlier node")])
def test_a_malformed_tree_is_refused_naming_parents(family_models, parents, why):
    from flexspec_serve.engine import InvalidRequest
    from flexspec_serve.engine.verifier import Verifier, VerifyRequest

    req = VerifyRequest("s", 0, (4, 5, 6), full_context=(1, 2, 3), parents=tuple(parents))
    out = Verifier(family_models["v1"]).verify([req])[0]
    assert isinstance(out, InvalidRequest) and out.field == "parents" and why in str(out)


def test_sampled_trees_need_a_draft_copy_and_a_pipelined_tree_waits_for_its_predecessor(family_models):
    from flexspec_serve.engine import InvalidRequest
    from flexspec_serve.engine.errors import ConditionNotMet
    from flexspec_serve.engine.sampling import SamplingParams
    from flexspec_serve.engine.verifier import RoundOutcome, Verifier, VerifyRequest

    sampled = VerifyRequest("s", 0, (4, 5), full_context=(1, 2, 3), sampling=SamplingParams(0.8), parents=(-1, -1))
    piped = VerifyRequest("t", 1, (4, 5), assume=(7, 8), parents=(-1, 0))
    refused, waiting = Verifier(family_models["v1"]).verify([sampled, piped])
    assert isinstance(refused, InvalidRequest) and refused.field == "sampling"  # q needs the draft copy
    assert isinstance(waiting, ConditionNotMet)  # a well-formed tree; its assumption is what is checked
    decided = Verifier(family_models["v1"], family_models["draft"]).verify([sampled])[0]
    assert isinstance(decided, RoundOutcome) and decided.path in ((), (0,), (1,))


def test_tree_rounds_and_their_answers_round_trip_both_encodings():
    from flexspec_serve import protocol as P

    r = P.DraftRound(session_id="s", seq=3, draft_tokens=[5, 9, 6, 2], tree_parents=[-1, -1, 0, 0])
    assert P.decode_round(P.encode_round(r)) == r == P.DraftRound.model_validate_json(r.model_dump_json())
    res = P.RoundResult(session_id="s", seq=3, accepted=2, token=7, bonus=True, version="v1", context_len=9,
                        path=[0, 3])
    assert P.decode_result(P.encode_result(res)) == res
    plain = res.model_copy(update={"path": None})
    assert P.decode_result(P.encode_result(plain)) == plain
    with pytest.raises(P.ProtocolError, match="tree_parents"):
        P.validate(P.DraftRound, {"session_id": "s", "seq": 0, "tree_parents": [-2]})


def test_an_emulated_device_pays_verify_time_for_every_node_and_feeds_a_taken_runner_up_next_round():
    from flexspec_serve import protocol as P
    from flexspec_serve.edge.channels import make_link
    from flexspec_serve.edge.controller import FixedK
    from flexspec_serve.edge.devices import DEVICE_CLASSES, CloudProfile
    from flexspec_serve.edge.emulator import EmulatedDevice
    from flexspec_serve.engine.generate import RoundEvent
    from flexspec_serve.tree import tree_parents

    cloud = CloudProfile()

    def round_(path, conts=None):
        parents = None if conts is None else tuple(tree_parents(3, conts))
        dev = EmulatedDevice("d", DEVICE_CLASSES["flagship-phone"], make_link("good", 0), FixedK(k=3), cloud,
                             tree="chain" if conts is None else "second" if not any(conts) else "branches")
        res = P.RoundResult(session_id="s", seq=0, accepted=len(path), token=7, bonus=False, version="v1",
                            context_len=40, path=path if parents else None)
        rec = dev.finish_round(RoundEvent(0, 0, 3, len(path), 30, 20, res, False, parents))
        return dev, rec

    chain_dev, chain = round_([0, 1])
    tree_dev, tree = round_([0, 4], [0, 0, 0])  # d_1, then s_2: the runner-up at position 2 (nodes d1-d3 s1 s2 s3)
    assert tree.verify_ms - chain.verify_ms == pytest.approx(3 * cloud.verify_ms_per_token)  # 6 nodes, not 3
    assert tree.draft_ms == chain.draft_ms  # runner-ups cost no draft step
    assert (chain_dev.backlog_tokens, tree_dev.backlog_tokens) == (1, 2)  # s_2 and the token are unfed
    # branches: d1-d3, s1 e1 e2, s2 e1, s3 (9 nodes); the path s_1 e_1 ends on a node the draft fed
    fed_dev, fed = round_([3, 4], [2, 1, 0])
    leaf_dev, _ = round_([0, 6, 7], [2, 1, 0])  # d_1, s_2, its e_1: a leaf
    assert fed.verify_ms - chain.verify_ms == pytest.approx(6 * cloud.verify_ms_per_token)
    assert fed.draft_ms == chain.draft_ms and (fed_dev.backlog_tokens, leaf_dev.backlog_tokens) == (1, 2)


@pytest.mark.parametrize("path, ahead, tree", [
    ("clean", "off", "second"), ("flaky", "off", "second"), ("evicting", "off", "second"), ("clean", "draft", "second"),
    ("clean", "pipeline", "second"), ("flaky", "pipeline", "second"), ("flaky", "off", "branches"),
    ("clean", "draft", "branches"), ("clean", "pipeline", "branches")])
def test_fleet_devices_sending_token_trees_emit_the_targets_greedy_output(family_models, humaneval_prompts, path,
                                                                          ahead, tree):
    from flexspec_serve.engine.verifier import Verifier, VerifierLimits
    from flexspec_serve.transport import AsyncLocalTransport
    from tests.test_fleet import assert_all_completed, FlakyTransport, WireSpy, greedy_reference, run_shard, small_fleet

    prompts = [p[-40:] for p in humaneval_prompts[:6]]
    spec = small_fleet(tree=tree, ahead=ahead, max_new_tokens=24, devices=8)
    verifier = Verifier(family_models["v1"], family_models["draft"], name="v1",
                        limits=VerifierLimits(max_sessions=2 if path == "evicting" else 4096))
    transport = WireSpy(FlakyTransport(AsyncLocalTransport(verifier)) if path == "flaky" else AsyncLocalTransport(verifier))
    sent = transport.sent  # what went on the wire
    res = run_shard(spec, prompts, family_models, transport=transport, verifier=verifier)
    assert_all_completed(res)
    ref = greedy_reference(family_models, prompts, spec.max_new_tokens)
    for s in res.sessions:
        assert s["tokens"] == ref[s["prompt_index"]], s["session"]
    trees = [r for r in sent if r.tree_parents]
    assert trees and all(len(r.draft_tokens) == len(r.tree_parents) for r in trees)
    assert all(r.tree_parents for r in sent if r.draft_tokens)  # every drafting round sends its tree
    if tree == "branches":  # some fresh rounds grow a runner-up's continuation
        assert any(_has_branch(r.tree_parents) for r in trees)
    if ahead != "off":
        assert any(r["lookahead_hit"] for r in res.rounds)  # the chain still hits, runner-ups beside it
    if ahead == "pipeline" and path == "clean":
        assert any(r.assume for r in trees)  # pipelined rounds are trees too


def _has_branch(parents) -> bool:
    """A node hangs off a runner-up or a branch node (past the chain, which is 0..K-1 with parents -1..K-2)."""
    k = next((j for j, par in enumerate(parents) if par != j - 1), len(parents))
    return any(par >= k for par in parents)


def test_a_branches_tree_fits_the_node_limit_and_lists_the_chain_first():
    from flexspec_serve.tree import Tree, continuations, on_chain, tree_nodes, tree_parents

    assert continuations(3, Tree.BRANCHES) == [2, 1, 0] and continuations(3, Tree.SECOND) == [0, 0, 0]
    assert tree_parents(3, [2, 1, 0]) == [-1, 0, 1, -1, 3, 4, 0, 6, 1]  # d1 d2 d3 | s1 e e | s2 e | s3
    assert [tree_nodes(k, Tree.BRANCHES) for k in (1, 4, 5, 8)] == [2, 13, 16, 16]  # 5: s_1's branch gets 1
    assert continuations(5, Tree.BRANCHES) == [2, 2, 2, 0, 0] and tree_nodes(9, Tree.SECOND) == 18
    assert on_chain([0, 1, 2]) and on_chain(None) and not on_chain([0, 4])


def test_a_branch_is_the_drafts_greedy_continuation_and_taking_it_keeps_a_true_draft_cache(family_models,
                                                                                          humaneval_prompts):
    from flexspec_serve.engine.proposer import DraftProposer
    from flexspec_serve.engine.sampling import SamplingParams
    from flexspec_serve.tree import Tree, continuations

    draft = family_models["draft"]
    proposer, prompt = DraftProposer(draft), humaneval_prompts[0][-30:]

    def greedy(context, n):  # the draft's own greedy continuation, from scratch
        return reference_greedy(draft, context, n)

    s = proposer.start("s", prompt, SamplingParams())
    prop = proposer.propose([s], [4], tree=Tree.BRANCHES)[0]
    chain, conts = prop.tokens[:4], continuations(4, Tree.BRANCHES)
    assert chain == greedy(prompt, 4) and len(prop.tokens) == 4 + 4 + sum(conts)
    node = 4
    for i, n in enumerate(conts):  # s_i, then n tokens that the draft continues it with
        runner_up, grown = prop.tokens[node], prop.tokens[node + 1 : node + 1 + n]
        assert runner_up != chain[i] and grown == greedy(prompt + chain[:i] + [runner_up], n)
        node += 1 + n
    # the target took d_1, s_2 and its first continuation token, then said 99
    accepted = [chain[0], prop.tokens[4 + 1 + conts[0]], prop.tokens[4 + 2 + conts[0]]]
    proposer.apply_tree(s, accepted, 99)
    assert s.tokens == prompt + accepted + [99] and proposer.backlog(s) == 1  # the branch's cache was kept
    fresh = proposer.start("f", s.tokens, SamplingParams())
    assert proposer.propose([s], [3])[0].tokens == proposer.propose([fresh], [3])[0].tokens == greedy(s.tokens, 3)


def test_tokens_drafted_ahead_grow_their_branches_and_a_hit_keeps_them_true(family_models, humaneval_prompts):
    from flexspec_serve.engine.proposer import DraftProposer
    from flexspec_serve.engine.sampling import SamplingParams
    from flexspec_serve.tree import Tree, continuations

    draft = family_models["draft"]
    proposer, prompt = DraftProposer(draft), humaneval_prompts[1][-30:]

    def greedy(context, n):
        return reference_greedy(draft, context, n)

    s = proposer.start("s", prompt, SamplingParams())
    first = proposer.propose([s], [3], lookahead=True, tree=Tree.BRANCHES)[0]
    proposer.draft_ahead([s], [4])  # d_4, then the next round's 3 tokens and its guess
    ahead = proposer.ahead_proposal(s, 3)  # what a pipelining device would send now
    chain, guess = first.tokens[:3], proposer.guess(s)
    proposer.apply_tree(s, chain, guess)  # a lookahead hit: the cloud accepted d_1..d_3 and said d_4
    nxt = proposer.propose([s], [3], tree=Tree.BRANCHES)[0]
    assert nxt.tokens == ahead.tokens and nxt.parents == ahead.parents  # the round sent ahead is this round
    assert nxt.tokens[:3] == greedy(s.tokens, 3) and len(nxt.tokens) == 6 + sum(continuations(3, Tree.BRANCHES))
    runner_up, grown = nxt.tokens[3], nxt.tokens[4:6]  # s_1 and its branch
    assert grown == greedy(s.tokens + [runner_up], 2)
    proposer.apply_tree(s, [runner_up, grown[0]], 77)  # the path took the branch grown during the wait
    assert proposer.backlog(s) == 1
    fresh = proposer.start("f", s.tokens, SamplingParams())
    assert proposer.propose([s], [3])[0].tokens == proposer.propose([fresh], [3])[0].tokens == greedy(s.tokens, 3)


def test_a_cloud_token_equal_to_the_guesss_runner_up_is_a_hit_whose_next_round_drafts_on_from_it(
        family_models, humaneval_prompts):
    from flexspec_serve.engine.proposer import DraftProposer
    from flexspec_serve.engine.sampling import SamplingParams
    from flexspec_serve.tree import Tree

    draft = family_models["draft"]
    proposer, prompt = DraftProposer(draft), humaneval_prompts[2][-30:]

    def round_in_flight(name: str):
        s = proposer.start(name, prompt, SamplingParams())
        return s, proposer.propose([s], [3], lookahead=True, tree=Tree.BRANCHES)[0]

    s, first = round_in_flight("s")
    chain, (guess, _, runner_up) = first.tokens[:3], s.drafted[3]
    assert runner_up not in (-1, guess)
    # what does not count: the path left the chain, a rejection, or a token neither guess named
    neither = 1 + max(guess, runner_up)
    for accepted, token, path in ((3, runner_up, [0, 1, 4]), (2, runner_up, None), (3, neither, None)):
        assert not proposer.take_second_guess(s, accepted, token, path) and s.drafted[3][0] == guess
    ahead, _ = round_in_flight("ahead")
    proposer.draft_ahead([ahead], [2])  # drafted on past d_4: that continuation follows the first guess only
    assert not proposer.take_second_guess(ahead, 3, runner_up, None)

    from benchmarks.guess_ab import first_guess_only  # its old arm takes none
    with first_guess_only():
        assert not proposer.take_second_guess(s, 3, runner_up, [0, 1, 2])
    assert proposer.take_second_guess(s, 3, runner_up, [0, 1, 2])
    assert proposer.guess(s) == runner_up and proposer.lookahead_hit(s, 3, runner_up, [0, 1, 2])
    proposer.draft_ahead([s], [4])  # the next round's 3 tokens and its guess, on from s_4
    proposer.apply_tree(s, chain, runner_up)
    assert s.tokens == prompt + chain + [runner_up]
    assert [t for t, *_ in s.ready] == reference_greedy(draft, s.tokens, 4)  # what drafting after the answer gives
    assert proposer.steps_needed(s, 3) == 0 and s.cache.length == len(s.tokens) + 3
    nxt = proposer.propose([s], [3], tree=Tree.BRANCHES)[0]
    fresh = proposer.start("f", s.tokens, SamplingParams())
    assert nxt == proposer.propose([fresh], [3], tree=Tree.BRANCHES)[0]  # the same tree, branches and all


@pytest.mark.parametrize("tree", ["second", "branches"])
def test_token_trees_with_draft_ahead_keep_greedy_output_and_an_off_chain_path_is_never_a_hit(
        family_models, humaneval_prompts, tree, needs_variety, second_guesses):
    from flexspec_serve.engine.generate import speculative_generate
    from flexspec_serve.engine.proposer import DraftProposer
    from flexspec_serve.engine.verifier import Verifier
    from flexspec_serve.tree import on_chain

    prompts = humaneval_prompts[:12]
    want = [reference_greedy(family_models["v1"], p, MAX_NEW) for p in prompts]
    events, second = [], []

    def on_round(e):
        events.append(e)
        if second_guesses.pop(f"s{e.index}", 0):  # this round's cloud token was the guess's runner-up
            second.append(e)

    out = speculative_generate(DraftProposer(family_models["draft"]), Verifier(family_models["v1"]), prompts, MAX_NEW,
                               lambda i, r: 1 + (i + r) % 4, on_round=on_round, ahead="draft", tree=tree)
    assert [c.tokens for c in out] == want
    assert any(e.lookahead_hit for e in events)
    assert all(e.lookahead_hit and e.k for e in second)
    assert bool(second) == (tree == "branches")  # second guesses ride on branches only
    needs_variety(any(not on_chain(e.result.path) for e in events), "a round that accepts a runner-up")
    assert not any(e.lookahead_hit and not on_chain(e.result.path) for e in events)
    if tree == "branches":  # a round drafted ahead grew its branches too
        after_hit = {(e.index, e.round_index + 1) for e in events if e.lookahead_hit}
        assert any(_has_branch(e.parents) for e in events if (e.index, e.round_index) in after_hit and e.k > 1)
