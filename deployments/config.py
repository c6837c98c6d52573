"""The serving app's configuration (YAML, validated) and the version registry's state.

The registry is the single source of truth for versions, aliases and weights once the app runs; the
app config only seeds it. Ray-free (pure pydantic), so the CLI and tests can read it anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from typing import Literal

from pydantic import Field, field_validator, model_validator

from flexspec_serve import paths
from flexspec_serve.canary import CanaryRules
from flexspec_serve.config import StrictModel
from flexspec_serve.edge.devices import CLOUD_PROFILES

VERSION_NAME = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$"
APP_NAME = "flexspec"  # the router's Serve application (`flexspec serve up`)


def deployment_name(version: str) -> str:
    return f"verifier-{version}"


def version_app_name(version: str) -> str:
    """Every target version is its own Serve application, so adding or deleting one never touches the others."""
    return f"flexspec-{version}"


class AutoscalingSpec(StrictModel):
    """Per-version autoscaling (a canary scales on its own); the policy is `autoscale.policies.VersionAutoscaler`."""

    min_replicas: int = Field(1, ge=0, le=256)
    max_replicas: int = Field(4, ge=1, le=256)
    policy: Literal["verified_tokens", "ongoing_requests"] = Field(
        "verified_tokens", description="verified tokens/s against capacity, or ongoing requests per replica")
    capacity_tokens_per_s: float = Field(400.0, gt=0, description="verified tokens/s one replica sustains at the "
                                                                   "latency SLO (see `flexspec plan`)")
    target_utilisation: float = Field(0.7, gt=0, le=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    metrics_interval_s: float = Field(1.0, gt=0, description="how often replicas report their load")
    look_back_period_s: float = Field(5.0, gt=0, description="window the reported load is averaged over")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} exceeds max_replicas {self.max_replicas}")
        return self

    def serve_config(self) -> dict:
        kwargs = {"policy": self.policy, "capacity_tokens_per_s": self.capacity_tokens_per_s,
                  "target_utilisation": self.target_utilisation, "target_ongoing_requests": self.target_ongoing_requests,
                  "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s}
        # Serve also delays a custom policy's decisions by its own up/downscale delays: zero them, the policy's
        # cooldown wrapper is the one delay
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": max(1, self.min_replicas), "metrics_interval_s": self.metrics_interval_s,
                "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
                "look_back_period_s": self.look_back_period_s,
                "policy": {"policy_function": "autoscale.policies:VersionAutoscaler", "policy_kwargs": kwargs}}


class VersionSpec(StrictModel):
    name: str = Field(pattern=VERSION_NAME, description="version name used on the wire")
    path: str = Field(description="checkpoint directory (or HF id in the local cache)")
    num_replicas: int = Field(1, ge=1, le=256)
    num_cpus: float = Field(0.5, gt=0, description="CPUs per replica (fractional is fine)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica on a GPU cluster")
    batcher: Literal["engine-loop", "serve-batch"] = Field(
        "engine-loop", description="engine-loop: a batch forms when the engine is free, from every round that "
        "arrived meanwhile; serve-batch: Serve's @serve.batch, which forms batches on a timer")
    max_batch_size: int = Field(16, ge=1, le=512, description="rounds verified together, at most")
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=1, description="extra wait for more rounds once the engine is "
                                                                     "free (serve-batch: after the first round)")
    max_ongoing_requests: int = Field(64, ge=1, description="per replica; must exceed max_batch_size")
    max_queued_requests: int = Field(512, ge=-1, description="beyond this the handle answers 503")
    torch_threads: int = Field(1, ge=1, le=64, description="torch intra-op threads inside a replica")
    omp_wait_policy: Literal["PASSIVE", "ACTIVE"] = Field(
        "PASSIVE", description="OpenMP threads of the replica sleep (PASSIVE) or spin (ACTIVE) between kernels; "
        "spinning steals cores from the router and other replicas sharing the node (+40 % throughput through Serve "
        "on 2 shared cores when passive, docs/results/serving.md)")
    max_sessions: int = Field(4096, ge=1, description="KV-cache LRU: sessions per replica")
    max_cache_mb: int = Field(1024, ge=1, description="KV-cache LRU: memory cap per replica")
    session_ttl_s: float = Field(120.0, gt=0, description="drop a session idle this long (its client resyncs "
                                                          "if it returns): steady load, steady memory")
    max_draft_tokens: int = Field(16, ge=1, le=64)
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:[0-9]+)?|auto)$")
    autoscaling: AutoscalingSpec | None = Field(None, description="scale replicas on load; num_replicas ignored")
    access_log: bool = Field(False, description="Serve's access-log line per request in this version's replicas: "
                             "a line per round, off by default (off and on alternated on 2 shared cores: 1.09x "
                             "rounds/s through the router, 1.11x direct; docs/results/router_load.md)")
    emulate_cloud: str | None = Field(
        None, description="load tests on hardware other than the cloud's: every verify batch is held until the "
        f"named cost profile's time for its positions has passed (one of {sorted(CLOUD_PROFILES)}, "
        "flexspec_serve.edge.devices), so the cloud answers as that GPU would wherever the host is faster; "
        "rounds report the hold in timings.held_ms")

    @field_validator("emulate_cloud")
    @classmethod
    def _known_profile(cls, name: str | None) -> str | None:
        if name is not None and name not in CLOUD_PROFILES:
            raise ValueError(f"unknown cloud profile {name!r}; known: {sorted(CLOUD_PROFILES)}")
        return name

    @model_validator(mode="after")
    def _ongoing_above_batch(self) -> VersionSpec:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests {self.max_ongoing_requests} must be at least "
                             f"max_batch_size {self.max_batch_size}, or batches can never fill")
        return self


Alias = str | dict[str, float]


class DrainPlan(StrictModel):
    mode: Literal["finish", "migrate"] = Field("finish", description="finish: pinned sessions end on this version; "
                                                                     "migrate: their next round resyncs on `to`")
    to: str = Field("stable", description="alias or version that takes this version's new (and migrated) sessions")
    since: float = Field(description="epoch seconds when draining started")


_JUDGE = CanaryRules()  # the judge's defaults, stated once there


class CanaryRuleFields(StrictModel):
    """The canary judge's rules (`flexspec_serve.canary.CanaryRules`) as a canary request and the registry's
    canary plan carry them (`deployments.versions.canary_rules` turns them into the judge's)."""

    window_s: float = Field(_JUDGE.window_s, gt=0, description="promote after this long healthy")
    min_rounds: int = Field(_JUDGE.min_rounds, ge=1, description="rounds on each version before any judgement")
    max_acceptance_drop: float = Field(_JUDGE.max_acceptance_drop, gt=0, lt=1,
                                       description="roll back past this drop of tau(K=4)")
    max_error_rate: float = Field(_JUDGE.max_error_rate, ge=0, lt=1, description="roll back past this error rate")
    min_sessions: int = Field(_JUDGE.min_sessions, ge=2,
                              description="sessions on each version before acceptance is judged")
    z: float = Field(_JUDGE.z, ge=0, le=6, description="standard errors (between sessions) an acceptance drop must "
                                                       "stand out by before it rolls back")


class CanaryPlan(CanaryRuleFields):
    version: str
    baseline: str
    alias: str = "stable"
    weight: float = Field(gt=0, lt=1, description="share of the alias's new sessions sent to the candidate")
    started_at: float
    start_counters: dict[str, dict[str, int]] = Field(default_factory=dict, description="per version, at start")
    status: Literal["running", "promoted", "rolled_back"] = "running"
    reason: str = ""


class RegistryState(StrictModel):
    versions: dict[str, VersionSpec] = Field(description="deployed versions by name")
    aliases: dict[str, Alias] = Field(default_factory=dict,
                                      description="alias -> version, or -> {version: weight} (split by session)")
    generation: int = Field(0, ge=0, description="bumped on every write")
    draft_path: str | None = Field(None, description="the frozen draft every version is served with")
    draining: dict[str, DrainPlan] = Field(default_factory=dict, description="versions taking no new sessions")
    retired: dict[str, str] = Field(default_factory=dict, description="retired version -> alias for stray rounds")
    canary: CanaryPlan | None = None
    gates: dict[str, dict] = Field(default_factory=dict, description="compatibility gate result per version")
    events: list[dict] = Field(default_factory=list, description="version operations, newest last (last 200)")

    @model_validator(mode="after")
    def _aliases_point_at_versions(self) -> RegistryState:
        for alias, target in self.aliases.items():
            names = [target] if isinstance(target, str) else list(target)
            missing = [n for n in names if n not in self.versions]
            if missing:
                raise ValueError(f"alias {alias!r} points at unknown version(s) {missing}; known: {sorted(self.versions)}")
            if isinstance(target, dict) and (not target or any(w < 0 for w in target.values()) or sum(target.values()) <= 0):
                raise ValueError(f"alias {alias!r}: weights must be non-negative and not all zero, got {target}")
            draining = [n for n in names if n in self.draining]
            if draining:
                raise ValueError(f"alias {alias!r} points at draining version(s) {draining}")
        for name, plan in self.draining.items():
            if name not in self.versions or plan.to == name or plan.to in self.draining:
                raise ValueError(f"draining {name!r} must be deployed and hand over to a live alias or version, "
                                 f"not {plan.to!r}")
        return self

    def resolve(self, target: str | None, session_id: str, first_round: bool = True) -> str:
        """The version for a round: explicit version, alias, or weighted split by session. A draining version
        takes no new sessions (and, when migrating, no rounds at all); a retired one's strays go to its alias."""
        name = target or "stable"
        if name in self.retired and name not in self.versions:
            return self.resolve(self.retired[name], session_id)
        if name in self.versions:
            drain = self.draining.get(name)
            if drain and (first_round or drain.mode == "migrate"):
                return self.resolve(drain.to, session_id)
            return name
        if name not in self.aliases:
            raise UnknownTarget(name, sorted(self.versions), sorted(self.aliases))
        alias = self.aliases[name]
        if isinstance(alias, str):
            return alias
        return pick_weighted(alias, session_id)

    def edited(self, event: dict | None = None, **changes) -> RegistryState:
        """A validated copy with `changes` applied and `event` appended to the history."""
        events = self.events + ([event] if event else [])
        return RegistryState.model_validate({**self.model_dump(), **changes, "events": events[-200:]})


class UnknownTarget(KeyError):
    def __init__(self, name: str, versions: list[str], aliases: list[str]):
        super().__init__(name)
        self.name, self.versions, self.aliases = name, versions, aliases

    def __str__(self) -> str:
        return f"unknown version or alias {self.name!r}; versions: {self.versions}, aliases: {self.aliases}"


def pick_weighted(weights: dict[str, float], session_id: str) -> str:
    """Deterministic by session: the same session always lands on the same version of a split."""
    u = int.from_bytes(hashlib.sha256(session_id.encode()).digest()[:8], "big") / 2**64
    total, acc = sum(weights.values()), 0.0
    for name in sorted(weights):
        acc += weights[name] / total
        if u < acc:
            return name
    return sorted(weights)[-1]


class AppConfig(StrictModel):
    """What `flexspec serve up` / `serve deploy deployments/serve.yaml` deploys."""

    draft_path: str = Field(description="the frozen draft (the cloud keeps a copy to recompute q)")
    versions: list[VersionSpec] = Field(min_length=1)
    aliases: dict[str, Alias] = Field(default_factory=dict)
    registry_path: str = Field(default_factory=lambda: str(paths.home() / "registry.json"),
                               description="where the registry persists (survives router restarts)")
    admin_token_file: str | None = Field(None, description="file holding the admin token (else the "
                                                          "FLEXSPEC_ADMIN_TOKEN environment variable)")
    model_root: str | None = Field(None, description="versions added at run time must live under this directory")
    drain_idle_s: float = Field(10.0, gt=0, description="a retiring version is deleted after this long without rounds")
    api_keys_file: str | None = Field(None, description="YAML/JSON {client: key} for HTTP rounds (else the "
                                                        "FLEXSPEC_API_KEYS variable; none = open)")
    session_rounds_per_s: float = Field(50.0, gt=0, description="per-session rate limit on HTTP rounds")
    session_burst: float = Field(20.0, ge=1, description="rounds a session may send at once before the limit")
    router_replicas: int = Field(1, ge=1)
    router_num_cpus: float = Field(0.2, gt=0)
    router_access_log: bool = Field(False, description="Serve's access-log line per request in the router: a line "
                                    "per round from handle and HTTP clients (VersionSpec.access_log: the versions')")

    def seed_state(self) -> RegistryState:
        return RegistryState(versions={v.name: v for v in self.versions}, aliases=self.aliases,
                             draft_path=self.draft_path)

    @classmethod
    def for_family(cls, family_dir: str | Path, versions: list[str], version_kw: dict | None = None, **kw) -> AppConfig:
        """`version_kw`: VersionSpec fields every version gets."""
        family_dir = Path(family_dir)
        vs = [VersionSpec(name=v, path=str(family_dir / v), **(version_kw or {})) for v in versions]
        aliases = kw.pop("aliases", {"stable": versions[0]})
        return cls(draft_path=str(family_dir / "draft"), versions=vs, aliases=aliases, **kw)


class FileRegistry:
    """The registry persisted as JSON (atomic replace); every write bumps the generation."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()

    def load(self) -> RegistryState | None:
        try:
            return RegistryState.model_validate_json(self.path.read_text())
        except FileNotFoundError:
            return None

    def save(self, state: RegistryState) -> RegistryState:
        state = state.model_copy(update={"generation": state.generation + 1})
        RegistryState.model_validate(state.model_dump())  # re-check invariants of the edited state
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".registry-")
        with os.fdopen(fd, "w") as fh:
            fh.write(state.model_dump_json(indent=2))
        os.replace(tmp, self.path)
        return state

    def load_or_seed(self, seed: RegistryState) -> RegistryState:
        existing = self.load()
        return existing if existing is not None else self.save(seed)

    def describe(self) -> str:
        state = self.load()
        return "no registry" if state is None else json.dumps(state.model_dump(), indent=2)


class RegistryView:
    """A reader's copy of the registry: re-read when the file changed, which is checked at most every
    `period_s` (or on the next call after `invalidate`, e.g. after this process wrote it).

    Callers on several threads are fine (the router's sync endpoints run in FastAPI's threads, its rounds on
    the event loop): the check time is set only once the state it stands for is in place, so a caller that
    finds the check fresh never gets the state from before it. Setting it first once let a canary's caller
    read the previous canary while another thread was re-reading the file."""

    def __init__(self, registry: FileRegistry, state: RegistryState, period_s: float = 0.5, clock=time.monotonic):
        self.registry, self.state, self.period_s, self.clock = registry, state, period_s, clock
        self._mtime_ns: int | None = None
        self._checked = float("-inf")
        self._invalidations = 0

    def current(self) -> RegistryState:
        now = self.clock()
        if now - self._checked < self.period_s:
            return self.state
        seen = self._invalidations
        try:
            mtime_ns = self.registry.path.stat().st_mtime_ns
        except FileNotFoundError:
            return self.state
        if mtime_ns != self._mtime_ns:
            self.state, self._mtime_ns = self.registry.load() or self.state, mtime_ns
        if seen == self._invalidations:  # else a write came during this read: the next call checks again
            self._checked = now
        return self.state

    def invalidate(self) -> None:
        self._invalidations += 1
        self._checked = float("-inf")
