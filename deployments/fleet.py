"""Fleet actors: Ray actors, each hosting a shard of a fleet's emulated devices as asyncio tasks (the
devices' logic is the Ray-free `flexspec_serve.fleet.runtime.Shard`), plus the three transports a fleet can
use to reach the app: the router's DeploymentHandle (in-cluster), direct (in-cluster, routed in the actor:
one hop to the version), and HTTP through Serve's proxy (as a remote device would). Each raises
`TransportError` when the path itself fails, so devices retry with backoff."""

from __future__ import annotations

import logging

import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from deployments.routing import DirectRouter
from deployments.transport import decode_answer, exchange_of
from flexspec_serve import protocol as P
from flexspec_serve.transport import Exchange, TransportError

log = logging.getLogger("flexspec.fleet")
APP_NAME = "flexspec"


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


@ray.remote
class FleetActor:
    """One shard of a fleet. `ready()` loads the draft; `run(start_epoch_s)` runs the devices to the end;
    `progress()` answers live counters while `run` is in flight (async actor: both share one loop)."""

    def __init__(self, spec: dict, plans: list, prompts: list[list[int]], draft_path: str, api_key: str | None = None,
                 torch_threads: int = 1):
        import torch

        from flexspec_serve.fleet.spec import FleetSpec

        torch.set_num_threads(torch_threads)  # Ray sets OMP_NUM_THREADS=1; the draft is small, one thread each
        self.spec, self.plans, self.prompts = FleetSpec.model_validate(spec), plans, prompts
        self.draft_path, self.api_key = draft_path, api_key
        self.shard = None

    async def ready(self) -> int:
        from flexspec_serve.engine.proposer import DraftProposer
        from flexspec_serve.zoo.loading import load_causal_lm

        self.proposer = DraftProposer(load_causal_lm(self.draft_path))
        self.transport = {"handle": AsyncHandleTransport, "direct": AsyncDirectTransport,
                          "http": lambda: AsyncHttpTransport(self.spec.url, self.api_key)}[self.spec.transport]()
        return len(self.plans)

    async def run(self, start_epoch_s: float):
        from flexspec_serve.fleet.runtime import Shard

        self.shard = Shard(self.spec, self.plans, self.prompts, self.proposer, self.transport, start_epoch_s)
        return await self.shard.run()

    async def progress(self) -> dict:
        if self.shard is None:
            return {}
        return vars(self.shard.counters).copy()
