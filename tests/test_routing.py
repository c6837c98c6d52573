"""Client-side routing (`deployments.routing.DirectRouter`) against a fake router: when it fetches the
registry snapshot, what it keeps, and how it fails. The routing itself is tested through Serve."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")
from ray.exceptions import RayError  # noqa: E402

from deployments.config import RegistryState, VersionSpec  # noqa: E402
from deployments.routing import DirectRouter  # noqa: E402
from flexspec_serve.transport import TransportError  # noqa: E402
from tests.fakes import FakeClock  # noqa: E402


def registry(generation: int, stable: str = "v1") -> dict:
    versions = {v: VersionSpec(name=v, path=f"/m/{v}") for v in ("v1", "v2")}
    return RegistryState(versions=versions, aliases={"stable": stable}, generation=generation).model_dump()


class FakeRouter:
    """The router's `registry_snapshot(known_generation)` method behind a handle-like `.remote()`."""

    def __init__(self, state: dict):
        self.state, self.calls, self.fail = state, [], False
        self.registry_snapshot = self

    def remote(self, known):
        self.calls.append(known)

        async def answer():
            await asyncio.sleep(0)
            if self.fail:
                raise RayError("router down")
            return None if known == self.state["generation"] else self.state

        return answer()


def test_snapshot_is_fetched_once_per_refresh_period_and_only_sent_when_it_changed():
    router, clock = FakeRouter(registry(3)), FakeClock(100.0)
    direct = DirectRouter(router, refresh_s=0.5, clock=clock)

    async def scenario():
        first = await direct.state()
        assert first.generation == 3 and router.calls == [None]
        clock.t += 0.4
        assert await direct.state() is first and router.calls == [None]  # fresh enough: no call
        clock.t += 0.2
        assert await direct.state() is first and router.calls == [None, 3]  # unchanged: the router sent None
        router.state = registry(4, stable="v2")
        clock.t += 0.6
        changed = await direct.state()
        assert changed.generation == 4 and changed.resolve("stable", "s1") == "v2"

    asyncio.run(scenario())


def test_concurrent_callers_share_one_fetch():
    router, clock = FakeRouter(registry(1)), FakeClock(100.0)
    direct = DirectRouter(router, clock=clock)

    async def scenario():
        states = await asyncio.gather(*[direct.state() for _ in range(20)])
        assert len(router.calls) == 1 and all(s.generation == 1 for s in states)

    asyncio.run(scenario())


def test_a_failed_refresh_keeps_the_last_snapshot_and_no_snapshot_at_all_is_a_transport_error():
    router, clock = FakeRouter(registry(2)), FakeClock(100.0)
    direct = DirectRouter(router, clock=clock)
    router.fail = True
    with pytest.raises(TransportError, match="registry snapshot"):
        asyncio.run(direct.state())

    async def scenario():
        router.fail = False
        assert (await direct.state()).generation == 2
        router.fail, clock.t = True, clock.t + 1
        assert (await direct.state()).generation == 2  # routed on the old snapshot, retried next call
        router.fail = False
        assert (await direct.state()).generation == 2 and len(router.calls) == 4

    asyncio.run(scenario())
