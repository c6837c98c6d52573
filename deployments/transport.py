"""Transports to a running app, for edge clients and load tests: the router's DeploymentHandle
(in-cluster), direct (in-cluster, routed in this process: one hop to the version) or HTTP.

All speak the compact encoding and implement `round_trip(rounds) -> list[Exchange]` like the in-process
`LocalTransport`, so the same edge client runs over any of them.
"""

from __future__ import annotations

import asyncio
import json

from deployments.routing import Answer, DirectRouter
from flexspec_serve import protocol as P
from flexspec_serve.transport import Exchange


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
