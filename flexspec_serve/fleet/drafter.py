"""`StepDrafter`: one fleet actor's draft work, batched step by step across its devices.

Every draft step is one batched forward over every device drafting at that moment (its round's K tokens,
or tokens drafted ahead while a round waits). A device that asks while others draft joins at their next
step, instead of waiting for their whole drafts to end, and each device gets its answer as soon as its own
tokens are drafted. When nothing is drafting, the first step may wait a little (`wait_ms`, the caller's
choice) for other devices to join. One worker thread runs the steps, so torch never runs two at once and
the event loop stays free, though not of the GIL: `hand_the_gil_over_sooner` is for the process it runs in.

It does not choose K and does not emulate time: the caller sleeps until the device's own draft time is up.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from flexspec_serve.batching import resolve
from flexspec_serve.engine.proposer import DraftJob, DraftProposer, EdgeSession, Proposal
from flexspec_serve.tree import Tree


SWITCH_INTERVAL_S = 0.0005  # the interpreter's default is 0.005


def hand_the_gil_over_sooner() -> None:
    """Lower the interpreter's switch interval in a process whose event loop runs beside a torch worker
    thread (a fleet actor). Every torch op of a draft step releases the GIL and takes it back; while the
    loop runs Python, taking it back waits up to the switch interval, so a forward of a hundred ops crawls
    behind a busy loop (`benchmarks/gil_convoy.py` measures it). Process-wide, so the actor calls it once."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


class StepDrafter:
    def __init__(self, proposer: DraftProposer, name: str = "draft"):
        self.proposer = proposer
        self._lock = threading.Lock()  # guards _inbox and _running (the worker thread reads them too)
        self._inbox: list[tuple[DraftJob, asyncio.Future]] = []
        self._running = False  # a worker run is queued or under way
        self._start: asyncio.Handle | None = None  # a gathering first step's start, due at _start_due (loop time)
        self._start_due = 0.0  # (uvloop's call_at answers a past time with a plain Handle, which has no `when`)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.steps = 0  # batched forwards run
        self.rows = 0  # session-steps run (a forward of 3 devices: 3)

    async def propose(self, session: EdgeSession, k: int, tree: Tree = Tree.CHAIN, wait_ms: float = 0.0) -> Proposal:
        """The session's round of K tokens (`DraftProposer.propose` for one session, batched with the rest)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        job = self.proposer.propose_job(session, k, lambda p: loop.call_soon_threadsafe(resolve, fut, p), tree=tree)
        return await self._submit(job, fut, wait_ms)

    async def ahead(self, session: EdgeSession, n: int) -> None:
        """n more tokens drafted past what the session has drafted (`DraftProposer.draft_ahead`), no waiting."""
        await self._side_job(lambda done: self.proposer.ahead_job(session, n, done))

    async def prefill(self, session: EdgeSession) -> None:
        """The session's backlog fed into its draft cache (`DraftProposer.prefill_job`), no waiting."""
        await self._side_job(lambda done: self.proposer.prefill_job(session, done))

    async def _side_job(self, make: Callable[[Callable[[], None]], DraftJob | None]) -> None:
        """A job without a result (drafting ahead, feeding a backlog), `make(on_done)`; None: nothing to do."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        job = make(lambda: loop.call_soon_threadsafe(resolve, fut, None))
        if job is not None:
            await self._submit(job, fut, 0.0)

    @property
    def mean_batch_size(self) -> float:
        """Devices per draft step (forward)."""
        return self.rows / self.steps if self.steps else 0.0

    def close(self) -> None:
        if self._start is not None:
            self._start.cancel()
        self._pool.shutdown(wait=False)

    async def _submit(self, job: DraftJob, fut: asyncio.Future, wait_ms: float):
        loop = asyncio.get_running_loop()
        with self._lock:
            self._inbox.append((job, fut))
            running = self._running
        if not running:  # gathering a first step: it starts at the earliest deadline of the jobs waiting
            due = loop.time() + wait_ms / 1e3
            if self._start is None or due < self._start_due:
                if self._start is not None:
                    self._start.cancel()
                self._start, self._start_due = loop.call_at(due, self._begin, loop), due
        return await fut

    def _begin(self, loop: asyncio.AbstractEventLoop) -> None:
        """The gathering first step's start is due."""
        self._start = None
        self._kick(loop)

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start a worker run unless one is under way or nothing is waiting."""
        with self._lock:
            if self._running or not self._inbox:
                return
            self._running = True
        self._pool.submit(self._work, loop)

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        """Worker thread: steps until no job is left and none is waiting; a failed step fails every job of
        this run (their sessions' state is unknown), and jobs that arrived since start a new run."""
        taken: list[asyncio.Future] = []

        def take(idle: bool) -> list[DraftJob]:
            with self._lock:
                batch, self._inbox = self._inbox, []
                if idle and not batch:
                    self._running = False
            taken.extend(fut for _, fut in batch)
            return [job for job, _ in batch]

        try:
            self.proposer.run_jobs([], take, self._count)
        except Exception as err:  # the draft failed: every device drafting in this run sees it
            for fut in taken:
                loop.call_soon_threadsafe(_fail, fut, err)
            with self._lock:
                self._running = False
            loop.call_soon_threadsafe(self._kick, loop)  # whatever arrived meanwhile

    def _count(self, jobs: int) -> None:
        self.steps, self.rows = self.steps + 1, self.rows + jobs


def _fail(fut: asyncio.Future, err: Exception) -> None:
    if not fut.done():
        fut.set_exception(err)
