"""Autoscaling under a load ramp, next to the capacity planner (`python -m benchmarks.ramp`).

1. The planner (`autoscale.planner`) sizes v1 for the peak fleet from the verify cost measured here and
   gives the per-replica capacity that the version's `AutoscalingSpec` then uses.
2. A local app serves v1 with that autoscaling spec; a small fleet runs, then the peak fleet, then nothing;
   the replica count is sampled every second.
3. The table compares the planner's replicas for the peak with what the autoscaler settled on.

Writes docs/results/ramp.md.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from pathlib import Path

from ray import serve

from autoscale.cli import measured_cost
from autoscale.planner import ASSUMPTIONS, plan
from deployments.cli import family_app_config, start_local_app
from deployments.config import AutoscalingSpec, deployment_name, version_app_name
from deployments.loadtest import fleet_prompts, run_fleet
from flexspec_serve import paths
from flexspec_serve.fleet.report import summarize
from flexspec_serve.reports import machine
from flexspec_serve.fleet.spec import FleetSpec


def fleet(devices: int, duration_s: float, think_s: float, name: str) -> FleetSpec:
    return FleetSpec(name=name, devices=devices, actors=2, actor_num_cpus=0.2, max_new_tokens=48, target="stable",
                     duration_s=duration_s, arrival={"start_within_s": min(think_s, duration_s / 2),
                                                     "think_time_s": think_s},
                     mix=[{"device_class": "flagship-phone", "share": 0.5, "channel": "TMobile-LTE-short"},
                          {"device_class": "midrange-phone", "share": 0.5, "channel": "ATT-LTE-driving"}])


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.t0, self.samples, self.stop = time.time(), [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            dep = serve.status().applications[version_app_name("v1")].deployments[deployment_name("v1")]
            self.samples.append((round(time.time() - self.t0, 1), dep.replica_states.get("RUNNING", 0)))
            time.sleep(1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--small", type=int, default=10)
    ap.add_argument("--peak", type=int, default=100)
    ap.add_argument("--think", type=float, default=40.0)
    ap.add_argument("--phase-s", type=float, default=60.0)
    ap.add_argument("--slo-ms", type=float, default=200.0)
    ap.add_argument("--overhead-ms", type=float, default=14.5, help="Serve path per round; 14.5 ms measured "
                    "by `python -m benchmarks.serve` on the 2-core machine (docs/results/serving.md)")
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    family = paths.family_dir(args.profile)
    small = fleet(args.small, args.phase_s, args.think, "small")
    peak = fleet(args.peak, args.phase_s, args.think, "peak")
    cost = measured_cost(args.profile)
    demand, plans = plan(peak, cost, {"v1": 1.0}, args.slo_ms, args.overhead_ms)
    planned = plans[0]
    logging.getLogger("flexspec.ramp").info("planner: %s; demand %s", planned, demand)
    scaling = AutoscalingSpec(min_replicas=1, max_replicas=max(4, planned.replicas + 2),
                              capacity_tokens_per_s=planned.replica_capacity_tokens_per_s, target_utilisation=0.7,
                              upscale_delay_s=5, downscale_delay_s=15, metrics_interval_s=1, look_back_period_s=5)
    cfg = family_app_config(family, ["v1"], registry_path=str(paths.home() / "bench-ramp-registry.json"))
    cfg.versions[0] = cfg.versions[0].model_copy(update={"autoscaling": scaling})
    start_local_app(cfg)
    sampler = Sampler()
    sampler.start()
    prompts, draft = fleet_prompts(peak, family / "draft"), str(family / "draft")
    phases = []
    for spec in (small, peak):
        begin = time.time() - sampler.t0
        run, _, _ = run_fleet(spec, prompts, draft, show_progress=True)
        s = summarize(run, {"policy": spec.policy, "devices": spec.devices})
        phases.append((spec.name, round(begin, 1), round(time.time() - sampler.t0, 1), s))
    idle_begin = time.time() - sampler.t0
    while time.time() - sampler.t0 < idle_begin + 60 and sampler.samples[-1][1] > 1:
        time.sleep(1)
    time.sleep(2)
    sampler.stop.set()
    peak_begin, peak_end = phases[1][1], phases[1][2]
    during_peak = [n for t, n in sampler.samples if peak_begin + 20 <= t <= peak_end]
    settled = max(set(during_peak), key=during_peak.count) if during_peak else 0
    lines = [
        "# Autoscaling ramp vs the capacity planner (local Ray + Serve, CPU)\n",
        f"Command: `python -m benchmarks.ramp --profile {args.profile}`  \nmachine: {machine()}\n",
        f"Verify cost (ms per call by batch): {cost}. Planner (SLO {args.slo_ms:g} ms, overhead {args.overhead_ms:g} "
        f"ms/round, utilisation 0.7) for the peak fleet of {peak.devices} devices: {demand.rounds_per_s:.1f} rounds/s, "
        f"{demand.verified_tokens_per_s:.0f} verified tokens/s -> batch {planned.batch}, "
        f"{planned.replica_capacity_tokens_per_s:.0f} tokens/s per replica, **{planned.replicas} replicas**. "
        f"The autoscaler got that capacity (`capacity_tokens_per_s`), upscale delay 5 s, downscale delay 15 s.\n",
        "| phase | devices | from s | to s | sessions | failed | verified tok/s measured | replicas seen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, begin, end, s in phases:
        seen = sorted({n for t, n in sampler.samples if begin <= t <= end})
        lines.append(f"| {name} | {s['devices']} | {begin} | {end} | {s['sessions_started']} | {s['sessions_failed']} "
                     f"| {s['rounds'] and round(s['rounds'] * (s['mean_k'] + 1) / max(end - begin, 1), 1)} | {seen} |")
    lines += [f"| idle | 0 | {round(idle_begin, 1)} | {sampler.samples[-1][0]} | 0 | 0 | 0 | "
              f"{sorted({n for t, n in sampler.samples if t >= idle_begin})} |",
              f"\nSettled during the peak (most frequent count after its first 20 s): **{settled} replicas**; planner: "
              f"**{planned.replicas}** (difference {settled - planned.replicas:+d}).\n",
              "Replicas over time (s, running replicas): " + ", ".join(f"{t:g}:{n}" for t, n in sampler.samples[::5]),
              "\n" + ASSUMPTIONS]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ramp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    serve.shutdown()


if __name__ == "__main__":
    main()
