"""Serving benchmark on a local Ray + Serve (`python -m benchmarks.serve [--profile default]`).

1. Verified tokens/s with 16 concurrent sessions (K = 4), batched (max_batch_size 16) vs max_batch_size 1.
2. Per-round overhead of the Serve path: round latency minus the engine's verify time, next to a bare
   DeploymentHandle round trip (an echo deployment) measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import ray
from ray import serve

from deployments.app import deploy
from deployments.config import AppConfig, VersionSpec
from flexspec_serve import paths
from flexspec_serve import protocol as P
from flexspec_serve.zoo.corpus import humaneval_problems
from flexspec_serve.zoo.loading import load_tokenizer


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Echo:
    def ping(self, x: bytes) -> bytes:
        return x


async def _session_async(handle, sid: str, prompt: list[int], rounds: int, k: int, target: str):
    out, drafts = [], prompt[:k]
    for seq in range(rounds):
        rnd = P.DraftRound(session_id=sid, seq=seq, target=target, draft_tokens=drafts,
                           full_context=prompt if seq == 0 else None)
        started = time.perf_counter()
        status, body = await handle.round_compact.remote(P.encode_round(rnd))
        latency = (time.perf_counter() - started) * 1e3
        if status != 200:
            raise RuntimeError(body)
        if seq:
            out.append((latency, P.decode_result(body).timings.verify_ms))
    return out


def run_load(handle, prompts, sessions: int, rounds: int, k: int, target: str):
    """`sessions` concurrent sessions from one asyncio loop (no client threads competing for the GIL)."""

    async def all_sessions():
        tag = time.monotonic_ns()
        return await asyncio.gather(*[_session_async(handle, f"{target}-{i}-{tag}", prompts[i % len(prompts)],
                                                     rounds, k, target) for i in range(sessions)])

    started = time.perf_counter()
    per = asyncio.run(all_sessions())
    wall = time.perf_counter() - started
    flat = [x for p in per for x in p]
    return sessions * rounds * (k + 1) / wall, flat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--torch-threads", type=int, default=2)
    args = ap.parse_args()
    fam = paths.family_dir(args.profile)
    tok = load_tokenizer(fam / "v1")
    prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"][-128:] for p in humaneval_problems(16)]
    versions = [VersionSpec(name="batched", path=str(fam / "v1"), num_cpus=0.5, max_batch_size=16,
                            batch_wait_timeout_s=0.005, torch_threads=args.torch_threads),
                VersionSpec(name="unbatched", path=str(fam / "v1"), num_cpus=0.5, max_batch_size=1,
                            batch_wait_timeout_s=0.0, torch_threads=args.torch_threads)]
    cfg = AppConfig(draft_path=str(fam / "draft"), versions=versions, aliases={"stable": "batched"},
                    registry_path=str(paths.home() / "bench-registry.json"))
    ray.init(include_dashboard=False, log_to_driver=False)
    handle = deploy(cfg, name="bench", route_prefix="/bench")
    echo = serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    payload = P.encode_round(P.DraftRound(session_id="x", seq=1, draft_tokens=[1, 2, 3, 4]))
    for _ in range(20):
        echo.ping.remote(payload).result()
    rtt = []
    for _ in range(200):
        started = time.perf_counter()
        echo.ping.remote(payload).result()
        rtt.append((time.perf_counter() - started) * 1e3)
    bare_ms = statistics.median(rtt)
    run_load(handle, prompts, 4, 3, args.k, "batched")  # warm up both versions
    run_load(handle, prompts, 4, 3, args.k, "unbatched")
    rows = []
    for target in ("batched", "unbatched"):
        tps, flat = run_load(handle, prompts, args.sessions, args.rounds, args.k, target)
        lat = statistics.median(x[0] for x in flat)
        overhead = statistics.median(x[0] - x[1] for x in flat)
        stats = handle.stats.remote().result()[target]
        rows.append((target, tps, lat, overhead, stats["mean_batch_size"]))
    print(f"\n{args.sessions} concurrent sessions x {args.rounds} rounds, K = {args.k}, family {fam}")
    print(f"{'max_batch_size':>16} | {'verified tok/s':>14} | {'round p50 ms':>12} | {'overhead p50 ms':>15} | "
          f"{'mean batch':>10}")
    for target, tps, lat, overhead, mean_batch in rows:
        print(f"{'16' if target == 'batched' else '1':>16} | {tps:>14.1f} | {lat:>12.2f} | {overhead:>15.2f} | "
              f"{mean_batch:>10}")
    print(f"batched / unbatched throughput: {rows[0][1] / rows[1][1]:.2f}x")
    single = asyncio.run(_session_async(handle, f"solo-{time.monotonic_ns()}", prompts[0], 30, args.k, "batched"))
    solo_overhead = statistics.median(x[0] - x[1] for x in single)
    print(f"one session alone: round p50 {statistics.median(x[0] for x in single):.2f} ms, Serve-path overhead "
          f"(round - verify) {solo_overhead:.2f} ms; bare handle round trip {bare_ms:.2f} ms "
          f"-> overhead = {solo_overhead / bare_ms:.2f} round trips (includes the batch wait of 5 ms)")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
