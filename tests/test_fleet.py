"""Fleet devices in real time, without Ray: the asyncio shard against in-process verification."""

from __future__ import annotations

import collections

import asyncio
import csv
import json
import time

import pytest
import yaml

from flexspec_serve import protocol as P
from flexspec_serve.config import ConfigError, load_yaml
from flexspec_serve.edge.devices import DEVICE_CLASSES
from flexspec_serve.engine.generate import speculative_generate
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.engine.sampling import SamplingParams
from flexspec_serve.engine.verifier import Verifier, VerifierLimits
from flexspec_serve.fleet import report
from flexspec_serve.fleet.runtime import Shard, backoff_ms
from flexspec_serve.fleet.spec import FleetSpec
from flexspec_serve.transport import AsyncLocalTransport, TransportError

MIX = [{"device_class": "flagship-phone", "share": 0.5, "channel": "TMobile-LTE-short"},
       {"device_class": "wearable", "share": 0.5, "channel": "fading"}]


P_SAMPLING = SamplingParams()  # greedy


def small_fleet(**kw) -> FleetSpec:
    base = {"devices": 12, "mix": MIX, "max_new_tokens": 12, "duration_s": 2.0, "target": "v1",
            "arrival": {"start_within_s": 0.5, "think_time_s": 0.2, "sessions_per_device": 2}}
    return FleetSpec.model_validate(base | kw)


def run_shard(spec, prompts, family_models, transport=None, verifier=None, loop="asyncio"):
    """`loop`: asyncio's, or uvloop (what Ray's actors run)."""
    draft = family_models["draft"]
    verifier = verifier or Verifier(family_models["v1"], draft, name="v1")
    transport = transport or AsyncLocalTransport(verifier)
    run = asyncio.run if loop == "asyncio" else pytest.importorskip("uvloop").run
    return run(Shard(spec, spec.plans(), prompts, DraftProposer(draft), transport, time.time()).run())


def assert_all_completed(res) -> None:
    """Every session completed and no device crashed; the failures' errors in the message when not."""
    failed = [(s["session"], s["error"]) for s in res.sessions if not s["completed"]]
    assert res.sessions and not failed and not res.device_crashes, (failed, res.device_crashes)


def greedy_reference(family_models, prompts, max_new) -> list[list[int]]:
    return [r.tokens for r in speculative_generate(None, Verifier(family_models["v1"]), prompts, max_new)]


class WireSpy:
    """Passes rounds on to `inner`, keeping every round sent in `sent`."""

    def __init__(self, inner):
        self.inner, self.sent = inner, []

    async def send(self, rnd):
        self.sent.append(rnd)
        return await self.inner.send(rnd)


class FlakyTransport:
    """Every third call of each session fails on the path (before or after reaching the verifier), like a
    dropped link. Counted per session: with one count for all, a session's retries once kept landing on every
    third call while other devices' calls filled the slots between, and it failed 8 attempts in a row."""

    def __init__(self, inner):
        self.inner, self.calls = inner, collections.Counter()

    async def send(self, rnd: P.DraftRound):
        self.calls[rnd.session_id] += 1
        n = self.calls[rnd.session_id]
        if n % 3 == 0:
            if n % 2:
                await self.inner.send(rnd)  # reached the server, the answer was lost: the retry is idempotent
            raise TransportError("link dropped")
        return await self.inner.send(rnd)


def test_greedy_fleet_devices_emit_the_targets_greedy_output(family_models, humaneval_prompts, monkeypatch):
    prompts = [p[-40:] for p in humaneval_prompts[:6]]
    spec = small_fleet()
    fed, prefill_job = [], DraftProposer.prefill_job
    monkeypatch.setattr(DraftProposer, "prefill_job", lambda self, s, *a: fed.append(s.session_id) or prefill_job(self, s, *a))
    res = run_shard(spec, prompts, family_models)
    assert_all_completed(res)
    assert res.sessions_started == len(res.sessions) == 24
    ref = greedy_reference(family_models, prompts, spec.max_new_tokens)
    for s in res.sessions:
        assert s["tokens"] == ref[s["prompt_index"]], s["session"]
    assert {r["device_class"] for r in res.rounds} == {"flagship-phone", "wearable"}
    assert max(res.lags_ms) < 1000
    # wearables (5 ms per prompt token) open cloud-only, their prompts fed during the wait
    opened = {r["session"] for r in res.rounds if r["round"] == 0 and r["k"] == 0 and r["device_class"] == "wearable"}
    assert opened and opened <= set(fed)


@pytest.mark.parametrize("loop, tree", [("asyncio", "chain"), ("uvloop", "chain"),  # Ray's actors run uvloop
                                        ("asyncio", "branches")])
def test_devices_drafting_ahead_still_emit_the_targets_greedy_output(family_models, humaneval_prompts, loop, tree,
                                                                     second_guesses):
    prompts = [p[-40:] for p in humaneval_prompts[:6]]
    spec = small_fleet(ahead="draft", max_new_tokens=24, tree=tree)
    res = run_shard(spec, prompts, family_models, loop=loop)
    assert_all_completed(res)
    ref = greedy_reference(family_models, prompts, spec.max_new_tokens)
    for s in res.sessions:
        assert s["tokens"] == ref[s["prompt_index"]], s["session"]
    hits = [r for r in res.rounds if r["lookahead_hit"]]
    assert hits and all(r["accepted"] == r["k"] for r in hits)
    # with branches, rounds whose cloud token was the guess's runner-up are hits too (second guesses)
    assert bool(second_guesses) == (tree == "branches")
    assert all(n <= sum(r["lookahead_hit"] for r in hits if r["session"] == sid) for sid, n in second_guesses.items())
    started_drafted = [r for r in res.rounds if r["predrafted"] and r["k"]]  # drafting rounds right after a hit
    assert started_drafted
    for r in started_drafted:  # only the tokens not drafted during the previous wait cost draft time
        step_ms = DEVICE_CLASSES[r["device_class"]].draft_ms_per_token
        assert r["draft_ms"] == pytest.approx(step_ms * max(0, r["k"] - r["predrafted"]))


@pytest.mark.parametrize("path", ["clean", "flaky", "evicting"])
def test_pipelining_devices_still_emit_the_targets_greedy_output(family_models, humaneval_prompts, path):
    prompts = [p[-40:] for p in humaneval_prompts[:6]]
    spec = small_fleet(ahead="pipeline", max_new_tokens=24, devices=8 if path != "clean" else 12)
    verifier = Verifier(family_models["v1"], family_models["draft"], name="v1",
                        limits=VerifierLimits(max_sessions=2 if path == "evicting" else 4096))
    transport = FlakyTransport(AsyncLocalTransport(verifier)) if path == "flaky" else None
    res = run_shard(spec, prompts, family_models, transport=transport, verifier=verifier)
    assert res.sessions and all(s["completed"] for s in res.sessions) and not res.device_crashes, \
        [s["error"] for s in res.sessions if not s["completed"]]
    ref = greedy_reference(family_models, prompts, spec.max_new_tokens)
    for s in res.sessions:
        assert s["tokens"] == ref[s["prompt_index"]], s["session"]
    rounds = {(r["session"], r["round"]): r for r in res.rounds}
    piped = [r for r in res.rounds if r["pipelined"]]
    assert piped or path == "evicting"
    for r in piped:  # sent during a hit's wait; took less than its own trip, which overlapped that round
        assert rounds[(r["session"], r["round"] - 1)]["lookahead_hit"]
        assert r["draft_ms"] == 0 and r["round_ms"] < r["up_ms"] + r["verify_ms"] + r["down_ms"] + r["lag_ms"]


def test_pipelining_devices_sampling_finish_and_the_cloud_decides_their_pipelined_rounds(family_models,
                                                                                          humaneval_prompts):
    prompts = [p[-40:] for p in humaneval_prompts[:6]]
    spec = small_fleet(ahead="pipeline", max_new_tokens=24, temperature=0.8,
                       policy="fixed-2")  # always pipelines: the adaptive one may learn that sampled guesses rarely hit
    verifier = Verifier(family_models["v1"], family_models["draft"], name="v1")
    res = run_shard(spec, prompts, family_models, verifier=verifier)
    assert_all_completed(res)
    assert all(len(s["tokens"]) == 24 for s in res.sessions)
    piped = [r for r in res.rounds if r["pipelined"]]
    assert piped and all(r["accepted"] <= r["k"] for r in piped)
    decided = sum(verifier.session_stats(s["session"]).rounds for s in res.sessions)
    assert decided == len(res.rounds)  # every round the cloud decided was used; refused ones were not decided


def test_lost_answers_are_retried_and_sessions_still_match(family_models, humaneval_prompts):
    prompts = [p[-40:] for p in humaneval_prompts[:4]]
    spec = small_fleet(devices=6)
    flaky = FlakyTransport(AsyncLocalTransport(Verifier(family_models["v1"], family_models["draft"], name="v1")))
    res = run_shard(spec, prompts, family_models, transport=flaky)
    assert all(s["completed"] for s in res.sessions), [s["error"] for s in res.sessions if not s["completed"]]
    assert sum(r["attempts"] - 1 for r in res.rounds) > 0
    ref = greedy_reference(family_models, prompts, spec.max_new_tokens)
    assert all(s["tokens"] == ref[s["prompt_index"]] for s in res.sessions)


def test_sessions_evicted_on_the_server_resync_and_continue(family_models, humaneval_prompts):
    prompts = [p[-40:] for p in humaneval_prompts[:4]]
    spec = small_fleet(devices=8)
    tight = Verifier(family_models["v1"], family_models["draft"], name="v1", limits=VerifierLimits(max_sessions=2))
    res = run_shard(spec, prompts, family_models, verifier=tight)
    assert all(s["completed"] for s in res.sessions) and sum(s["resyncs"] for s in res.sessions) > 0
    ref = greedy_reference(family_models, prompts, spec.max_new_tokens)
    assert all(s["tokens"] == ref[s["prompt_index"]] for s in res.sessions)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # Ray's actors run uvloop
def test_devices_that_ask_together_share_draft_steps_and_get_what_they_would_alone(family_models,
                                                                                    humaneval_prompts, loop):
    from flexspec_serve.fleet.drafter import StepDrafter

    run = asyncio.run if loop == "asyncio" else pytest.importorskip("uvloop").run

    proposer = DraftProposer(family_models["draft"])
    start = lambda: [proposer.start(str(i), p, P_SAMPLING) for i, p in enumerate(humaneval_prompts[:3])]  # noqa: E731

    async def main(sessions):
        drafter = StepDrafter(proposer)
        try:
            got = await asyncio.gather(*(drafter.propose(s, k) for s, k in zip(sessions, (4, 2, 3))))
            await drafter.ahead(sessions[0], 3)
            return got, drafter.steps, drafter.rows
        finally:
            drafter.close()

    sessions = start()
    got, steps, rows = run(main(sessions))
    assert (steps, rows) == (4 + 3, 4 + 2 + 3 + 3)  # the three rounds asked together: their steps are shared
    alone = start()
    want = [proposer.propose([s], [k])[0] for s, k in zip(alone, (4, 2, 3))]
    proposer.draft_ahead([alone[0]], [3])
    assert [g.tokens for g in got] == [w.tokens for w in want]
    assert sessions[0].drafted == alone[0].drafted


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_cloud_only_round_feeds_the_prompt_and_the_next_round_drafts_as_it_would_have(family_models,
                                                                                      humaneval_prompts, temperature):
    """The prompt is fed in a step that drafts nothing (a sampling session's generator is not drawn), and
    after the cloud's token the next round feeds only that token and drafts what a cold session would."""
    from flexspec_serve.fleet.drafter import StepDrafter

    proposer = DraftProposer(family_models["draft"])
    prompt, sampling = humaneval_prompts[4], SamplingParams(temperature, 1.0, 7)

    async def main(s):
        drafter = StepDrafter(proposer)
        try:
            await drafter.prefill(s)
            fed, steps = s.cache.length, drafter.steps
            proposer.apply(s, [], 0, 42)  # the cloud-only round's answer
            return fed, steps, await drafter.propose(s, 4), drafter.steps
        finally:
            drafter.close()

    warm = proposer.start("warm", prompt, sampling)
    fed, steps, got, steps_after = asyncio.run(main(warm))
    assert (fed, steps, steps_after) == (len(prompt), 1, 1 + 4)
    cold = proposer.start("cold", prompt, sampling)
    proposer.apply(cold, [], 0, 42)
    want = proposer.propose([cold], [4])[0]
    assert got.tokens == want.tokens and warm.cache.length == cold.cache.length
    assert proposer.prefill_job(warm) is None  # a draft in flight: nothing to feed


def test_a_failed_draft_step_fails_its_devices_and_the_next_ones_still_draft(family_models, humaneval_prompts,
                                                                             monkeypatch):
    from flexspec_serve.fleet.drafter import StepDrafter

    proposer = DraftProposer(family_models["draft"])
    real_step = proposer._step

    def broken(jobs):
        monkeypatch.setattr(proposer, "_step", real_step)  # only the first step fails
        raise RuntimeError("out of memory")

    monkeypatch.setattr(proposer, "_step", broken)

    async def main():
        drafter = StepDrafter(proposer)
        try:
            sessions = [proposer.start(str(i), p, P_SAMPLING) for i, p in enumerate(humaneval_prompts[:3])]
            failed = await asyncio.gather(*(drafter.propose(s, 2) for s in sessions[:2]), return_exceptions=True)
            return failed, await drafter.propose(sessions[2], 2)
        finally:
            drafter.close()

    failed, later = asyncio.run(main())
    assert [type(f) for f in failed] == [RuntimeError, RuntimeError] and len(later.tokens) == 2


def test_a_fleet_process_hands_the_gil_over_within_a_millisecond():
    import sys

    from flexspec_serve.fleet.drafter import hand_the_gil_over_sooner

    default = sys.getswitchinterval()
    try:
        hand_the_gil_over_sooner()
        assert sys.getswitchinterval() <= 0.001 < default  # a draft step's ops wait less behind the event loop
    finally:
        sys.setswitchinterval(default)


def test_backoff_is_capped_exponential_with_jitter():
    import random

    rng = random.Random(0)
    draws = [[backoff_ms(a, rng) for _ in range(200)] for a in range(10)]
    assert max(draws[0]) <= 50 and max(draws[3]) <= 400 and max(draws[9]) <= 2000
    assert min(draws[9]) < 500 < max(draws[9])  # full jitter spreads retries out


def test_observed_cloud_learns_the_cost_per_verified_position_when_k_varies():
    import random

    from flexspec_serve.edge.devices import CloudProfile
    from flexspec_serve.fleet.clock import ObservedCloud

    rng = random.Random(1)
    varied, steady = ObservedCloud(CloudProfile()), ObservedCloud(CloudProfile())  # prior: 18 ms + 0.8 ms/position
    for _ in range(300):  # this host's CPU: 30 ms + 3 ms per position, with jitter
        k = rng.randint(1, 9)
        varied.record(k, 30.0 + 3.0 * (k + 1) + rng.uniform(-2, 2))
        steady.record(4, 30.0 + 3.0 * 5 + rng.uniform(-2, 2))
    assert varied.per_token_ms == pytest.approx(3.0, abs=0.6) and varied.base_ms == pytest.approx(30.0, abs=4.0)
    assert steady.per_token_ms == pytest.approx(0.8, abs=0.1)  # K never moved: the prior slope stays
    assert steady.verify_ms(4) == pytest.approx(45.0, abs=2.0)  # ... and the base absorbs the rest


def test_the_clouds_share_of_a_round_splits_into_queue_verify_hold_and_path():
    rows = [{"verify_ms": 60.0, "queue_ms": 5.0, "server_verify_ms": 20.0, "server_held_ms": 4.0},
            {"verify_ms": 40.0, "queue_ms": 3.0, "server_verify_ms": 25.0, "server_held_ms": 0.0}]
    c = report.cloud_per_round(rows)
    assert c == {"seen_ms": 50.0, "queue_ms": 4.0, "verify_ms": 22.5, "held_ms": 2.0, "path_ms": 21.5, "held_rate": 0.5}
    assert report.cloud_per_round([]) is None


def test_report_files_have_the_documented_fields(family_models, humaneval_prompts, tmp_path):
    prompts = [p[-40:] for p in humaneval_prompts[:4]]
    spec = small_fleet(devices=6)
    run = report.merge([run_shard(spec, prompts, family_models)])
    summary = report.summarize(run, {"policy": spec.policy, "devices": spec.devices}, [{"t_s": 1.0, "label": "swap"}])
    assert set(report.SUMMARY_FIELDS) <= set(summary)
    assert summary["sessions_lost"] == 0 and summary["sessions_failed"] == 0
    assert any(m["label"] == "swap" for m in summary["version_changes"])
    files = report.write_report(tmp_path, run, summary, report.compare_rows([summary]))
    assert all(f.exists() and f.stat().st_size > 0 for f in files)
    assert {p.name for p in files} >= set(report.PLOTS)
    with (tmp_path / "rounds.csv").open() as fh:
        header = next(csv.reader(fh))
    assert {"device", "device_class", "k", "accepted", "round_ms", "rate_up_bps", "lag_ms", "version"} <= set(header)
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == len(run.rounds)
    assert "Policies on the same fleet" in (tmp_path / "report.md").read_text()
    by_kind = summary["emulation_lag_ms"]["by_kind"]  # which part of the emulation falls behind
    assert {"session_start", "draft", "uplink", "downlink"} <= set(by_kind)
    assert by_kind["session_start"]["events"] == summary["sessions_started"]
    assert by_kind["uplink"]["events"] == by_kind["downlink"]["events"] == len(run.rounds)  # one trip per round
    assert sum(v["events"] for v in by_kind.values()) == summary["emulation_lag_ms"]["events"]
    assert {"expected_tokens", "expected_round_ms"} <= set(header)  # the controller's expectation per round
    modelled = [r for r in run.rounds if r["expected_round_ms"] is not None]
    assert len(modelled) > 0.8 * len(run.rounds)  # all but rounds cut short at a session's end
    assert all(r["expected_round_ms"] > 0 and r["expected_tokens"] >= 1 for r in modelled)
    assert 0.2 < summary["model_speed_ratio"] < 5 and all(c["model_speed_ratio"] for c in summary["per_class"])


def test_controller_fit_compares_expected_with_realized_speed_of_modelled_rounds():
    rounds = [{"tokens": 2, "round_ms": 200.0, "expected_tokens": 2.0, "expected_round_ms": 100.0},
              {"tokens": 1, "round_ms": 50.0, "expected_tokens": None, "expected_round_ms": None}]
    assert report.model_speed_ratio(rounds) == pytest.approx(2.0)  # expected twice as fast: optimistic
    assert report.model_speed_ratio(rounds[1:]) is None  # a baseline's rounds: no model to compare


@pytest.mark.parametrize("patch, field", [
    ({"devices": 0}, "devices"), ({"policy": "fastest"}, "policy"), ({"transport": "pigeon"}, "transport"),
    ({"arrival": {"think_time_s": -1}}, "arrival.think_time_s"), ({"arival": {}}, "arival"),
    ({"mix": [{"device_class": "toaster", "share": 1.0}]}, "toaster"),
    ({"ahead": "sometimes"}, "ahead"), ({"pipeline": True}, "write `ahead: pipeline`"),  # the old boolean fields
    ({"draft_ahead": False}, "write `ahead: draft`"), ({"siblings": True}, "write `tree: second`"),
    ({"tree": "bush"}, "tree"),
])
def test_bad_fleet_file_names_the_field(tmp_path, patch, field):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"mix": MIX, **patch}))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_yaml(FleetSpec, path)


@pytest.mark.parametrize("name", ["demo", "mixed"])
def test_the_shipped_fleet_files_load(name):
    from pathlib import Path

    spec = load_yaml(FleetSpec, Path(__file__).resolve().parents[1] / "deployments" / "fleets" / f"{name}.yaml")
    assert spec.ahead == "off" and spec.tree == "chain"


def test_a_bare_yaml_off_is_the_ahead_mode_off(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("mix: [{device_class: wearable, share: 1.0}]\nahead: off\n")  # YAML 1.1 reads it as false
    assert load_yaml(FleetSpec, path).ahead == "off"


def test_fleet_plans_are_deterministic_and_split_evenly():
    spec = small_fleet(devices=101, actors=4)
    shards = spec.shards()
    assert [len(s) for s in shards] == [26, 25, 25, 25]
    assert spec.plans() == small_fleet(devices=101, actors=4).plans()
    assert len({p.offset_ms for p in spec.plans()}) == 101  # every device at its own trace offset


def test_class_comparison_divides_each_class_by_its_own_cloud_only_speed():
    from flexspec_serve.fleet.report import class_compare_rows

    def summary(policy, speeds):
        return {"policy": policy, "per_class": [{"device_class": c, "decode_tokens_per_s": v, "acceptance_length": 2.5,
                                                 "mean_k": 4.0} for c, v in speeds.items()]}

    rows = class_compare_rows([summary("adaptive", {"phone": 30.0, "watch": 12.0}),
                               summary("cloud-only", {"phone": 10.0, "watch": 10.0})])
    ratio = {(r["device class"], r["policy"]): r["vs cloud-only"] for r in rows}
    assert ratio == {("phone", "adaptive"): 3.0, ("phone", "cloud-only"): 1.0, ("watch", "adaptive"): 1.2,
                     ("watch", "cloud-only"): 1.0}


def test_repeats_divide_each_seed_by_its_own_cloud_only_run_then_average():
    from flexspec_serve.fleet.report import repeat_rows

    def summary(policy, phone, watch, ahead="off"):
        return {"policy": policy, "ahead": ahead, "tree": "chain", "decode_tokens_per_s": (phone + watch) / 2,
                "per_class": [{"device_class": "phone", "decode_tokens_per_s": phone},
                              {"device_class": "watch", "decode_tokens_per_s": watch}]}

    rows = repeat_rows({1: [summary("adaptive", 30.0, 10.0), summary("cloud-only", 10.0, 10.0)],
                        2: [summary("adaptive", 24.0, 12.0), summary("cloud-only", 12.0, 6.0),
                            summary("adaptive", 36.0, 18.0, ahead="draft")]})
    by = {r["policy"]: r for r in rows}
    assert by["adaptive"] == {"policy": "adaptive", "seed 1": 2.0, "seed 2": 2.0, "mean": 2.0, "sd": 0.0, "min": 2.0,
                              "max": 2.0, "phone mean": 2.5, "watch mean": 1.5}  # (3 + 2) / 2 and (1 + 2) / 2
    assert by["adaptive + draft-ahead"]["mean"] == 3.0 and "seed 1" not in by["adaptive + draft-ahead"]
    assert by["adaptive + draft-ahead"]["sd"] is None  # one seed
    spread = repeat_rows({seed: [summary("adaptive", 10.0 * r, 10.0 * r), summary("cloud-only", 10.0, 10.0)]
                          for seed, r in enumerate((1.5, 2.0, 2.5))})
    assert spread[0]["mean"] == 2.0 and spread[0]["sd"] == 0.5
    assert by["cloud-only"]["mean"] == 1.0
    with pytest.raises(ValueError, match="seed 3 has no cloud-only"):
        repeat_rows({3: [summary("adaptive", 30.0, 10.0)]})
