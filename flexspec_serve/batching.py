"""`MicroBatcher`: asyncio callers submit one item each; a blocking batch function runs on one worker
thread (so torch never runs two batches at once and the event loop stays free).

A batch is formed when the worker is free: everything that arrived while the previous batch ran, plus
what arrives within `wait_ms` (0: nothing more), up to `max_batch_size`. Under load batches grow with
the arrival rate; a lone caller waits for nothing. `serve.batch` forms batches on a timer instead, even
while the previous batch still runs, so under load it queues many small batches behind each other.
Used for in-process verification and (by default) the verifier deployment's rounds. (A fleet actor's
draft steps batch step by step instead: `fleet.drafter`.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    def __init__(self, fn: Callable[[list[T]], list[R]], wait_ms: float = 2.0, max_batch_size: int = 64,
                 name: str = "batch", on_batch: Callable[[list[T], list[R], float], None] | None = None):
        """`on_batch(items, results, ms)` runs on the event loop after each successful batch."""
        self.fn, self.wait_s, self.max_batch, self.on_batch = fn, wait_ms / 1e3, max_batch_size, on_batch
        self._pending: list[tuple[T, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self.batches = 0
        self.items = 0

    async def submit(self, item: T) -> R:
        """The item's result."""
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            if self.wait_s > 0:
                await asyncio.sleep(self.wait_s)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            items = [item for item, _ in batch]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._pool, self.fn, items)
            except Exception as err:  # the batch function failed: every caller in the batch sees it
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            self.batches += 1
            self.items += len(batch)
            if self.on_batch is not None:
                self.on_batch(items, results, (time.perf_counter() - started) * 1e3)
            for (_, fut), res in zip(batch, results):
                if not fut.done():
                    fut.set_result(res)

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def resolve(fut: asyncio.Future, value) -> None:
    """Answer `fut` unless it already is (a cancelled caller's future)."""
    if not fut.done():
        fut.set_result(value)
