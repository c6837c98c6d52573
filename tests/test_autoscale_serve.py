"""Autoscaling on a real local Ray Serve: a load ramp (light -> heavy -> idle) against a version whose
`AutoscalingSpec` uses the verified-tokens policy; the replica count rises, then falls (slow: ~2 min)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from deployments.app import deploy  # noqa: E402
from deployments.config import AppConfig, AutoscalingSpec, VersionSpec, deployment_name, version_app_name  # noqa: E402
from flexspec_serve import protocol as P  # noqa: E402
from flexspec_serve.engine.client import ClientSession  # noqa: E402
from flexspec_serve.engine.proposer import Proposal  # noqa: E402
from flexspec_serve.engine.sampling import SamplingParams  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.serve]


async def session(handle, sid: str, prompt: list[int], rounds: int, pause_s: float, failures: list) -> None:
    """A client that drafts 4 arbitrary ids per round; when scaling moves it to a new replica, it resyncs."""
    client = ClientSession.start(sid, prompt, SamplingParams(), None, "v1")
    for _ in range(rounds):
        draft = Proposal(client.committed[-4:])
        for _attempt in range(3):
            status, body = await handle.round_compact.remote(P.encode_round(client.message(draft)))
            if status == 200:
                client.commit(draft, P.decode_result(body))
                break
            if not client.on_error(P.ErrorBody.model_validate_json(body)):
                failures.append(body)
                return
        await asyncio.sleep(pause_s)


def replicas(app_name: str, dep: str) -> int:
    status = serve.status().applications[app_name].deployments[dep]
    return status.replica_states.get("RUNNING", 0)


def test_replicas_rise_under_a_ramp_and_fall_when_idle(tiny_family, tmp_path, humaneval_prompts):
    scaling = AutoscalingSpec(min_replicas=1, max_replicas=3, capacity_tokens_per_s=60, target_utilisation=1.0,
                              upscale_delay_s=2, downscale_delay_s=8, metrics_interval_s=0.5, look_back_period_s=2)
    cfg = AppConfig(draft_path=str(tiny_family / "draft"), registry_path=str(tmp_path / "registry.json"),
                    versions=[VersionSpec(name="v1", path=str(tiny_family / "v1"), num_cpus=0.2, autoscaling=scaling)],
                    aliases={"stable": "v1"}, router_num_cpus=0.1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        handle = deploy(cfg)
        app, dep = version_app_name("v1"), deployment_name("v1")
        timeline: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample():
            t0 = time.monotonic()
            while not stop.is_set():
                timeline.append((time.monotonic() - t0, replicas(app, dep)))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        failures: list = []
        prompts = [p[-32:] for p in humaneval_prompts]

        async def phase(n_sessions: int, rounds: int, pause_s: float, tag: str):
            await asyncio.gather(*(session(handle, f"{tag}-{i}", prompts[i % len(prompts)], rounds, pause_s, failures)
                                   for i in range(n_sessions)))

        asyncio.run(phase(2, 20, 0.2, "light"))  # ~ 2 x 5 rounds/s x 5 tokens = 50 tok/s: one replica
        light_peak = max(n for _, n in timeline)
        for wave in range(3):  # as fast as the app answers: well above one replica's 60 tok/s
            asyncio.run(phase(24, 50, 0.0, f"heavy{wave}"))  # 50 rounds x <= 5 tokens stays within 512 positions
        deadline = time.monotonic() + 60
        while replicas(app, dep) > 1 and time.monotonic() < deadline:  # idle: back down after the delay
            time.sleep(1)
        stop.set()
        assert not failures, failures[:3]
        peak = max(n for _, n in timeline)
        assert light_peak == 1 and peak >= 2, timeline
        assert replicas(app, dep) == 1, timeline
    finally:
        serve.shutdown()
        ray.shutdown()
