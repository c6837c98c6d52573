"""`flexspec plan`: replicas per version for a fleet at a round-latency SLO (registered through the
`flexspec_serve.commands` entry point; the core never imports this package)."""

from __future__ import annotations

import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("plan", help="capacity planner: replicas per target version for a fleet and an SLO")
    p.add_argument("--fleet", type=Path, required=True, help="fleet spec YAML")
    p.add_argument("--devices", type=int, help="override the fleet's device count")
    p.add_argument("--slo-ms", type=float, default=200.0, help="server-side round latency SLO (queue + verify)")
    p.add_argument("--weights", nargs="+", default=["v1=1"], help="version=weight of the fleet's target")
    p.add_argument("--overhead-ms", type=float, default=5.0, help="serving overhead per round outside the engine "
                   "(router, handles, encoding), from `python -m benchmarks.serve`")
    p.add_argument("--alpha", type=float, default=0.6, help="expected per-token acceptance rate")
    p.add_argument("--utilisation", type=float, default=0.7)
    p.add_argument("--cost-file", type=Path, help="JSON {batch: verify ms}; default: measure on the family's v1")
    p.add_argument("--profile", default="default", help="family to measure the verify cost on")
    p.add_argument("--json", type=Path, help="also write the plan as JSON")
    p.set_defaults(func=cmd_plan)


def measured_cost(profile: str) -> dict[int, float]:
    import torch

    from flexspec_serve import paths
    from flexspec_serve.engine.costs import benchmark_contexts, cost_profile
    from flexspec_serve.engine.verifier import Verifier
    from flexspec_serve.zoo.loading import load_causal_lm, load_tokenizer

    torch.set_num_threads(1)  # as in a replica
    family = paths.family_dir(profile)
    tok = load_tokenizer(family / "v1")
    return cost_profile(Verifier(load_causal_lm(family / "v1")), benchmark_contexts(tok, 32), k=4)


def cmd_plan(args) -> int:
    from autoscale.planner import ASSUMPTIONS, plan
    from flexspec_serve.cli import print_table
    from flexspec_serve.config import load_yaml
    from flexspec_serve.fleet.spec import FleetSpec

    spec = load_yaml(FleetSpec, args.fleet)
    if args.devices:
        spec = spec.model_copy(update={"devices": args.devices})
    cost = ({int(k): float(v) for k, v in json.loads(args.cost_file.read_text()).items()} if args.cost_file
            else measured_cost(args.profile))
    weights = {name: float(w) for name, _, w in (item.partition("=") for item in args.weights)}
    demand, plans = plan(spec, cost, weights, args.slo_ms, args.overhead_ms, args.alpha, args.utilisation)
    print_table("Verify cost (ms per call) by batch size", [{str(b): ms for b, ms in cost.items()}])
    print(f"fleet {spec.name}: {spec.devices} devices, {demand.devices_in_session:.1f} in a session on average, "
          f"{demand.rounds_per_s:.1f} rounds/s, {demand.verified_tokens_per_s:.0f} verified tokens/s, mean K "
          f"{demand.mean_k:.2f}")
    print_table(f"Replicas per version (SLO {args.slo_ms:g} ms, overhead {args.overhead_ms:g} ms/round, "
                f"utilisation {args.utilisation:g})", [vars(p) for p in plans])
    print(ASSUMPTIONS)
    if args.json:
        args.json.write_text(json.dumps({"demand": vars(demand), "plans": [vars(p) for p in plans],
                                         "cost_ms": cost}, indent=2))
    return 0
