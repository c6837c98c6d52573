"""Acceptance statistics per session and per target version."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields


def expected_acceptance_length(alpha: float, k: int) -> float:
    """E[tau] for K drafts each accepted with probability alpha, independently: (1 - alpha^(K+1)) / (1 - alpha)."""
    if k == 0:
        return 1.0
    return float(k + 1) if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass
class AcceptanceStats:
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    generated_tokens: int = 0  # accepted + one recovered/bonus token per round
    offered_by_position: list[int] = field(default_factory=list)  # rounds that drafted position i
    accepted_by_position: list[int] = field(default_factory=list)  # ... and had it accepted

    def record(self, k: int, accepted: int) -> None:
        self.rounds += 1
        self.draft_tokens += k
        self.accepted_tokens += accepted
        self.generated_tokens += accepted + 1
        grow = k - len(self.offered_by_position)
        if grow > 0:
            self.offered_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        for i in range(k):
            self.offered_by_position[i] += 1
            self.accepted_by_position[i] += int(i < accepted)

    def merge(self, other: AcceptanceStats) -> None:
        self.rounds += other.rounds
        self.draft_tokens += other.draft_tokens
        self.accepted_tokens += other.accepted_tokens
        self.generated_tokens += other.generated_tokens
        for i, (o, a) in enumerate(zip(other.offered_by_position, other.accepted_by_position)):
            if i >= len(self.offered_by_position):
                self.offered_by_position.append(0)
                self.accepted_by_position.append(0)
            self.offered_by_position[i] += o
            self.accepted_by_position[i] += a

    @property
    def acceptance_length(self) -> float:
        """Mean tokens per round (accepted + 1); 0 before any round."""
        return self.generated_tokens / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    def rate_by_position(self) -> list[float]:
        return [a / o if o else 0.0 for o, a in zip(self.offered_by_position, self.accepted_by_position)]

    def as_dict(self) -> dict:
        return {
            "rounds": self.rounds, "draft_tokens": self.draft_tokens, "accepted_tokens": self.accepted_tokens,
            "generated_tokens": self.generated_tokens, "acceptance_length": round(self.acceptance_length, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "acceptance_rate_by_position": [round(r, 4) for r in self.rate_by_position()],
        }


@dataclass
class SessionSpread:
    """How acceptance varies between the sessions behind a merged `AcceptanceStats`: per-session sums of
    accepted a_s and draft d_s tokens, squared and crossed (sums, so replicas merge by adding). Rounds of one
    session are far from independent (a session that loops accepts nearly everything, a hard one little), so
    the error of alpha = sum a_s / sum d_s comes from these, not from the round count."""

    sessions: int = 0
    accepted_sq: float = 0.0  # sum of a_s^2
    draft_sq: float = 0.0  # sum of d_s^2
    cross: float = 0.0  # sum of a_s d_s

    def add(self, session: AcceptanceStats) -> None:
        a, d = session.accepted_tokens, session.draft_tokens
        self.sessions += 1
        self.accepted_sq += a * a
        self.draft_sq += d * d
        self.cross += a * d

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SessionSpread:
        """From `as_dict`'s keys (missing ones: 0, as from a replica that does not count sessions)."""
        return cls(int(d.get("sessions", 0)), *(float(d.get(f.name, 0.0)) for f in fields(cls)[1:]))


SPREAD_KEYS = tuple(f.name for f in fields(SessionSpread))  # summed across replicas (they hold disjoint sessions)


def merge_sessions(sessions: Iterable[AcceptanceStats]) -> tuple[AcceptanceStats, SessionSpread]:
    """Sessions' acceptance merged, and how it varies between them."""
    total, spread = AcceptanceStats(), SessionSpread()
    for s in sessions:
        total.merge(s)
        spread.add(s)
    return total, spread
