"""Version management without Serve: the canary judge, the manager on a real registry file with a fake
deployer (same interface as the Serve one), the compatibility gate on the tiny family."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from deployments.config import FileRegistry, RegistryState, VersionSpec
from deployments.versions import VersionError, VersionManager
from flexspec_serve.canary import CanaryRules, VersionWindow, judge_canary
from flexspec_serve.engine.stats import AcceptanceStats
from flexspec_serve.versions import compatibility_gate
from flexspec_serve.zoo.loading import TokenizerMismatch
from tests.fakes import FakeClock

RULES = CanaryRules(window_s=30, min_rounds=50, max_acceptance_drop=0.2, max_error_rate=0.01)


class FakeDeployer:
    def __init__(self):
        self.deployed, self.deleted = [], []

    def deploy(self, spec: VersionSpec, draft_path: str) -> None:
        self.deployed.append(spec.name)

    def delete(self, version: str) -> None:
        self.deleted.append(version)


@pytest.fixture
def manager(tmp_path):
    reg = FileRegistry(tmp_path / "registry.json")
    reg.save(RegistryState(versions={v: VersionSpec(name=v, path=f"/m/{v}") for v in ("v1", "v2")},
                           aliases={"stable": "v1"}, draft_path="/m/draft"))
    return VersionManager(reg, FakeDeployer(), clock=FakeClock(1000.0), idle_s=5.0)


def stats(rounds: int, alpha: float, errors: int = 0, idle_s: float = 0.0, k: int = 4) -> dict:
    return {"rounds": rounds, "draft_tokens": rounds * k, "accepted_tokens": round(rounds * k * alpha),
            "errors": errors, "idle_s": idle_s}


def passing_gate(version: str) -> dict:
    return {"passed": True, "message": f"{version} passes"}


def test_judge_waits_for_rounds_then_promotes_a_healthy_candidate():
    base = VersionWindow(200, 800, 480, 0)  # alpha 0.6
    assert judge_canary(RULES, 40, base, VersionWindow(10, 40, 23, 0)).action == "continue"
    assert judge_canary(RULES, 10, base, VersionWindow(100, 400, 230, 0)).action == "continue"
    assert judge_canary(RULES, 31, base, VersionWindow(100, 400, 230, 0)).action == "promote"  # tau 2.21 vs 2.31


def test_judge_rolls_back_on_an_acceptance_drop_or_errors():
    base = VersionWindow(200, 800, 480, 0)  # alpha 0.6
    assert judge_canary(RULES, 5, base, VersionWindow(100, 400, 120, 0)).action == "rollback"  # tau 1.43 vs 2.31
    assert judge_canary(RULES, 5, base, VersionWindow(20, 80, 48, 5)).action == "rollback"  # errors, before min_rounds


def window(sessions: list[tuple[int, int]], rounds_per_session: int = 10) -> VersionWindow:
    """A version's window over sessions of (accepted, draft) tokens, summed as the replicas sum them."""
    return VersionWindow.of_sessions([AcceptanceStats(rounds=rounds_per_session, draft_tokens=drafted,
                                                      accepted_tokens=accepted) for accepted, drafted in sessions])


def test_alpha_error_is_the_session_clustered_one():
    sessions = [(38, 40), (6, 40), (20, 40), (30, 60), (12, 20)]
    w = window(sessions)
    a, d = np.array(sessions, dtype=float).T
    alpha = a.sum() / d.sum()
    expected = np.sqrt(len(a) / (len(a) - 1) * ((a - alpha * d) ** 2).sum()) / d.sum()
    assert w.alpha == pytest.approx(alpha) and w.alpha_se == pytest.approx(expected)
    assert window([(20, 40)] * 5).alpha_se == pytest.approx(0.0)  # identical sessions: no spread
    assert window([(20, 40)]).alpha_se == float("inf") and VersionWindow(10, 40, 20, 0).alpha_se == 0.0


def test_a_drop_from_a_few_uneven_sessions_waits_for_evidence_and_the_same_drop_over_many_rolls_back():
    base = window([(24, 40)] * 40)  # alpha 0.6 in every session
    # candidate alpha 0.4 (tau 1.65 vs 2.31): once from five sessions that range from 0.2 to 0.6 ...
    uneven = window([(8, 40), (12, 40), (16, 40), (20, 40), (24, 40)])
    assert uneven.alpha == pytest.approx(0.4)
    decision = judge_canary(RULES, 40, base, uneven)
    assert decision.action == "continue" and "not yet beyond" in decision.reason
    # ... then from forty sessions spread the same way: the drop stands out
    many = window([(8, 40), (12, 40), (16, 40), (20, 40), (24, 40)] * 8)
    assert judge_canary(RULES, 5, base, many).action == "rollback"


def test_acceptance_is_judged_only_after_enough_sessions_on_each_version():
    base = window([(24, 40)] * 40)
    few = window([(4, 40)] * 4, rounds_per_session=30)  # 120 rounds, but 4 sessions
    decision = judge_canary(RULES, 40, base, few)
    assert decision.action == "continue" and "5 sessions" in decision.reason
    assert judge_canary(RULES, 5, base, window([(4, 40)] * 5, rounds_per_session=30)).action == "rollback"
    healthy = window([(22, 40), (26, 40), (23, 40), (25, 40), (24, 40), (21, 40)])
    assert judge_canary(RULES, 31, base, healthy).action == "promote"


def test_manager_judges_on_the_window_of_young_sessions_when_replicas_give_one(manager):
    manager.record_gate("v2", passing_gate("v2"))
    manager.canary("v2", 0.2, RULES, stats={"v1": stats(0, 0.0), "v2": stats(0, 0.0)})
    manager.clock.t += 31
    young = {"rounds": 100, "draft_tokens": 400, "accepted_tokens": 140, "errors": 0}  # alpha 0.35 for both
    decision = manager.tick({"v1": {**stats(5000, 0.6), "window": young}, "v2": {**stats(100, 0.35), "window": young}})
    assert decision[0].action == "promote"  # the cumulative alpha of v1's old sessions (0.6) is not the yardstick


def as_reply(w: VersionWindow) -> dict:
    """A replica's `window` reply for this window (`VerifierServer.stats`)."""
    return {"rounds": w.rounds, "draft_tokens": w.draft_tokens, "accepted_tokens": w.accepted_tokens,
            **w.spread.as_dict()}


def test_the_canary_keeps_the_session_rules_it_was_started_with(manager):
    base = window([(24, 40)] * 10)  # alpha 0.6
    spread = window([(12, 40), (20, 40)] * 5)  # alpha 0.4 +- 0.033: past the limit by 2 standard errors, not 3
    assert judge_canary(RULES, 31, base, spread).action == "rollback"  # z = 2
    manager.record_gate("v2", passing_gate("v2"))
    strict = CanaryRules(window_s=30, min_rounds=50, min_sessions=12, z=3.0)
    plan = manager.canary("v2", 0.2, strict, stats={"v1": stats(0, 0.0), "v2": stats(0, 0.0)}).canary
    assert (plan.min_sessions, plan.z) == (12, 3.0)
    manager.clock.t += 31
    reply = {"v1": {**stats(100, 0.6), "window": as_reply(base)}, "v2": {**stats(100, 0.4), "window": as_reply(spread)}}
    assert "waiting for 12 sessions" in manager.tick(reply)[0].reason
    more = window([(24, 40)] * 12), window([(12, 40), (20, 40)] * 6)
    reply = {v: {**stats(120, 0.5), "window": as_reply(w)} for v, w in zip(("v1", "v2"), more)}
    decision = manager.tick(reply)[0]
    assert decision.action == "continue" and "not yet beyond" in decision.reason  # z = 3


def test_judge_is_not_fooled_by_cloud_only_rounds_on_young_sessions():
    base = VersionWindow(200, 800, 480, 0)
    young = VersionWindow(200, 400, 240, 0)  # half its rounds drafted nothing (K = 0): same alpha
    assert judge_canary(RULES, 31, base, young).action == "promote"


def test_added_version_takes_no_traffic_until_told(manager):
    manager.add(VersionSpec(name="v3", path="/m/v3"))
    state = manager.state()
    assert manager.deployer.deployed == ["v3"] and "v3" in state.versions
    assert {state.resolve("stable", f"s{i}") for i in range(200)} == {"v1"}
    assert state.events[-1]["action"] == "add"
    with pytest.raises(VersionError, match="already exists"):
        manager.add(VersionSpec(name="v3", path="/m/v3"))


def test_canary_needs_the_gate_then_splits_new_sessions(manager):
    with pytest.raises(VersionError, match="refused by the gate"):
        manager.canary("v2", 0.2, RULES)
    manager.record_gate("v2", passing_gate("v2"))
    state = manager.canary("v2", 0.2, RULES, stats={"v1": stats(10, 0.6), "v2": stats(0, 0.0)})
    share = sum(state.resolve("stable", f"s{i}") == "v2" for i in range(1000)) / 1000
    assert 0.16 < share < 0.24
    assert state.canary.start_counters["v1"]["rounds"] == 10


def test_canary_with_low_acceptance_is_rolled_back_automatically(manager):
    manager.record_gate("v2", passing_gate("v2"))
    manager.canary("v2", 0.2, RULES, stats={"v1": stats(0, 0.0), "v2": stats(0, 0.0)})
    manager.clock.t += 10
    decisions = manager.tick({"v1": stats(400, 0.6), "v2": stats(100, 0.25)})
    state = manager.state()
    assert decisions[0].action == "rollback" and state.aliases["stable"] == "v1"
    assert state.canary.status == "rolled_back" and "acceptance" in state.canary.reason


def test_healthy_canary_is_promoted_after_its_window(manager):
    manager.record_gate("v2", passing_gate("v2"))
    manager.canary("v2", 0.2, RULES, stats={"v1": stats(0, 0.0), "v2": stats(0, 0.0)})
    manager.clock.t += 10
    assert manager.tick({"v1": stats(400, 0.6), "v2": stats(100, 0.58)})[0].action == "continue"
    manager.clock.t += 25
    assert manager.tick({"v1": stats(800, 0.6), "v2": stats(200, 0.58)})[0].action == "promote"
    assert manager.state().aliases["stable"] == "v2"


def test_retire_drains_then_deletes_and_strays_follow_the_alias(manager):
    with pytest.raises(VersionError, match="still point"):
        manager.retire("v1")
    manager.promote("v2")
    state = manager.retire("v1", mode="finish")
    assert state.resolve("v1", "old", first_round=False) == "v1"  # pinned sessions finish on v1
    assert state.resolve("v1", "new", first_round=True) == "v2"  # no new sessions on v1
    manager.tick({"v1": stats(50, 0.6, idle_s=1.0), "v2": stats(5, 0.6)})
    assert manager.deployer.deleted == []  # still busy
    manager.tick({"v1": stats(50, 0.6, idle_s=6.0), "v2": stats(5, 0.6)})
    state = manager.state()
    assert manager.deployer.deleted == ["v1"] and "v1" not in state.versions
    assert state.resolve("v1", "straggler", first_round=False) == "v2"


def test_migrating_retire_moves_pinned_rounds_at_once(manager):
    manager.promote("v2")
    state = manager.retire("v1", mode="migrate")
    assert state.resolve("v1", "old", first_round=False) == "v2"


def test_gate_passes_the_same_model_and_refuses_a_higher_bar(tiny_family):
    texts = ["def add(a, b):\n    return", "import os\n\ndef list_files(path):\n"]
    ok = compatibility_gate(tiny_family / "draft", "v1", tiny_family / "v1", "v1", tiny_family / "v1", texts,
                            max_new=12)
    assert ok.passed and ok.ratio == pytest.approx(1.0)
    refused = compatibility_gate(tiny_family / "draft", "v1", tiny_family / "v1", "v1", tiny_family / "v1", texts,
                                 max_new=12, min_fraction=1.5)
    assert not refused.passed and "refused" in refused.message


def test_gate_refuses_a_candidate_with_another_tokenizer(tiny_family, tmp_path):
    from flexspec_serve.zoo.loading import load_tokenizer

    other = tmp_path / "v9"
    shutil.copytree(tiny_family / "v1", other)
    tok = load_tokenizer(other)
    tok.add_tokens(["<unrelated-token-a>", "<unrelated-token-b>"])
    tok.save_pretrained(other)
    with pytest.raises(TokenizerMismatch, match="v9"):
        compatibility_gate(tiny_family / "draft", "v9", other, "v1", tiny_family / "v1", ["x = 1"])


def test_api_keys_name_the_client_and_refuse_others(monkeypatch):
    from deployments.security import ApiKeys

    monkeypatch.setenv("FLEXSPEC_API_KEYS", "fleet-a:alpha-key, fleet-b:beta-key")
    keys = ApiKeys.load(None)
    assert keys.enabled and keys.client("Bearer beta-key") == "fleet-b"
    assert keys.client("Bearer alpha") is None and keys.client("") is None
    monkeypatch.delenv("FLEXSPEC_API_KEYS")
    assert not ApiKeys.load(None).enabled


def test_rate_limiter_allows_a_burst_then_the_rate_and_says_how_long_to_wait():
    from deployments.security import RateLimiter

    clock = FakeClock(0.0)
    limiter = RateLimiter(rate_per_s=10, burst=3, max_keys=2, clock=clock)
    assert [limiter.allow("s1")[0] for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("s1")[1] == pytest.approx(0.1)
    clock.t += 0.1
    assert limiter.allow("s1")[0] and limiter.allow("s2")[0]
    limiter.allow("s3")
    assert len(limiter.buckets) == 2 and "s1" not in limiter.buckets  # bounded memory: oldest forgotten


def test_on_real_sessions_an_identical_candidate_is_rarely_rolled_back_and_a_much_worse_one_always():
    """`benchmarks.canary_judge` on the committed LTE run's sessions (seeded): counting rounds alone rolls an
    identical candidate back often, weighing the sessions' spread seldom; both catch a candidate 60 % lower."""
    import random

    from benchmarks.canary_judge import DEFAULT_ROUNDS, first_rollback, load_sessions

    pool = load_sessions(DEFAULT_ROUNDS)
    rules = CanaryRules(min_rounds=100)

    def rollbacks(f: float, counted: bool) -> int:
        rng = random.Random(0)
        return sum(first_rollback(pool, f, rules, counted, 0.3, 40, rng) is not None for _ in range(40))

    assert len(pool) > 50
    assert rollbacks(1.0, counted=False) >= 5 and rollbacks(1.0, counted=True) <= 2
    assert rollbacks(0.4, counted=False) == 40 and rollbacks(0.4, counted=True) == 40


def test_cli_canary_sends_the_session_rules_and_the_api_checks_them():
    from pydantic import ValidationError

    from deployments.admin import CanaryRequest
    from deployments.versions_cli import _request
    from flexspec_serve.cli import build_parser

    args = build_parser().parse_args(["versions", "canary", "v3", "--min-sessions", "8", "--z", "2.5"])
    method, path, body = _request(args)
    req = CanaryRequest.model_validate(body)
    assert (method, path) == ("POST", "/admin/versions/v3/canary") and (req.min_sessions, req.z) == (8, 2.5)
    with pytest.raises(ValidationError, match="min_sessions"):
        CanaryRequest.model_validate({**body, "min_sessions": 1})


def test_a_canary_request_without_rules_gets_the_judges_defaults_and_the_cli_offers_every_rule():
    from deployments.config import CanaryRuleFields
    from deployments.versions import canary_rules
    from deployments.versions_cli import _request
    from flexspec_serve.cli import build_parser

    assert canary_rules(CanaryRuleFields()) == CanaryRules()
    flags = [f"--{name.replace('_', '-')}" for name in CanaryRuleFields.model_fields]
    argv = ["versions", "canary", "v3"] + [a for flag in flags for a in (flag, "3")]
    body = _request(build_parser().parse_args(argv))[2]
    assert {f: body[f] for f in CanaryRuleFields.model_fields} == dict.fromkeys(CanaryRuleFields.model_fields, 3)
