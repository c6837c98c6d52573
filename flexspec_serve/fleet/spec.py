"""The fleet spec (YAML, validated at the edge) and the deterministic per-device plan derived from it.

A fleet is N emulated edge devices: a mix of device classes, each class with its own channel (a carried
Mahimahi trace or a statistical setting; every device starts at its own offset in a trace and draws its
own fading realisation), an arrival process (first session within `start_within_s`, then exponential
think time between sessions, so the fleet's session starts form a Poisson-like stream), a prompt source,
a workload (max new tokens, sampling) and a K policy. Everything random is seeded from `seed`, so two
runs with the same spec (e.g. `--compare` with another policy) replay the same devices, channels,
arrivals and prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pydantic import Field, field_validator, model_validator

from flexspec_serve.ahead import Ahead
from flexspec_serve.config import StrictModel
from flexspec_serve.edge.devices import DEVICE_CLASSES
from flexspec_serve.tree import Tree

POLICY_PATTERN = r"^(adaptive|cloud-only|accept-adaptive|fixed-[0-9]+)$"


class ClassShare(StrictModel):
    device_class: str = Field(description=f"one of {sorted(DEVICE_CLASSES)}")
    share: float = Field(gt=0, le=1, description="fraction of the fleet in this class")
    channel: str = Field("fading", description="a carried Mahimahi trace name or good | fading | poor")


class Arrival(StrictModel):
    start_within_s: float = Field(10.0, ge=0, description="each device's first session starts uniformly in [0, this]")
    think_time_s: float = Field(5.0, ge=0, description="mean (exponential) pause between a device's sessions")
    sessions_per_device: int = Field(0, ge=0, description="stop a device after this many sessions; 0 = until the end")


class FleetSpec(StrictModel):
    """A fleet of emulated devices: class mix, channels, arrivals, workload, policy, transport."""

    name: str = Field("fleet", pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,31}$", description="prefix of device ids")
    devices: int = Field(16, ge=1, le=100_000, description="number of emulated devices")
    mix: list[ClassShare] = Field(min_length=1, description="device classes and their shares (sum to 1)")
    policy: str = Field("adaptive", pattern=POLICY_PATTERN, description="adaptive | cloud-only | accept-adaptive | fixed-K")
    max_draft_tokens: int = Field(8, ge=1, le=16, description="K_max")
    ahead: Ahead = Field(Ahead.OFF, description="what devices do while a round waits for its answer. off: idle; "
                         "draft: draft-ahead, so after a lookahead hit (all K accepted, the cloud's token guessed) the "
                         "next round's draft is ready (the fleet actor runs that draft work for real); pipeline: also "
                         "send that next round as soon as it is drafted, before the answer (the cloud verifies it only "
                         "after a lookahead hit; the fleet actor drafts ahead on every round)")
    tree: Tree = Field(Tree.CHAIN, description="the shape of a round's draft (greedy and sampling sessions). "
                       "chain: K tokens; second: each draft step's runner-up beside its token too (2K nodes, no "
                       "extra draft step); branches: each runner-up also continued by the draft for up to 2 more "
                       "tokens in the same K steps. Nodes count against the server's max_draft_tokens (16 assumed)")
    max_new_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0, le=10, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    target: str = Field("stable", max_length=64, description="version or alias every session asks for")
    prompts: str = Field("humaneval", description="'humaneval' or a path to a JSONL file with a 'prompt' field")
    max_prompt_tokens: int = Field(192, ge=1, le=8192, description="keep the last this many prompt tokens")
    arrival: Arrival = Field(default_factory=Arrival)
    duration_s: float = Field(60.0, gt=0, le=86_400, description="no session starts after this; running ones finish")
    actors: int = Field(2, ge=1, le=1024, description="fleet actors; devices are split evenly between them")
    actor_num_cpus: float = Field(0.25, gt=0, description="CPUs reserved per fleet actor")
    transport: str = Field("handle", pattern=r"^(handle|direct|http)$",
                           description="handle: the router's DeploymentHandle; direct: routed in the fleet actor, "
                           "one hop to the version's deployment; http: through Serve's proxy")
    url: str = Field("http://127.0.0.1:8000", description="router base URL for the http transport")
    api_key_file: str | None = Field(None, description="file holding this fleet's API key for the http transport "
                                                       "(one line); else $FLEXSPEC_API_KEY. Keys never go in here")
    draft_batch_wait_ms: float = Field(8.0, ge=0, le=100, description="when none of an actor's devices is drafting, "
                                       "the first draft step waits for others to join for at most this long, and at "
                                       "most a quarter of the round's own draft time (devices that ask while others "
                                       "draft join them at their next step)")
    trace_offset_spread_s: float = Field(600.0, ge=0, description="devices start at random offsets in a trace")
    seed: int = Field(0, ge=0)

    @field_validator("ahead", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        """YAML 1.1 reads a bare `off` (and `no`) as false: that is the mode `off`."""
        return Ahead.OFF if value is False else value

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        """Fleet files from before `ahead` and `tree`: name the replacement instead of only rejecting the field."""
        if isinstance(data, dict):
            for old, new in (("draft_ahead", "ahead: draft"), ("pipeline", "ahead: pipeline"),
                             ("siblings", "tree: second")):
                if old in data:
                    raise ValueError(f"{old}: {data[old]!r} is no longer a field; write `{new}` instead")
        return data

    @model_validator(mode="after")
    def _check_mix(self) -> FleetSpec:
        unknown = [c.device_class for c in self.mix if c.device_class not in DEVICE_CLASSES]
        if unknown:
            raise ValueError(f"mix.device_class {unknown[0]!r} is not a known class; choose from {sorted(DEVICE_CLASSES)}")
        total = sum(c.share for c in self.mix)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"mix shares sum to {total:g}, not 1")
        return self

    def assignments(self) -> list[ClassShare]:
        """The class (and channel) of each device, deterministic: largest-remainder apportionment."""
        raw = [c.share * self.devices for c in self.mix]
        counts = [int(r) for r in raw]
        for i in sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)[: self.devices - sum(counts)]:
            counts[i] += 1
        return [c for c, n in zip(self.mix, counts) for _ in range(n)]

    def plans(self) -> list[DevicePlan]:
        rng = random.Random(self.seed)
        return [DevicePlan(f"{self.name}-{i}", a.device_class, a.channel, seed=self.seed * 1_000_003 + i,
                           offset_ms=rng.uniform(0, self.trace_offset_spread_s * 1e3))
                for i, a in enumerate(self.assignments())]

    def shards(self) -> list[list[DevicePlan]]:
        """Devices split round-robin over the actors (so every actor gets a similar class mix)."""
        plans = self.plans()
        return [s for s in (plans[a :: self.actors] for a in range(self.actors)) if s]


@dataclass(frozen=True)
class DevicePlan:
    device_id: str
    device_class: str
    channel: str
    seed: int
    offset_ms: float
