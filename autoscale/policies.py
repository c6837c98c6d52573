"""Autoscaling policies as pure functions `(context) -> (replicas, state)`, with bounds, cooldowns and
anti-flapping as small wrappers that stack. Ray-free: the context is anything with the attributes of
Ray Serve's `AutoscalingContext` that are read here (tests pass a dataclass and a fake clock).

Use with Ray Serve 2.60: `AutoscalingConfig(policy=AutoscalingPolicy(
policy_function="autoscale.policies:VersionAutoscaler", policy_kwargs={...}))`; replicas report
`verified_tokens_per_s` through `record_autoscaling_stats`. Each version's `AutoscalingSpec` (in the
registry) becomes such a config (`deployments.config.AutoscalingSpec.serve_config`), so a canary scales
on its own; `autoscale.planner` sizes versions for a fleet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol


class Context(Protocol):
    current_num_replicas: int
    total_num_requests: float
    aggregated_metrics: dict | None
    capacity_adjusted_min_replicas: int
    capacity_adjusted_max_replicas: int
    policy_state: dict[str, Any]
    current_time: float | None


Policy = Callable[[Context], tuple[int, dict]]


def metric_total(ctx: Context, name: str) -> float:
    """Sum of a custom metric over replicas (Serve gives {replica: value}; a plain number is taken as is)."""
    value = (ctx.aggregated_metrics or {}).get(name, 0.0)
    return float(sum(value.values())) if isinstance(value, dict) else float(value)


def ongoing_requests(target_per_replica: float) -> Policy:
    """Enough replicas to keep ongoing + queued requests per replica at the target."""
    if target_per_replica <= 0:
        raise ValueError(f"target_per_replica={target_per_replica!r}: must be positive")

    def policy(ctx: Context) -> tuple[int, dict]:
        return math.ceil(ctx.total_num_requests / target_per_replica), dict(ctx.policy_state)

    return policy


def verified_tokens(capacity_tokens_per_s: float, target_utilisation: float = 0.7,
                    metric: str = "verified_tokens_per_s") -> Policy:
    """Speculative-decoding load: verified tokens/s against what one replica sustains at the latency SLO."""
    if capacity_tokens_per_s <= 0 or not 0 < target_utilisation <= 1:
        raise ValueError(f"capacity {capacity_tokens_per_s!r} must be > 0 and utilisation "
                         f"{target_utilisation!r} within (0, 1]")

    def policy(ctx: Context) -> tuple[int, dict]:
        load = metric_total(ctx, metric)
        return math.ceil(load / (capacity_tokens_per_s * target_utilisation)), dict(ctx.policy_state)

    return policy


def bounded(policy: Policy, min_replicas: int | None = None, max_replicas: int | None = None) -> Policy:
    """Clamp to [min, max] (default: the context's capacity-adjusted bounds)."""

    def wrapped(ctx: Context) -> tuple[int, dict]:
        desired, state = policy(ctx)
        lo = ctx.capacity_adjusted_min_replicas if min_replicas is None else min_replicas
        hi = ctx.capacity_adjusted_max_replicas if max_replicas is None else max_replicas
        return max(lo, min(hi, desired)), state

    return wrapped


def cooldown(policy: Policy, upscale_delay_s: float, downscale_delay_s: float, key: str = "cooldown") -> Policy:
    """Act on a scale-up (down) only after it has been asked for continuously for the delay; once the delay
    has passed, keep acting in that direction until the load changes direction (the replica count may take
    several ticks to follow)."""

    def wrapped(ctx: Context) -> tuple[int, dict]:
        desired, state = policy(ctx)
        now, current = ctx.current_time or 0.0, ctx.current_num_replicas
        direction = (desired > current) - (desired < current)
        pending = state.get(key)
        if direction == 0:
            return current, {**state, key: None}
        if pending is None or pending["direction"] != direction:
            pending = {"direction": direction, "since": now}
        delay = upscale_delay_s if direction > 0 else downscale_delay_s
        if now - pending["since"] >= delay:
            return desired, {**state, key: pending}
        return current, {**state, key: pending}

    return wrapped


def hysteresis(policy: Policy, down_fraction: float = 0.8) -> Policy:
    """Scale down only when the policy would still be happy with `down_fraction` of the replicas kept:
    a load hovering at a boundary does not flap between n and n + 1."""

    def wrapped(ctx: Context) -> tuple[int, dict]:
        desired, state = policy(ctx)
        current = ctx.current_num_replicas
        if desired < current and desired > math.floor(current * down_fraction):
            return current, state
        return desired, state

    return wrapped


class VersionAutoscaler:
    """The stacked policy for one target version, built from `policy_kwargs` (a version's `AutoscalingSpec`):
    bounded(cooldown(hysteresis(base))), base = verified tokens/s against capacity, or ongoing requests."""

    def __init__(self, policy: str = "verified_tokens", capacity_tokens_per_s: float = 400.0,
                 target_utilisation: float = 0.7, target_ongoing_requests: float = 8.0, upscale_delay_s: float = 5.0,
                 downscale_delay_s: float = 30.0, down_fraction: float = 0.8):
        if policy == "verified_tokens":
            base = verified_tokens(capacity_tokens_per_s, target_utilisation)
        elif policy == "ongoing_requests":
            base = ongoing_requests(target_ongoing_requests)
        else:
            raise ValueError(f"policy {policy!r}: use verified_tokens or ongoing_requests")
        self.policy = bounded(cooldown(hysteresis(base, down_fraction), upscale_delay_s, downscale_delay_s))

    def __call__(self, ctx: Context) -> tuple[int, dict]:
        return self.policy(ctx)
