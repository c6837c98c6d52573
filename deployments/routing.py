"""Routing one round to its version's deployment, shared by the router replica and by in-cluster clients
that route for themselves (`DirectRouter`).

A round is routed in three steps: resolve its version from a registry snapshot (`RegistryState.resolve`:
explicit version, alias, weighted split by session, draining and retired versions), call that version's
deployment with the session id as the consistent-hash key (the replica holding the session's KV cache),
and turn a failed call into an error body the client knows how to handle (404, or 503 + retry-after).

`DirectRouter` is client-side routing, the way Serve's own handles pick replicas in the caller: the
caller holds a registry snapshot (refreshed from the router every `refresh_s`) and a round takes one
handle hop instead of two (client -> version instead of client -> router -> version). What it does not
do: API keys and the per-session rate limit (HTTP clients only, in the router) and admin operations.
Sessions stay pinned because the client names the version it was served by after the first round, so a
snapshot that is up to `refresh_s` old only delays when *new* sessions see a registry change; a round
that reaches a version already deleted gets a 503, and its retry resolves on a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Iterable

from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RayServeException

from deployments.config import RegistryState, UnknownTarget, deployment_name, version_app_name
from flexspec_serve import protocol as P
from flexspec_serve.transport import TransportError

log = logging.getLogger("flexspec.routing")

Answer = P.RoundResult | tuple[int, P.ErrorBody]


class VersionHandles:
    """One DeploymentHandle per version's verifier deployment, made on first use."""

    def __init__(self):
        self._handles: dict[str, object] = {}

    def get(self, version: str):
        if version not in self._handles:
            self._handles[version] = serve.get_deployment_handle(deployment_name(version), version_app_name(version))
        return self._handles[version]

    def keep_only(self, live: Iterable[str]) -> None:
        for gone in set(self._handles) - set(live):
            self._handles.pop(gone, None)


async def route_round(state: RegistryState, handles: VersionHandles, rnd: P.DraftRound) -> Answer:
    """A RoundResult, or (http status, ErrorBody) for an unknown target or a version that did not answer."""
    try:
        version = state.resolve(rnd.target, rnd.session_id, first_round=rnd.seq == 0)
    except UnknownTarget as err:
        return 404, P.ErrorBody.of("unknown_version", str(err), "target", rnd.target)
    handle = handles.get(version).options(session_id=rnd.session_id)
    try:
        return await handle.verify.remote(rnd)
    except BackPressureError:
        return 503, P.ErrorBody.of("overloaded", f"{version} is at its queue limit; retry later", retry_after_s=0.5)
    except (RayError, RayServeException) as err:  # replica died, or the version is being replaced
        return 503, unavailable(version, err)


def unavailable(version: str, err: Exception) -> P.ErrorBody:
    """The body of a 503 for a version whose deployment did not answer: the client retries shortly."""
    return P.ErrorBody.of("unavailable", f"{version} did not answer ({type(err).__name__}); retry", retry_after_s=0.2)


class DirectRouter:
    """Routes rounds in the caller's process, on a registry snapshot fetched from the router's
    `registry_snapshot` at most every `refresh_s` (it answers None when the caller's generation is current)."""

    def __init__(self, router_handle, refresh_s: float = 0.5, clock=time.monotonic):
        self.router, self.refresh_s, self.clock = router_handle, refresh_s, clock
        self.handles = VersionHandles()
        self._state: RegistryState | None = None
        self._fetched_at = float("-inf")
        self._refresh: asyncio.Task | None = None

    async def state(self) -> RegistryState:
        """The snapshot, refreshed when older than `refresh_s` (one fetch in flight for all callers)."""
        if self._state is not None and self.clock() - self._fetched_at < self.refresh_s:
            return self._state
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.get_running_loop().create_task(self._fetch())
        try:
            await asyncio.shield(self._refresh)
        except (RayError, RayServeException) as err:
            if self._state is None:
                raise TransportError(f"registry snapshot from the router failed: {type(err).__name__}") from err
            log.warning("registry refresh failed (%s); routing on the snapshot of generation %d",
                        type(err).__name__, self._state.generation)
        return self._state

    async def _fetch(self) -> None:
        known = self._state.generation if self._state is not None else None
        fresh = await self.router.registry_snapshot.remote(known)
        self._fetched_at = self.clock()
        if fresh is not None:
            self._state = RegistryState.model_validate(fresh)
            self.handles.keep_only(self._state.versions)

    async def route(self, rnd: P.DraftRound) -> Answer:
        return await route_round(await self.state(), self.handles, rnd)
