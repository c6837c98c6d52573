"""Real-time fleet devices: many emulated edge devices as asyncio tasks in one process (one fleet actor).

Each device follows its own arrival process (sessions separated by think time) and, per round:

    choose K   (the device's policy, from what it has observed of its link and of the cloud)
    draft      real frozen draft, batched with this process's other devices; due at t0 + draft time
               of the device's profile (unhidden prefill + K steps)
    uplink     the device's own link (trace at its own offset, or its own fading draw); due at delivery
    cloud      a real round through the transport (Serve handle, HTTP, or in-process)
    downlink   due at delivery of the answer's bytes

Waits happen in wall time (`FleetClock`, shared by every actor of a run through the start epoch). How late
each due time actually fires is the *emulation lag*, recorded per event: while it stays small, every
device's clock is faithful to its profile even though all devices share a few host cores.

Failures: a `resync_required` answer resends the round with the full context; an overloaded answer waits
for its Retry-After; a broken path (`TransportError`) retries with capped exponential backoff and full
jitter. A session that still cannot finish is reported as failed, never dropped silently.

It does not start Ray or Serve (`deployments/fleet.py` wraps a shard in an actor) and writes no files
(`fleet.report` does).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass, field

from flexspec_serve import protocol as P
from flexspec_serve.batching import MicroBatcher
from flexspec_serve.edge.channels import make_link
from flexspec_serve.edge.controller import make_policy
from flexspec_serve.edge.devices import DEVICE_CLASSES, CloudProfile
from flexspec_serve.edge.emulator import EmulatedDevice
from flexspec_serve.engine.client import ClientSession
from flexspec_serve.engine.generate import RoundEvent
from flexspec_serve.engine.proposer import DraftProposer, ahead_tokens
from flexspec_serve.engine.sampling import SamplingParams
from flexspec_serve.fleet.spec import DevicePlan, FleetSpec
from flexspec_serve.transport import AsyncTransport, Exchange, TransportError

RETRYABLE_CODES = frozenset({"overloaded", "rate_limited", "unavailable"})
MAX_ATTEMPTS = 8
BACKOFF_BASE_MS, BACKOFF_CAP_MS = 50.0, 2000.0


class SessionFailed(Exception):
    pass


class FleetClock:
    """Milliseconds since the run's start epoch (wall time, so every actor of a run agrees)."""

    def __init__(self, start_epoch_s: float):
        self.start = start_epoch_s

    def now_ms(self) -> float:
        return (time.time() - self.start) * 1e3

    async def sleep_until(self, due_ms: float) -> float:
        """Wait for an emulated event; returns how late it fired (the emulation lag, ms)."""
        delay = due_ms - self.now_ms()
        if delay > 0:
            await asyncio.sleep(delay / 1e3)
        return max(0.0, self.now_ms() - due_ms)


class ObservedCloud:
    """The cloud's answer time as one device sees it (EMA of arrival -> answer), in `CloudProfile`'s shape,
    so the controller plans with the real service's latency instead of a guess."""

    def __init__(self, prior: CloudProfile, smoothing: float = 0.2):
        self.base_ms, self.per_token_ms, self.a = prior.verify_base_ms, prior.verify_ms_per_token, smoothing

    def verify_ms(self, k: int) -> float:
        return self.base_ms + self.per_token_ms * (k + 1)

    def record(self, k: int, elapsed_ms: float) -> None:
        self.base_ms = (1 - self.a) * self.base_ms + self.a * max(0.0, elapsed_ms - self.per_token_ms * (k + 1))


def backoff_ms(attempt: int, rng: random.Random) -> float:
    """Capped exponential backoff with full jitter (attempt 0, 1, 2, ...)."""
    return rng.uniform(0.0, min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2**attempt))


@dataclass
class LiveCounters:
    devices: int
    in_session: int = 0
    mid_round: int = 0
    sessions_started: int = 0
    sessions_completed: int = 0
    sessions_failed: int = 0
    rounds: int = 0
    tokens: int = 0
    retries: int = 0
    resyncs: int = 0


@dataclass
class ShardResult:
    rounds: list[dict] = field(default_factory=list)  # one RoundRecord per round
    sessions: list[dict] = field(default_factory=list)  # one per session, with its generated tokens
    lags_ms: list[float] = field(default_factory=list)  # every emulated event's lateness
    timeline: list[dict] = field(default_factory=list)  # sampled once a second
    draft_mean_batch: float = 0.0
    sessions_started: int = 0
    device_crashes: list[str] = field(default_factory=list)  # a bug, not a service error: never expected


class Shard:
    """The devices of one fleet actor, run against one transport."""

    def __init__(self, spec: FleetSpec, plans: list[DevicePlan], prompts: list[list[int]], proposer: DraftProposer,
                 transport: AsyncTransport, start_epoch_s: float, cloud: CloudProfile = CloudProfile()):
        if not prompts:
            raise ValueError("a fleet needs at least one prompt")
        self.spec, self.plans, self.prompts, self.proposer, self.transport = spec, plans, prompts, proposer, transport
        self.clock, self.cloud = FleetClock(start_epoch_s), cloud
        self.counters = LiveCounters(len(plans))
        self.result = ShardResult()
        self.devices: list[EmulatedDevice] = []
        self.drafter = MicroBatcher(self._propose_batch, spec.draft_batch_wait_ms, 512, "draft")
        # draft-ahead work has a deadline (the answer's downlink): its own worker, no gathering wait
        self.ahead_drafter = MicroBatcher(self._ahead_batch, 0.0, 512, "draft-ahead")

    def _propose_batch(self, items: list[tuple]) -> list:
        """Proposals of the K tokens each round sends (a device drafts its guess d_{K+1} during the wait)."""
        return self.proposer.propose([s for s, _ in items], [k for _, k in items])

    def _ahead_batch(self, items: list[tuple]) -> list:
        """Draft-ahead during waits: n more tokens for each session."""
        self.proposer.draft_ahead([s for s, _ in items], [n for _, n in items])
        return [None] * len(items)

    async def _propose(self, client: ClientSession, k: int):
        """The round's proposal; from tokens drafted ahead alone when they suffice (no batch wait)."""
        if not k:
            return None
        if self.proposer.steps_needed(client.edge, k) == 0:
            return self.proposer.propose([client.edge], [k])[0]
        return await self.drafter.submit((client.edge, k))

    def _start_guess(self, dev: EmulatedDevice, client: ClientSession, k: int) -> asyncio.Task | None:
        """Draft-ahead, part 1, as the round goes on the air: the draft's guess d_{K+1} (one step)."""
        if not (dev.ahead_now and k) or self.proposer.drafted_past_sent(client.edge) > 0:
            return None
        return asyncio.create_task(self.ahead_drafter.submit((client.edge, 1)))

    async def _after_answer(self, client: ClientSession, k: int, result: P.RoundResult,
                            guess: asyncio.Task | None) -> bool:
        """Draft-ahead, part 2, as the answer comes down: on a lookahead hit, the rest of what the device
        drafted during its wait (computed now because only hits use it; they are the same tokens)."""
        if guess is not None:
            await guess
        if not self.proposer.lookahead_hit(client.edge, result.accepted, result.token):
            return False
        more = 1 + ahead_tokens(k) - self.proposer.drafted_past_sent(client.edge)
        if more > 0:
            await self.ahead_drafter.submit((client.edge, more))
        return True

    async def run(self) -> ShardResult:
        sampler = asyncio.create_task(self._sample_timeline())
        try:
            outcomes = await asyncio.gather(*(self._device(p) for p in self.plans), return_exceptions=True)
        finally:
            sampler.cancel()
            self.drafter.close()
            self.ahead_drafter.close()
        r = self.result
        r.device_crashes = [f"{p.device_id}: {o!r}" for p, o in zip(self.plans, outcomes) if isinstance(o, BaseException)]
        r.rounds = [asdict(rec) for d in self.devices for rec in d.records]
        r.draft_mean_batch = round(self.drafter.mean_batch_size, 3)
        r.sessions_started = self.counters.sessions_started
        return r

    async def _sample_timeline(self) -> None:
        while True:
            c = self.counters
            self.result.timeline.append({"t_s": round(self.clock.now_ms() / 1e3, 3), "in_session": c.in_session,
                                         "mid_round": c.mid_round, "tokens": c.tokens, "rounds": c.rounds})
            await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ one device
    async def _device(self, plan: DevicePlan) -> None:
        spec, rng = self.spec, random.Random(plan.seed)
        profile = DEVICE_CLASSES[plan.device_class]
        cloud = ObservedCloud(self.cloud)
        dev = EmulatedDevice(plan.device_id, profile, make_link(plan.channel, plan.seed, plan.offset_ms),
                             make_policy(spec.policy, profile, cloud, spec.max_draft_tokens, spec.draft_ahead), cloud,
                             draft_ahead=spec.draft_ahead)
        self.devices.append(dev)
        due, n = rng.uniform(0.0, spec.arrival.start_within_s * 1e3), 0
        while due < spec.duration_s * 1e3:  # no session starts after the arrival window
            if spec.arrival.sessions_per_device and n >= spec.arrival.sessions_per_device:
                return
            self.result.lags_ms.append(await self.clock.sleep_until(due))
            await self._session(dev, plan, n, rng)
            n += 1
            think = rng.expovariate(1.0 / spec.arrival.think_time_s) if spec.arrival.think_time_s else 0.0
            due = self.clock.now_ms() + think * 1e3

    async def _session(self, dev: EmulatedDevice, plan: DevicePlan, n: int, rng: random.Random) -> None:
        spec, c = self.spec, self.counters
        index = rng.randrange(len(self.prompts))
        sampling = SamplingParams(spec.temperature, spec.top_p, plan.seed * 1009 + n)
        client = ClientSession.start(f"{plan.device_id}-s{n}", self.prompts[index], sampling, self.proposer,
                                     spec.target)
        dev.start_session(len(client.prompt))
        started, error = self.clock.now_ms(), None
        c.in_session += 1
        c.sessions_started += 1
        try:
            while len(client.tokens) < spec.max_new_tokens:
                await self._round(dev, client, rng)
        except SessionFailed as err:
            error = str(err)
        finally:
            c.in_session -= 1
        c.sessions_completed += error is None
        c.sessions_failed += error is not None
        self.result.sessions.append({
            "device": plan.device_id, "session": client.session_id, "device_class": plan.device_class,
            "prompt_index": index, "version": client.version, "completed": error is None, "error": error,
            "resyncs": client.resyncs, "rounds": client.stats.rounds, "started_ms": round(started, 1),
            "finished_ms": round(self.clock.now_ms(), 1), "tokens": client.tokens[: spec.max_new_tokens]})

    async def _round(self, dev: EmulatedDevice, client: ClientSession, rng: random.Random) -> None:
        c, clock = self.counters, self.clock
        t0 = clock.now_ms()
        dev.clock_ms = t0
        k = max(0, min(dev.choose_k(), self.spec.max_new_tokens - len(client.tokens) - 1))
        prefill = self.proposer.backlog(client.edge)
        draft_ms = dev.draft_latency_ms(k)
        c.mid_round += 1
        try:
            proposal = await self._propose(client, k)
            draft = proposal.tokens if proposal else []
            lags = [await clock.sleep_until(t0 + draft_ms)]
            guess, after = self._start_guess(dev, client, k), []
            on_answer = (lambda res: after.append(asyncio.create_task(self._after_answer(client, k, res, guess)))) \
                if dev.ahead_now and k else None
            try:
                ex, up_ms, down_ms, attempts = await self._deliver(dev, client, draft, lags, rng, on_answer)
            finally:
                hit = await self._settle(after, guess, lags)
        finally:
            c.mid_round -= 1
        back = clock.now_ms()
        result: P.RoundResult = ex.result
        client.commit(draft, result, self.proposer)
        dev.cloud.record(k, back - t0 - draft_ms - up_ms - down_ms)
        ev = RoundEvent(0, result.seq, k, result.accepted, prefill, ex.bytes_up, ex.bytes_down, result, hit)
        dev.account(ev, t0, draft_ms, up_ms, back - t0 - draft_ms - up_ms - down_ms, down_ms,
                    session=client.session_id, rate_up_bps=round(dev.observer.rate_bps["up"], 1),
                    lag_ms=round(max(lags), 3), queue_ms=result.timings.queue_ms,
                    server_verify_ms=result.timings.verify_ms, batch_size=result.timings.batch_size,
                    attempts=attempts)
        self.result.lags_ms.extend(lags)
        c.rounds += 1
        c.tokens += result.accepted + 1

    async def _settle(self, after: list[asyncio.Task], guess: asyncio.Task | None, lags: list[float]) -> bool:
        """Draft-ahead work must be done before the answer is applied; if it ends after the answer's due
        time, the answer counts as that late. Returns whether the round was a lookahead hit."""
        if not after:
            if guess is not None:
                await guess
            return False
        answered = self.clock.now_ms()
        hit = await after[-1]
        lags[-1] = max(lags[-1], self.clock.now_ms() - answered)
        return hit

    async def _deliver(self, dev: EmulatedDevice, client: ClientSession, draft: list[int], lags: list[float],
                       rng: random.Random, on_answer=None) -> tuple[Exchange, float, float, int]:
        """Uplink, cloud, downlink, with resync and retries: (exchange with bytes summed, last up_ms,
        last down_ms, attempts). `on_answer(result)` sees a round's result as the cloud sends it."""
        clock, bytes_up, bytes_down = self.clock, 0, 0
        for attempt in range(MAX_ATTEMPTS):
            msg = client.message(draft)
            nbytes = len(P.encode_round(msg))
            sent = clock.now_ms()
            arrive = dev.link.up.delivery_ms(nbytes, sent)
            lags.append(await clock.sleep_until(arrive))
            bytes_up += nbytes
            try:
                ex = await self.transport.send(msg)
            except TransportError:
                self.counters.retries += 1
                await asyncio.sleep(backoff_ms(attempt, rng) / 1e3)
                continue
            answered = clock.now_ms()
            back = dev.link.down.delivery_ms(ex.bytes_down, answered)
            if on_answer is not None and isinstance(ex.result, P.RoundResult):
                on_answer(ex.result)
            lags.append(await clock.sleep_until(back))
            bytes_down += ex.bytes_down
            if isinstance(ex.result, P.RoundResult):
                return Exchange(ex.result, bytes_up, bytes_down), arrive - sent, back - answered, attempt + 1
            if client.on_error(ex.result):  # the server lost the session: resend with the full context
                self.counters.resyncs += 1
                continue
            if ex.result.error.code not in RETRYABLE_CODES:
                raise SessionFailed(f"{ex.result.error.code}: {ex.result.error.message}")
            self.counters.retries += 1
            wait_s = ex.result.error.retry_after_s
            await asyncio.sleep(wait_s if wait_s is not None else backoff_ms(attempt, rng) / 1e3)
        raise SessionFailed(f"round {client.seq} of {client.session_id} failed {MAX_ATTEMPTS} times")
