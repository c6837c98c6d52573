"""Heterogeneous edge device classes and the fleet spec that mixes them.

Draft speed is given per draft token and per prefill token in ms (a device class's speed for the
family's draft model); powers in W; energy budget in J per generated token. `CloudProfile` is the
verify-cost model of the cloud side used in emulated time (measured values can replace it).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field, model_validator

from flexspec_serve.config import StrictModel


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    draft_ms_per_token: float  # one autoregressive draft step
    prefill_ms_per_token: float  # feeding context tokens into the draft cache
    compute_w: float  # SoC power while drafting
    tx_w: float  # radio power while transmitting
    rx_w: float  # radio power while receiving
    idle_w: float  # radio connected, waiting for the cloud
    energy_budget_j_per_token: float  # the most energy one generated token may cost
    memory_mb: int  # RAM available to the draft

    def draft_ms(self, k: int, prefill_tokens: int = 0) -> float:
        return k * self.draft_ms_per_token + prefill_tokens * self.prefill_ms_per_token


# Sized for a ~1B-parameter draft on each class; budgets are what a vendor might allow an assistant.
DEVICE_CLASSES: dict[str, DeviceProfile] = {
    "flagship-phone": DeviceProfile("flagship-phone", 9.0, 0.6, 4.5, 1.2, 0.9, 0.25, 0.30, 8192),
    "midrange-phone": DeviceProfile("midrange-phone", 22.0, 1.5, 3.5, 1.4, 1.0, 0.25, 0.30, 4096),
    "wearable": DeviceProfile("wearable", 70.0, 5.0, 1.2, 0.9, 0.6, 0.10, 0.15, 1024),
    "single-board": DeviceProfile("single-board", 45.0, 3.0, 6.0, 1.0, 0.8, 0.50, 0.60, 4096),
    "edge-gpu-box": DeviceProfile("edge-gpu-box", 3.0, 0.1, 25.0, 2.0, 1.5, 1.00, 1.50, 16384),
}


@dataclass(frozen=True)
class CloudProfile:
    """Verification cost in ms: base (weights read once per pass) + per verified position."""

    verify_base_ms: float = 18.0
    verify_ms_per_token: float = 0.8

    def verify_ms(self, k: int) -> float:
        return self.verify_base_ms + self.verify_ms_per_token * (k + 1)


class ClassShare(StrictModel):
    device_class: str = Field(description=f"one of {sorted(DEVICE_CLASSES)}")
    share: float = Field(gt=0, le=1, description="fraction of the fleet in this class")
    channel: str = Field("fading", description="a carried Mahimahi trace name or good | fading | poor")


class FleetSpec(StrictModel):
    """A fleet of emulated devices: class mix, channels, workload and policy."""

    name: str = Field("fleet", max_length=64)
    devices: int = Field(16, ge=1, le=100_000, description="number of emulated devices")
    mix: list[ClassShare] = Field(min_length=1, description="device classes and their shares (sum to 1)")
    policy: str = Field("adaptive", pattern=r"^(adaptive|cloud-only|accept-adaptive|fixed-[0-9]+)$",
                        description="adaptive | cloud-only | accept-adaptive | fixed-K")
    max_draft_tokens: int = Field(8, ge=1, le=16, description="K_max")
    max_new_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0, le=10, description="0 = greedy")
    target: str = Field("stable", description="version or alias")
    prompts: str = Field("humaneval", description="'humaneval' or a path to a JSONL file with a 'prompt' field")
    seed: int = Field(0, ge=0)

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
