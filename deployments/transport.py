"""Transports to a running app, for edge clients, load tests and benchmarks: the router's DeploymentHandle
(in-cluster), direct (in-cluster, routed in this process: one hop to the version) or HTTP.

All speak the compact encoding (byte counts are what a network would carry). The blocking ones implement
`round_trip(rounds) -> list[Exchange]` like the in-process `LocalTransport`, so the same edge client runs
over any of them; the asyncio ones implement `send(round) -> Exchange` for fleet devices and raise
`TransportError` when the path itself fails, so devices retry with backoff.
"""

from __future__ import annotations

import asyncio
import json

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.config import APP_NAME
from deployments.routing import Answer, DirectRouter
from flexspec_serve import protocol as P
from flexspec_serve.transport import Exchange, TransportError


def decode_answer(status: int, body: bytes) -> P.RoundResult | P.ErrorBody:
    if status == 200:
        return P.decode_result(body)
    return P.ErrorBody.model_validate(json.loads(body))


def exchange_of(payload: bytes, answer: Answer) -> Exchange:
    """A direct call's answer as the wire would have carried it (compact result, or the JSON error body)."""
    if isinstance(answer, P.RoundResult):
        return Exchange(answer, len(payload), len(P.encode_result(answer)))
    return Exchange(answer[1], len(payload), len(answer[1].model_dump_json()))


class HandleTransport:
    """Calls the router's `round_compact` through a DeploymentHandle (all rounds of a batch in flight)."""

    def __init__(self, router_handle):
        self.router = router_handle

    def round_trip(self, rounds: list[P.DraftRound]) -> list[Exchange]:
        payloads = [P.encode_round(r) for r in rounds]
        responses = [self.router.round_compact.remote(b) for b in payloads]
        out = []
        for up, resp in zip(payloads, responses):
            status, body = resp.result()
            out.append(Exchange(decode_answer(status, body), len(up), len(body)))
        return out


class DirectTransport:
    """Routes each round in this process (`routing.DirectRouter`) and calls its version's deployment directly:
    one handle hop. The version verifies the round as the compact encoding delivers it."""

    def __init__(self, router_handle, refresh_s: float = 0.5):
        self.router = DirectRouter(router_handle, refresh_s)

    def round_trip(self, rounds: list[P.DraftRound]) -> list[Exchange]:
        payloads = [P.encode_round(r) for r in rounds]

        async def in_flight():
            return await asyncio.gather(*(self.router.route(P.decode_round(b)) for b in payloads))

        return [exchange_of(up, answer) for up, answer in zip(payloads, asyncio.run(in_flight()))]


class HttpTransport:
    """POSTs compact rounds to /v1/round with the x-session-id header (used for replica affinity)."""

    def __init__(self, base_url: str, timeout_s: float = 30.0, api_key: str | None = None):
        import httpx

        headers = {"content-type": P.COMPACT_CONTENT_TYPE}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.client = httpx.Client(base_url=base_url, timeout=timeout_s, headers=headers)

    def round_trip(self, rounds: list[P.DraftRound]) -> list[Exchange]:
        out = []
        for r in rounds:
            body = P.encode_round(r)
            resp = self.client.post("/v1/round", content=body, headers={"x-session-id": r.session_id})
            out.append(Exchange(decode_answer(resp.status_code, resp.content), len(body), len(resp.content)))
        return out


class AsyncHandleTransport:
    """`router.round_compact` through a DeploymentHandle; the compact bytes are what a network would carry."""

    def __init__(self, app_name: str = APP_NAME):
        self.router = serve.get_app_handle(app_name)

    async def send(self, rnd: P.DraftRound) -> Exchange:
        payload = P.encode_round(rnd)
        try:
            status, body = await self.router.round_compact.remote(payload)
        except (ray.exceptions.RayError, RayServeException) as err:
            raise TransportError(f"router call failed: {type(err).__name__}") from err
        return Exchange(decode_answer(status, body), len(payload), len(body))


class AsyncDirectTransport:
    """Routes in this process (`routing.DirectRouter`) and calls the version's deployment: one handle hop.
    Bytes are counted on the compact encoding, and the version verifies the round as the wire delivers it."""

    def __init__(self, app_name: str = APP_NAME, refresh_s: float = 0.5):
        self.router = DirectRouter(serve.get_app_handle(app_name), refresh_s)

    async def send(self, rnd: P.DraftRound) -> Exchange:
        payload = P.encode_round(rnd)
        return exchange_of(payload, await self.router.route(P.decode_round(payload)))


class AsyncHttpTransport:
    """POST /v1/round with the compact body and `x-session-id` (replica affinity), as a remote device."""

    def __init__(self, base_url: str, api_key: str | None = None, max_connections: int = 256, timeout_s: float = 60.0):
        import httpx

        headers = {"content-type": P.COMPACT_CONTENT_TYPE}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._httpx = httpx
        self.client = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout_s,
                                        limits=httpx.Limits(max_connections=max_connections))

    async def send(self, rnd: P.DraftRound) -> Exchange:
        payload = P.encode_round(rnd)
        try:
            resp = await self.client.post("/v1/round", content=payload, headers={"x-session-id": rnd.session_id})
        except self._httpx.HTTPError as err:
            raise TransportError(f"HTTP round failed: {type(err).__name__}") from err
        if resp.status_code >= 500 and not resp.headers.get("content-type", "").startswith("application/json"):
            raise TransportError(f"HTTP {resp.status_code} without an error body")
        return Exchange(decode_answer(resp.status_code, resp.content), len(payload), len(resp.content))
