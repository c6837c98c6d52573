"""The serving path under load: cloud-only rounds through the router and direct, access logs on and off
(`python -m benchmarks.router_load [--profile tiny] [--repeats 2]`).

`--sessions` closed-loop sessions from one asyncio loop send `--rounds` cloud-only rounds each per cell (K = 0:
one position, the cheapest verify there is, so the path's share is the largest; `benchmarks.serve.run_load`),
through the fleets' handle transport (client -> router -> version: two hops) and direct one (routed in the
client: one hop). Each cell deploys the app afresh with Serve's access log on or off (`VersionSpec.access_log`,
`AppConfig.router_access_log`); the cells alternate, off first, `--repeats` times, so a drift of the host
shows in both. Overhead = round latency minus the server's queue and verify time as the round reports them.
What it does not measure: HTTP clients (the proxy's own hop), the model's cost (the tiny family's verify is
a few ms), or a fleet's draft work on the same cores (`benchmarks.fleet` does).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import ray
from ray import serve

from deployments.app import deploy
from deployments.config import AppConfig, VersionSpec, version_app_name
from deployments.transport import AsyncDirectTransport, AsyncHandleTransport
from benchmarks.serve import CallPath, run_load
from flexspec_serve import paths
from flexspec_serve.reports import machine, md_table

APP = "router-load"
VERSION = "load"  # its own version name: the app can run beside another (the tests' own v1)
PROMPT = [5, 6, 7, 8, 9, 10]
COLUMNS = ("repeat", "access log", "path", "rounds/s", "round p50 ms", "overhead p50 ms", "overhead mean ms",
           "server p50 ms")


def cell(family: Path, access_log: bool, args, registry: Path) -> dict[str, tuple[float, list]]:
    """Deploy with the access log on or off, warm each path, then load it (`benchmarks.serve.run_load`, K = 0):
    path -> (rounds/s, [(latency ms, result) of each round after a session's first]); delete the apps."""
    registry.unlink(missing_ok=True)
    version = VersionSpec(name=VERSION, path=str(family / "v1"), num_cpus=args.replica_num_cpus, access_log=access_log)
    cfg = AppConfig(draft_path=str(family / "draft"), versions=[version], aliases={"stable": VERSION},
                    registry_path=str(registry), router_access_log=access_log)
    deploy(cfg, name=APP, route_prefix=f"/{APP}")
    try:
        out = {}
        for path in (CallPath("router", AsyncHandleTransport(APP)), CallPath("direct", AsyncDirectTransport(APP))):
            run_load(path, [PROMPT], args.sessions, 5, 0, VERSION)  # warm: handles, replicas, the router's snapshot
            out[path.name] = run_load(path, [PROMPT], args.sessions, args.rounds, 0, VERSION)
        return out
    finally:
        for app in (APP, version_app_name(VERSION)):
            serve.delete(app)


def row(repeat: int, access_log: bool, path: str, load: tuple[float, list]) -> dict:
    rounds_per_s, rounds = load
    lat = [ms for ms, _ in rounds]
    server = [res.timings.queue_ms + res.timings.verify_ms for _, res in rounds]
    over = [a - b for a, b in zip(lat, server)]
    return {"repeat": repeat, "access log": "on" if access_log else "off", "path": path,
            "rounds/s": round(rounds_per_s, 1), "round p50 ms": round(statistics.median(lat), 1),
            "overhead p50 ms": round(statistics.median(over), 1), "overhead mean ms": round(statistics.mean(over), 1),
            "server p50 ms": round(statistics.median(server), 1)}


def summary(rows: list[dict]) -> list[dict]:
    """Per path: mean rounds/s with the access log off and on, and their ratio."""
    out = []
    for path in dict.fromkeys(r["path"] for r in rows):
        mean = {log: statistics.mean(r["rounds/s"] for r in rows if r["path"] == path and r["access log"] == log)
                for log in ("off", "on")}
        out.append({"path": path, "rounds/s log off": round(mean["off"], 1), "rounds/s log on": round(mean["on"], 1),
                    "off / on": round(mean["off"] / mean["on"], 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", type=Path, default=None, help="a built family (default: the profile's in the cache)")
    ap.add_argument("--sessions", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=150, help="closed-loop rounds per session and cell")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--replica-num-cpus", type=float, default=0.25)
    ap.add_argument("--out", type=Path, default=None, help="also write router_load.md here")
    args = ap.parse_args()
    family = args.family or paths.family_dir(args.profile, args.seed)
    ray.init(include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for repeat in range(1, args.repeats + 1):
            for access_log in (False, True):
                for path, load in cell(family, access_log, args, paths.home() / "router-load-registry.json").items():
                    rows.append(row(repeat, access_log, path, load))
    finally:
        serve.shutdown()
        ray.shutdown()
    command = "python -m benchmarks.router_load " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None)
    text = "\n".join([
        "# The serving path under load: router and direct, Serve's access log off and on\n",
        f"Command: `{command}`  \nmachine: {machine()}; family {family.name}; {args.sessions} closed-loop sessions of "
        f"cloud-only rounds, {args.rounds} rounds each per cell\n",
        md_table(rows, COLUMNS), "\n## Means\n", md_table(summary(rows)),
    ]) + "\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "router_load.md").write_text(text)


if __name__ == "__main__":
    main()
