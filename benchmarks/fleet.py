"""Fleet benchmark on a local Ray + Serve (`python -m benchmarks.fleet [--profile default]`).

1. Scale: a large fleet (default 1000 devices over 4 actors) against the local app; emulation lag
   percentiles, how many devices were in a session and mid-round at once, failures.
2. Speculative vs cloud-only on the LTE traces: the same fleet, seeds and prompts replayed with the
   adaptive controller, fixed K = 4 and cloud-only, and the adaptive controller on devices that draft
   ahead and on devices that pipeline, each with chains, second choices and branches (token trees); decode
   tokens/s per policy and the ratio. `--seeds 0 1 2` repeats it under other fleet seeds (other trace
   offsets, prompts and arrivals) and adds a table of the speed-ups across the repeats (`--lte-runs` picks
   the runs to repeat).
3. Sampling (temperature 0.8) on the same LTE fleet: chains, branches, and branches drafting ahead against
   cloud-only at the same temperature (token trees decided by recursive rejection sampling).

Writes docs/results/fleet.md (and the two load-test reports under docs/results/fleet/).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from deployments.cli import add_emulate_cloud, family_app_config, start_local_app
from deployments.loadtest import fleet_prompts, run_report
from flexspec_serve import paths
from flexspec_serve.ahead import Ahead
from flexspec_serve.edge.devices import CLOUD_PROFILES
from flexspec_serve.fleet.report import class_compare_rows, cloud_only, compare_rows, repeat_rows
from flexspec_serve.fleet.spec import FleetSpec
from flexspec_serve.reports import machine, md_table
from flexspec_serve.tree import Tree

LTE = ("TMobile-LTE-short", "ATT-LTE-driving")


def scale_spec(args, think: float) -> FleetSpec:
    return FleetSpec(
        name="scale", devices=args.devices, actors=args.actors, actor_num_cpus=0.2, max_new_tokens=48, target="stable",
        mix=[{"device_class": "flagship-phone", "share": 0.4, "channel": LTE[0]},
             {"device_class": "midrange-phone", "share": 0.4, "channel": LTE[1]},
             {"device_class": "wearable", "share": 0.2, "channel": "fading"}],
        arrival={"start_within_s": think, "think_time_s": think}, duration_s=args.duration)


LTE_RUNS = tuple(("adaptive", ahead, tree) for tree in Tree for ahead in Ahead) + (
    ("fixed-4", Ahead.OFF, Tree.CHAIN), ("cloud-only", Ahead.OFF, Tree.CHAIN))


SAMPLING_TEMPERATURE = 0.8
SAMPLING_RUNS = (("adaptive", Ahead.OFF, Tree.CHAIN), ("adaptive", Ahead.OFF, Tree.BRANCHES),
                 ("adaptive", Ahead.DRAFT, Tree.BRANCHES), ("cloud-only", Ahead.OFF, Tree.CHAIN))


def run_dir(policy: str, ahead: Ahead, tree: Tree, temperature: float = 0.0, seed: int = 0) -> str:
    mode = {Ahead.OFF: "", Ahead.DRAFT: "ahead", Ahead.PIPELINE: "pipeline"}[ahead]
    return "-".join(filter(None, ("lte", policy, mode, "" if tree is Tree.CHAIN else tree.value,
                                  f"T{temperature:g}" if temperature else "", f"s{seed}" if seed else "")))


def lte_spec(args, policy: str, ahead: Ahead, tree: Tree, temperature: float = 0.0, seed: int = 0) -> FleetSpec:
    return FleetSpec(
        name="lte", devices=args.lte_devices, actors=2, actor_num_cpus=0.2, max_new_tokens=48, target="stable",
        seed=seed, temperature=temperature, policy=policy, ahead=ahead, tree=tree, transport=args.transport,
        mix=[{"device_class": "flagship-phone", "share": 0.5, "channel": LTE[0]},
             {"device_class": "midrange-phone", "share": 0.5, "channel": LTE[1]}],
        arrival={"start_within_s": 6, "think_time_s": 6}, duration_s=args.lte_duration)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--actors", type=int, default=4)
    ap.add_argument("--duration", type=float, default=90.0)
    ap.add_argument("--think", type=float, nargs="+", default=[800.0, 400.0],
                    help="mean think time between a device's sessions (s), one scale run each (lighter first); "
                    "first sessions are spread over the same time, so session starts arrive at a steady rate")
    ap.add_argument("--lte-devices", type=int, default=12)
    ap.add_argument("--lte-duration", type=float, default=40.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="fleet seeds of the LTE comparison, one repeat each (the first gets the full tables)")
    ap.add_argument("--lte-runs", nargs="+", choices=[run_dir(*r) for r in LTE_RUNS],
                    help="only these LTE runs (cloud-only always runs: every ratio divides by it)")
    ap.add_argument("--transport", choices=["handle", "direct", "http"], default="handle",
                    help="how the LTE and sampling fleets reach the app (handle: through the router; direct: "
                    "client-side routing straight to the version's replica; http: through the proxy)")
    add_emulate_cloud(ap)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    ap.add_argument("--parts", nargs="+", choices=["scale", "lte", "sampling"], default=["scale", "lte", "sampling"],
                    help="run only these parts (fleet.md then shows only them: use another --out)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    family = paths.family_dir(args.profile)
    start_local_app(family_app_config(family, ["v1", "v2"], emulate_cloud=args.emulate_cloud))
    draft = str(family / "draft")
    scales = [scale_spec(args, think) for think in args.think] if "scale" in args.parts else []
    prompts = fleet_prompts(scale_spec(args, 1.0), family / "draft")
    runs = [run_report(spec, prompts, draft, args.out / "fleet" / f"scale-think{spec.arrival.think_time_s:g}",
                       command="python -m benchmarks.fleet") for spec in scales]
    by_seed = lte_repeats(args, prompts, draft) if "lte" in args.parts else {}
    summaries = by_seed.get(args.seeds[0], [])
    sampled = [run_report(lte_spec(args, *run, SAMPLING_TEMPERATURE), prompts, draft,
                          args.out / "fleet" / run_dir(*run, SAMPLING_TEMPERATURE), command="python -m benchmarks.fleet")
               for run in (SAMPLING_RUNS if "sampling" in args.parts else ())]
    lines = [
        "# Fleet benchmark (local Ray + Serve, CPU)\n",
        f"Command: `python -m benchmarks.fleet {' '.join(sys.argv[1:])}`  \n"
        f"machine: {machine()}; family {args.profile} seed 0, versions v1 (stable) + v2; cloud: "
        f"{cloud_profile_text(args.emulate_cloud)}\n",
        *(scale_section(args, scales, runs) if runs else []), *(lte_section(args, summaries) if summaries else []),
        *(repeat_section(args, by_seed) if len(by_seed) > 1 else []),
        *([f"## Sampling at temperature {SAMPLING_TEMPERATURE:g} (the same LTE fleet)\n",
           md_table(compare_rows(sampled)), md_table(class_compare_rows(sampled))] if sampled else []),
        "Reports: `docs/results/fleet/scale-think*/report.md`, `docs/results/fleet/lte-*/report.md`.",
    ]
    (args.out / "fleet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"scale_lag_ms": [s["emulation_lag_ms"] for s in runs], "compare": compare_rows(summaries)},
                     indent=1))


def lte_repeats(args, prompts, draft: str) -> dict[int, list[dict]]:
    """seed -> the LTE runs' summaries under that fleet seed (cloud-only last, as in LTE_RUNS)."""
    chosen = [r for r in LTE_RUNS if not args.lte_runs or run_dir(*r) in args.lte_runs or r[0] == "cloud-only"]
    return {seed: [run_report(lte_spec(args, *run, seed=seed), prompts, draft,
                              args.out / "fleet" / run_dir(*run, seed=seed), command="python -m benchmarks.fleet")
                   for run in chosen]
            for seed in args.seeds}


def cloud_profile_text(profile: str | None) -> str:
    if profile is None:
        return "this host's CPU verifying the family (its speed is the host's)"
    c = CLOUD_PROFILES[profile]
    return (f"emulated `{profile}` (each verify batch held to {c.verify_base_ms:g} ms + {c.verify_ms_per_token:g} ms "
            f"per position of its widest round + {c.verify_ms_per_batched_token:g} ms per position of the others; "
            "`cloud_per_round` in each summary)")


def repeat_section(args, by_seed: dict[int, list[dict]]) -> list[str]:
    cloud = ", ".join(f"{cloud_only(runs)['decode_tokens_per_s']:g} (seed {seed})" for seed, runs in by_seed.items())
    return [
        f"## Repeats under {len(by_seed)} fleet seeds (LTE, {args.lte_devices} devices)\n",
        "Speed-up over cloud-only; each seed draws other trace offsets, prompts and arrivals, and divides by its own "
        f"cloud-only run (cloud-only tok/s: {cloud}).\n",
        md_table(repeat_rows(by_seed)),
    ]


def scale_section(args, scales: list[FleetSpec], runs: list[dict]) -> list[str]:
    return [
        f"## Scale: {args.devices} devices over {args.actors} fleet actors\n",
        f"Arrivals: first session uniform within the think time, then exponential think time (mean, per row), "
        f"{scales[0].max_new_tokens} new tokens per session, {args.duration:g} s of arrivals.\n",
        "| think s | devices | sessions | completed | failed | lost | rounds | in session (mean / max) | mid-round "
        "(mean / max) | lag p50 ms | lag p99 ms | lag max ms | lag events | fleet tok/s | per-token p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[scale_row(spec, s) for spec, s in zip(scales, runs)], "",
    ]


def lte_section(args, summaries: list[dict]) -> list[str]:
    return [
        f"## Speculative vs cloud-only on the LTE traces ({LTE[0]}, {LTE[1]}; {args.lte_devices} devices, "
        f"fleet seed {args.seeds[0]}, {args.transport} transport)\n",
        md_table(compare_rows(summaries)), "By device class (the same runs):\n",
        md_table(class_compare_rows(summaries)), "The cloud as the rounds saw it (per round, means):\n",
        md_table([cloud_row(s) for s in summaries]),
    ]


def cloud_row(s: dict) -> dict:
    """The cloud's share of a round as devices saw it, and its parts (`fleet.report.cloud_per_round`)."""
    c = s["cloud_per_round"]
    return {"policy": s["policy"], "ahead": s["ahead"], "tree": s["tree"], "verify batch": s["server_mean_batch"],
            "cloud seen ms": c["seen_ms"], "queue ms": c["queue_ms"], "server verify ms": c["verify_ms"],
            "held ms": c["held_ms"], "rounds held": c["held_rate"], "path ms": c["path_ms"]}


def scale_row(spec: FleetSpec, s: dict) -> str:
    lag, lat = s["emulation_lag_ms"], s["per_token_latency_ms"]
    return (f"| {spec.arrival.think_time_s:g} | {s['devices']} | {s['sessions_started']} | {s['sessions_completed']} | "
            f"{s['sessions_failed']} | {s['sessions_lost']} | {s['rounds']} | {s['in_session']['mean']} / "
            f"{s['in_session']['max']} | {s['mid_round']['mean']} / {s['mid_round']['max']} | {lag['p50']} | "
            f"{lag['p99']} | {lag['max']} | {lag['events']} | {s['fleet_tokens_per_s']} | {lat['p50']} / {lat['p99']} |")


if __name__ == "__main__":
    main()
