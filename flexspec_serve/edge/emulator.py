"""Edge devices in emulated time, driving the real draft model and a real verifier.

Each `EmulatedDevice` owns a profile, a link (true channel), a `LinkObserver` (what it can see) and a
K policy. The generation loop (`engine.generate`) runs the real frozen draft and the real target over
the real wire encoding; the emulator only advances each device's own clock per round:

    draft (K * t_draft + prefill) -> uplink delivery -> cloud verify -> downlink delivery

and accounts latency, energy (compute + radio), bytes and acceptance per round. Cloud verify time
comes from a `CloudProfile` (deterministic) rather than this machine's timing.

What a device does while its round waits is `EmulatedDevice.ahead` (`flexspec_serve.ahead.Ahead`).

Draft-ahead (`Ahead.DRAFT`): the device drafts during the wait for the answer (up to
`DeviceProfile.ahead_steps`), and pays that energy hit or miss. On a lookahead hit the next round's first
tokens are ready (`predrafted`) and cost no draft time. With `branches` the guess's runner-up is a second
guess (`flexspec_serve.ahead.second_guess`): its continuation grows in the same steps, one row more, and a
hit on it readies the next round just the same. When this host's draft computes them does not enter
the figures, only the emulated clock does: the in-process loop drafts them (for hits only) before applying
the answer, a fleet actor as the answer comes down (greedy: the same tokens; sampling: the same distribution).

Pipelining (`Ahead.PIPELINE`, on top of draft-ahead): after a lookahead hit whose next round the
device had drafted before the answer came, that round was already sent then, with the same K: it left
1 + K draft steps after its predecessor, and the cloud verified it after its predecessor. The in-process
loop still verifies it after the answer (the same tokens); only the emulated clock differs.

Token trees (`EmulatedDevice.tree`; shapes in `flexspec_serve.tree`): the cloud's verify time
counts the round's nodes, the draft time only its K steps (a branch grows in the chain's steps). A path
that ends on a node the draft never fed (a leaf) leaves that node unfed with the cloud's token.

The device counts its own draft cache (`backlog_tokens`, `predrafted`): what it fed and drafted ahead within
its own waits. This host's proposer may hold more (the in-process loop drafts ahead fully after every hit,
whatever the wait), so the emulated clock and energy never read the proposer's cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from flexspec_serve.ahead import Ahead
from flexspec_serve.edge.channels import Link, LinkObserver
from flexspec_serve.edge.controller import Policy, RoundView
from flexspec_serve.edge.devices import CloudProfile, DeviceProfile
from flexspec_serve.engine.generate import RoundEvent, speculative_generate
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.engine.sampling import SamplingParams
from flexspec_serve.tree import Tree, ends_on_leaf, on_chain


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
    server_held_ms: float = 0.0  # server: an emulated cloud's hold after them (VersionSpec.emulate_cloud)
    batch_size: int = 0
    attempts: int = 1
    predrafted: int = 0  # draft-ahead: tokens of this round drafted during the previous round's wait
    lookahead_hit: bool = False  # draft-ahead: all K accepted and the cloud's token was the draft's guess
    pipelined: bool = False  # sent before the previous round's answer (its round_ms: from that answer to its own)
    refused_next: bool = False  # a miss: the round pipelined behind it was sent anyway, and refused (its bytes
    # and radio energy are booked here)
    # the adaptive controller's expectation when it chose K (`RoundPlan.tokens` and `.time_ms`; None for the
    # baselines, for a round cut shorter than the K chosen at a session's end, and for a pipelined round, which
    # went out on its predecessor's plan): compare with tokens and round_ms to see how well its model fits
    expected_tokens: float | None = None
    expected_round_ms: float | None = None


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
    ahead: Ahead = Ahead.OFF  # what the device does while a round waits (see the module docstring)
    predrafted: int = 0  # draft tokens already drafted for the next round (after a lookahead hit)
    ahead_now: bool = False  # this round drafts ahead (the device can, and its policy chose to)
    piped_sent_ms: float | None = None  # when the next round went out, if it was pipelined
    tree: Tree = Tree.CHAIN  # the shape of a round's draft (see the module docstring)
    last_k: int = 0
    last_verified_ms: float = 0.0  # when the cloud finished verifying the last round

    def start_session(self, prompt_tokens: int) -> None:
        """A new session: the draft has seen none of its prompt and has nothing drafted ahead."""
        self.backlog_tokens, self.idle_credit_ms, self.predrafted = prompt_tokens, 0.0, 0
        self.piped_sent_ms = None

    def critical_prefill_ms(self) -> float:
        """Prefill that cannot hide in waiting time already spent (the draft runs while the cloud works)."""
        return max(0.0, self.backlog_tokens * self.profile.prefill_ms_per_token - self.idle_credit_ms)

    def view(self) -> RoundView:
        obs = self.observer
        obs.report_rate("up", self.link.up.reported_rate_bps(self.clock_ms))
        obs.report_rate("down", self.link.down.reported_rate_bps(self.clock_ms))
        return RoundView(up_ms=obs.delay_ms["up"], down_ms=obs.predict_ms("down", 24),
                         prefill_ms=self.critical_prefill_ms(), up_ms_per_byte=obs.ms_per_byte("up"),
                         predrafted=self.predrafted)

    def choose_k(self) -> int:
        if self.piped_sent_ms is not None:
            return self.last_k  # the round is on the air already (the policy's plan of that K stands)
        k = self.policy.choose(self.view())
        self.ahead_now = self.ahead.drafts and self.policy.ahead_now and k > 0
        return k

    def draft_latency_ms(self, k: int) -> float:
        """Drafting on the round's critical path: unhidden prefill plus the K draft steps not predrafted."""
        if not k:
            return 0.0
        if self.predrafted:  # the pre-draft fed the context already
            return self.profile.draft_ms(max(0, k - self.predrafted))
        return self.critical_prefill_ms() + self.profile.draft_ms(k)

    def _draft_work(self, ev: RoundEvent, wait_ms: float) -> tuple[float, int, int]:
        """(ms of draft compute this round, for energy; steps drafted ahead during the wait; predrafted
        tokens for the next round)."""
        p = self.profile
        if not ev.k:
            return 0.0, 0, 0
        steps = ev.k - min(ev.k, self.predrafted)
        prefill = 0 if self.predrafted else self.backlog_tokens
        ahead = p.ahead_steps(ev.k, wait_ms) if self.ahead_now else 0
        ready = ahead - 1 if ev.lookahead_hit and ahead else 0
        return p.draft_ms(steps + ahead, prefill), ahead, ready

    def finish_round(self, ev: RoundEvent) -> RoundRecord:
        """Emulated time: the link and the `CloudProfile` decide how long the round took."""
        t0, piped, self.piped_sent_ms = self.clock_ms, self.piped_sent_ms if ev.k else None, None  # (K = 0: the
        # session's last token, which a device sends as a plain round)
        draft_ms = 0.0 if piped is not None else self.draft_latency_ms(ev.k)
        sent = piped if piped is not None else t0 + draft_ms
        arrived = self.link.up.delivery_ms(ev.bytes_up, sent)
        start = max(arrived, self.last_verified_ms) if piped is not None else arrived  # after its predecessor
        done = start + self.cloud.verify_ms(len(ev.parents) if ev.parents else ev.k)
        back = max(t0, self.link.down.delivery_ms(ev.bytes_down, done))
        rec = self.account(ev, t0, draft_ms, arrived - sent, done - arrived, back - done,
                           back_ms=back if piped is not None else None, pipelined=piped is not None)
        self.last_k, self.last_verified_ms = ev.k, done
        nxt = sent + self.profile.draft_ms(1 + ev.k)  # d_{K+1}, then the next round's K tokens
        if not (self.ahead.sends and self.ahead_now and ev.k and nxt < back):
            return rec  # not pipelining, or the answer came first (plain draft-ahead)
        if ev.lookahead_hit and self.predrafted >= ev.k:
            self.piped_sent_ms = nxt
        else:  # the round sent behind a miss: the cloud refuses it (about this round's size both ways)
            arrived_next = self.link.up.delivery_ms(ev.bytes_up, nxt)
            refused = self.link.down.delivery_ms(ev.bytes_down, max(arrived_next, done))
            self.book_refused(rec, ev.bytes_up, ev.bytes_down, arrived_next - nxt, refused - max(arrived_next, done))
        return rec

    def book_refused(self, rec: RoundRecord, bytes_up: int, bytes_down: int, up_ms: float, down_ms: float) -> None:
        """A pipelined round sent behind `rec`'s round, refused because that round missed: its traffic and
        radio energy count against `rec`."""
        p = self.profile
        rec.refused_next = True
        rec.bytes_up += bytes_up
        rec.bytes_down += bytes_down
        rec.energy_j += (up_ms * p.tx_w + down_ms * p.rx_w) / 1e3

    def account(self, ev: RoundEvent, t0: float, draft_ms: float, up_ms: float, verify_ms: float, down_ms: float,
                back_ms: float | None = None, **extra) -> RoundRecord:
        """Book one finished round (however its times were obtained): observer, policy, energy, draft backlog.
        `back_ms`: when its answer came, for a round whose parts overlapped the one before it (pipelined)."""
        p = self.profile
        compute_ms, ahead, ready = self._draft_work(ev, up_ms + verify_ms + down_ms)  # energy: all draft work
        predrafted, self.predrafted = self.predrafted, ready
        self.observer.record("up", ev.bytes_up, up_ms)
        self.observer.record("down", ev.bytes_down, down_ms)
        self.policy.observe(ev.k, ev.accepted, ev.lookahead_hit)
        energy = (compute_ms * p.compute_w + up_ms * p.tx_w + down_ms * p.rx_w + verify_ms * p.idle_w) / 1e3
        back = t0 + draft_ms + up_ms + verify_ms + down_ms if back_ms is None else back_ms
        self.clock_ms = back
        if extra.get("pipelined"):
            self.policy.observe_pipelined(ev.k, back - t0)
        if ev.k:  # the cache now misses only the cloud's token (and d_K when all were accepted, unless drafting
            # d_{K+1} fed it; after a hit whose wait drafted past d_{K+1}, nothing)
            path = ev.result.path
            off_chain = 1 + ends_on_leaf(path, ev.parents)  # a runner-up or branch end is fed next round
            unfed = 1 + (ev.accepted == ev.k and not ahead) if on_chain(path) else off_chain
            self.backlog_tokens = 0 if ready else unfed
            self.idle_credit_ms = 0.0
        else:
            self.backlog_tokens += 1
            self.idle_credit_ms += back - t0
        alpha = getattr(getattr(self.policy, "estimator", None), "alpha", float("nan"))
        plan = self.policy.expected
        expected = plan if plan is not None and plan.k == ev.k and not extra.get("pipelined") else None
        rec = RoundRecord(self.device_id, p.name, self.link.name, self.policy.name, ev.round_index, t0, ev.k,
                          ev.accepted, ev.accepted + 1, draft_ms, up_ms, verify_ms, down_ms, back - t0, energy,
                          ev.bytes_up, ev.bytes_down, alpha, ev.result.version, predrafted=predrafted,
                          lookahead_hit=bool(ev.lookahead_hit),
                          expected_tokens=None if expected is None else round(expected.tokens, 4),
                          expected_round_ms=None if expected is None else round(expected.time_ms, 3),
                          **extra)
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
    if len({d.tree for d in devices}) > 1 or len({d.ahead for d in devices}) > 1:
        raise ValueError("devices of one run all send drafts of one shape (`tree`) and share one `ahead` mode")
    for dev, prompt in zip(devices, prompts):
        dev.start_session(len(prompt))
    speculative_generate(
        proposer, transport, prompts, max_new_tokens, choose_k=lambda i, r: devices[i].choose_k(), sampling=sampling,
        session_prefix=session_prefix, on_round=lambda ev: devices[ev.index].finish_round(ev), target=target,
        ahead=devices[0].ahead if devices else Ahead.OFF, tree=devices[0].tree if devices else Tree.CHAIN,
    )
    return [summarize(d) for d in devices]


def records_as_rows(devices: list[EmulatedDevice]) -> list[dict]:
    return [asdict(r) for d in devices for r in d.records]
