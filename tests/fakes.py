"""Fakes shared by the tests: they implement the real interface (here: a clock is a callable)."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock the test moves by hand (`clock.t += 0.5`)."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t
