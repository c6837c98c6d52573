"""What a fleet shard keeps and passes around: live counters, the shard's result, a round on the air
(`Flight`) and its trip's outcome (`Delivery`). Plain data; `fleet.runtime` fills them in.
"""

from __future__ import annotations

import asyncio
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flexspec_serve import protocol as P

if TYPE_CHECKING:
    from flexspec_serve.engine.proposer import Proposal


@dataclass
class LiveCounters:
    devices: int
    in_session: int = 0
    mid_round: int = 0
    sessions_started: int = 0
    sessions_completed: int = 0
    sessions_failed: int = 0
    rounds: int = 0
    tokens: int = 0
    retries: int = 0
    resyncs: int = 0


@dataclass
class ShardResult:
    rounds: list[dict] = field(default_factory=list)  # one RoundRecord per round
    sessions: list[dict] = field(default_factory=list)  # one per session, with its generated tokens
    lags_by_kind: dict[str, array] = field(default_factory=dict)  # every emulated event's lateness, by kind
    timeline: list[dict] = field(default_factory=list)  # sampled once a second
    draft_mean_batch: float = 0.0  # devices per draft step (forward), drafting ahead included
    sessions_started: int = 0
    device_crashes: list[str] = field(default_factory=list)  # a bug, not a service error: never expected

    @property
    def lags_ms(self) -> list[float]:
        """Every emulated event's lateness (all kinds)."""
        return [lag for lags in self.lags_by_kind.values() for lag in lags]


@dataclass
class Delivery:
    """One round's trip: the answer (a result, or the error a pipelined round got), bytes over all attempts,
    and the last attempt's uplink, cloud and downlink times and when its answer reached the device."""

    result: P.RoundResult | P.ErrorBody
    bytes_up: int
    bytes_down: int
    up_ms: float
    cloud_ms: float
    down_ms: float
    attempts: int
    back_ms: float


@dataclass
class Flight:
    """A round on the air: K, its draft, where it starts on the device's critical path (`t0`: when drafting
    began, or for a pipelined round the previous answer), its critical draft time, the lags of its events, draft-ahead tasks, when it was sent, and the task that delivers its answer."""

    k: int
    draft: Proposal | None  # None: K = 0
    t0: float
    draft_ms: float
    lags: list[float] = field(default_factory=list)
    guess: asyncio.Task | None = None
    after: list[asyncio.Task] = field(default_factory=list)
    sent: float = 0.0
    pipelined: bool = False
    assume: list[int] | None = None  # a pipelined round: what the round before it had to commit
    task: asyncio.Task | None = None
