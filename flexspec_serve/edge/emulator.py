"""Edge devices in emulated time, driving the real draft model and a real verifier.

Each `EmulatedDevice` owns a profile, a link (true channel), a `LinkObserver` (what it can see) and a
K policy. The generation loop (`engine.generate`) runs the real frozen draft and the real target over
the real wire encoding; the emulator only advances each device's own clock per round:

    draft (K * t_draft + prefill) -> uplink delivery -> cloud verify -> downlink delivery

and accounts latency, energy (compute + radio), bytes and acceptance per round. Cloud verify time
comes from a `CloudProfile` (deterministic) rather than this machine's timing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from flexspec_serve.edge.channels import Link, LinkObserver
from flexspec_serve.edge.controller import Policy, RoundView
from flexspec_serve.edge.devices import CloudProfile, DeviceProfile
from flexspec_serve.engine.generate import RoundEvent, speculative_generate
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.engine.sampling import SamplingParams


@dataclass
class RoundRecord:
    device: str
    device_class: str
    channel: str
    policy: str
    round: int
    t_start_ms: float
    k: int
    accepted: int
    tokens: int  # tokens this round added (accepted + 1)
    draft_ms: float
    up_ms: float
    verify_ms: float
    down_ms: float
    round_ms: float
    energy_j: float
    bytes_up: int
    bytes_down: int
    alpha_hat: float
    version: str
    # filled by real-time fleet devices (fleet/), left at their defaults in emulated time
    session: str = ""
    rate_up_bps: float = 0.0
    lag_ms: float = 0.0  # how late the round's emulated events fired, at worst
    queue_ms: float = 0.0  # server: waiting for a batch
    server_verify_ms: float = 0.0  # server: the batch's forward passes
    batch_size: int = 0
    attempts: int = 1


@dataclass
class EmulatedDevice:
    device_id: str
    profile: DeviceProfile
    link: Link
    policy: Policy
    cloud: CloudProfile = field(default_factory=CloudProfile)
    observer: LinkObserver = field(default_factory=LinkObserver)
    clock_ms: float = 0.0
    records: list[RoundRecord] = field(default_factory=list)
    backlog_tokens: int = 0  # committed tokens not yet in the draft cache (the prompt, at first)
    idle_credit_ms: float = 0.0  # waiting time since the last drafting round, usable for background prefill

    def critical_prefill_ms(self) -> float:
        """Prefill that cannot hide in waiting time already spent (the draft runs while the cloud works)."""
        return max(0.0, self.backlog_tokens * self.profile.prefill_ms_per_token - self.idle_credit_ms)

    def view(self) -> RoundView:
        obs = self.observer
        obs.report_rate("up", self.link.up.reported_rate_bps(self.clock_ms))
        obs.report_rate("down", self.link.down.reported_rate_bps(self.clock_ms))
        return RoundView(up_ms=obs.delay_ms["up"], down_ms=obs.predict_ms("down", 24),
                         prefill_ms=self.critical_prefill_ms(), up_ms_per_byte=obs.ms_per_byte("up"))

    def choose_k(self) -> int:
        return self.policy.choose(self.view())

    def draft_latency_ms(self, k: int) -> float:
        """Drafting on the round's critical path: unhidden prefill plus K draft steps."""
        return (self.critical_prefill_ms() + self.profile.draft_ms(k)) if k else 0.0

    def finish_round(self, ev: RoundEvent) -> RoundRecord:
        """Emulated time: the link and the `CloudProfile` decide how long the round took."""
        t0 = self.clock_ms
        draft_ms = self.draft_latency_ms(ev.k)
        sent = t0 + draft_ms
        arrived = self.link.up.delivery_ms(ev.bytes_up, sent)
        verify_ms = self.cloud.verify_ms(ev.k)
        back = self.link.down.delivery_ms(ev.bytes_down, arrived + verify_ms)
        return self.account(ev, t0, draft_ms, arrived - sent, verify_ms, back - arrived - verify_ms)

    def account(self, ev: RoundEvent, t0: float, draft_ms: float, up_ms: float, verify_ms: float, down_ms: float,
                **extra) -> RoundRecord:
        """Book one finished round (however its times were obtained): observer, policy, energy, draft backlog."""
        p = self.profile
        compute_ms = p.draft_ms(ev.k, ev.prefill_tokens if ev.k else 0)  # energy: all draft work
        self.observer.record("up", ev.bytes_up, up_ms)
        self.observer.record("down", ev.bytes_down, down_ms)
        self.policy.observe(ev.k, ev.accepted)
        energy = (compute_ms * p.compute_w + up_ms * p.tx_w + down_ms * p.rx_w + verify_ms * p.idle_w) / 1e3
        back = t0 + draft_ms + up_ms + verify_ms + down_ms
        self.clock_ms = back
        if ev.k:  # the cache now misses only the cloud's token (and d_K when all were accepted)
            self.backlog_tokens, self.idle_credit_ms = 1 + (ev.accepted == ev.k), 0.0
        else:
            self.backlog_tokens += 1
            self.idle_credit_ms += back - t0
        alpha = getattr(getattr(self.policy, "estimator", None), "alpha", float("nan"))
        rec = RoundRecord(self.device_id, p.name, self.link.name, self.policy.name, ev.round_index, t0, ev.k,
                          ev.accepted, ev.accepted + 1, draft_ms, up_ms, verify_ms, down_ms, back - t0, energy,
                          ev.bytes_up, ev.bytes_down, alpha, ev.result.version, **extra)
        self.records.append(rec)
        return rec


@dataclass
class DeviceSummary:
    device: str
    device_class: str
    channel: str
    policy: str
    tokens: int
    seconds: float
    tokens_per_s: float
    j_per_token: float
    mean_k: float
    acceptance_length: float
    bytes_up_per_token: float
    bytes_down_per_token: float


def summarize(dev: EmulatedDevice) -> DeviceSummary:
    r = dev.records
    tokens = sum(x.tokens for x in r)
    seconds = sum(x.round_ms for x in r) / 1e3
    return DeviceSummary(
        dev.device_id, dev.profile.name, dev.link.name, dev.policy.name, tokens, round(seconds, 4),
        round(tokens / seconds, 3) if seconds else 0.0, round(sum(x.energy_j for x in r) / max(1, tokens), 5),
        round(sum(x.k for x in r) / max(1, len(r)), 3), round(tokens / max(1, len(r)), 3),
        round(sum(x.bytes_up for x in r) / max(1, tokens), 2), round(sum(x.bytes_down for x in r) / max(1, tokens), 2),
    )


def run_devices(devices: list[EmulatedDevice], prompts: list[list[int]], proposer: DraftProposer, transport,
                max_new_tokens: int, sampling: SamplingParams = SamplingParams(), target: str | None = None,
                session_prefix: str = "dev") -> list[DeviceSummary]:
    """Device i generates for prompts[i] until max_new_tokens; returns one summary per device."""
    if len(devices) != len(prompts):
        raise ValueError(f"{len(devices)} devices but {len(prompts)} prompts")
    for dev, prompt in zip(devices, prompts):
        dev.backlog_tokens = len(prompt)  # the draft has not seen the prompt yet
    speculative_generate(
        proposer, transport, prompts, max_new_tokens, choose_k=lambda i, r: devices[i].choose_k(), sampling=sampling,
        session_prefix=session_prefix, on_round=lambda ev: devices[ev.index].finish_round(ev), target=target,
    )
    return [summarize(d) for d in devices]


def records_as_rows(devices: list[EmulatedDevice]) -> list[dict]:
    return [asdict(r) for d in devices for r in d.records]
