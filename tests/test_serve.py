"""The cloud side on a real local Ray + Serve (never a mocked Serve), with the tiny family."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import time

import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from deployments.app import deploy  # noqa: E402
from deployments.config import AppConfig, VersionSpec  # noqa: E402
from deployments.transport import HandleTransport, HttpTransport  # noqa: E402
from flexspec_serve import protocol as P  # noqa: E402
from flexspec_serve.engine.generate import speculative_generate  # noqa: E402
from flexspec_serve.engine.proposer import DraftProposer  # noqa: E402
from flexspec_serve.engine.verifier import Verifier  # noqa: E402

pytestmark = pytest.mark.serve
ADMIN_TOKEN = "test-admin-token-3f9a"
API_KEY = "fleet-key-7c1d"
KEYED = {"authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tiny_family, tmp_path_factory):
    port = free_port()
    registry = tmp_path_factory.mktemp("registry") / "registry.json"
    versions = [VersionSpec(name="v1", path=str(tiny_family / "v1"), num_replicas=2, num_cpus=0.25, max_batch_size=16,
                            batch_wait_timeout_s=0.01),
                VersionSpec(name="v2", path=str(tiny_family / "v2"), num_cpus=0.25, max_batch_size=16,
                            batch_wait_timeout_s=0.01)]
    cfg = AppConfig(draft_path=str(tiny_family / "draft"), versions=versions, registry_path=str(registry),
                    aliases={"stable": "v1", "canary": "v2", "half": {"v1": 0.5, "v2": 0.5}}, router_num_cpus=0.1,
                    drain_idle_s=2.0)
    os.environ["FLEXSPEC_ADMIN_TOKEN"] = ADMIN_TOKEN  # replicas of this local Ray inherit both
    os.environ["FLEXSPEC_API_KEYS"] = f"test-fleet:{API_KEY}"
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    handle = deploy(cfg)
    yield {"handle": handle, "url": f"http://127.0.0.1:{port}", "registry": registry}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture
def no_canary_left_running(app, request):
    """A swap test that fails with its canary still running rolls it back on the way out, so the next test
    does not find part of `stable`'s new sessions going to a candidate left behind (one failure, not three)."""
    yield
    import httpx

    from deployments.config import FileRegistry

    canary = FileRegistry(app["registry"]).load().canary
    if canary is not None and canary.status == "running":
        reply = httpx.post(f"{app['url']}/admin/rollback", json={"reason": f"left running by {request.node.name}"},
                           headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
        assert reply.status_code == 200, reply.text


def first_round(session_id: str, target: str | None, prompt=(5, 6, 7, 8)) -> P.DraftRound:
    return P.DraftRound(session_id=session_id, seq=0, target=target, full_context=list(prompt))


def served_version(app, rnd: P.DraftRound) -> str:
    status, body = app["handle"].round_compact.remote(P.encode_round(rnd)).result()
    assert status == 200, body
    return P.decode_result(body).version


def test_explicit_version_alias_and_weighted_split_route_as_configured(app):
    assert served_version(app, first_round("a", "v2")) == "v2"
    assert served_version(app, first_round("b", "canary")) == "v2"
    assert served_version(app, first_round("c", None)) == "v1"  # default alias: stable
    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: served_version(app, first_round(f"split-{i}", "half")), range(200)))
    share = got.count("v2") / len(got)
    assert 0.4 <= share <= 0.6, share  # 200 sessions: +-0.1 is over 2.8 sigma
    # deterministic by session: the same session id gets the same version again
    assert served_version(app, first_round("split-7", "half")) == got[7]


def test_greedy_results_through_serve_equal_the_in_process_engine(app, family_models, humaneval_prompts):
    prompts = [p[-48:] for p in humaneval_prompts[:4]]
    draft = family_models["draft"]
    local = speculative_generate(DraftProposer(draft), Verifier(family_models["v2"], draft), prompts, 16, 3)
    remote = speculative_generate(DraftProposer(draft), HandleTransport(app["handle"]), prompts, 16, 3,
                                  session_prefix="eq-", target="v2")
    assert [r.tokens for r in remote] == [r.tokens for r in local]
    assert all(out.version == "v2" for r in remote for out in r.rounds)


def test_concurrent_sessions_are_verified_in_batches(app, family_models, humaneval_prompts):
    draft = family_models["draft"]
    speculative_generate(DraftProposer(draft), HandleTransport(app["handle"]), [p[-32:] for p in humaneval_prompts[:16]],
                         12, 4, session_prefix="batch-", target="v2")
    stats = app["handle"].stats.remote().result()
    assert stats["v2"]["max_batch_size_seen"] > 1, stats["v2"]
    assert len(stats["v1"]["replicas"]) == 2 and len(stats["v2"]["replicas"]) == 1  # merged over every replica
    report = serve.get_deployment_handle("verifier-v2", "flexspec-v2").record_autoscaling_stats.remote().result()
    assert report["verified_tokens_per_s"] > 0  # the custom metric the autoscaling policy reads


def test_long_session_keeps_hitting_its_replicas_kv_cache(app, family_models, humaneval_prompts):
    draft = family_models["draft"]
    res = speculative_generate(DraftProposer(draft), HandleTransport(app["handle"]), [humaneval_prompts[5][-40:]],
                               120, 2, session_prefix="long-", target="v1")[0]  # v1 has two replicas
    hits = sum(out.cache_hit for out in res.rounds[1:])  # round 0 builds the cache
    assert hits / (len(res.rounds) - 1) > 0.9 and len(res.rounds) > 30


def test_direct_routing_in_the_client_matches_the_router_and_the_in_process_engine(app, family_models,
                                                                                   humaneval_prompts):
    from deployments.transport import DirectTransport

    direct = DirectTransport(app["handle"])
    for sid, target in [("d-a", "v2"), ("d-b", "canary"), ("d-c", None)] + [(f"d-split-{i}", "half") for i in range(12)]:
        [ex] = direct.round_trip([first_round(sid, target)])
        assert ex.result.version == served_version(app, first_round(sid, target)), (sid, target)
    prompts = [p[-48:] for p in humaneval_prompts[:4]]
    draft = family_models["draft"]
    local = speculative_generate(DraftProposer(draft), Verifier(family_models["v1"], draft), prompts, 16, 3)
    remote = speculative_generate(DraftProposer(draft), direct, prompts, 16, 3, session_prefix="direct-", target="v1")
    assert [r.tokens for r in remote] == [r.tokens for r in local]
    [unknown] = direct.round_trip([first_round("d-x", "no-such-version")])
    assert unknown.result.error.code == "unknown_version" and "v1" in unknown.result.error.message


def test_direct_routing_sees_a_registry_change_within_its_refresh_period(app):
    import httpx

    from deployments.transport import DirectTransport

    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    direct = DirectTransport(app["handle"], refresh_s=0.2)
    try:
        for n, version in enumerate(["v2", "v1", "v2"]):
            assert httpx.put(f"{app['url']}/admin/aliases/gamma", json={"target": version}, headers=auth,
                             timeout=30).status_code == 200
            time.sleep(0.3)
            [ex] = direct.round_trip([first_round(f"gamma-{n}", "gamma")])
            assert ex.result.version == version
    finally:
        httpx.delete(f"{app['url']}/admin/aliases/gamma", headers=auth, timeout=30)


def test_http_json_and_compact_rounds_and_errors(app):
    import httpx

    url = app["url"]
    ok = httpx.post(f"{url}/v1/round", json=first_round("h1", "v1").model_dump(), headers=KEYED, timeout=30)
    assert ok.status_code == 200 and ok.json()["version"] == "v1"
    transport = HttpTransport(url, api_key=API_KEY)
    ex = transport.round_trip([first_round("h2", "canary")])[0]
    assert isinstance(ex.result, P.RoundResult) and ex.result.version == "v2" and ex.bytes_up < 40
    missing = httpx.post(f"{url}/v1/round", json=first_round("h3", "v9").model_dump(), headers=KEYED, timeout=30)
    assert missing.status_code == 404 and "v9" in missing.json()["error"]["message"]
    assert "v1" in missing.json()["error"]["message"] and "canary" in missing.json()["error"]["message"]
    bad = httpx.post(f"{url}/v1/round", json={"session_id": "x", "seq": -1}, headers=KEYED, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "seq"
    resync = httpx.post(f"{url}/v1/round", json={"session_id": "never-seen", "seq": 4, "target": "v1"},
                        headers=KEYED, timeout=30)
    assert resync.status_code == 409 and resync.json()["error"]["code"] == "resync_required"
    for garbage in (b"\xff\xfe\x00\x81", b"&\x13\xa7\x18"):  # not UTF-8: found by the schemathesis run
        resp = httpx.post(f"{url}/v1/round", content=garbage, timeout=30,
                          headers={**KEYED, "content-type": "application/json"})
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "invalid_json"


def test_openai_compatible_completions_and_models(app):
    import httpx

    url = app["url"]
    models = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert {"v1", "v2", "stable", "canary"} <= {m["id"] for m in models["data"]}
    resp = httpx.post(f"{url}/v1/completions", json={"model": "canary", "prompt": "def add(a, b):",
                                                     "max_tokens": 5, "temperature": 0}, headers=KEYED, timeout=60)
    body = resp.json()
    assert resp.status_code == 200, body
    assert body["object"] == "text_completion" and body["model"] == "v2"
    assert body["usage"]["completion_tokens"] <= 5 and isinstance(body["choices"][0]["text"], str)
    for body, status in (({"model": "nope", "prompt": "x"}, 404), ({"prompt": "x", "max_tokens": 0}, 422),
                         ({"prompt": ", ", "seed": 10**19}, 422),  # the seed: found by the schemathesis run
                         ({"prompt": ["ok", "a\ud800b"]}, 422)):  # a lone surrogate: valid JSON, not text
        raw = json.dumps(body)  # ASCII-escaped, so the lone surrogate travels as valid JSON
        assert httpx.post(f"{url}/v1/completions", content=raw, headers={**KEYED, "content-type": "application/json"},
                          timeout=30).status_code == status


def test_a_completions_prompts_are_generated_together_each_as_it_would_be_alone(app, tokenizer):
    import httpx

    prompts = ["def add(a, b):", "import os\n", "class Stack:", "for i in range("]
    alone = [httpx.post(f"{app['url']}/v1/completions", json={"prompt": p, "max_tokens": 30, "temperature": 0},
                        headers=KEYED, timeout=60).json()["choices"][0]["text"] for p in prompts]
    # before `VerifierDeployment.complete`, concurrent calls per prompt did not return (see its docstring)
    resp = httpx.post(f"{app['url']}/v1/completions", json={"prompt": prompts, "max_tokens": 30, "temperature": 0},
                      headers=KEYED, timeout=60)
    assert resp.status_code == 200, resp.text
    assert [c["text"] for c in resp.json()["choices"]] == alone
    for prompt, why in (([], "at least 1"), (["x"] * 17, "at most 16")):
        bad = httpx.post(f"{app['url']}/v1/completions", json={"prompt": prompt}, headers=KEYED, timeout=30)
        assert bad.status_code == 422 and why in bad.json()["error"]["message"], bad.text
    # one prompt too long for the model: the request fails with its error, and the other prompt stops
    too_long = tokenizer.decode(tokenizer(" ".join(map(str, range(2000))), add_special_tokens=False)["input_ids"][:2000])
    refused = httpx.post(f"{app['url']}/v1/completions", json={"prompt": ["def f():", too_long], "max_tokens": 1024},
                         headers=KEYED, timeout=60)
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "context", refused.text


def test_completions_refuse_an_oversized_prompt_and_stop_at_the_models_length(app, tokenizer):
    import httpx

    url = app["url"]
    ids = tokenizer(" ".join(str(i) for i in range(2000)), add_special_tokens=False)["input_ids"]
    too_long = httpx.post(f"{url}/v1/completions", json={"prompt": tokenizer.decode(ids[:2000]), "max_tokens": 4},
                          headers=KEYED, timeout=60)
    assert too_long.status_code == 422 and too_long.json()["error"]["field"] == "context"
    near = httpx.post(f"{url}/v1/completions", json={"prompt": tokenizer.decode(ids[:490]), "max_tokens": 60,
                                                      "temperature": 5e-324}, headers=KEYED, timeout=120)
    body = near.json()
    assert near.status_code == 200, body
    assert body["choices"][0]["finish_reason"] == "length" and 0 < body["usage"]["completion_tokens"] < 60


def test_registry_persists_and_is_reread(app):
    from deployments.config import FileRegistry

    reg = FileRegistry(app["registry"])
    state = reg.load()
    assert state is not None and state.aliases["stable"] == "v1"
    reg.save(state.model_copy(update={"aliases": {**state.aliases, "stable": "v2"}}))
    time.sleep(0.6)  # the router checks the file at most every 0.5 s
    assert served_version(app, first_round("after-write", None)) == "v2"
    reg.save(reg.load().model_copy(update={"aliases": {**state.aliases, "stable": "v1"}}))


def test_admin_api_writes_the_registry_and_it_survives_a_router_restart(app):
    import httpx

    url, auth = app["url"], {"authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.get(f"{url}/admin/registry", timeout=30).status_code == 401
    assert httpx.get(f"{url}/admin/registry", headers={"authorization": "Bearer wrong"}, timeout=30).status_code == 401
    bad = httpx.put(f"{url}/admin/aliases/beta", json={"target": "v9"}, headers=auth, timeout=30)
    assert bad.status_code == 422 and "v9" in bad.json()["error"]["message"]
    ok = httpx.put(f"{url}/admin/aliases/beta", json={"target": {"v1": 0.0, "v2": 1.0}}, headers=auth, timeout=30)
    assert ok.status_code == 200
    assert served_version(app, first_round("beta-1", "beta")) == "v2"
    routers = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if a["namespace"] == "serve" and "#router#" in a["name"]]
    assert routers, ray.util.list_named_actors(all_namespaces=True)
    ray.kill(ray.get_actor(routers[0]["name"], namespace="serve"), no_restart=True)
    deadline = time.monotonic() + 90
    while True:
        try:
            assert served_version(app, first_round(f"beta-after-{time.monotonic_ns()}", "beta")) == "v2"
            break
        except AssertionError:
            raise
        except Exception:  # the router is being replaced
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    reg = httpx.get(f"{url}/admin/registry", headers=auth, timeout=30).json()
    assert reg["aliases"]["beta"] == {"v1": 0.0, "v2": 1.0}
    assert httpx.delete(f"{url}/admin/aliases/beta", headers=auth, timeout=30).status_code == 200


@pytest.mark.parametrize("ahead, tree", [("off", "chain"), ("pipeline", "chain"), ("draft", "branches")])
def test_fleet_of_20_devices_over_2_actors_finishes_clean_and_greedy_matches_the_target(
        app, tiny_family, family_models, humaneval_prompts, tmp_path, ahead, tree):
    from deployments.loadtest import run_report
    from flexspec_serve.fleet.report import PLOTS, SUMMARY_FIELDS
    from flexspec_serve.fleet.spec import FleetSpec

    prompts = [p[-40:] for p in humaneval_prompts[:8]]
    spec = FleetSpec(devices=20, actors=2, actor_num_cpus=0.2, max_new_tokens=12, duration_s=4, target="stable",
                     ahead=ahead, tree=tree,
                     mix=[{"device_class": "flagship-phone", "share": 0.5, "channel": "TMobile-LTE-short"},
                          {"device_class": "midrange-phone", "share": 0.5, "channel": "fading"}],
                     arrival={"start_within_s": 1, "think_time_s": 0.5, "sessions_per_device": 2})
    summary = run_report(spec, prompts, str(tiny_family / "draft"), tmp_path, show_progress=False)
    assert set(SUMMARY_FIELDS) <= set(summary)
    # every device starts its first session within 1 s; a second one starts only if the first ended in time
    # (a loaded host once left 2 of the 40 unstarted when the 4 s of arrivals ended): every started one completes
    started = summary["sessions_started"]
    assert 20 <= started <= 40 and summary["sessions_completed"] == started
    assert summary["sessions_failed"] == summary["sessions_lost"] == 0 and not summary["device_crashes"]
    ref = [r.tokens for r in speculative_generate(None, Verifier(family_models["v1"]), prompts, 12)]
    sessions = [json.loads(line) for line in (tmp_path / "sessions.jsonl").read_text().splitlines()]
    assert len(sessions) == started and all(s["version"] == "v1" for s in sessions)
    assert all(s["tokens"] == ref[s["prompt_index"]] for s in sessions)
    assert all((tmp_path / name).exists() for name in ("summary.json", "rounds.csv", "report.md", *PLOTS))
    assert (summary["pipelined_round_rate"] > 0) == (ahead == "pipeline")  # rounds sent before their predecessor's answer


def test_fleet_over_http_reaches_the_router_like_a_remote_device(app, tiny_family, humaneval_prompts, tmp_path):
    from deployments.loadtest import fleet_api_key, run_report
    from flexspec_serve.fleet.spec import FleetSpec

    key_file = tmp_path / "fleet.key"  # this fleet's own key, from a secrets file named in its spec
    key_file.write_text(API_KEY + "\n")
    spec = FleetSpec(devices=4, actors=1, actor_num_cpus=0.2, max_new_tokens=8, duration_s=2, target="canary",
                     transport="http", url=app["url"], mix=[{"device_class": "flagship-phone", "share": 1.0}],
                     arrival={"start_within_s": 0.5, "sessions_per_device": 1}, api_key_file=str(key_file))
    summary = run_report(spec, [p[-32:] for p in humaneval_prompts[:4]], str(tiny_family / "draft"), tmp_path,
                         show_progress=False, api_key=fleet_api_key(spec))
    assert summary["sessions_completed"] == 4 and summary["sessions_failed"] == 0
    assert [row["version"] for row in summary["per_version"]] == ["v2"]


class KillReplicaAt:
    """A load test's `on_tick`: kills one replica of a version once, `at_s` into the run: the replica that
    verified a round most recently (its stats, reached by consistent hashing on probe keys), so the kill
    lands on one that holds running sessions."""

    def __init__(self, version: str, at_s: float):
        self.version, self.at_s, self.killed = version, at_s, None

    def busiest_replica(self) -> str:
        handle = serve.get_deployment_handle(f"verifier-{self.version}", f"flexspec-{self.version}")
        seen: dict[str, float] = {}
        for i in range(32):  # two replicas: every one is reached within a few keys
            st = handle.options(session_id=f"probe-{i}").stats.remote().result()
            seen[st["replica"]] = st["idle_s"]
        return min(seen, key=seen.get)

    def __call__(self, t_s: float) -> list[dict]:
        if self.killed or t_s < self.at_s:
            return []
        busy = self.busiest_replica()
        self.killed = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                           if a["namespace"] == "serve" and a["name"].endswith(f"#verifier-{self.version}#{busy}"))
        ray.kill(ray.get_actor(self.killed, namespace="serve"), no_restart=True)
        return [{"t_s": round(t_s, 2), "label": f"killed a verifier-{self.version} replica"}]


def test_killing_a_verifier_replica_under_a_fleet_loses_no_session(app, tiny_family, family_models,
                                                                    humaneval_prompts, tmp_path):
    from deployments.loadtest import run_report
    from flexspec_serve.fleet.spec import FleetSpec

    prompts = [p[-40:] for p in humaneval_prompts[:8]]
    spec = FleetSpec(devices=12, actors=1, actor_num_cpus=0.2, max_new_tokens=24, duration_s=8, target="v1",
                     mix=[{"device_class": "flagship-phone", "share": 1.0, "channel": "good"}],
                     arrival={"start_within_s": 1, "think_time_s": 0.2})
    killer = KillReplicaAt("v1", at_s=3)
    summary = run_report(spec, prompts, str(tiny_family / "draft"), tmp_path, on_tick=killer, show_progress=False)
    assert killer.killed, "no replica was killed"
    assert summary["sessions_failed"] == 0 and summary["sessions_lost"] == 0 and summary["sessions_completed"] > 12
    ref = [r.tokens for r in speculative_generate(None, Verifier(family_models["v1"]), prompts, 24)]
    sessions = [json.loads(line) for line in (tmp_path / "sessions.jsonl").read_text().splitlines()]
    assert all(s["tokens"] == ref[s["prompt_index"]] for s in sessions)
    assert summary["resyncs"] + summary["retries"] > 0  # the lost replica's sessions came back through resync


def test_fuzzed_round_bodies_get_4xx_never_5xx_and_the_app_still_answers(app):
    import httpx
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=20)
               | st.floats(allow_nan=False, allow_infinity=False))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8),
                                                                                              inner, max_size=5),
                          max_leaves=20)
    fields = st.fixed_dictionaries({}, optional={k: values for k in P.DraftRound.model_fields})
    client = httpx.Client(base_url=app["url"], headers={**KEYED, "x-session-id": "fuzz"}, timeout=30)
    statuses: list[int] = []

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=fields | values, raw=st.binary(max_size=64), compact=st.booleans())
    def fuzz(body, raw, compact):
        sid = {"x-session-id": f"fuzz-{len(statuses)}"}  # each its own rate-limit bucket
        if compact:
            resp = client.post("/v1/round", content=raw, headers={"content-type": P.COMPACT_CONTENT_TYPE, **sid})
        else:
            resp = client.post("/v1/round", json=body, headers=sid)
        statuses.append(resp.status_code)
        assert resp.status_code < 500, (body, raw, resp.text)
        if resp.status_code >= 400:
            assert "error" in resp.json()

    fuzz()
    assert len(statuses) >= 300 and any(400 <= c < 500 for c in statuses)
    ok = client.post("/v1/round", json=first_round("after-fuzz", "v2").model_dump(),
                     headers={"x-session-id": "after-fuzz"})
    assert ok.status_code == 200 and ok.json()["version"] == "v2"


# The hot-swap tests change which versions the module's app serves: they run last.

def swap_fleet(**kw):
    from flexspec_serve.fleet.spec import FleetSpec

    return FleetSpec.model_validate({
        "devices": 16, "actors": 2, "actor_num_cpus": 0.2, "max_new_tokens": 16, "duration_s": 20, "target": "stable",
        "mix": [{"device_class": "flagship-phone", "share": 0.5, "channel": "TMobile-LTE-short"},
                {"device_class": "midrange-phone", "share": 0.5, "channel": "fading"}],
        "arrival": {"start_within_s": 2, "think_time_s": 0.3}} | kw)


def test_schema_driven_fuzz_finds_no_5xx_and_every_4xx_names_the_problem(app):
    """A short schemathesis run from the router's own OpenAPI schema (the long one: benchmarks/fuzz.py)."""
    pytest.importorskip("schemathesis")
    from benchmarks.fuzz import fuzz

    record = fuzz(app["url"], 400, API_KEY)
    assert record.cases >= 400
    assert not record.failures, record.failures[:3]
    statuses = {status for (_, _, status) in record.status}
    assert {200, 401, 422} <= statuses  # valid rounds answered, admin refused without the token, bad input named
    assert served_version(app, first_round("after-fuzz", "v1")) == "v1"


@pytest.mark.usefixtures("no_canary_left_running")
def test_hot_swap_under_a_running_fleet_loses_nothing(app, tiny_family, family_models, humaneval_prompts, tmp_path):
    from deployments.config import FileRegistry
    from deployments.loadtest import run_report
    from deployments.swap import SwapPlan, SwapTrigger

    import httpx

    # v1 can only be retired once no alias points at it: the fixture's 50/50 split moves to v2
    assert httpx.put(f"{app['url']}/admin/aliases/half", json={"target": "v2"},
                     headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30).status_code == 200
    prompts = [p[-40:] for p in humaneval_prompts[:8]]
    # the tiny family's versions differ more than the default's: the test is about the mechanics, so the bars are low
    plan = SwapPlan("v3", str(tiny_family / "v3"), weight=0.5, window_s=4, min_rounds=20, min_fraction=0.5,
                    max_acceptance_drop=0.6, timeout_s=90)
    trigger = SwapTrigger(app["url"], ADMIN_TOKEN, plan, start_at_s=1)
    # the canary judges sessions that start after it does: arrivals must go on well past the add and the gate
    # (deploying v3 under the fleet took 32.6 s on a 2-core host 1.6x slower than the usual one, and with 35 s
    # of arrivals the canary then started after the last session had: it timed out);
    # devices route for themselves (direct transport): the swap must reach them through registry snapshots;
    # they pipeline: two rounds of a session can be on the air as the alias moves (pinning keeps both on its version)
    summary = run_report(swap_fleet(duration_s=60, transport="direct", ahead="pipeline"), prompts,
                         str(tiny_family / "draft"), tmp_path, on_tick=trigger, show_progress=False)
    assert trigger.script.outcome == "promoted", trigger.script.events
    assert summary["sessions_failed"] == 0 and summary["sessions_lost"] == 0 and not summary["device_crashes"]
    assert summary["pipelined_round_rate"] > 0
    labels = [m["label"] for m in summary["version_changes"]]
    assert "promoted v3" in labels and "deleted v1" in labels
    sessions = [json.loads(line) for line in (tmp_path / "sessions.jsonl").read_text().splitlines()]
    assert {s["version"] for s in sessions} == {"v1", "v3"}
    for v in ("v1", "v3"):  # every session decoded exactly what its pinned version decodes greedily
        ref = [r.tokens for r in speculative_generate(None, Verifier(family_models[v]), prompts, 16)]
        assert all(s["tokens"] == ref[s["prompt_index"]] for s in sessions if s["version"] == v)
    state = FileRegistry(app["registry"]).load()
    assert state.aliases["stable"] == "v3" and "v1" not in state.versions and state.retired["v1"] == "stable"
    assert "flexspec-v1" not in serve.status().applications
    assert served_version(app, first_round("after-swap", None)) == "v3"
    assert served_version(app, P.DraftRound(session_id="stray", seq=0, target="v1", full_context=[5, 6])) == "v3"


def perturbed_copy(src, dst, scale: float = 3.0):
    """A deliberately incompatible candidate: the same tokenizer and shapes, its weights drowned in noise."""
    import shutil

    import torch

    from flexspec_serve.zoo.loading import load_causal_lm

    shutil.copytree(src, dst)
    model = load_causal_lm(src)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    model.save_pretrained(dst)
    return dst


@pytest.mark.usefixtures("no_canary_left_running")
def test_incompatible_candidate_is_refused_by_the_gate_and_rolled_back_by_the_canary(
        app, tiny_family, humaneval_prompts, tmp_path):
    from deployments.config import FileRegistry
    from deployments.loadtest import run_report
    from deployments.swap import SwapPlan, SwapScript, SwapTrigger

    bad = perturbed_copy(tiny_family / "v1", tmp_path / "v1-noisy")
    stable = FileRegistry(app["registry"]).load().aliases["stable"]
    refused = SwapScript(app["url"], ADMIN_TOKEN, SwapPlan("noisy", str(bad)), time.time())
    refused.run()
    assert refused.outcome == "refused by the gate" and not refused.gate["passed"]
    # forced past the gate, the canary's live acceptance gives it away and the watcher rolls it back
    forced = SwapTrigger(app["url"], ADMIN_TOKEN, SwapPlan("noisy-forced", str(bad), weight=0.5, window_s=60,
                                                           min_rounds=10, force=True, timeout_s=90), start_at_s=0)
    # arrivals past the add (23.5 s under the fleet on the slower host that timed the hot-swap test out too)
    summary = run_report(swap_fleet(duration_s=50), [p[-40:] for p in humaneval_prompts[:8]],
                         str(tiny_family / "draft"), tmp_path / "run", on_tick=forced, show_progress=False)
    assert forced.script.outcome.startswith("rolled back"), forced.script.events
    assert summary["sessions_failed"] == 0 and summary["sessions_lost"] == 0
    state = FileRegistry(app["registry"]).load()
    assert state.aliases["stable"] == stable and state.canary.status == "rolled_back"
    assert "acceptance" in state.canary.reason


def test_http_rounds_need_an_api_key_and_respect_the_session_rate_limit(app):
    import httpx

    url, rnd = app["url"], first_round("keyed-1", "v1").model_dump()
    assert httpx.post(f"{url}/v1/round", json=rnd, timeout=30).status_code == 401
    assert httpx.post(f"{url}/v1/round", json=rnd, headers={"authorization": "Bearer nope"}, timeout=30).status_code == 403
    assert httpx.post(f"{url}/v1/round", json=rnd, headers={**KEYED, "x-session-id": "burst-1"},
                      timeout=30).status_code == 200
    # 80 rounds at once against a burst of 20 and 50 rounds/s. The limit is checked before the body is read,
    # so empty bodies count too and come back at once (422). Valid rounds, each verified, can arrive too slowly
    # on a loaded host to exceed 50/s (16 in flight taking over 320 ms each), and one run saw none limited.
    with httpx.Client(base_url=url, headers={**KEYED, "x-session-id": "burst-1"}, timeout=30) as client, \
            cf.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: client.post("/v1/round", json={}), range(80)))
    limited = [r for r in codes if r.status_code == 429]
    assert limited and all(r.status_code in (422, 429) for r in codes), [r.status_code for r in codes]
    assert int(limited[0].headers["retry-after"]) >= 1 and limited[0].json()["error"]["code"] == "rate_limited"


class RetireAt:
    """A load test's `on_tick`: retires a version through the admin API once, `at_s` into the run."""

    def __init__(self, url: str, version: str, mode: str, at_s: float):
        self.url, self.version, self.mode, self.at_s, self.status = url, version, mode, at_s, None

    def __call__(self, t_s: float) -> list[dict]:
        import httpx

        if self.status is not None or t_s < self.at_s:
            return []
        self.status = httpx.post(f"{self.url}/admin/versions/{self.version}/retire", json={"mode": self.mode},
                                 headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60).status_code
        return [{"t_s": round(t_s, 2), "label": f"retire {self.version} ({self.mode})"}]


@pytest.mark.usefixtures("no_canary_left_running")
def test_migrating_retire_moves_running_sessions_to_the_alias_without_losing_any(app, tiny_family,
                                                                                 humaneval_prompts, tmp_path):
    import httpx

    from deployments.config import FileRegistry
    from deployments.loadtest import run_report

    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    stable = FileRegistry(app["registry"]).load().aliases["stable"]
    for alias in ("canary", "half"):  # nothing may point at the version being retired
        assert httpx.put(f"{app['url']}/admin/aliases/{alias}", json={"target": stable}, headers=auth,
                         timeout=30).status_code == 200
    retire = RetireAt(app["url"], "v2", "migrate", at_s=2.5)
    summary = run_report(swap_fleet(devices=8, duration_s=6, max_new_tokens=40, target="v2"),
                         [p[-40:] for p in humaneval_prompts[:8]], str(tiny_family / "draft"), tmp_path,
                         on_tick=retire, show_progress=False)
    assert retire.status == 200
    assert summary["sessions_failed"] == 0 and summary["sessions_lost"] == 0
    sessions = [json.loads(line) for line in (tmp_path / "sessions.jsonl").read_text().splitlines()]
    moved = [s for s in sessions if s["version"] == stable and s["resyncs"] > 0]
    assert moved, "no running session was migrated"  # they resent their context to the alias's version
    deadline = time.monotonic() + 60
    while "v2" in FileRegistry(app["registry"]).load().versions:  # deleted once idle
        assert time.monotonic() < deadline, "v2 was not deleted after draining"
        time.sleep(1)


def test_version_admin_calls_without_the_token_are_refused(app):
    import httpx

    for method, path in (("POST", "/admin/versions"), ("POST", "/admin/versions/v2/canary"),
                         ("POST", "/admin/versions/v2/retire"), ("POST", "/admin/rollback")):
        assert httpx.request(method, f"{app['url']}{path}", json={}, timeout=30).status_code == 401


def test_serving_report_measures_batching_overhead_and_cache_hits(app, tiny_family, tmp_path):
    from benchmarks import serve as bench

    s = bench.Settings(sessions=4, rounds=3, torch_threads=1, batches=(1, 2, 4), kv_sessions=2, kv_rounds=6,
                       rtt_samples=20, replica_num_cpus=0.1)
    res = bench.measure(tiny_family, s, tmp_path / "registry.json")
    meta = {"command": "test", "machine": "test", "family": tiny_family.name, "seed": 0, "torch_threads": 1, "k": 4,
            "sessions": 4, "rounds": 3, "batch_wait_ms": 5.0, "gpu_table": None}
    md_path, png = bench.write(tmp_path, res, meta)
    md = md_path.read_text()
    assert all(c in md for c in bench.SERVE_COLUMNS + bench.ENGINE_COLUMNS)
    assert [r["batch"] for r in res["engine"]] == [1, 2, 4] and all(r["ms/call"] > 0 for r in res["engine"])
    rows = {(r["path"], r["version"]): r for r in res["serve"]}
    assert set(rows) == {("router", "loop"), ("router", "sbatch"), ("router", "unbatched"), ("direct", "loop"),
                         ("direct", "unbatched")}
    for path in ("router", "direct"):
        assert rows[(path, "unbatched")]["mean batch seen"] == 1.0 and rows[(path, "loop")]["verified tok/s"] > 0
        assert rows[(path, "loop")]["batcher"] == "engine-loop"
    assert rows[("router", "sbatch")]["batcher"] == "serve-batch"
    assert [r["path"] for r in res["lone"]] == ["router", "direct"]
    assert all(r["bare handle RTT p50 ms"] > 0 and r["overhead in RTTs"] > 0 for r in res["lone"])
    assert res["kv"]["rounds after the first"] == 2 * 5 and res["kv"]["hit rate"] >= 0.9
    assert png.stat().st_size > 0
    # the apps it deployed are gone again; the fixture's app still answers
    assert not {"serving-bench", "flexspec-loop", "flexspec-sbatch", "flexspec-kv"} & set(serve.status().applications)
    assert served_version(app, first_round("after-bench", "stable"))  # answered (200) by whatever stable is now


def test_router_load_benchmark_runs_beside_the_app_and_measures_both_paths(app, tiny_family, tmp_path):
    from types import SimpleNamespace

    from benchmarks import router_load as bench

    apps_before = set(serve.status().applications)
    out = bench.cell(tiny_family, False, SimpleNamespace(sessions=2, rounds=10, replica_num_cpus=0.1),
                     tmp_path / "registry.json")
    rows = [bench.row(1, log, path, load) for log in (False, True) for path, load in out.items()]
    assert [r["path"] for r in rows] == ["router", "direct"] * 2
    assert all(r["rounds/s"] > 0 and r["overhead p50 ms"] > 0 for r in rows)
    assert {s["path"]: s["off / on"] for s in bench.summary(rows)} == {"router": 1.0, "direct": 1.0}
    # its apps are gone again, the fixture's (its versions are applications too) are all still there and answer
    assert set(serve.status().applications) == apps_before
    assert served_version(app, first_round("after-router-load", "stable"))
