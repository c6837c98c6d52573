"""Soak benchmark: a fixed load for a long time, memory sampled (`python -m benchmarks.soak [--minutes 20]`).

A fleet (default 100 devices, think time 40 s) decodes through a local app for `--minutes`; every 30 s the
resident memory of each Serve replica and fleet actor process is sampled (psutil, by process title), with
the verifiers' KV-cache bytes and held sessions. The trend is the least-squares slope over the second
half of the run (MB per minute): flat memory means the LRU session store and everything around it are
bounded at a steady load.

Writes docs/results/soak.md.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from ray import serve

from deployments.cli import family_app_config, start_local_app
from deployments.loadtest import fleet_prompts, run_fleet
from flexspec_serve import paths
from flexspec_serve.fleet.report import summarize
from flexspec_serve.reports import machine
from flexspec_serve.fleet.spec import FleetSpec

WATCHED = ("ServeReplica:flexspec-v1", "ServeReplica:flexspec:router", "FleetActor")


def rss_by_role() -> dict[str, float]:
    out: dict[str, float] = {}
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        title = " ".join(proc.info["cmdline"] or [])
        for role in WATCHED:
            if role in title and proc.info["memory_info"]:
                out[role] = out.get(role, 0.0) + proc.info["memory_info"].rss / 2**20
    return out


class MemorySampler(threading.Thread):
    def __init__(self, router, period_s: float):
        super().__init__(daemon=True)
        self.router, self.period_s, self.t0 = router, period_s, time.time()
        self.samples: list[dict] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.period_s if self.samples else 1.0):
            stats = self.router.stats.remote().result().get("v1", {})
            self.samples.append({"t_min": round((time.time() - self.t0) / 60, 2), **rss_by_role(),
                                 "kv_mb": round(stats.get("cache_bytes", 0) / 2**20, 2),
                                 "sessions": stats.get("sessions", 0)})


def slope_mb_per_min(samples: list[dict], key: str) -> float:
    half = [s for s in samples[len(samples) // 2 :] if key in s]
    if len(half) < 3:
        return float("nan")
    t, y = np.array([s["t_min"] for s in half]), np.array([s[key] for s in half])
    return round(float(np.polyfit(t, y, 1)[0]), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--think", type=float, default=40.0)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    family = paths.family_dir(args.profile)
    cfg = family_app_config(family, ["v1"], registry_path=str(paths.home() / "bench-soak-registry.json"))
    router = start_local_app(cfg)
    spec = FleetSpec(name="soak", devices=args.devices, actors=2, actor_num_cpus=0.2, max_new_tokens=48,
                     target="stable", duration_s=args.minutes * 60,
                     arrival={"start_within_s": args.think, "think_time_s": args.think},
                     mix=[{"device_class": "flagship-phone", "share": 0.5, "channel": "TMobile-LTE-short"},
                          {"device_class": "wearable", "share": 0.5, "channel": "fading"}])
    sampler = MemorySampler(router, 30.0)
    sampler.start()
    run, wall_s, _ = run_fleet(spec, fleet_prompts(spec, family / "draft"), str(family / "draft"))
    sampler.stop.set()
    sampler.join()
    s = summarize(run, {"policy": spec.policy, "devices": spec.devices})
    roles = [r for r in WATCHED if any(r in x for x in sampler.samples)] + ["kv_mb"]
    lines = [
        "# Soak benchmark (local Ray + Serve, CPU)\n",
        f"Command: `python -m benchmarks.soak --minutes {args.minutes:g} --devices {args.devices}`  \n"
        f"machine: {machine()}; family {args.profile}, v1 only (max_sessions {cfg.versions[0].max_sessions}, "
        f"max_cache_mb {cfg.versions[0].max_cache_mb})\n",
        f"{s['sessions_started']} sessions ({s['sessions_failed']} failed, {s['sessions_lost']} lost), {s['rounds']} "
        f"rounds, {s['tokens']} tokens in {wall_s / 60:.1f} min; {s['in_session']['mean']} devices in a session on "
        f"average.\n",
        "Resident memory (MB) every 30 s; KV-cache MB and sessions held by the v1 replica:\n",
        "| min | " + " | ".join(roles) + " | sessions |", "|---|" + "---|" * (len(roles) + 1),
        *[f"| {x['t_min']} | " + " | ".join(f"{x.get(r, float('nan')):.1f}" for r in roles) + f" | {x['sessions']} |"
          for x in sampler.samples],
        "\nTrend over the second half (least-squares slope, MB per minute): "
        + ", ".join(f"{r} {slope_mb_per_min(sampler.samples, r):+}" for r in roles),
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    serve.shutdown()


if __name__ == "__main__":
    main()
