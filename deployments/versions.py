"""Version management on the registry: add, check, canary, promote, set weights, roll back, retire.

`VersionManager` is a plain class (testable with a fake deployer that implements `Deployer`); the router's
admin API holds one, and `flexspec versions ...` calls that API. Every operation is one validated registry
write with an event in the registry's history; deploying and deleting a version's Serve application goes
through the deployer. `tick(counters)` is one step of the watcher: it judges a running canary
(`flexspec_serve.canary.judge_canary`) and finishes drains.

Draining (retire): the version takes no new sessions at once. `finish` keeps routing its pinned sessions
to it; `migrate` routes their next round to the `to` alias, whose replica answers `resync_required`, and
the client resends its full context there (no session lost; the continuation is the new version's). Once
the version has verified no round for `idle_s` its application is deleted, and its name keeps resolving to
`to` for stragglers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from deployments.config import CanaryPlan, CanaryRuleFields, DrainPlan, FileRegistry, RegistryState, VersionSpec
from flexspec_serve.canary import CanaryRules, Decision, VersionWindow, judge_canary
from flexspec_serve.engine.stats import SessionSpread


COUNTERS = ("rounds", "draft_tokens", "accepted_tokens", "errors")


class Deployer(Protocol):
    def deploy(self, spec: VersionSpec, draft_path: str) -> None: ...

    def delete(self, version: str) -> None: ...


class VersionError(ValueError):
    """An operation that cannot be applied to the registry as it is (the message says why)."""

    def __init__(self, message: str, status: int = 409):
        super().__init__(message)
        self.status = status


def counters(stats: dict) -> dict[str, int]:
    """The cumulative counters the canary judges on, from a verifier's `stats()`."""
    return {k: int(stats.get(k, 0)) for k in COUNTERS}


class VersionManager:
    def __init__(self, registry: FileRegistry, deployer: Deployer, clock: Callable[[], float] = time.time,
                 idle_s: float = 10.0):
        self.registry, self.deployer, self.clock, self.idle_s = registry, deployer, clock, idle_s

    def state(self) -> RegistryState:
        state = self.registry.load()
        if state is None:
            raise VersionError("no registry yet: start the app first", 503)
        return state

    def _save(self, state: RegistryState, action: str, version: str | None, detail: str = "", **changes) -> RegistryState:
        event = {"t": round(self.clock(), 3), "action": action, "version": version, "detail": detail}
        try:
            return self.registry.save(state.edited(event, **changes))
        except ValueError as err:
            raise VersionError(str(err), 422) from None

    # ------------------------------------------------------------------ operations
    def add(self, spec: VersionSpec) -> RegistryState:
        """Deploy a new version as its own application; no alias points at it, so it takes no traffic."""
        state = self.state()
        if spec.name in state.versions:
            raise VersionError(f"version {spec.name!r} already exists")
        self.deployer.deploy(spec, state.draft_path)
        state = self.state()  # deploying takes a while; write on top of the latest registry
        retired = {k: v for k, v in state.retired.items() if k != spec.name}
        return self._save(state, "add", spec.name, spec.path, versions={**state.versions, spec.name: spec},
                          retired=retired)

    def record_gate(self, version: str, gate: dict) -> RegistryState:
        state = self.state()
        self._require(state, version)
        return self._save(state, "check", version, gate["message"], gates={**state.gates, version: gate})

    def canary(self, version: str, weight: float, rules: CanaryRules = CanaryRules(), alias: str = "stable",
               force: bool = False, stats: dict[str, dict] | None = None) -> RegistryState:
        """Send `weight` of the alias's new sessions to `version`; the watcher promotes or rolls back."""
        state = self.state()
        self._require(state, version)
        gate = state.gates.get(version)
        if not force and not (gate and gate["passed"]):
            why = gate["message"] if gate else "no compatibility check recorded"
            raise VersionError(f"canary of {version!r} refused by the gate: {why} (run `check`, or force)", 412)
        if state.canary and state.canary.status == "running":
            raise VersionError(f"a canary of {state.canary.version!r} is already running")
        baseline = state.aliases.get(alias)
        if not isinstance(baseline, str) or baseline == version:
            raise VersionError(f"alias {alias!r} must point at one version other than {version!r}, not {baseline!r}")
        plan = CanaryPlan(version=version, baseline=baseline, alias=alias, weight=weight, started_at=self.clock(),
                          **{f: getattr(rules, f) for f in CanaryRuleFields.model_fields},
                          start_counters={v: counters(s) for v, s in (stats or {}).items()})
        return self._save(state, "canary", version, f"{weight:.0%} of {alias!r} new sessions (baseline {baseline})",
                          aliases={**state.aliases, alias: {baseline: 1 - weight, version: weight}}, canary=plan)

    def set_weights(self, alias: str, target: str | dict[str, float]) -> RegistryState:
        state = self.state()
        return self._save(state, "set-weights", None, f"{alias} -> {target}", aliases={**state.aliases, alias: target})

    def promote(self, version: str | None = None, alias: str = "stable", reason: str = "") -> RegistryState:
        """Point the alias at `version` (default: the running canary) for every new session."""
        state = self.state()
        version = version or (state.canary.version if state.canary else None)
        if version is None:
            raise VersionError("nothing to promote: name a version or start a canary")
        self._require(state, version)
        canary = state.canary
        if canary and canary.version == version:
            canary = canary.model_copy(update={"status": "promoted", "reason": reason or "promoted by operator"})
        return self._save(state, "promote", version, reason, aliases={**state.aliases, alias: version}, canary=canary)

    def rollback(self, reason: str = "rolled back by operator") -> RegistryState:
        """End the running canary: its alias points at the baseline again."""
        state = self.state()
        c = state.canary
        if c is None or c.status != "running":
            raise VersionError("no running canary to roll back")
        done = c.model_copy(update={"status": "rolled_back", "reason": reason})
        return self._save(state, "rollback", c.version, reason, aliases={**state.aliases, c.alias: c.baseline},
                          canary=done)

    def retire(self, version: str, mode: str = "finish", to: str = "stable") -> RegistryState:
        """Stop new sessions on `version` now; the watcher deletes it once drained."""
        state = self.state()
        self._require(state, version)
        users = [a for a, t in state.aliases.items() if t == version or (isinstance(t, dict) and version in t)]
        if users:
            raise VersionError(f"aliases {users} still point at {version!r}: promote or set weights first")
        plan = DrainPlan(mode=mode, to=to, since=self.clock())
        return self._save(state, "retire", version, f"draining ({mode}) to {to!r}",
                          draining={**state.draining, version: plan})

    # ------------------------------------------------------------------ watcher
    def tick(self, stats: dict[str, dict]) -> list[Decision]:
        """One watcher step, with each version's current `stats()` (cumulative)."""
        decisions = []
        state = self.state()
        c = state.canary
        if c is not None and c.status == "running" and c.version in stats and c.baseline in stats:
            decision = judge_canary(canary_rules(c), self.clock() - c.started_at, self._window(c, c.baseline, stats),
                                    self._window(c, c.version, stats))
            decisions.append(decision)
            if decision.action == "rollback":
                self.rollback(f"automatic: {decision.reason}")
            elif decision.action == "promote":
                self.promote(c.version, c.alias, f"automatic: {decision.reason}")
        for version, plan in self.state().draining.items():
            idle = stats.get(version, {}).get("idle_s")
            if idle is not None and idle >= self.idle_s:  # migrated sessions stop arriving at once
                self._delete(version, plan)
                decisions.append(Decision("retired", f"{version} drained ({plan.mode})"))
        return decisions

    def _delete(self, version: str, plan: DrainPlan) -> None:
        self.deployer.delete(version)
        state = self.state()
        self._save(state, "deleted", version, f"stray rounds go to {plan.to!r}",
                   versions={k: v for k, v in state.versions.items() if k != version},
                   draining={k: v for k, v in state.draining.items() if k != version},
                   retired={**state.retired, version: plan.to},
                   gates={k: v for k, v in state.gates.items() if k != version})

    @staticmethod
    def _window(plan: CanaryPlan, version: str, stats: dict[str, dict]) -> VersionWindow:
        """Acceptance over sessions that started since the canary did (both versions equally young), with
        their spread; falls back to counter deltas (sessions not counted) when the replica gives no window;
        errors as deltas of the counters."""
        now, start = counters(stats[version]), plan.start_counters.get(version, {})
        window = stats[version].get("window")
        if window is None:
            window = {k: now[k] - start.get(k, 0) for k in COUNTERS}
        return VersionWindow(int(window["rounds"]), int(window["draft_tokens"]), int(window["accepted_tokens"]),
                             now["errors"] - start.get("errors", 0), SessionSpread.from_dict(window))

    @staticmethod
    def _require(state: RegistryState, version: str) -> None:
        if version not in state.versions:
            raise VersionError(f"unknown version {version!r}; versions: {sorted(state.versions)}", 404)


def canary_rules(fields: CanaryRuleFields) -> CanaryRules:
    """The judge's rules from a canary request or plan (the rest keep `CanaryRules`' defaults)."""
    return CanaryRules(**{f: getattr(fields, f) for f in CanaryRuleFields.model_fields})
