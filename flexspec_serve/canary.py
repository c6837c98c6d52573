"""The canary judge for target versions (Ray-free and torch-free; the serving package acts on its decisions).

`judge_canary`: a pure function from the canary's plan and the live counters of both versions (deltas
since the canary started) to continue / promote / rollback, with the reason. It compares the acceptance
of sessions that started since the canary did, on both versions (a canary only gets new sessions, and
young sessions accept less: their first rounds are often cloud-only and their first drafts harder),
as the acceptance length implied at K = 4 by the live acceptance rate alpha (accepted / draft tokens):
the gate's quantity, free of the devices' K mix. Acceptance varies far more between sessions than
between rounds of one session (in the LTE fleet a session's own alpha ranged from 0.18 to 1.0), so a
drop counts only once `min_sessions` sessions ran on each version and only when it stands out of the
sessions' spread: the candidate given `z` standard errors of the difference (`SessionSpread`) would
still fall below the limit. A real drop past the limit that is not yet that clear keeps the canary
running (and unpromoted) until it is.

It does not deploy, route or write the registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flexspec_serve.engine.stats import AcceptanceStats, SessionSpread, expected_acceptance_length, merge_sessions


@dataclass(frozen=True)
class CanaryRules:
    window_s: float = 60.0  # healthy this long (and min_rounds seen) -> promote
    min_rounds: int = 100  # rounds on the candidate before any judgement
    max_acceptance_drop: float = 0.2  # rollback if tau(K=4) from live alpha falls this far below the baseline's
    max_error_rate: float = 0.01  # rollback if errors / rounds on the candidate exceed this ...
    max_error_rate_excess: float = 0.005  # ... and exceed the baseline's by this much
    min_sessions: int = 5  # sessions on each version before acceptance is judged (when the replicas count them)
    z: float = 2.0  # standard errors a drop must stand out by before it rolls back


@dataclass(frozen=True)
class VersionWindow:
    """Counters of one version since the canary started (deltas of cumulative counters), and the sessions
    behind them (`engine.stats.SessionSpread`; sessions 0: not counted, as from counter deltas)."""

    rounds: int
    draft_tokens: int
    accepted_tokens: int
    errors: int
    spread: SessionSpread = field(default_factory=SessionSpread)

    @classmethod
    def of_sessions(cls, sessions: list[AcceptanceStats], errors: int = 0, counted: bool = True) -> VersionWindow:
        """The window over these sessions, merged as a replica merges them (`counted=False`: without the
        sessions, as counter deltas give it)."""
        total, spread = merge_sessions(sessions)
        return cls(total.rounds, total.draft_tokens, total.accepted_tokens, errors,
                   spread if counted else SessionSpread())

    @property
    def sessions(self) -> int:
        return self.spread.sessions

    @property
    def alpha(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def alpha_se(self) -> float:
        """Standard error of alpha over sessions (a ratio estimator's, clustered by session): sqrt(n / (n - 1)
        sum_s (a_s - alpha d_s)^2) / sum_s d_s. 0 when sessions are not counted, infinite from fewer than 2."""
        n, a = self.sessions, self.alpha
        if n == 0:
            return 0.0
        if n < 2 or not self.draft_tokens:
            return math.inf
        sp = self.spread
        residual = max(0.0, sp.accepted_sq - 2 * a * sp.cross + a * a * sp.draft_sq)
        return math.sqrt(n / (n - 1) * residual) / self.draft_tokens

    @property
    def tau_k4(self) -> float:
        return expected_acceptance_length(self.alpha, 4)

    @property
    def error_rate(self) -> float:
        return self.errors / max(1, self.rounds + self.errors)


@dataclass(frozen=True)
class Decision:
    action: str  # "continue" | "promote" | "rollback"
    reason: str


def judge_canary(rules: CanaryRules, elapsed_s: float, baseline: VersionWindow, candidate: VersionWindow) -> Decision:
    if candidate.errors and candidate.error_rate > rules.max_error_rate \
            and candidate.error_rate > baseline.error_rate + rules.max_error_rate_excess:
        return Decision("rollback", f"error rate {candidate.error_rate:.2%} vs baseline {baseline.error_rate:.2%}")
    if candidate.rounds < rules.min_rounds or baseline.rounds < rules.min_rounds:
        return Decision("continue", f"waiting for {rules.min_rounds} rounds on each version "
                                    f"({candidate.rounds} candidate, {baseline.rounds} baseline)")
    c, b = candidate, baseline
    counted = c.sessions and b.sessions
    if counted and min(c.sessions, b.sessions) < rules.min_sessions:
        return Decision("continue", f"waiting for {rules.min_sessions} sessions on each version "
                                    f"({c.sessions} candidate, {b.sessions} baseline)")
    drop = 1.0 - c.tau_k4 / b.tau_k4
    shown = f"tau(K=4) {c.tau_k4:.2f} (alpha {c.alpha:.3f}) vs baseline {b.tau_k4:.2f} (alpha {b.alpha:.3f})"
    if counted:
        se = math.hypot(c.alpha_se, b.alpha_se)
        shown += f", {c.sessions} / {b.sessions} sessions, alpha difference +-{se:.3f}"
        clear_drop = 1.0 - expected_acceptance_length(min(1.0, c.alpha + rules.z * se), 4) / b.tau_k4
    else:
        clear_drop = drop
    limit = rules.max_acceptance_drop
    if clear_drop > limit:
        return Decision("rollback", f"acceptance: {shown}, {drop:.0%} lower (limit {limit:.0%})")
    if drop > limit:
        return Decision("continue", f"{shown}: {drop:.0%} lower, not yet beyond the sessions' spread "
                                    f"({rules.z:g} standard errors)")
    if elapsed_s >= rules.window_s:
        return Decision("promote", f"healthy for {elapsed_s:.0f} s: {shown}, error rate {c.error_rate:.2%}")
    return Decision("continue", f"{shown}; {elapsed_s:.0f}/{rules.window_s:.0f} s")
