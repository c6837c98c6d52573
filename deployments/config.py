"""The serving app's configuration (YAML, validated) and the version registry's state.

The registry is the single source of truth for versions, aliases and weights once the app runs; the
app config only seeds it. Ray-free (pure pydantic), so the CLI and tests can read it anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from pydantic import Field, model_validator

from flexspec_serve import paths
from flexspec_serve.config import StrictModel

VERSION_NAME = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$"


class VersionSpec(StrictModel):
    name: str = Field(pattern=VERSION_NAME, description="version name used on the wire")
    path: str = Field(description="checkpoint directory (or HF id in the local cache)")
    num_replicas: int = Field(1, ge=1, le=256)
    num_cpus: float = Field(0.5, gt=0, description="CPUs per replica (fractional is fine)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica on a GPU cluster")
    max_batch_size: int = Field(16, ge=1, le=512, description="serve.batch: rounds verified together")
    batch_wait_timeout_s: float = Field(0.004, ge=0, le=1, description="serve.batch: wait to fill a batch")
    max_ongoing_requests: int = Field(64, ge=1, description="per replica; must exceed max_batch_size")
    max_queued_requests: int = Field(512, ge=-1, description="beyond this the handle answers 503")
    torch_threads: int = Field(1, ge=1, le=64, description="torch intra-op threads inside a replica")
    max_sessions: int = Field(4096, ge=1, description="KV-cache LRU: sessions per replica")
    max_cache_mb: int = Field(1024, ge=1, description="KV-cache LRU: memory cap per replica")
    max_draft_tokens: int = Field(16, ge=1, le=64)
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:[0-9]+)?|auto)$")

    @model_validator(mode="after")
    def _ongoing_above_batch(self) -> VersionSpec:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests {self.max_ongoing_requests} must be at least "
                             f"max_batch_size {self.max_batch_size}, or batches can never fill")
        return self


Alias = str | dict[str, float]


class RegistryState(StrictModel):
    versions: dict[str, VersionSpec] = Field(description="deployed versions by name")
    aliases: dict[str, Alias] = Field(default_factory=dict,
                                      description="alias -> version, or -> {version: weight} (split by session)")
    generation: int = Field(0, ge=0, description="bumped on every write")

    @model_validator(mode="after")
    def _aliases_point_at_versions(self) -> RegistryState:
        for alias, target in self.aliases.items():
            names = [target] if isinstance(target, str) else list(target)
            missing = [n for n in names if n not in self.versions]
            if missing:
                raise ValueError(f"alias {alias!r} points at unknown version(s) {missing}; known: {sorted(self.versions)}")
            if isinstance(target, dict) and (not target or any(w < 0 for w in target.values()) or sum(target.values()) <= 0):
                raise ValueError(f"alias {alias!r}: weights must be non-negative and not all zero, got {target}")
        return self

    def resolve(self, target: str | None, session_id: str) -> str:
        """Version for a session's first round: explicit version, alias, or weighted split by session."""
        name = target or "stable"
        if name in self.versions:
            return name
        if name not in self.aliases:
            raise UnknownTarget(name, sorted(self.versions), sorted(self.aliases))
        alias = self.aliases[name]
        if isinstance(alias, str):
            return alias
        return pick_weighted(alias, session_id)


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
    router_replicas: int = Field(1, ge=1)
    router_num_cpus: float = Field(0.2, gt=0)

    def seed_state(self) -> RegistryState:
        return RegistryState(versions={v.name: v for v in self.versions}, aliases=self.aliases)

    @classmethod
    def for_family(cls, family_dir: str | Path, versions: list[str], **kw) -> AppConfig:
        family_dir = Path(family_dir)
        vs = [VersionSpec(name=v, path=str(family_dir / v)) for v in versions]
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
