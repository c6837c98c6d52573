"""Fleet actors: Ray actors, each hosting a shard of a fleet's emulated devices as asyncio tasks (the
devices' logic is the Ray-free `flexspec_serve.fleet.runtime.Shard`). A fleet reaches the app over one of
the asyncio transports in `deployments/transport.py` (`FleetSpec.transport`: handle, direct or http)."""

from __future__ import annotations

import logging

import ray

from deployments.transport import AsyncDirectTransport, AsyncHandleTransport, AsyncHttpTransport

log = logging.getLogger("flexspec.fleet")


@ray.remote
class FleetActor:
    """One shard of a fleet. `ready()` loads the draft; `run(start_epoch_s)` runs the devices to the end;
    `progress()` answers live counters while `run` is in flight (async actor: both share one loop)."""

    def __init__(self, spec: dict, plans: list, prompts: list[list[int]], draft_path: str, api_key: str | None = None,
                 torch_threads: int = 1):
        import torch

        from flexspec_serve.fleet.drafter import hand_the_gil_over_sooner
        from flexspec_serve.fleet.spec import FleetSpec

        torch.set_num_threads(torch_threads)  # Ray sets OMP_NUM_THREADS=1; the draft is small, one thread each
        hand_the_gil_over_sooner()  # the drafter's worker thread shares the GIL with this actor's busy loop
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
