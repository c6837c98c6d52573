"""Autoscaling policies: scale-up, scale-down, bounds, cooldown and flapping, on a fake clock."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from autoscale.policies import (
    VersionAutoscaler, bounded, cooldown, hysteresis, ongoing_requests, verified_tokens,
)


@dataclass
class FakeContext:
    """The attributes of Ray Serve's AutoscalingContext that the policies read."""

    current_num_replicas: int = 1
    total_num_requests: float = 0.0
    aggregated_metrics: dict = field(default_factory=dict)
    capacity_adjusted_min_replicas: int = 1
    capacity_adjusted_max_replicas: int = 8
    policy_state: dict = field(default_factory=dict)
    current_time: float = 0.0


class Driver:
    """Applies a policy every `tick_s` of fake time, like the Serve controller does."""

    def __init__(self, policy, replicas: int = 1, apply: bool = True):
        self.policy, self.ctx, self.apply = policy, FakeContext(current_num_replicas=replicas), apply

    def step(self, tokens_per_s: float | None = None, requests: float | None = None, tick_s: float = 1.0) -> int:
        if tokens_per_s is not None:
            self.ctx.aggregated_metrics = {"verified_tokens_per_s": {"r1": tokens_per_s}}
        if requests is not None:
            self.ctx.total_num_requests = requests
        replicas, self.ctx.policy_state = self.policy(self.ctx)
        if self.apply:  # else the deployment lags behind the decision, as while replicas start
            self.ctx.current_num_replicas = replicas
        self.ctx.current_time += tick_s
        return replicas


def test_scales_up_on_ongoing_requests():
    d = Driver(ongoing_requests(target_per_replica=8))
    assert d.step(requests=30) == 4


def test_scales_up_and_down_on_verified_tokens():
    d = Driver(verified_tokens(capacity_tokens_per_s=1000, target_utilisation=0.5))
    assert d.step(tokens_per_s=2600) == 6
    assert d.step(tokens_per_s=400) == 1


def test_bounds_clamp_both_ways():
    d = Driver(bounded(verified_tokens(100), min_replicas=2, max_replicas=5))
    assert d.step(tokens_per_s=10_000) == 5
    assert d.step(tokens_per_s=0) == 2


def test_cooldown_waits_for_a_sustained_need():
    d = Driver(cooldown(verified_tokens(1000, 1.0), upscale_delay_s=3, downscale_delay_s=10))
    assert [d.step(tokens_per_s=3500) for _ in range(4)] == [1, 1, 1, 4]
    down = [d.step(tokens_per_s=900) for _ in range(12)]
    assert down[:10] == [4] * 10 and down[10] == 1


def test_cooldown_restarts_when_the_need_goes_away():
    d = Driver(cooldown(verified_tokens(1000, 1.0), upscale_delay_s=3, downscale_delay_s=10))
    d.step(tokens_per_s=3500)
    d.step(tokens_per_s=3500)
    d.step(tokens_per_s=500)  # the spike is over before the delay: nothing happens, the timer resets
    assert [d.step(tokens_per_s=3500) for _ in range(3)] == [1, 1, 1]


def test_hysteresis_stops_flapping_at_a_boundary():
    plain = Driver(verified_tokens(1000, 1.0), replicas=3)
    steady = Driver(hysteresis(verified_tokens(1000, 1.0), down_fraction=0.6), replicas=3)
    load = [3010, 2990] * 5  # hovering at the 3-replica boundary
    assert len({plain.step(tokens_per_s=x) for x in load}) == 2
    assert {steady.step(tokens_per_s=x) for x in load} == {4}
    assert steady.step(tokens_per_s=500) == 1


def test_stacked_default_uses_context_bounds_and_state():
    d = Driver(VersionAutoscaler(capacity_tokens_per_s=1000, target_utilisation=1.0, upscale_delay_s=2,
                                    downscale_delay_s=5))
    d.ctx.capacity_adjusted_max_replicas = 3
    assert [d.step(tokens_per_s=9000) for _ in range(3)] == [1, 1, 3]


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="target_per_replica"):
        ongoing_requests(0)
    with pytest.raises(ValueError, match="utilisation"):
        verified_tokens(100, 1.5)


def test_policy_is_accepted_by_ray_serve_autoscaling_config():
    pytest.importorskip("ray")
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy

    cfg = AutoscalingConfig(min_replicas=1, max_replicas=4, policy=AutoscalingPolicy(
        policy_function="autoscale.policies:VersionAutoscaler", policy_kwargs={"capacity_tokens_per_s": 2500}))
    assert cfg.policy.policy_kwargs["capacity_tokens_per_s"] == 2500


def test_cooldown_keeps_its_decision_while_the_replicas_catch_up():
    """Serve starts replicas over several ticks; a decision once made must not blink back to `current`."""
    d = Driver(cooldown(verified_tokens(1000, 1.0), upscale_delay_s=2, downscale_delay_s=10), apply=False)
    decided = [d.step(tokens_per_s=3500) for _ in range(6)]
    assert decided == [1, 1, 4, 4, 4, 4]
