"""Transports to a running app, for edge clients and load tests: a DeploymentHandle (in-cluster) or HTTP.

Both speak the compact encoding and implement `round_trip(rounds) -> list[Exchange]` like the in-process
`LocalTransport`, so the same edge client runs over any of them.
"""

from __future__ import annotations

import json

from flexspec_serve import protocol as P
from flexspec_serve.transport import Exchange


def decode_answer(status: int, body: bytes) -> P.RoundResult | P.ErrorBody:
    if status == 200:
        return P.decode_result(body)
    return P.ErrorBody.model_validate(json.loads(body))


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
