"""Hot-swap benchmark on a local Ray + Serve (`python -m benchmarks.swap [--profile default]`).

A fleet (default 200 devices) decodes through `stable` = v1 while v3 is swapped in mid-run through the
admin API: add, compatibility gate, canary, automatic promotion, v1 drained and deleted. Measured: failed
and lost sessions, and the p99 of the cloud part of a round (device-observed time from uplink delivery to
the answer, i.e. Serve path + queue + verify) during the swap against the steady state before it. Then
the family's unconstrained version (backbone contract broken) goes through the gate; and the bytes a
coupled design would have sent to the devices.

Writes docs/results/swap.md and the load-test report under docs/results/swap/.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
from pathlib import Path

import numpy as np

from deployments.cli import family_app_config, start_local_app
from deployments.demo import draft_bytes
from deployments.loadtest import fleet_prompts, run_report
from deployments.swap import SwapPlan, SwapScript, SwapTrigger
from flexspec_serve import paths
from flexspec_serve.reports import machine
from flexspec_serve.fleet.spec import FleetSpec


def p99(rows, lo_s: float, hi_s: float, key: str = "verify_ms") -> tuple[float, int]:
    vals = [r[key] for r in rows if lo_s <= r["t_start_ms"] / 1e3 < hi_s]
    return (round(float(np.percentile(vals, 99)), 1) if vals else float("nan")), len(vals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--think", type=float, default=80.0)
    ap.add_argument("--duration", type=float, default=150.0)
    ap.add_argument("--swap-at", type=float, default=45.0)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    family = paths.family_dir(args.profile)
    token = os.environ.setdefault("FLEXSPEC_ADMIN_TOKEN", secrets.token_urlsafe(24))
    registry = paths.home() / "bench-swap-registry.json"
    registry.unlink(missing_ok=True)
    start_local_app(family_app_config(family, ["v1", "v2"], registry_path=str(registry), model_root=str(family)))
    url = "http://127.0.0.1:8000"
    spec = FleetSpec(name="swap", devices=args.devices, actors=2, actor_num_cpus=0.2, max_new_tokens=48,
                     target="stable", duration_s=args.duration, arrival={"start_within_s": args.think,
                                                                          "think_time_s": args.think},
                     mix=[{"device_class": "flagship-phone", "share": 0.4, "channel": "TMobile-LTE-short"},
                          {"device_class": "midrange-phone", "share": 0.4, "channel": "ATT-LTE-driving"},
                          {"device_class": "wearable", "share": 0.2, "channel": "fading"}])
    trigger = SwapTrigger(url, token, SwapPlan("v3", str(family / "v3"), weight=0.3, window_s=20, min_rounds=50),
                          args.swap_at)
    out = args.out / "swap"
    summary = run_report(spec, fleet_prompts(spec, family / "draft"), str(family / "draft"), out,
                         command="python -m benchmarks.swap", on_tick=trigger, edge_model_bytes=draft_bytes(family))
    events = {e["label"]: e["t_s"] for e in trigger.script.events}
    rounds = [r for r in _rounds(out)]
    swap_start, swap_end = events.get("add v3", args.swap_at), events.get("deleted v1", args.duration)
    steady, n_steady = p99(rounds, 10.0, swap_start, "round_ms")
    during, n_during = p99(rounds, swap_start, swap_end, "round_ms")
    cloud_steady, _ = p99(rounds, 10.0, swap_start)
    cloud_during, _ = p99(rounds, swap_start, swap_end)
    gate = SwapScript(url, token, SwapPlan("v2-unconstrained", str(family / "v2-unconstrained")), 0.0)
    gate.run()
    edge = summary["edge_model_bytes"]
    lines = [
        "# Hot-swap benchmark (local Ray + Serve, CPU)\n",
        f"Command: `python -m benchmarks.swap --profile {args.profile} --devices {args.devices}`  \n"
        f"machine: {machine()}; family {args.profile} seed 0; v1 = stable at start, v2 deployed beside it\n",
        f"Fleet: {spec.devices} devices (flagship/midrange/wearable on TMobile-LTE, ATT-LTE, fading), think time "
        f"{args.think:g} s, {spec.duration_s:g} s of arrivals; swap of v3 started at {swap_start:g} s "
        f"(canary 30 %, 20 s window, then v1 retired with `finish`).\n",
        "| step | t (s) |", "|---|---|", *[f"| {e['label']} | {e['t_s']} |" for e in trigger.script.events],
        f"\nOutcome: {trigger.script.outcome}.\n",
        "| sessions | completed | failed | lost | rounds | round p99 steady (ms) | round p99 during swap (ms) | ratio "
        "| cloud part p99 steady / during (ms) | ratio |", "|---|---|---|---|---|---|---|---|---|---|",
        f"| {summary['sessions_started']} | {summary['sessions_completed']} | {summary['sessions_failed']} | "
        f"{summary['sessions_lost']} | {summary['rounds']} | {steady} (n={n_steady}) | {during} (n={n_during}) | "
        f"{during / steady:.2f} | {cloud_steady} / {cloud_during} | {cloud_during / cloud_steady:.2f} |\n",
        "Round = the device-observed round time (draft, uplink, cloud, downlink); cloud part = from the uplink's "
        "delivery to the answer (Serve path, queue, verify). Steady = from 10 s to the start of the swap; during = "
        "from `add` to the old version's deletion.\n",
        f"Unconstrained candidate through the gate: {gate.gate['message'] if gate.gate else gate.outcome}\n",
        f"Model bytes sent to the {spec.devices} devices across the swap: {edge['frozen']} (frozen draft). A coupled "
        f"design would have shipped the re-distilled draft ({edge['per_device'] / 1e6:.2f} MB) to every device: "
        f"{edge['coupled'] / 1e6:.1f} MB. Round traffic to the devices during the whole run: "
        f"{edge['downlink_round_bytes'] / 1e3:.0f} kB.\n",
        "Report: `docs/results/swap/report.md` (tokens/s over time with the swap marked).",
    ]
    (args.out / "swap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _rounds(out: Path):
    import csv

    with (out / "rounds.csv").open() as fh:
        for row in csv.DictReader(fh):
            yield {"t_start_ms": float(row["t_start_ms"]), "verify_ms": float(row["verify_ms"]),
                   "round_ms": float(row["round_ms"])}


if __name__ == "__main__":
    main()
