"""The capacity planner: supply from a measured cost profile, demand from a fleet spec."""

from __future__ import annotations

import pytest

from autoscale.planner import device_demand, plan, replica_capacity
from flexspec_serve.fleet.spec import FleetSpec

COST = {1: 4.0, 2: 6.8, 4: 9.7, 8: 16.0, 16: 29.0, 32: 59.3}
MIX = [{"device_class": "flagship-phone", "share": 0.5, "channel": "TMobile-LTE-short"},
       {"device_class": "wearable", "share": 0.5, "channel": "fading"}]


def fleet(devices: int, think_s: float = 10.0, **kw) -> FleetSpec:
    return FleetSpec(devices=devices, mix=MIX, arrival={"think_time_s": think_s}, max_new_tokens=64, **kw)


def test_replica_takes_the_largest_batch_that_holds_the_slo():
    batch, rps = replica_capacity(COST, overhead_ms=5.0, slo_ms=200.0)
    assert batch == 8 and rps == pytest.approx(8 / (16.0 + 8 * 5.0) * 1e3)  # 2 x 56 ms <= 200; 16 needs 218
    assert replica_capacity(COST, 0.0, 40.0)[0] == 8  # 2 x 16 ms
    assert replica_capacity(COST, 0.0, 5.0)[0] == 1  # nothing fits: batch 1 (the caller sees the SLO missed)


def test_demand_grows_with_devices_and_falls_with_think_time():
    small, large = device_demand(fleet(100), 0.6, 100.0), device_demand(fleet(1000), 0.6, 100.0)
    assert large.rounds_per_s == pytest.approx(10 * small.rounds_per_s, rel=0.05)
    assert device_demand(fleet(1000, think_s=100.0), 0.6, 100.0).rounds_per_s < large.rounds_per_s / 3
    assert 0 < small.devices_in_session < 100 and large.verified_tokens_per_s > large.rounds_per_s


def test_pipelining_fleet_demands_the_rounds_the_cloud_refuses():
    ahead = device_demand(fleet(1000, policy="fixed-4", ahead="draft"), 0.6, 100.0)
    piped = device_demand(fleet(1000, policy="fixed-4", ahead="pipeline"), 0.6, 100.0)
    assert ahead.refused_rounds_per_s == 0 and piped.refused_rounds_per_s > 0
    # behind every miss of the answered rounds (P(hit) = 0.6^5 at K = 4) one refused round, on top of them
    answered = piped.rounds_per_s - piped.refused_rounds_per_s
    assert piped.refused_rounds_per_s > 0.5 * answered
    assert piped.verified_tokens_per_s == pytest.approx(5 * answered, rel=1e-6)  # refused rounds verify nothing


def test_replicas_follow_load_and_weights():
    _, few = plan(fleet(50), COST, {"v1": 1.0})
    _, many = plan(fleet(2000), COST, {"v1": 0.9, "v3": 0.1})
    assert few[0].replicas == 1
    v1, v3 = {p.version: p for p in many}["v1"], {p.version: p for p in many}["v3"]
    assert v1.replicas > v3.replicas >= 1 and v1.rounds_per_s == pytest.approx(9 * v3.rounds_per_s, rel=0.01)
    assert v1.replica_capacity_tokens_per_s > v1.replica_rounds_per_s  # K + 1 verified positions per round
