"""`flexspec demo` (what `make demo` runs): the whole system on an embedded local Ray, end to end.

1. build the model family if it is missing (offline, from the standard library's source);
2. start Ray + Serve with two target versions (v1 = stable, v2 = canary alias);
3. run a mixed fleet of emulated edge devices (three classes, real cellular traces and a fading channel)
   through the router;
4. mid-run, hot-swap a third version in through the admin API: add v3, compatibility gate, canary, the
   router promotes it, v1 is drained and deleted; the devices' frozen draft is never touched;
5. print the summary and where the report (tables, plots, swap marks) is.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

log = logging.getLogger("flexspec.demo")
FLEET = Path(__file__).resolve().parent / "fleets" / "demo.yaml"


def add_arguments(p) -> None:
    p.add_argument("--devices", type=int, help="override the demo fleet's device count")
    p.add_argument("--duration", type=float, help="seconds of session arrivals (default: the fleet file's)")
    p.add_argument("--swap-at", type=float, default=15.0, help="seconds into the run when v3 is swapped in")
    p.add_argument("--out", type=Path, default=Path("demo-report"), help="report directory")
    p.add_argument("--port", type=int, default=8000)


def cmd_demo(args) -> int:
    from deployments.cli import family_app_config, start_local_app
    from deployments.loadtest import fleet_prompts, print_summary, run_report
    from deployments.swap import SwapPlan, SwapTrigger
    from flexspec_serve import paths
    from flexspec_serve.config import load_yaml, zoo_profile
    from flexspec_serve.fleet.spec import FleetSpec
    from flexspec_serve.zoo.family import build_family

    family = paths.family_dir(args.profile, args.seed)
    build_family(zoo_profile(args.profile), family, seed=args.seed)  # returns at once when it is there
    spec = load_yaml(FleetSpec, FLEET)
    patch = {k: v for k, v in {"devices": args.devices, "duration_s": args.duration}.items() if v is not None}
    spec = spec.model_copy(update=patch)
    token = os.environ.setdefault("FLEXSPEC_ADMIN_TOKEN", secrets.token_urlsafe(24))  # replicas inherit it
    registry = paths.home() / "demo-registry.json"
    registry.unlink(missing_ok=True)
    cfg = family_app_config(family, ["v1", "v2"], registry_path=str(registry), model_root=str(family))
    print(f"starting Ray + Serve with {[v.name for v in cfg.versions]} (stable=v1, canary=v2) ...")
    start_local_app(cfg, args.port)
    url = f"http://127.0.0.1:{args.port}"
    trigger = SwapTrigger(url, token, SwapPlan("v3", str(family / "v3"), weight=0.3, window_s=12, min_rounds=30),
                          args.swap_at)
    print(f"running {spec.devices} devices for {spec.duration_s:g} s; v3 swaps in at {args.swap_at:g} s ...")
    try:
        started = time.monotonic()
        summary = run_report(spec, fleet_prompts(spec, family / "draft"), str(family / "draft"), args.out,
                             command="flexspec demo", on_tick=trigger, edge_model_bytes=draft_bytes(family))
        print_summary(summary, args.out)
        swap = trigger.script
        print(f"hot swap: {swap.outcome if swap else 'not started'}; "
              + "; ".join(f"{e['t_s']:.0f} s {e['label']}" for e in (swap.events if swap else [])))
        edge = summary.get("edge_model_bytes", {})
        print(f"model bytes sent to devices during the run: {edge.get('frozen', 0)} "
              f"(a coupled design would send the draft, {edge.get('per_device', 0) / 1e6:.1f} MB, to each of "
              f"{spec.devices} devices: {edge.get('coupled', 0) / 1e6:.0f} MB)")
        print(f"demo done in {time.monotonic() - started:.0f} s")
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return 0


def draft_bytes(family: Path) -> int:
    """What re-downloading the draft would cost one device: its checkpoint files."""
    return sum(f.stat().st_size for f in (family / "draft").iterdir() if f.is_file())
