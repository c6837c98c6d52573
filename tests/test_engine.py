"""The speculative engine: lossless greedy and sampling, ragged batching, rollback/resync, bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from flexspec_serve.engine import InvalidRequest, ResyncRequired, SequenceError
from flexspec_serve.engine.errors import ConditionNotMet
from flexspec_serve.engine.generate import reference_greedy as target_greedy, speculative_generate
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.engine.ragged import CachedSequence, run_ragged
from flexspec_serve.engine.sampling import SamplingParams
from flexspec_serve.engine.verifier import Verifier, VerifierLimits, VerifyRequest

VERSIONS = ("v1", "v2", "v3", "v2-unconstrained")
MAX_NEW = 20


@pytest.fixture(scope="module")
def reference_greedy(family_models, humaneval_prompts):
    prompts = humaneval_prompts[:20]
    return {v: [target_greedy(family_models[v], p, MAX_NEW) for p in prompts] for v in VERSIONS}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("k", [1, 3, 8, "varying"])
def test_greedy_speculative_output_equals_target_greedy(family_models, humaneval_prompts, reference_greedy,
                                                        version, k):
    choose_k = (lambda i, r: (i + r) % 9) if k == "varying" else k  # 0..8, different per session and round
    verifier = Verifier(family_models[version], family_models["draft"])
    results = speculative_generate(DraftProposer(family_models["draft"]), verifier, humaneval_prompts[:20],
                                   MAX_NEW, choose_k)
    assert [r.tokens for r in results] == reference_greedy[version]


def test_cloud_only_generation_equals_target_greedy(family_models, humaneval_prompts, reference_greedy):
    results = speculative_generate(None, Verifier(family_models["v3"]), humaneval_prompts[:20], MAX_NEW)
    assert [r.tokens for r in results] == reference_greedy["v3"]
    assert all(r.stats.acceptance_length == 1.0 for r in results)


def _outcomes(verifier, requests, one_at_a_time):
    if one_at_a_time:
        return [verifier.verify([r])[0] for r in requests]
    return verifier.verify(requests)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_ragged_batched_verification_equals_one_at_a_time(family_models, humaneval_prompts, temperature):
    draft, target = family_models["draft"], family_models["v2"]
    prompts = [p[: 5 + 7 * i] for i, p in enumerate(humaneval_prompts[:6])]  # different context lengths
    runs = []
    for one_at_a_time in (True, False):
        proposer, verifier = DraftProposer(draft), Verifier(target, draft)
        sessions = [proposer.start(f"s{i}", p, SamplingParams(temperature, 1.0, i)) for i, p in enumerate(prompts)]
        log = []
        for rnd in range(5):
            ks = [(i * 3 + rnd) % 7 for i in range(len(sessions))]  # ragged K, zeros included
            props = proposer.propose(sessions, ks)
            reqs = [VerifyRequest(f"s{i}", rnd, tuple(pr.tokens), full_context=tuple(prompts[i]) if rnd == 0 else None,
                                  sampling=SamplingParams(temperature, 1.0, i)) for i, pr in enumerate(props)]
            outs = _outcomes(verifier, reqs, one_at_a_time)
            if rnd:  # (first rounds are prompts of different lengths: prefill-sized ones run as their own forward)
                assert max(o.batch_size for o in outs) == (1 if one_at_a_time else len(reqs))
            for s, r, o in zip(sessions, reqs, outs):
                proposer.apply(s, list(r.draft_tokens), o.accepted, o.token)
                log.append((r.draft_tokens, o.accepted, o.token))
        runs.append(log)
    assert runs[0] == runs[1]


def test_a_prompt_is_not_padded_into_decode_rounds_batched_with_it(family_models, humaneval_prompts):
    verifier = Verifier(family_models["v1"])
    decoding = [VerifyRequest(f"d{i}", 0, (), full_context=tuple(humaneval_prompts[i][:40])) for i in range(3)]
    verifier.verify(decoding)
    nxt = [VerifyRequest(f"d{i}", 1, (7, 8, 9)) for i in range(3)]
    prompt = VerifyRequest("new", 0, (), full_context=tuple(humaneval_prompts[5][:200]))
    *decoded, prefilled = verifier.verify([*nxt, prompt])
    assert [o.batch_size for o in decoded] == [3, 3, 3] and prefilled.batch_size == 1
    alone = Verifier(family_models["v1"])
    alone.verify(decoding)
    assert [(o.accepted, o.token) for o in decoded] == [(o.accepted, o.token) for o in alone.verify(nxt)]


def test_batched_draft_proposals_equal_single_ones(family_models, humaneval_prompts):
    proposer = DraftProposer(family_models["draft"])
    prompts = [p[: 4 + 5 * i] for i, p in enumerate(humaneval_prompts[:5])]
    batch = proposer.propose([proposer.start(str(i), p, SamplingParams()) for i, p in enumerate(prompts)], [4] * 5)
    single = [proposer.propose([proposer.start(str(i), p, SamplingParams())], [4])[0] for i, p in enumerate(prompts)]
    assert [b.tokens for b in batch] == [s.tokens for s in single]


def test_ragged_forward_logits_match_unpadded(family_models):
    model = family_models["v1"]
    a, b = CachedSequence(), CachedSequence()
    run_ragged(model, [a], [[5, 6, 7, 8, 9, 10]])
    run_ragged(model, [b], [[11, 12]])
    batched = run_ragged(model, [a, b], [[3, 4], [13, 14, 15]])
    solo_a, solo_b = CachedSequence(), CachedSequence()
    ref_a = run_ragged(model, [solo_a], [[5, 6, 7, 8, 9, 10, 3, 4]])[0][-2:]
    ref_b = run_ragged(model, [solo_b], [[11, 12, 13, 14, 15]])[0][-3:]
    torch.testing.assert_close(batched[0], ref_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batched[1], ref_b, atol=1e-4, rtol=1e-4)
    assert a.length == 8 and b.length == 5


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_resync_after_eviction_gives_identical_continuation(family_models, humaneval_prompts, temperature):
    draft, target = family_models["draft"], family_models["v3"]
    prompt = humaneval_prompts[3]

    def run(evict_at):
        proposer, verifier = DraftProposer(draft), Verifier(target, draft)
        s = proposer.start("dev", prompt, SamplingParams(temperature, 1.0, 11))
        for rnd in range(8):
            prop = proposer.propose([s], [3])[0]
            req = VerifyRequest("dev", rnd, tuple(prop.tokens), full_context=tuple(prompt) if rnd == 0 else None,
                                sampling=SamplingParams(temperature, 1.0, 11))
            if rnd == evict_at:
                assert verifier.drop_session("dev")
                with pytest.raises(ResyncRequired):
                    raise verifier.verify([req])[0]
                proposer.resync(s)  # the client also rebuilds its draft cache from scratch
                req = VerifyRequest("dev", rnd, req.draft_tokens, full_context=tuple(s.tokens), sampling=req.sampling)
            out = verifier.verify([req])[0]
            proposer.apply(s, list(prop.tokens), out.accepted, out.token)
        return s.generated

    assert run(evict_at=None) == run(evict_at=4)


def test_rollback_keeps_cache_equal_to_committed_tokens(family_models, humaneval_prompts):
    draft, target = family_models["draft"], family_models["v1"]
    proposer, verifier = DraftProposer(draft), Verifier(target, draft)
    s = proposer.start("x", humaneval_prompts[0], SamplingParams())
    for rnd in range(6):
        prop = proposer.propose([s], [5])[0]
        out = verifier.verify([VerifyRequest("x", rnd, tuple(prop.tokens),
                                             full_context=tuple(s.tokens) if rnd == 0 else None)])[0]
        proposer.apply(s, prop.tokens, out.accepted, out.token)
        server = verifier.sessions["x"]
        assert server.tokens == s.tokens
        assert server.target.length == len(s.tokens) - 1  # the last (recovered/bonus) token is fed next round
        assert s.cache.length <= len(s.tokens) - 1


def test_retried_round_returns_the_same_result_and_is_applied_once(family_models, humaneval_prompts):
    verifier = Verifier(family_models["v1"], family_models["draft"])
    prompt = tuple(humaneval_prompts[1])
    first = VerifyRequest("r", 0, (1, 2, 3), full_context=prompt, sampling=SamplingParams(0.8, 1.0, 5))
    a = verifier.verify([first])[0]
    length = len(verifier.sessions["r"].tokens)
    b = verifier.verify([first])[0]
    assert a == b and len(verifier.sessions["r"].tokens) == length
    with pytest.raises(SequenceError):
        raise verifier.verify([VerifyRequest("r", 5, (4,))])[0]
    nxt = verifier.verify([VerifyRequest("r", 1, (4,))])[0]
    assert nxt.seq == 1 and verifier.sessions["r"].stats.rounds == 2


def test_unknown_session_without_context_asks_for_resync(family_models):
    with pytest.raises(ResyncRequired, match="full_context"):
        raise Verifier(family_models["v1"]).verify([VerifyRequest("ghost", 3, (1,))])[0]


@pytest.mark.parametrize(
    "request_kwargs, field",
    [(dict(draft_tokens=(1, 99_999)), "draft_tokens"), (dict(draft_tokens=(1,) * 17), "draft_tokens"),
     (dict(full_context=tuple(range(5)) * 200), "context"), (dict(full_context=(-1, 3)), "full_context"),
     (dict(seq=1, full_context=None, assume=(1, 99_999)), "assume"), (dict(assume=(1, 2)), "assume")],
)
def test_bad_inputs_raise_errors_naming_the_value(family_models, request_kwargs, field):
    base = dict(session_id="bad", seq=0, full_context=(1, 2, 3))
    verifier = Verifier(family_models["v1"], limits=VerifierLimits(max_draft_tokens=16))
    err = verifier.verify([VerifyRequest(**{**base, **request_kwargs})])[0]
    assert isinstance(err, InvalidRequest) and err.field == field
    assert str(err.value) in str(err)
    assert (err.code == "context_too_long") == (field == "context")  # cloud-only generation stops on this code


def test_one_bad_request_does_not_fail_the_batch(family_models):
    verifier = Verifier(family_models["v1"])
    good = VerifyRequest("good", 0, (), full_context=(5, 6, 7))
    bad = VerifyRequest("bad", 0, (10**6,), full_context=(5, 6, 7))
    out_bad, out_good = verifier.verify([bad, good])
    assert isinstance(out_bad, InvalidRequest) and out_good.context_len == 4


def test_a_round_that_fails_inside_the_engine_leaves_its_batch_mates_alone(family_models, monkeypatch):
    from flexspec_serve.engine.errors import RoundFailed

    verifier = Verifier(family_models["v1"], family_models["draft"])
    decide = verifier._decide

    def broken_for_one(req, *args):
        if req.session_id == "unlucky":
            raise RuntimeError("probability tensor contains nan")
        return decide(req, *args)

    monkeypatch.setattr(verifier, "_decide", broken_for_one)
    reqs = [VerifyRequest(sid, 0, (9, 9), full_context=(5, 6, 7)) for sid in ("a", "unlucky", "b")]
    a, unlucky, b = verifier.verify(reqs)
    assert isinstance(unlucky, RoundFailed) and unlucky.http_status == 500
    alone = Verifier(family_models["v1"], family_models["draft"]).verify([reqs[0]])[0]
    assert (a.accepted, a.token) == (b.accepted, b.token) == (alone.accepted, alone.token)
    # the failed session holds no half-applied state: its next round is told to resync
    assert isinstance(verifier.verify([VerifyRequest("unlucky", 1, (9,))])[0], ResyncRequired)


def test_temperature_below_epsilon_is_greedy_not_nan(family_models, humaneval_prompts):
    greedy = speculative_generate(DraftProposer(family_models["draft"]), Verifier(family_models["v1"],
                                  family_models["draft"]), humaneval_prompts[:2], 12, 4)
    tiny = speculative_generate(DraftProposer(family_models["draft"]), Verifier(family_models["v1"],
                                family_models["draft"]), humaneval_prompts[:2], 12, 4,
                                sampling=SamplingParams(5e-324, 5e-324, 3))
    assert [r.tokens for r in tiny] == [r.tokens for r in greedy]


def test_lru_evicts_by_count_and_bytes(family_models):
    verifier = Verifier(family_models["v1"], limits=VerifierLimits(max_sessions=2))
    for i in range(3):
        verifier.verify([VerifyRequest(f"s{i}", 0, (), full_context=(1, 2, 3))])
    assert list(verifier.sessions) == ["s1", "s2"] and verifier.evictions == 1
    verifier.verify([VerifyRequest("s2", 1, (4, 5))])
    assert verifier.cache_bytes() == sum(s.nbytes() for s in verifier.sessions.values()) > 0
    tight = Verifier(family_models["v1"], limits=VerifierLimits(max_cache_bytes=1))
    tight.verify([VerifyRequest("a", 0, (), full_context=(1, 2, 3))])
    assert not tight.sessions


def test_idle_sessions_expire_and_their_client_resyncs(family_models):
    now = [0.0]
    verifier = Verifier(family_models["v1"], limits=VerifierLimits(session_ttl_s=10), clock=lambda: now[0])
    verifier.verify([VerifyRequest("idle", 0, (), full_context=(1, 2, 3)),
                     VerifyRequest("busy", 0, (), full_context=(1, 2, 3))])
    now[0] = 8.0
    verifier.verify([VerifyRequest("busy", 1, ())])
    now[0] = 12.0
    verifier.verify([VerifyRequest("busy", 2, ())])  # any batch expires what has been idle too long
    assert list(verifier.sessions) == ["busy"] and verifier.expired == 1
    (late,) = verifier.verify([VerifyRequest("idle", 1, ())])
    assert isinstance(late, ResyncRequired)


def test_statistics_count_rounds_and_positions(family_models, humaneval_prompts):
    verifier = Verifier(family_models["v1"], family_models["draft"])
    res = speculative_generate(DraftProposer(family_models["draft"]), verifier, humaneval_prompts[:3], 16, 4)
    s = verifier.stats
    assert s.rounds == sum(r.stats.rounds for r in res)
    assert s.generated_tokens == s.accepted_tokens + s.rounds
    rates = s.rate_by_position()
    assert len(rates) == 4 and all(0 <= r <= 1 for r in rates)
    assert s.acceptance_length == pytest.approx(s.generated_tokens / s.rounds)


def test_core_imports_no_ray():
    code = (
        "import importlib, pkgutil, sys, flexspec_serve\n"
        "for m in pkgutil.walk_packages(flexspec_serve.__path__, 'flexspec_serve.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n == 'ray' or n.startswith('ray.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_fleet_spec_and_planner_inputs_load_without_torch():
    """`flexspec loadtest` and the capacity planner validate fleet files before any model is loaded."""
    code = ("import sys, flexspec_serve.fleet.spec, flexspec_serve.edge.controller, flexspec_serve.edge.channels\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_gpu_verify_script_runs_on_cpu_in_small_shape():
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_verify.py"
    out = subprocess.run([sys.executable, str(script), "--small", "--device", "cpu", "--batches", "1", "2",
                          "--k", "2", "5", "--reps", "2", "--warmup", "1"], capture_output=True, text=True,
                         timeout=300, check=True)
    rows = [line.split("|") for line in out.stdout.splitlines() if line.count("|") == 4]
    assert {(r[0].strip(), int(r[1]), int(r[2])) for r in rows[1:]} == {
        (m, k, b) for m in ("eager", "static") for k in (2, 5) for b in (1, 2)}  # every mode, K and batch


def test_draft_ahead_keeps_greedy_output_and_guesses_the_next_draft_token(family_models, humaneval_prompts,
                                                                         reference_greedy, needs_variety):
    proposer = DraftProposer(family_models["draft"])
    prompts = humaneval_prompts[:6]
    sessions = [proposer.start(str(i), p, SamplingParams()) for i, p in enumerate(prompts)]
    ahead = proposer.propose(sessions, [3, 0, 1, 4, 2, 5], lookahead=True)
    longer = proposer.propose([proposer.start(str(i), p, SamplingParams()) for i, p in enumerate(prompts)],
                              [4, 0, 2, 5, 3, 6])
    for s, a, b in zip(sessions, ahead, longer):
        assert a.tokens + ([proposer.guess(s)] if a.tokens else []) == b.tokens  # d_{K+1} drafted, not sent
    assert proposer.guess(sessions[1]) is None  # a cloud-only round guesses nothing
    hits = []
    results = speculative_generate(proposer, Verifier(family_models["v1"], family_models["draft"]),
                                   humaneval_prompts[:20], MAX_NEW, lambda i, r: (i + r) % 6, ahead="draft",
                                   on_round=hits.append)
    assert [r.tokens for r in results] == reference_greedy["v1"]  # hits start rounds from drafted-ahead tokens
    assert any(ev.lookahead_hit for ev in hits)
    needs_variety(not all(ev.lookahead_hit for ev in hits if ev.k), "a missed guess")
    assert all(ev.accepted == ev.k for ev in hits if ev.lookahead_hit)


def test_a_sampling_sessions_guess_is_qs_likeliest_token_while_its_drafts_stay_samples(family_models,
                                                                                        humaneval_prompts):
    from flexspec_serve.engine.ragged import CachedSequence, run_ragged

    draft = family_models["draft"]
    proposer, prompt = DraftProposer(draft), humaneval_prompts[4][-40:]
    params = SamplingParams(0.8, 1.0, 3)
    guessing, plain = (proposer.start(n, prompt, params) for n in ("g", "p"))
    sent = proposer.propose([guessing], [3], lookahead=True)[0]
    assert sent == proposer.propose([plain], [3])[0]  # the same seed draws the same drafts: the guess draws nothing
    logits = run_ragged(draft, [CachedSequence()], [prompt + sent.tokens])[0][-1]  # [V]: q after d_3, unscaled
    assert [proposer.guess(guessing), guessing.drafted[3][2]] == logits.topk(2).indices.tolist()
    fresh = proposer.start("c", prompt + sent.tokens + [proposer.guess(guessing)], params)
    fresh.generator.set_state(guessing.generator.get_state())
    proposer.draft_ahead([guessing], [4])  # past the guess: draws from q, as drafting after the answer would be
    assert [t for t, *_ in guessing.drafted[4:]] == proposer.propose([fresh], [4])[0].tokens


def test_a_short_draft_is_handed_over_before_the_longest_in_its_batch_is_done(family_models, humaneval_prompts):
    proposer = DraftProposer(family_models["draft"])
    sessions = [proposer.start(str(i), p, SamplingParams()) for i, p in enumerate(humaneval_prompts[:4])]
    seen = []
    proposals = proposer.propose(sessions, [5, 1, 0, 3], on_done=lambda i, p: seen.append((i, p)))
    assert [i for i, _ in seen] == [2, 1, 3, 0]  # K = 0 at once, then each after its own K-th step
    assert [p for _, p in sorted(seen, key=lambda x: x[0])] == proposals
    fresh = [proposer.start(str(i), p, SamplingParams()) for i, p in enumerate(humaneval_prompts[:4])]
    assert [p.tokens for p in proposer.propose(fresh, [5, 1, 0, 3])] == [p.tokens for p in proposals]


def test_a_draft_that_joins_a_running_one_shares_its_steps_and_drafts_the_same_tokens(family_models,
                                                                                       humaneval_prompts):
    proposer = DraftProposer(family_models["draft"])
    first, late = (proposer.start(str(i), p, SamplingParams()) for i, p in enumerate(humaneval_prompts[:2]))
    done = []
    joiner = proposer.propose_job(late, 2, lambda p: done.append(("late", p)))
    asked = []

    def take(idle: bool) -> list:
        asked.append(idle)
        return [joiner] if len(asked) == 3 else []  # joins before the third step

    per_step = []
    proposer.run_jobs([proposer.propose_job(first, 6, lambda p: done.append(("first", p)))], take, per_step.append)
    steps, rows = len(per_step), sum(per_step)
    assert (steps, rows) == (6, 8)  # its two steps rode along with the third and fourth
    assert [who for who, _ in done] == ["late", "first"] and asked[-1] is True
    fresh = [proposer.start(str(i), p, SamplingParams()) for i, p in enumerate(humaneval_prompts[:2])]
    alone = [proposer.propose([s], [k])[0].tokens for s, k in zip(fresh, (6, 2))]
    assert [p.tokens for _, p in sorted(done)] == alone


def test_tokens_drafted_ahead_are_the_next_rounds_draft_and_the_cache_stays_consistent(family_models,
                                                                                        humaneval_prompts):
    proposer = DraftProposer(family_models["draft"])
    ahead, fresh = (proposer.start("a", humaneval_prompts[3], SamplingParams()),
                    proposer.start("b", humaneval_prompts[3], SamplingParams()))
    prop = proposer.propose([ahead], [3], lookahead=True)[0]
    guess = proposer.guess(ahead)
    proposer.draft_ahead([ahead], [5])
    assert [t for t, *_ in ahead.drafted][3] == guess and len(ahead.drafted) == 3 + 1 + 5
    proposer.apply(ahead, prop.tokens, 3, guess)  # the cloud took all three and guessed d_4: a hit
    after_hit = proposer.propose([proposer.start("c", ahead.tokens, SamplingParams())], [5])[0]
    assert [t for t, *_ in ahead.ready] == after_hit.tokens
    assert ahead.cache.length == len(ahead.tokens) + 4  # the ready tokens but the last are fed
    assert proposer.steps_needed(ahead, 5) == 0 and proposer.steps_needed(ahead, 8) == 3
    fresh.tokens = list(ahead.tokens)
    for k in (2, 7, 4):  # fewer than ready, more than ready, then after a miss
        got, want = proposer.propose([ahead], [k], lookahead=True)[0], proposer.propose([fresh], [k], True)[0]
        assert (got.tokens, proposer.guess(ahead)) == (want.tokens, proposer.guess(fresh))
        proposer.draft_ahead([ahead], [k])
        for s in (ahead, fresh):
            proposer.apply(s, got.tokens, 1, 5)  # a rejection at position 2
            assert s.cache.length == len(s.tokens) - 1 and not s.ready


def test_pipelined_round_is_verified_only_when_its_predecessor_committed_what_it_assumed(family_models,
                                                                                         humaneval_prompts):
    target = family_models["v1"]
    prompt = humaneval_prompts[2]
    ref = target_greedy(target, prompt, 8)  # the target's own continuation: every draft of it is accepted
    first = VerifyRequest("p", 0, tuple(ref[:2]), full_context=tuple(prompt))
    ahead = VerifyRequest("p", 1, tuple(ref[3:5]), assume=tuple(ref[:3]))
    both = Verifier(target)
    a, b = both.verify([first, ahead])  # one batch: the predecessor is decided first
    assert (a.accepted, a.token, b.accepted, b.token) == (2, ref[2], 2, ref[5])
    assert both.verify([first, ahead]) == [a, b]  # retries of either (answers lost) get the same answers
    assert both.sessions["p"].tokens == list(prompt) + ref[:6]

    verifier = Verifier(target)
    with pytest.raises(ConditionNotMet, match="round 0 verified first"):  # arrived before its predecessor
        raise verifier.verify([ahead])[0]
    verifier.verify([first])
    wrong = VerifyRequest("p", 1, tuple(ref[3:5]), assume=tuple(ref[:2]) + ((ref[2] + 1) % 100,))
    with pytest.raises(ConditionNotMet, match="did not commit"):
        raise verifier.verify([wrong])[0]
    assert verifier.sessions["p"].tokens == list(prompt) + ref[:3]  # a refused round changes nothing
    plain = verifier.verify([VerifyRequest("p", 1, tuple(ref[3:5]))])[0]
    assert (plain.accepted, plain.token) == (2, ref[5])


def test_a_verified_pipelined_round_samples_as_the_same_plain_round_would(family_models, humaneval_prompts):
    sampling = SamplingParams(0.8, 1.0, 11)
    prompt = tuple(humaneval_prompts[3])
    first = VerifyRequest("s", 0, (5, 6, 7), full_context=prompt, sampling=sampling)
    plain = Verifier(family_models["v2"], family_models["draft"])
    r0 = plain.verify([first])[0]
    committed = (5, 6, 7)[: r0.accepted] + (r0.token,)
    r1 = plain.verify([VerifyRequest("s", 1, (8, 9))])[0]
    piped = Verifier(family_models["v2"], family_models["draft"])
    p0, p1 = piped.verify([first, VerifyRequest("s", 1, (8, 9), assume=committed)])
    decided = lambda o: (o.seq, o.accepted, o.token, o.context_len)  # noqa: E731
    assert [decided(o) for o in (p0, p1)] == [decided(o) for o in (r0, r1)]
    assert piped.sessions["s"].tokens == plain.sessions["s"].tokens


def test_acceptance_since_a_time_merges_the_young_sessions_and_their_spread(family_models, humaneval_prompts):
    import time

    draft, target = family_models["draft"], family_models["v1"]
    verifier = Verifier(target, draft)
    speculative_generate(DraftProposer(draft), verifier, humaneval_prompts[:2], 12, 3, session_prefix="old")
    since = time.time()
    young = speculative_generate(DraftProposer(draft), verifier, humaneval_prompts[2:5], 12, 3, session_prefix="new")
    total, spread = verifier.stats_since(since)
    per_session = [verifier.session_stats(s.session_id) for s in young]
    assert spread.sessions == 3 and total.rounds == sum(s.rounds for s in per_session)
    assert total.accepted_tokens == sum(s.accepted_tokens for s in per_session)
    assert spread.accepted_sq == sum(s.accepted_tokens ** 2 for s in per_session)
    assert spread.draft_sq == sum(s.draft_tokens ** 2 for s in per_session)
    assert spread.cross == sum(s.accepted_tokens * s.draft_tokens for s in per_session)
