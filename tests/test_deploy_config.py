"""App config, registry and cluster config, without starting Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.config import (AppConfig, FileRegistry, RegistryState, RegistryView, UnknownTarget, VersionSpec,
                                pick_weighted, version_app_name)
from flexspec_serve.config import ConfigError, parse_model
from tests.fakes import FakeClock

REPO = Path(__file__).resolve().parents[1]


def state(**aliases):
    versions = {n: VersionSpec(name=n, path=f"/m/{n}") for n in ("v1", "v2", "v3")}
    return RegistryState(versions=versions, aliases=aliases)


def test_resolution_explicit_alias_and_split():
    s = state(stable="v1", canary="v3", split={"v1": 0.8, "v2": 0.2})
    assert s.resolve("v2", "x") == "v2" and s.resolve("canary", "x") == "v3" and s.resolve(None, "x") == "v1"
    picks = [s.resolve("split", f"s{i}") for i in range(2000)]
    assert 0.17 < picks.count("v2") / 2000 < 0.23
    assert all(s.resolve("split", f"s{i}") == picks[i] for i in range(50))


def test_unknown_target_lists_what_exists():
    with pytest.raises(UnknownTarget) as info:
        state(stable="v1").resolve("v7", "x")
    assert "v7" in str(info.value) and "v3" in str(info.value) and "stable" in str(info.value)


def test_alias_to_unknown_version_is_refused():
    with pytest.raises(ValueError, match="v9"):
        state(stable="v9")


def test_registry_round_trips_and_bumps_generation(tmp_path):
    reg = FileRegistry(tmp_path / "r.json")
    first = reg.load_or_seed(state(stable="v1"))
    assert first.generation == 1 and reg.load() == first
    again = reg.load_or_seed(state(stable="v2"))  # an existing registry wins over the seed
    assert again.aliases["stable"] == "v1"


class SlowFirstLoad(FileRegistry):
    """Its first `load` reads the file, then waits for `release` before it returns what it read."""

    def __init__(self, path):
        import threading

        super().__init__(path)
        self.entered, self.release, self.loads = threading.Event(), threading.Event(), 0

    def load(self):
        self.loads += 1
        read = super().load()
        if self.loads == 1:
            self.entered.set()
            self.release.wait(10)
        return read


def test_registry_view_rereads_a_changed_file_at_most_once_a_period_or_when_invalidated(tmp_path):
    reg, clock = FileRegistry(tmp_path / "r.json"), FakeClock()
    view = RegistryView(reg, reg.load_or_seed(state(stable="v1")), period_s=0.5, clock=clock)
    first = view.current().generation
    reg.save(state(stable="v2"))
    assert view.current().generation == first  # checked at t = 0 already
    clock.t = 0.6
    assert view.current().aliases["stable"] == "v2"
    reg.save(state(stable="v3"))
    view.invalidate()  # e.g. this process just wrote it
    assert view.current().aliases["stable"] == "v3"


def test_a_registry_reader_never_gets_the_state_from_before_a_write_while_another_thread_rereads(tmp_path):
    """Thread A re-reads the file (slowly); B asks meanwhile and must not get the old state as if the check
    were fresh: with the check time set before the re-read, a canary's caller once read the previous canary."""
    import threading

    FileRegistry(tmp_path / "r.json").save(state(stable="v1"))
    reg = SlowFirstLoad(tmp_path / "r.json")
    view = RegistryView(reg, state(stable="v1"), period_s=0.5)
    FileRegistry(tmp_path / "r.json").save(state(stable="v2"))  # an admin write the view has not seen
    a = threading.Thread(target=view.current)
    a.start()
    assert reg.entered.wait(10)
    try:
        assert view.current().aliases["stable"] == "v2"  # B, while A is still reading
    finally:
        reg.release.set()
        a.join(10)
    assert view.current().aliases["stable"] == "v2"


def test_a_registry_write_during_a_reread_is_seen_on_the_next_call(tmp_path):
    """A reads the old file; this process writes a new one and invalidates the view before A is done: A's
    finished read must not count as a fresh check of the new file."""
    import threading

    FileRegistry(tmp_path / "r.json").save(state(stable="v1"))
    reg = SlowFirstLoad(tmp_path / "r.json")
    view = RegistryView(reg, state(stable="v1"), period_s=0.5)
    a = threading.Thread(target=view.current)
    a.start()
    assert reg.entered.wait(10)
    FileRegistry(tmp_path / "r.json").save(state(stable="v2"))
    view.invalidate()
    reg.release.set()
    a.join(10)
    assert view.current().aliases["stable"] == "v2"


def test_batch_size_above_max_ongoing_requests_is_refused():
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        VersionSpec(name="v1", path="/x", max_batch_size=32, max_ongoing_requests=5)


def test_an_unknown_cloud_profile_is_refused_naming_it_and_the_known_ones():
    with pytest.raises(ValueError, match=r"'h100-70b'.*eager-8b"):
        VersionSpec(name="v1", path="/x", emulate_cloud="h100-70b")
    assert VersionSpec(name="v1", path="/x", emulate_cloud="graphs-8b").emulate_cloud == "graphs-8b"


def test_round_path_replicas_write_an_access_log_only_when_asked():
    """A line per round in the router and the version replicas, unless the config asks for one."""
    pytest.importorskip("ray")
    from deployments.app import router_deployment, version_deployment

    cfg = AppConfig.for_family("/m", ["v1"])
    assert not version_deployment(cfg.versions[0]).logging_config["enable_access_log"]
    assert not router_deployment(cfg).logging_config["enable_access_log"]
    logged = AppConfig.for_family("/m", ["v1"], version_kw={"access_log": True}, router_access_log=True)
    assert version_deployment(logged.versions[0]).logging_config["enable_access_log"]
    assert router_deployment(logged).logging_config["enable_access_log"]


def test_weighted_pick_is_stable_across_weight_order():
    assert pick_weighted({"a": 1, "b": 1}, "s1") == pick_weighted({"b": 1, "a": 1}, "s1")


def test_serve_yaml_points_at_the_builder_and_validates():
    doc = yaml.safe_load((REPO / "deployments" / "serve.yaml").read_text())
    app = doc["applications"][0]
    assert app["import_path"] == "deployments.app:build_app"
    cfg = parse_model(AppConfig, app["args"], "serve.yaml")
    assert {v.name for v in cfg.versions} == {"v1", "v2"}
    assert_version_apps_match(doc, cfg)


def assert_version_apps_match(doc: dict, cfg: AppConfig) -> None:
    """Every version the router seeds the registry with is deployed as its own application, identically."""
    apps = {a["name"]: a for a in doc["applications"][1:]}
    assert set(apps) == {version_app_name(v.name) for v in cfg.versions}
    for v in cfg.versions:
        app = apps[version_app_name(v.name)]
        assert app["import_path"] == "deployments.app:build_version_app" and app.get("route_prefix") is None
        assert VersionSpec.model_validate(app["args"]["spec"]) == v and app["args"]["draft_path"] == cfg.draft_path


def test_cluster_yaml_agrees_with_the_serve_config():
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    node_types = cluster["available_node_types"]
    gpu_types = [n for n, t in node_types.items() if t["resources"].get("GPU", 0) > 0]
    cpu_workers = [n for n, t in node_types.items() if n != cluster["head_node_type"] and not t["resources"].get("GPU")]
    assert gpu_types and cpu_workers and cluster["head_node_type"] in node_types
    serve_cfg = yaml.safe_load((REPO / "deployments" / "serve.cluster.yaml").read_text())
    args = parse_model(AppConfig, serve_cfg["applications"][0]["args"], "serve.cluster.yaml")
    assert_version_apps_match(serve_cfg, args)
    for v in args.versions:
        assert v.num_gpus > 0 and v.device in ("cuda", "auto")
        fits = [n for n in gpu_types if node_types[n]["resources"]["GPU"] >= v.num_gpus
                and node_types[n]["resources"]["CPU"] >= v.num_cpus]
        assert fits, f"{v.name} fits on no GPU node type"
    assert any("pip install" in c for c in cluster["setup_commands"])
    assert any("serve deploy" in c for c in cluster.get("head_start_ray_commands", []) + cluster.get("deploy_commands", []))


def test_bad_app_config_names_the_field():
    with pytest.raises(ConfigError, match="versions.0.num_cpus"):
        parse_model(AppConfig, {"draft_path": "/d", "versions": [{"name": "v1", "path": "/x", "num_cpus": 0}]}, "app")


def _replica(rid, **kw):
    base = {"version": "v1", "replica": rid, "sessions": 2, "cache_bytes": 100, "cache_hits": 9, "cache_misses": 1,
            "evictions": 0, "expired": 0, "batches": 10, "errors": 0, "rounds": 20, "draft_tokens": 80,
            "accepted_tokens": 40, "generated_tokens": 60, "mean_batch_size": 2.0, "max_batch_size_seen": 4,
            "idle_s": 30.0, "latency_p99_ms": 12.0, "window": {"rounds": 5, "draft_tokens": 20, "accepted_tokens": 10,
                                                              "generated_tokens": 15, "sessions": 2,
                                                              "accepted_sq": 52.0, "draft_sq": 208.0,
                                                              "cross": 104.0}}
    return base | kw


def test_version_stats_merge_over_replicas_and_count_each_replica_once():
    from deployments.server import merge_replica_stats

    a, b = _replica("a"), _replica("b", idle_s=0.2, rounds=10, draft_tokens=20, accepted_tokens=20,
                                   generated_tokens=30, batches=30, mean_batch_size=4.0, latency_p99_ms=40.0)
    merged = merge_replica_stats([a, b, a, b, a])  # probe keys reach the same replica more than once
    assert merged["replicas"] == ["a", "b"]
    assert merged["rounds"] == 30 and merged["sessions"] == 4 and merged["batches"] == 40
    assert merged["idle_s"] == 0.2  # one busy replica keeps the version from counting as drained
    assert merged["acceptance_rate"] == pytest.approx(60 / 100) and merged["acceptance_length"] == pytest.approx(3.0)
    assert merged["mean_batch_size"] == pytest.approx((2.0 * 10 + 4.0 * 30) / 40)
    assert merged["latency_p99_ms"] == 40.0 and merged["cache_hit_rate"] == pytest.approx(0.9)
    assert merged["window"]["rounds"] == 10 and merged["window"]["acceptance_rate"] == pytest.approx(0.5)
    assert merged["window"]["sessions"] == 4 and merged["window"]["cross"] == 208.0  # replicas hold other sessions
    assert merge_replica_stats([a])["replicas"] == ["a"] and merge_replica_stats([a])["rounds"] == 20


def test_loadtest_flags_override_the_fleet_file(tmp_path):
    import argparse

    from deployments.loadtest import load_spec, register

    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": 30, "mix": [{"device_class": "wearable", "share": 1.0}]}))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert load_spec(parser.parse_args(["loadtest", "--fleet", str(fleet)])).ahead == "off"
    spec = load_spec(parser.parse_args(["loadtest", "--fleet", str(fleet), "--ahead", "pipeline", "--devices", "7"]))
    assert spec.ahead.sends and spec.devices == 7
    spec = load_spec(parser.parse_args(["loadtest", "--fleet", str(fleet), "--ahead", "draft"]))
    assert spec.ahead.drafts and not spec.ahead.sends and spec.devices == 30
    assert load_spec(parser.parse_args(["loadtest", "--fleet", str(fleet), "--tree", "branches"])).tree == "branches"
    with pytest.raises(SystemExit):  # argparse names the choices
        parser.parse_args(["loadtest", "--fleet", str(fleet), "--ahead", "yes"])
    assert parser.parse_args(["loadtest", "--fleet", str(fleet), "--emulate-cloud", "eager-8b"]).emulate_cloud == "eager-8b"
    with pytest.raises(SystemExit):
        parser.parse_args(["loadtest", "--fleet", str(fleet), "--emulate-cloud", "h100"])


def test_a_refused_pipelined_round_is_not_a_replica_error(tiny_family):
    """The canary watcher rolls a version back on its error rate: pipelining devices must not trip it."""
    import torch

    from deployments.server import VerifierServer
    from flexspec_serve import protocol as P

    threads = torch.get_num_threads()
    try:
        server = VerifierServer(VersionSpec(name="v1", path=str(tiny_family / "v1")), str(tiny_family / "draft"))
    finally:
        torch.set_num_threads(threads)
    (first,) = server.verify_rounds([P.DraftRound(session_id="s", seq=0, full_context=[5, 6, 7], draft_tokens=[8])])
    wrong = [8, (first.token + 1) % 100]  # never what round 0 committed
    (refused,) = server.verify_rounds([P.DraftRound(session_id="s", seq=1, draft_tokens=[9], assume=wrong)])
    assert refused[0] == 409 and refused[1].error.code == "condition_not_met"
    (bad,) = server.verify_rounds([P.DraftRound(session_id="s", seq=1, draft_tokens=[10**6])])
    assert bad[1].error.code == "invalid_request"
    assert server.stats()["errors"] == 1  # the bad round only


def _server(tiny_family, **kw):
    import torch

    from deployments.server import VerifierServer

    threads = torch.get_num_threads()
    try:
        return VerifierServer(VersionSpec(name="v1", path=str(tiny_family / "v1"), **kw), str(tiny_family / "draft"))
    finally:
        torch.set_num_threads(threads)


def test_an_emulated_cloud_answers_a_batch_no_sooner_than_its_profile_says(tiny_family):
    """The tiny family verifies in a few ms here; `eager-8b` makes the batch take its 8B-on-H200 time."""
    import time

    from flexspec_serve import protocol as P
    from flexspec_serve.edge.devices import CLOUD_PROFILES

    server, plain = _server(tiny_family, emulate_cloud="eager-8b"), _server(tiny_family)
    for s in (server, plain):  # first rounds: the prompts
        s.verify_rounds([P.DraftRound(session_id=f"s{i}", seq=0, full_context=[5, 6, 7 + i]) for i in range(2)])
    batch = [P.DraftRound(session_id="s0", seq=1, draft_tokens=[8, 9, 10]), P.DraftRound(session_id="s1", seq=1,
                                                                                         draft_tokens=[11])]
    due_ms = CLOUD_PROFILES["eager-8b"].batch_verify_ms([4, 2])
    assert due_ms == pytest.approx(18.0 + 0.8 * 4 + 0.06 * 2)
    started = time.perf_counter()
    results = server.verify_rounds(batch)
    assert (time.perf_counter() - started) * 1e3 >= due_ms * 0.99
    stats = server.stats()
    assert stats["emulate_cloud"] == "eager-8b" and stats["held_batches"] + stats["overrun_batches"] == 2
    for r in results:
        assert r.timings.held_ms == results[0].timings.held_ms  # one hold for the whole batch
        if r.timings.held_ms:  # held: the real verify and the hold make up the profile's time, at most
            assert r.timings.verify_ms + r.timings.held_ms <= due_ms + 0.5
    plain_results = plain.verify_rounds(batch)
    assert [r.token for r in plain_results] == [r.token for r in results]  # the hold changes timing, not tokens
    assert all(r.timings.held_ms == 0 for r in plain_results) and plain.stats()["held_batches"] == 0
