"""Real-time fleet devices: many emulated edge devices as asyncio tasks in one process (one fleet actor).

Each device follows its own arrival process (sessions separated by think time) and, per round:

    choose K   (the device's policy, from what it has observed of its link and of the cloud)
    draft      real frozen draft, batched with this process's other devices; due at t0 + draft time
               of the device's profile (unhidden prefill + K steps)
    uplink     the device's own link (trace at its own offset, or its own fading draw); due at delivery
    cloud      a real round through the transport (Serve handle, HTTP, or in-process)
    downlink   due at delivery of the answer's bytes

A cloud-only round (K = 0, a session that opens cloud-only) feeds the draft what it has not seen (the
prompt) during its wait, as the device's emulated clock assumes; otherwise this host would compute that
prefill inside the next round's draft time, which the clock no longer charges for it.

Waits happen in wall time (`FleetClock`, shared by every actor of a run through the start epoch). How late
each due time actually fires is the *emulation lag*, recorded per event: while it stays small, every
device's clock is faithful to its profile even though all devices share a few host cores.

Pipelining (`FleetSpec.ahead: pipeline`): while a round waits, the device drafts d_{K+1} and the next round's K
tokens, and sends that round when its own draft time says they are drafted, unless the answer came first;
the round carries what it assumes its predecessor commits. After a lookahead hit it is already on the air
(`Flight`); after a miss the cloud refuses it and its traffic is booked on the miss. At most two rounds of
a device are on the air at once.

Token trees (`FleetSpec.tree`): each round also carries every draft step's runner-up, and with
`branches` each runner-up's continuation, all computed in the same draft steps (drafting ahead
included); the answer names the accepted path.

Failures: a `resync_required` answer resends the round with the full context; an overloaded answer waits
for its Retry-After; a broken path (`TransportError`) retries with capped exponential backoff and full
jitter. A session that still cannot finish is reported as failed, never dropped silently.

It does not start Ray or Serve (`deployments/fleet.py` wraps a shard in an actor) and writes no files
(`fleet.report` does).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import asdict

from flexspec_serve import protocol as P
from flexspec_serve.ahead import ahead_tokens, second_guess
from flexspec_serve.edge.channels import make_link
from flexspec_serve.edge.controller import make_policy
from flexspec_serve.edge.devices import DEVICE_CLASSES, CloudProfile
from flexspec_serve.edge.emulator import EmulatedDevice, RoundRecord
from flexspec_serve.engine.client import ClientSession
from flexspec_serve.engine.errors import ConditionNotMet
from flexspec_serve.engine.generate import RoundEvent
from flexspec_serve.engine.proposer import DraftProposer, Proposal
from flexspec_serve.engine.sampling import SamplingParams
from flexspec_serve.fleet.clock import FleetClock, ObservedCloud
from flexspec_serve.fleet.drafter import StepDrafter
from flexspec_serve.fleet.records import Delivery, Flight, LiveCounters, ShardResult
from flexspec_serve.fleet.spec import DevicePlan, FleetSpec
from flexspec_serve.transport import AsyncTransport, TransportError

RETRYABLE_CODES = frozenset({"overloaded", "rate_limited", "unavailable"})
MAX_ATTEMPTS = 8
BACKOFF_BASE_MS, BACKOFF_CAP_MS = 50.0, 2000.0
DRAFT_GATHER_SHARE = 0.25  # of a round's emulated draft time, at most, spent gathering a draft batch


class SessionFailed(Exception):
    pass


def backoff_ms(attempt: int, rng: random.Random) -> float:
    """Capped exponential backoff with full jitter (attempt 0, 1, 2, ...)."""
    return rng.uniform(0.0, min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2**attempt))


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
        self.drafter = StepDrafter(proposer)  # rounds' drafts and drafting ahead, batched step by step
        self._orphans: set[asyncio.Task] = set()  # pipelined rounds discarded while on the air

    async def _propose(self, client: ClientSession, k: int, draft_ms: float) -> Proposal | None:
        """The round's proposal; from tokens drafted ahead alone when they suffice (no draft step). When no
        device of the actor is drafting, the first step gathers others for at most a quarter of this
        device's own draft time: the rest is for computing it."""
        if not k:
            return None
        if self.proposer.steps_needed(client.edge, k) == 0:
            return self.proposer.propose([client.edge], [k], tree=self.spec.tree)[0]
        wait_ms = min(self.spec.draft_batch_wait_ms, DRAFT_GATHER_SHARE * draft_ms)
        return await self.drafter.propose(client.edge, k, self.spec.tree, wait_ms)

    def _start_guess(self, dev: EmulatedDevice, client: ClientSession, k: int) -> asyncio.Task | None:
        """Draft-ahead, part 1, as the round goes on the air: the draft's guess d_{K+1} (one step)."""
        if not (dev.ahead_now and k) or self.proposer.drafted_past_sent(client.edge) > 0:
            return None
        return asyncio.create_task(self.drafter.ahead(client.edge, 1))

    async def _after_answer(self, client: ClientSession, k: int, result: P.RoundResult,
                            guess: asyncio.Task | None) -> None:
        """Draft-ahead, part 2, as the answer comes down: on a lookahead hit, the rest of what the device
        drafted during its wait (computed now because only hits use it; they are the same tokens). A second
        guess's hit drafts on from the guess's runner-up (`ahead.second_guess`)."""
        if guess is not None:
            await guess
        second = second_guess(self.spec.ahead, self.spec.tree)
        if not self.proposer.settle_guess(client.edge, result.accepted, result.token, result.path, second):
            return
        more = 1 + ahead_tokens(k) - self.proposer.drafted_past_sent(client.edge)
        if more > 0:
            await self.drafter.ahead(client.edge, more)

    async def run(self) -> ShardResult:
        sampler = asyncio.create_task(self._sample_timeline())
        try:
            outcomes = await asyncio.gather(*(self._device(p) for p in self.plans), return_exceptions=True)
            await asyncio.gather(*self._orphans, return_exceptions=True)
        finally:
            sampler.cancel()
            self.drafter.close()
        r = self.result
        r.device_crashes = [f"{p.device_id}: {o!r}" for p, o in zip(self.plans, outcomes) if isinstance(o, BaseException)]
        r.rounds = [asdict(rec) for d in self.devices for rec in d.records]
        r.lags_by_kind = self.clock.by_kind
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
                             make_policy(spec.policy, profile, cloud, spec.max_draft_tokens, spec.ahead, spec.tree),
                             cloud, ahead=spec.ahead, tree=spec.tree)
        self.devices.append(dev)
        due, n = rng.uniform(0.0, spec.arrival.start_within_s * 1e3), 0
        while due < spec.duration_s * 1e3:  # no session starts after the arrival window
            if spec.arrival.sessions_per_device and n >= spec.arrival.sessions_per_device:
                return
            await self.clock.sleep_until(due, "session_start")
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
            flight = None
            while len(client.tokens) < spec.max_new_tokens:
                flight = await self._round(dev, client, rng, flight)
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

    async def _round(self, dev: EmulatedDevice, client: ClientSession, rng: random.Random,
                     head: Flight | None) -> Flight | None:
        """One round: drafted and sent now, or already on the air (`head`, pipelined during the last round's
        wait). Returns the round this one's wait pipelined when it goes on (after a lookahead hit)."""
        c, proposer, nxt = self.counters, self.proposer, None
        c.mid_round += 1
        try:
            if head is None:
                k = max(0, min(dev.choose_k(), self.spec.max_new_tokens - len(client.tokens) - 1))
                head = await self._launch(dev, client, rng, k)
            try:
                if self.spec.ahead.sends:
                    nxt = await self._pipeline(dev, client, head)
                d = await self._answer(dev, client, head, rng)
            finally:
                await self._settle(head.after, head.guess, head.lags)
        except BaseException:
            self._discard(nxt)
            raise
        finally:
            c.mid_round -= 1
        back = self.clock.now_ms()
        # the guess is settled: a lookahead hit or not, None when no guess was drafted (as the proposer sees it)
        hit = proposer.lookahead_hit(client.edge, d.result.accepted, d.result.token, d.result.path)
        client.commit(head.draft, d.result, proposer)
        rec = self._account(dev, client, head, d, hit, back)
        if nxt is not None and not hit:
            self._discard(nxt, dev, rec)  # its assumption failed: the cloud refuses it, nobody waits for that
            nxt = None
        if nxt is not None:
            proposer.promote(client.edge, nxt.k)
            nxt.t0 = back
        return nxt

    async def _launch(self, dev: EmulatedDevice, client: ClientSession, rng: random.Random, k: int) -> Flight:
        """Draft K tokens (due after the device's own draft time) and put the round on the air."""
        clock = self.clock
        t0 = clock.now_ms()
        dev.clock_ms = t0
        f = Flight(k, None, t0, dev.draft_latency_ms(k))
        f.draft = await self._propose(client, k, f.draft_ms)
        f.lags.append(await clock.sleep_until(t0 + f.draft_ms, "draft"))
        f.sent = clock.now_ms()
        on_answer = None
        if not k and self.proposer.backlog(client.edge) > 1 and len(client.tokens) + 1 < self.spec.max_new_tokens:
            # the device prefills during a cloud-only round that the session goes on after
            f.after.append(asyncio.create_task(self.drafter.prefill(client.edge)))
        elif not self.spec.ahead.sends:
            f.guess = self._start_guess(dev, client, k)
            if dev.ahead_now and k:
                on_answer = lambda res: f.after.append(  # noqa: E731
                    asyncio.create_task(self._after_answer(client, k, res, f.guess)))
        f.task = asyncio.create_task(self._deliver(dev, client, f.draft, f.lags, rng, on_answer))
        return f

    async def _pipeline(self, dev: EmulatedDevice, client: ClientSession, head: Flight) -> Flight | None:
        """Pipelining: while `head` waits, draft the guess d_{K+1} and the next round, and send that round
        when the device would have drafted it (never before the round ahead of `head` was answered), unless
        the answer comes back first. The cloud verifies it only if `head` commits what it assumes."""
        k, edge = head.k, client.edge
        k_next = min(k, self.spec.max_new_tokens - len(client.tokens) - (k + 1) - 1)
        if not (k and dev.ahead_now) or k_next <= 0:
            return None
        await self.drafter.ahead(edge, 1 + k_next)
        chain, nxt = edge.drafted[:k], self.proposer.ahead_proposal(edge, k_next)
        msg = client.pipelined_message([t for t, *_ in chain] + [self.proposer.guess(edge)], nxt)
        if msg is None or head.task.done():
            return None
        timer = asyncio.create_task(self.clock.sleep_until(max(head.sent + dev.profile.draft_ms(1 + k_next),
                                                               head.t0), "pipelined_send"))
        await asyncio.wait({timer, head.task}, return_when=asyncio.FIRST_COMPLETED)
        if head.task.done():  # the answer came first: plain draft-ahead, its tokens are ready on a hit
            timer.cancel()
            return None
        f = Flight(k_next, nxt, 0.0, 0.0, lags=[timer.result()], sent=self.clock.now_ms(), pipelined=True,
                   assume=msg.assume)
        f.task = asyncio.create_task(self._trip(dev, msg, f.lags))
        return f

    async def _answer(self, dev: EmulatedDevice, client: ClientSession, head: Flight, rng: random.Random) -> Delivery:
        """The head round's answer. A pipelined round that got no result (it arrived before its predecessor
        was decided, or the path failed) is resent, still with its assumption: the predecessor was a hit, so
        it now holds, and if the cloud had verified the round after all the resend gets that answer."""
        d = await head.task
        if head.pipelined:  # its answer may have come while this device was drafting: that late, at least
            head.lags[-1] = max(head.lags[-1], self.clock.late(d.back_ms, "answer_applied"))
        if isinstance(d.result, P.RoundResult):
            return d
        self.counters.retries += 1
        head.pipelined = False
        again = await self._deliver(dev, client, head.draft, head.lags, rng, assume=head.assume)
        again.bytes_up, again.bytes_down = again.bytes_up + d.bytes_up, again.bytes_down + d.bytes_down
        return again

    def _discard(self, f: Flight | None, dev: EmulatedDevice | None = None, rec: RoundRecord | None = None) -> None:
        """A pipelined round nobody needs: let its exchange finish (cancelling could cut a batch short), and
        book its traffic on the record of the round whose miss refused it."""
        if f is None or f.task is None:
            return
        self._orphans.add(f.task)
        f.task.add_done_callback(self._orphans.discard)
        if rec is None:
            return

        def book(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is None:
                d = task.result()
                dev.book_refused(rec, d.bytes_up, d.bytes_down, d.up_ms, d.down_ms)

        f.task.add_done_callback(book)

    def _account(self, dev: EmulatedDevice, client: ClientSession, f: Flight, d: Delivery, hit: bool | None,
                 back: float) -> RoundRecord:
        result: P.RoundResult = d.result
        # a plain round's parts add up to its time (the cloud's share takes any lag); a pipelined round's
        # overlap the round before it: it took from that answer to its own
        cloud_ms = d.cloud_ms if f.pipelined else back - f.t0 - f.draft_ms - d.up_ms - d.down_ms
        nodes, parents = (len(f.draft.tokens), f.draft.parents) if f.draft else (0, None)
        dev.cloud.record(nodes, cloud_ms)  # by verified positions (a tree's nodes)
        ev = RoundEvent(0, result.seq, f.k, result.accepted, d.bytes_up, d.bytes_down, result, hit,
                        tuple(parents) if parents else None)
        rec = dev.account(ev, f.t0, f.draft_ms, d.up_ms, cloud_ms, d.down_ms, back_ms=back if f.pipelined else None,
                          session=client.session_id, rate_up_bps=round(dev.observer.rate_bps["up"], 1),
                          lag_ms=round(max(f.lags), 3), queue_ms=result.timings.queue_ms,
                          server_verify_ms=result.timings.verify_ms, server_held_ms=result.timings.held_ms,
                          batch_size=result.timings.batch_size,
                          attempts=d.attempts, pipelined=f.pipelined)
        self.counters.rounds += 1
        self.counters.tokens += result.accepted + 1
        return rec

    async def _settle(self, after: list[asyncio.Task], guess: asyncio.Task | None, lags: list[float]) -> None:
        """Draft-ahead work must be done before the answer is applied; if it ends after the answer's due
        time, the answer counts as that late."""
        if not after:
            if guess is not None:
                await guess
            return
        answered = self.clock.now_ms()
        await after[-1]
        lags[-1] = max(lags[-1], self.clock.late(answered, "answer_applied"))

    async def _trip(self, dev: EmulatedDevice, msg: P.DraftRound, lags: list[float], on_answer=None) -> Delivery:
        """One attempt: uplink, exchange, downlink. A broken path answers `unavailable` (no downlink).
        `on_answer(result)` sees a round's result as the cloud sends it. A pipelined round takes one trip
        (on any error it is resent after its predecessor's hit); `_deliver` retries."""
        clock = self.clock
        nbytes = len(P.encode_round(msg))
        sent = clock.now_ms()
        arrive = dev.link.up.delivery_ms(nbytes, sent)
        lags.append(await clock.sleep_until(arrive, "uplink"))
        try:
            ex = await self.transport.send(msg)
        except TransportError as err:
            return Delivery(P.ErrorBody.of("unavailable", str(err)), nbytes, 0, arrive - sent, 0.0, 0.0, 1,
                            clock.now_ms())
        answered = clock.now_ms()
        back = dev.link.down.delivery_ms(ex.bytes_down, answered)
        if on_answer is not None and isinstance(ex.result, P.RoundResult):
            on_answer(ex.result)
        lags.append(await clock.sleep_until(back, "downlink"))
        return Delivery(ex.result, nbytes, ex.bytes_down, arrive - sent, answered - arrive, back - answered, 1, back)

    async def _deliver(self, dev: EmulatedDevice, client: ClientSession, draft: Proposal | None, lags: list[float],
                       rng: random.Random, on_answer=None, assume: list[int] | None = None) -> Delivery:
        """Trips with resync and retries (bytes summed over attempts; times of the last). `assume`: a
        pipelined round's resend (dropped if the cloud refuses it, e.g. after losing the session; then resync
        as usual)."""
        bytes_up = bytes_down = 0
        for attempt in range(MAX_ATTEMPTS):
            d = await self._trip(dev, client.message(draft, assume), lags, on_answer)
            bytes_up, bytes_down = bytes_up + d.bytes_up, bytes_down + d.bytes_down
            if isinstance(d.result, P.RoundResult):
                d.bytes_up, d.bytes_down, d.attempts = bytes_up, bytes_down, attempt + 1
                return d
            error = d.result.error
            if client.on_error(d.result):  # the server lost the session: resend with the full context
                self.counters.resyncs += 1
                continue
            if assume is not None and error.code == ConditionNotMet.code:
                assume = None  # e.g. the session is gone: as a plain round it gets resync_required
                continue
            if error.code not in RETRYABLE_CODES:
                raise SessionFailed(f"{error.code}: {error.message}")
            self.counters.retries += 1
            wait_s = error.retry_after_s
            await asyncio.sleep(wait_s if wait_s is not None else backoff_ms(attempt, rng) / 1e3)
        raise SessionFailed(f"round {client.seq} of {client.session_id} failed {MAX_ATTEMPTS} times")
