"""What a fleet device measures in real time: the run's clock and how late emulated events fire
(`FleetClock`), and the cloud's answer time as the device sees it (`ObservedCloud`).

No asyncio tasks are started here and nothing is sent; `fleet.runtime` drives both.
"""

from __future__ import annotations

import asyncio
import time
from array import array

from flexspec_serve.edge.devices import CloudProfile

LAG_KINDS = ("session_start", "draft", "uplink", "downlink", "pipelined_send", "answer_applied")


class FleetClock:
    """Milliseconds since the run's start epoch (wall time, so every actor of a run agrees). Keeps every
    lag by the kind of event (`LAG_KINDS`), to tell which part of the emulation falls behind."""

    def __init__(self, start_epoch_s: float):
        self.start = start_epoch_s
        self.by_kind: dict[str, array] = {kind: array("d") for kind in LAG_KINDS}  # 8 bytes a lag (soak runs)

    def now_ms(self) -> float:
        return (time.time() - self.start) * 1e3

    async def sleep_until(self, due_ms: float, kind: str) -> float:
        """Wait for an emulated event; returns how late it fired (the emulation lag, ms)."""
        delay = due_ms - self.now_ms()
        if delay > 0:
            await asyncio.sleep(delay / 1e3)
        return self.late(due_ms, kind)

    def late(self, due_ms: float, kind: str) -> float:
        """How late it is for something due at `due_ms` (booked under `kind`)."""
        lag = max(0.0, self.now_ms() - due_ms)
        self.by_kind[kind].append(lag)
        return lag


class ObservedCloud:
    """The cloud's answer time as one device sees it (arrival -> answer), in `CloudProfile`'s shape (base +
    per verified position), so the controller plans with the real service instead of a guess. Both terms
    are fitted online: exponentially weighted least squares of time on positions, the slope shrunk toward
    the prior's with `prior_weight` (in positions squared), so a device whose K barely varies keeps the
    prior slope and fits only the base. A GPU verifies extra positions almost free; this host's CPU does not.
    """

    def __init__(self, prior: CloudProfile, smoothing: float = 0.1, prior_weight: float = 1.0):
        self.base_ms, self.per_token_ms, self.a = prior.verify_base_ms, prior.verify_ms_per_token, smoothing
        self.prior_slope, self.prior_weight = prior.verify_ms_per_token, prior_weight
        self.moments: list[float] | None = None  # EW means of x, y, x^2, xy (x: positions, y: ms)

    def verify_ms(self, k: int) -> float:
        return self.base_ms + self.per_token_ms * (k + 1)

    def record(self, k: int, elapsed_ms: float) -> None:
        """A round verifying k draft tokens (tree nodes) took `elapsed_ms` from arrival to answer."""
        x, y = k + 1.0, max(0.0, elapsed_ms)
        obs = [x, y, x * x, x * y]
        m = self.moments = obs if self.moments is None else [(1 - self.a) * m + self.a * o
                                                            for m, o in zip(self.moments, obs)]
        var, cov = m[2] - m[0] ** 2, m[3] - m[0] * m[1]
        self.per_token_ms = max(0.0, (cov + self.prior_weight * self.prior_slope) / (max(0.0, var) + self.prior_weight))
        self.base_ms = max(0.0, m[1] - self.per_token_ms * m[0])
