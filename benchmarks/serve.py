"""Serving report on a local Ray + Serve (`python -m benchmarks.serve [--profile default]`).

Writes `serving.md` and `serving.png` under --out (default docs/results):
1. verify cost vs batch size, in-process (no Serve): what batching can gain at best on this machine;
2. through Serve, `sessions` concurrent sessions (K = 4) from one asyncio loop: verified tokens/s with
   max_batch_size 16 vs 1, round latency, the Serve-path overhead (round minus engine verify time) and the
   batch sizes the rounds saw;
3. one session alone: its Serve-path overhead next to a bare DeploymentHandle round trip (an echo
   deployment) measured in the same run;
   sections 2 and 3 take both in-cluster paths, with the fleets' transports (`deployments.transport`):
   through the router (client -> router -> version, two handle hops) and direct (routed in the client:
   one hop); both encode and decode the compact wire format as a device would;
4. KV-cache hit rate of long sessions on a version with 2 replicas (consistent hashing on the session id);
5. the GPU verify table when `benchmarks.gpu_verify` has written one (it runs without Ray).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import serve

from deployments.app import deploy
from deployments.config import AppConfig, VersionSpec, version_app_name
from deployments.transport import AsyncDirectTransport, AsyncHandleTransport
from flexspec_serve import paths
from flexspec_serve import protocol as P
from flexspec_serve.engine.costs import benchmark_contexts, cost_profile
from flexspec_serve.reports import machine, md_table
from flexspec_serve.zoo.corpus import humaneval_problems
from flexspec_serve.zoo.loading import load_tokenizer

SERVE_COLUMNS = ("path", "version", "batcher", "max_batch_size", "verified tok/s", "round p50 ms", "overhead p50 ms", "mean batch seen")
ROUTER_APP = "serving-bench"
ENGINE_COLUMNS = ("batch", "ms/call", "ms/session", "verified tok/s")


@dataclass
class Settings:
    sessions: int = 16
    rounds: int = 12
    k: int = 4
    torch_threads: int = 2
    batch_wait_s: float = 0.005
    batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    kv_sessions: int = 8
    kv_rounds: int = 24
    rtt_samples: int = 200
    replica_num_cpus: float = 0.5


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Echo:
    def ping(self, x: bytes) -> bytes:
        return x


class CallPath:
    """A named in-cluster path; a call answers a round or raises (the benchmark sends only valid rounds)."""

    def __init__(self, name: str, transport):
        self.name, self.transport = name, transport

    async def __call__(self, rnd: P.DraftRound) -> P.RoundResult:
        ex = await self.transport.send(rnd)
        if not isinstance(ex.result, P.RoundResult):
            raise RuntimeError(ex.result)
        return ex.result


async def _session(call, sid: str, prompt: list[int], rounds: int, k: int, target: str) -> list[tuple]:
    """One closed-loop session; returns (latency ms, result) of every round after the first."""
    out, drafts = [], prompt[:k]
    for seq in range(rounds):
        rnd = P.DraftRound(session_id=sid, seq=seq, target=target, draft_tokens=drafts,
                           full_context=prompt if seq == 0 else None)
        started = time.perf_counter()
        res = await call(rnd)
        latency = (time.perf_counter() - started) * 1e3
        if seq:
            out.append((latency, res))
    return out


def run_load(call, prompts, sessions: int, rounds: int, k: int, target: str) -> tuple[float, list]:
    """`sessions` concurrent sessions from one asyncio loop (no client threads competing for the GIL)."""

    async def everyone():
        tag = time.monotonic_ns()
        return await asyncio.gather(*[_session(call, f"{target}-{i}-{tag}", prompts[i % len(prompts)], rounds, k,
                                               target) for i in range(sessions)])

    started = time.perf_counter()
    per = asyncio.run(everyone())
    wall = time.perf_counter() - started
    return sessions * rounds * (k + 1) / wall, [x for p in per for x in p]


def engine_rows(family: Path, contexts: list[list[int]], s: Settings) -> list[dict]:
    import torch

    from flexspec_serve.engine.verifier import Verifier
    from flexspec_serve.zoo.loading import load_causal_lm

    torch.set_num_threads(s.torch_threads)
    prof = cost_profile(Verifier(load_causal_lm(family / "v1"), load_causal_lm(family / "draft")), contexts, s.k,
                        s.batches)
    return [{"batch": b, "ms/call": ms, "ms/session": round(ms / b, 3),
             "verified tok/s": round(b * (s.k + 1) / ms * 1e3, 1)} for b, ms in prof.items()]


def serve_rows(paths: list, prompts, versions: list[VersionSpec], s: Settings) -> list[dict]:
    """One row per (path, version) under the same concurrent load (the KV-locality version excluded)."""
    for call in paths:  # warm up (and let the direct path fetch its registry snapshot)
        for v in versions:
            run_load(call, prompts, 4, 3, s.k, v.name)
    rows = []
    for call in paths:
        for v in versions:
            if call.name == "direct" and v.batcher == "serve-batch" and v.max_batch_size > 1:
                continue  # the batcher comparison is made once, on the router path
            tps, flat = run_load(call, prompts, s.sessions, s.rounds, s.k, v.name)
            rows.append({"path": call.name, "version": v.name, "batcher": v.batcher if v.max_batch_size > 1 else "-",
                         "max_batch_size": v.max_batch_size, "verified tok/s": round(tps, 1),
                         "round p50 ms": round(statistics.median(x for x, _ in flat), 2),
                         "overhead p50 ms": round(statistics.median(x - r.timings.verify_ms for x, r in flat), 2),
                         "mean batch seen": round(statistics.mean(r.timings.batch_size for _, r in flat), 2)})
    return rows


def bare_rtt(echo, s: Settings) -> float:
    payload = P.encode_round(P.DraftRound(session_id="x", seq=1, draft_tokens=[1, 2, 3, 4]))
    for _ in range(20):
        echo.ping.remote(payload).result()
    rtt = []
    for _ in range(s.rtt_samples):
        started = time.perf_counter()
        echo.ping.remote(payload).result()
        rtt.append((time.perf_counter() - started) * 1e3)
    return statistics.median(rtt)


def lone_rows(paths: list, echo, prompt, s: Settings) -> list[dict]:
    """One session alone on the engine-loop version, per path, next to a bare handle round trip."""
    bare = bare_rtt(echo, s)
    rows = []
    for call in paths:
        single = asyncio.run(_session(call, f"solo-{call.name}-{time.monotonic_ns()}", prompt, 30, s.k, "loop"))
        overhead = statistics.median(x - r.timings.verify_ms for x, r in single)
        rows.append({"path": call.name, "round p50 ms": round(statistics.median(x for x, _ in single), 2),
                     "verify p50 ms": round(statistics.median(r.timings.verify_ms for _, r in single), 2),
                     "overhead p50 ms": round(overhead, 2), "bare handle RTT p50 ms": round(bare, 2),
                     "overhead in RTTs": round(overhead / bare, 2)})
    return rows


def kv_row(call, prompts, s: Settings) -> dict:
    _, flat = run_load(call, prompts, s.kv_sessions, s.kv_rounds, s.k, "kv")
    hits = sum(r.cache_hit for _, r in flat)
    return {"replicas": 2, "sessions": s.kv_sessions, "rounds after the first": len(flat), "cache hits": hits,
            "hit rate": round(hits / len(flat), 4)}


def app_config(family: Path, s: Settings, registry: Path) -> AppConfig:
    """The same v1 weights as four versions: engine-loop and serve.batch batching, unbatched, and two replicas
    for KV locality."""
    common = {"path": str(family / "v1"), "num_cpus": s.replica_num_cpus, "torch_threads": s.torch_threads}
    return AppConfig(
        draft_path=str(family / "draft"), aliases={"stable": "loop"}, registry_path=str(registry),
        router_num_cpus=min(0.1, s.replica_num_cpus),
        versions=[VersionSpec(name="loop", batcher="engine-loop", max_batch_size=16, batch_wait_timeout_s=0.0, **common),
                  VersionSpec(name="sbatch", batcher="serve-batch", max_batch_size=16,
                              batch_wait_timeout_s=s.batch_wait_s, **common),
                  VersionSpec(name="unbatched", max_batch_size=1, batch_wait_timeout_s=0.0, **common),
                  VersionSpec(name="kv", num_replicas=2, max_batch_size=16,
                              **{**common, "num_cpus": min(0.1, s.replica_num_cpus)})])


def measure(family: Path, s: Settings, registry: Path) -> dict:
    """Every section; needs a running Ray with Serve started. Deletes the apps it deployed."""
    tok = load_tokenizer(family / "v1")
    contexts = benchmark_contexts(tok, 32)
    prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"][-128:] for p in humaneval_problems(16)]
    out = {"engine": engine_rows(family, contexts, s)}
    cfg = app_config(family, s, registry)
    deploy(cfg, name=ROUTER_APP, route_prefix="/serving-bench")
    echo = serve.run(Echo.bind(), name="serving-echo", route_prefix="/serving-echo")
    try:
        paths = [CallPath("router", AsyncHandleTransport(ROUTER_APP)),
                 CallPath("direct", AsyncDirectTransport(ROUTER_APP))]
        out["serve"] = serve_rows(paths, prompts, [v for v in cfg.versions if v.name != "kv"], s)
        out["lone"] = lone_rows(paths, echo, prompts[0], s)
        out["kv"] = kv_row(paths[0], prompts, s)
    finally:
        for app in [ROUTER_APP, "serving-echo"] + [version_app_name(v.name) for v in cfg.versions]:
            serve.delete(app)
    return out


def write(out_dir: Path, res: dict, meta: dict) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    eng, srv, lone, kv = res["engine"], res["serve"], res["lone"], res["kv"]
    by_b = {r["batch"]: r for r in eng}
    top = max(by_b)
    engine_gain = (top * by_b[1]["ms/call"]) / by_b[top]["ms/call"]
    tps = {(r["path"], r["version"]): r["verified tok/s"] for r in srv}
    gains = {p: tps[(p, "loop")] / tps[(p, "unbatched")] for p in ("router", "direct")}
    lone_by = {r["path"]: r for r in lone}
    gpu = Path(meta["gpu_table"]) if meta.get("gpu_table") else None
    lines = [
        "# Serving: verify cost, batching through Serve, Serve overhead, KV-cache hits\n",
        f"Command: `{meta['command']}`  \nmachine: {meta['machine']}; family {meta['family']} (seed {meta['seed']}), "
        f"version v1 weights; torch threads {meta['torch_threads']} per replica; K = {meta['k']}\n",
        "## Verify cost vs batch size (in-process, no Serve; 256-token contexts)\n", md_table(eng, ENGINE_COLUMNS),
        f"Batch {top} verifies {engine_gain:.2f}x the tokens/s of {top} one-at-a-time calls: the most batching can "
        "gain on this machine, Serve or not.\n",
        f"## Through Serve: {meta['sessions']} concurrent sessions x {meta['rounds']} rounds\n",
        md_table(srv, SERVE_COLUMNS),
        f"Batched (engine loop) / unbatched verified tokens/s: **{gains['router']:.2f}x** through the router, "
        f"**{gains['direct']:.2f}x** direct (goal >= 4x); serve.batch ({meta['batch_wait_ms']:g} ms wait), router "
        f"path: {tps[('router', 'sbatch')] / tps[('router', 'unbatched')]:.2f}x. Overhead = round latency minus the "
        "engine's verify time; mean batch seen = the verify batch each round was part of.\n",
        "## One session alone\n", md_table(lone),
        f"On the engine-loop version the Serve path adds **{lone_by['router']['overhead in RTTs']:.2f}** bare handle "
        f"round trips through the router (client -> router -> version: two hops) and "
        f"**{lone_by['direct']['overhead in RTTs']:.2f}** direct (routed in the client: one hop); goal <= 2.\n",
        "## KV-cache locality (consistent hashing on the session id)\n", md_table([kv]),
        "## GPU\n",
        (f"See [{gpu.name}]({gpu.name}) (written by `python -m benchmarks.gpu_verify`)." if gpu else
         "No GPU verify table: `python -m benchmarks.gpu_verify` (Ray-free) writes one when run on a GPU machine."),
        "\n![serving](serving.png)",
    ]
    (out_dir / "serving.md").write_text("\n".join(lines) + "\n")
    _plot(eng, srv, out_dir / "serving.png")
    return [out_dir / "serving.md", out_dir / "serving.png"]


def _plot(eng: list[dict], srv: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8))
    a.plot([r["batch"] for r in eng], [r["ms/call"] for r in eng], "o-", label="ms per verify call")
    a.plot([r["batch"] for r in eng], [r["ms/session"] for r in eng], "s--", label="ms per session")
    a.set(xscale="log", xlabel="batch size", ylabel="ms", title="Verify cost (in-process)")
    a.legend(fontsize=8)
    b.bar([f"{r['path']}\n{r['batcher']}\nmax {r['max_batch_size']}" for r in srv], [r["verified tok/s"] for r in srv])
    b.set(ylabel="verified tokens/s", title="Through Serve")
    b.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    s = Settings(sessions=args.sessions, rounds=args.rounds, torch_threads=args.torch_threads)
    family = paths.family_dir(args.profile, args.seed)
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        res = measure(family, s, paths.home() / "serving-bench-registry.json")
    finally:
        serve.shutdown()
        ray.shutdown()
    gpu = args.out / "gpu_verify.md"
    meta = {"command": "python -m benchmarks.serve " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                              vars(args).items() if k != "out"),
            "machine": machine(), "family": family.name, "seed": args.seed, "torch_threads": s.torch_threads,
            "k": s.k, "sessions": s.sessions, "rounds": s.rounds, "batch_wait_ms": s.batch_wait_s * 1e3,
            "gpu_table": str(gpu) if gpu.exists() else None}
    print(write(args.out, res, meta)[0].read_text())


if __name__ == "__main__":
    main()
