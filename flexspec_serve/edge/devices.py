"""Heterogeneous edge device classes (the fleet spec that mixes them is `fleet.spec.FleetSpec`).

Draft speed is given per draft token and per prefill token in ms (a device class's speed for the
family's draft model); powers in W; energy budget in J per generated token. `CloudProfile` is the
verify-cost model of the cloud side used in emulated time (measured values can replace it).
"""

from __future__ import annotations

from dataclasses import dataclass

from flexspec_serve.ahead import ahead_tokens


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

    def ahead_steps(self, k: int, wait_ms: float) -> int:
        """Draft-ahead: steps drafted while a K-token round waits `wait_ms` for its answer: d_{K+1}, then
        as many of the `ahead_tokens(K)` as the wait allows."""
        return min(1 + ahead_tokens(k), int(wait_ms // self.draft_ms_per_token)) if k else 0


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
    """Verification cost in ms: base (weights read once per pass) + per verified position of a session
    (K + 1 for a chain), + per position of the other sessions verified in the same batched pass."""

    verify_base_ms: float = 18.0
    verify_ms_per_token: float = 0.8
    verify_ms_per_batched_token: float = 0.06

    def verify_ms(self, k: int) -> float:
        """One session's K-token round verified alone."""
        return self.verify_base_ms + self.verify_ms_per_token * (k + 1)

    def batch_verify_ms(self, positions: list[int]) -> float:
        """One batched pass over sessions verifying `positions[i]` positions each (a batch of one: `verify_ms`)."""
        widest = max(positions)
        return (self.verify_base_ms + self.verify_ms_per_token * widest
                + self.verify_ms_per_batched_token * (sum(positions) - widest))


# Cloud profiles for a Llama-8B-shaped target on one H200, against what was measured there
# (docs/results/gpu_verify.md; bf16, 512-token cache). `eager-8b`, the default (chosen before any measurement),
# is close to eager transformers: 19.9-28.3 ms per batch-1 step at K = 1-16. `graphs-8b` is a line through the
# static-cache + CUDA-graphs points at batch 16: 10.3 ms for 7 positions per session, 12.6 ms for 17 (at batch 1
# it is 6.6-7.3 ms whatever K). The batch term: an eager batch of 64 cost 0.04-0.08 ms more than batch 1 per
# position of each added session (batch 16: -0.01 to 0.09, noisy); 0.06 taken. `graphs-8b`'s line is through
# batch-16 points already (0).
DEFAULT_CLOUD = "eager-8b"  # CloudProfile()'s defaults
CLOUD_PROFILES = {
    DEFAULT_CLOUD: CloudProfile(),
    "graphs-8b": CloudProfile(8.67, 0.23, 0.0),
}
