"""Capacity planning: replicas per target version to hold a per-round latency SLO for a fleet.

Demand. For every device of the fleet spec, the FlexSpec controller picks K on the device's channel at its
mean rate (prior acceptance `alpha`); that gives its round time T_r (draft + uplink + server + downlink)
and tokens per round tau. A session of `max_new_tokens` takes T_s = max_new / tau rounds of T_r; with
think time Z between sessions a device is in a session a fraction T_s / (T_s + Z) of the time, sending
1 / T_r rounds/s meanwhile. A pipelining device also sends the round it drafted ahead behind every round
whose answer comes after that draft; behind a miss (probability 1 - P(lookahead hit)) the cloud refuses it,
which is one more round for the server to answer (a round's serving overhead and batch slot, no verified
positions). Summed over devices
(and split by the target's weights): rounds/s per version.

Supply. A replica verifying a batch of b rounds takes c(b) (measured: `engine.costs.cost_profile`) plus a
per-round serving overhead o (router, handles, encoding; measured by `benchmarks.serve`). A round waits
at most for the batch in flight and then its own, so the largest b with 2 (c(b) + b o) <= SLO is used;
one replica then serves b / (c(b) + b o) rounds/s, and is planned at `utilisation` of that.

Assumptions (the note printed with the table): rounds arrive independently (no synchronised fleets);
every replica gets an even share (consistent hashing over many sessions); acceptance equals `alpha`;
the channel sits at its mean rate; the server's share of the round time is SLO / 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flexspec_serve.edge.channels import make_link
from flexspec_serve.edge.controller import AcceptanceEstimator, FlexSpecController, RoundView, make_policy
from flexspec_serve.edge.devices import DEVICE_CLASSES, CloudProfile
from flexspec_serve.fleet.spec import FleetSpec


@dataclass(frozen=True)
class Demand:
    rounds_per_s: float
    verified_tokens_per_s: float  # K + 1 positions per round
    mean_k: float
    devices_in_session: float
    refused_rounds_per_s: float = 0.0  # pipelined rounds sent behind misses (included in rounds_per_s)


@dataclass(frozen=True)
class VersionPlan:
    version: str
    share: float
    rounds_per_s: float
    verified_tokens_per_s: float
    batch: int
    replica_rounds_per_s: float
    replica_capacity_tokens_per_s: float  # for the version's AutoscalingSpec.capacity_tokens_per_s
    replicas: int


def device_demand(spec: FleetSpec, alpha: float, server_ms: float, sample: int = 200) -> Demand:
    """Expected load of the fleet (a deterministic sample of at most `sample` devices, scaled up)."""
    plans = spec.plans()
    step = max(1, len(plans) // sample)
    picked = plans[::step]
    rounds = tokens = ks = in_session = refused = 0.0
    for p in picked:
        profile, cloud = DEVICE_CLASSES[p.device_class], CloudProfile(server_ms, 0.0)
        policy = make_policy(spec.policy, profile, cloud, spec.max_draft_tokens, spec.ahead, spec.tree)
        estimator = AcceptanceEstimator(prior_a=alpha * 20, prior_b=(1 - alpha) * 20)
        # the round-time model of the adaptive controller, whatever policy picks K (draft-ahead included)
        model = FlexSpecController(profile, cloud, spec.max_draft_tokens, estimator, spec.ahead, spec.tree)
        if isinstance(policy, FlexSpecController):
            policy.estimator = estimator
        view = mean_view(make_link(p.channel, p.seed, p.offset_ms))
        k = policy.choose(view)
        tau = estimator.expected_tau(k)
        t_round_s = model.round_ms(k, view) / 1e3
        t_session_s = spec.max_new_tokens / tau * t_round_s
        duty = t_session_s / (t_session_s + spec.arrival.think_time_s)
        refused_per_round = (1.0 - estimator.p_hit(k)) if model.sends_ahead(k, view) else 0.0
        rounds += duty * (1.0 + refused_per_round) / t_round_s
        refused += duty * refused_per_round / t_round_s
        tokens += duty * (model.nodes(k) + 1) / t_round_s  # verified positions (a token tree's nodes)
        ks += k
        in_session += duty
    scale = len(plans) / len(picked)
    return Demand(rounds * scale, tokens * scale, ks / len(picked), in_session * scale, refused * scale)


def mean_view(link) -> RoundView:
    """What a device on this link sees on average: one-way delays and the mean rates."""
    up_bps, down_bps = _mean_rate(link.name, "up", link.up), _mean_rate(link.name, "down", link.down)
    return RoundView(up_ms=_one_way_ms(link.up), down_ms=_one_way_ms(link.down) + 24 * 8e3 / down_bps,
                     up_ms_per_byte=8e3 / up_bps)


def _one_way_ms(channel) -> float:
    return channel.delay_ms if hasattr(channel, "delay_ms") else channel.s.one_way_delay_ms


_STATISTICAL_RATES: dict[tuple[str, str], float] = {}  # setting, direction -> mean rate (one draw per setting)


def _mean_rate(name: str, direction: str, channel) -> float:
    if hasattr(channel, "mean_rate_bps"):
        return max(1.0, channel.mean_rate_bps())
    key = (name, direction)
    if key not in _STATISTICAL_RATES:
        _STATISTICAL_RATES[key] = sum(channel.reported_rate_bps(t * 1000.0) for t in range(60)) / 60
    return max(1.0, _STATISTICAL_RATES[key])


def replica_capacity(cost_ms: dict[int, float], overhead_ms: float, slo_ms: float) -> tuple[int, float]:
    """(batch, rounds/s) of one replica at the SLO; batch 1 when even that misses it (flagged by the caller)."""
    best = (1, 1e3 / (cost_ms[min(cost_ms)] + overhead_ms))
    for b in sorted(cost_ms):
        busy_ms = cost_ms[b] + b * overhead_ms
        if 2 * busy_ms <= slo_ms:
            best = (b, b / busy_ms * 1e3)
    return best


def plan(spec: FleetSpec, cost_ms: dict[int, float], weights: dict[str, float], slo_ms: float = 200.0,
         overhead_ms: float = 5.0, alpha: float = 0.6, utilisation: float = 0.7) -> tuple[Demand, list[VersionPlan]]:
    demand = device_demand(spec, alpha, slo_ms / 2)
    batch, per_replica = replica_capacity(cost_ms, overhead_ms, slo_ms)
    tokens_per_round = demand.verified_tokens_per_s / demand.rounds_per_s if demand.rounds_per_s else 1.0
    total = sum(weights.values())
    out = []
    for version, w in sorted(weights.items()):
        share = w / total
        rps = demand.rounds_per_s * share
        out.append(VersionPlan(version, round(share, 3), round(rps, 2), round(demand.verified_tokens_per_s * share, 1),
                               batch, round(per_replica, 2), round(per_replica * tokens_per_round, 1),
                               max(1, math.ceil(rps / (per_replica * utilisation)))))
    return demand, out


ASSUMPTIONS = (
    "Assumptions: rounds arrive independently; replicas share load evenly (consistent hashing over many "
    "sessions); acceptance = alpha; channels at their mean rate; the server's share of a round is SLO/2; "
    "a round waits for at most one batch in flight plus its own; replicas planned at the given utilisation."
)
