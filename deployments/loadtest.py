"""`flexspec loadtest`: run a fleet of emulated edge devices (Ray actors) against a running app, show live
progress, and write the report (`flexspec_serve.fleet.report`). `--compare` replays the same fleet, seeds
and prompts with other policies (fixed K, cloud-only) and adds the comparison table.

`--start-app` starts an embedded local Ray + Serve with the family's versions first (self-contained runs);
otherwise it joins `--address` (default `auto`: the Ray that `flexspec serve up` started)."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from flexspec_serve.ahead import Ahead
from flexspec_serve.tree import Tree

log = logging.getLogger("flexspec.loadtest")


def register(sub) -> None:
    from deployments.cli import add_emulate_cloud

    p = sub.add_parser("loadtest", help="load-test a running app with a fleet of emulated edge devices")
    p.add_argument("--fleet", type=Path, required=True, help="fleet spec YAML (see deployments/fleets/)")
    p.add_argument("--devices", type=int, help="override the fleet's device count")
    p.add_argument("--duration", type=float, help="override the fleet's duration (s of session arrivals)")
    p.add_argument("--policy", help="override the fleet's policy (adaptive | fixed-K | cloud-only | accept-adaptive)")
    p.add_argument("--transport", choices=["handle", "direct", "http"], help="override the fleet's transport")
    p.add_argument("--ahead", choices=[a.value for a in Ahead],
                   help="override the fleet's ahead: what devices do while a round waits (off; draft: draft-ahead; "
                   "pipeline: also send the round drafted ahead before the answer, verified only after a hit)")
    p.add_argument("--tree", choices=[t.value for t in Tree],
                   help="override the fleet's draft shape: chain; second: each draft step's runner-up "
                   "too; branches: each runner-up also continued by the draft")
    p.add_argument("--compare", nargs="*", metavar="POLICY",
                   help="also replay the fleet with these policies (default: fixed-4 cloud-only)")
    p.add_argument("--out", type=Path, default=Path("loadtest-out"), help="report directory")
    p.add_argument("--profile", default="default", help="model family whose frozen draft the devices run")
    p.add_argument("--address", default="auto", help="Ray cluster to join (ignored with --start-app)")
    p.add_argument("--start-app", action="store_true", help="start an embedded Ray + Serve with the family first")
    p.add_argument("--versions", nargs="+", default=["v1", "v2"], help="versions for --start-app")
    add_emulate_cloud(p, "with --start-app: ")
    p.set_defaults(func=cmd_loadtest)


def load_spec(args):
    from flexspec_serve.config import load_yaml
    from flexspec_serve.fleet.spec import FleetSpec

    spec = load_yaml(FleetSpec, args.fleet)
    patch = {k: v for k, v in {"devices": args.devices, "duration_s": args.duration, "policy": args.policy,
                               "transport": args.transport, "ahead": args.ahead,
                               "tree": args.tree}.items() if v is not None}
    return FleetSpec.model_validate({**spec.model_dump(), **patch}) if patch else spec


def fleet_prompts(spec, draft_dir: Path) -> list[list[int]]:
    from flexspec_serve.fleet.prompts import load_prompt_texts, tokenize_prompts
    from flexspec_serve.zoo.loading import load_tokenizer

    return tokenize_prompts(load_prompt_texts(spec.prompts), load_tokenizer(draft_dir), spec.max_prompt_tokens)


def fleet_api_key(spec) -> str | None:
    """The fleet's own key (its `api_key_file`), else $FLEXSPEC_API_KEY, else none."""
    if spec.api_key_file:
        key = Path(spec.api_key_file).expanduser().read_text().strip()
        if not key:
            raise ValueError(f"api_key_file {spec.api_key_file} is empty")
        return key
    return os.environ.get("FLEXSPEC_API_KEY")


def run_fleet(spec, prompts: list[list[int]], draft_path: str, api_key: str | None = None,
              on_tick: Callable[[float], list[dict] | None] | None = None, show_progress: bool = True):
    """Run one fleet to the end; returns (merged ShardResult, wall seconds, events marked by `on_tick`)."""
    import ray

    from deployments.fleet import FleetActor
    from flexspec_serve.fleet.report import merge

    actors = [FleetActor.options(num_cpus=spec.actor_num_cpus).remote(spec.model_dump(), shard, prompts, draft_path,
                                                                      api_key)
              for shard in spec.shards()]
    try:
        ray.get([a.ready.remote() for a in actors])
        epoch = time.time() + 0.5
        pending = [a.run.remote(epoch) for a in actors]
        refs, events = list(pending), []
        with _Progress(spec, show_progress) as bar:
            while pending:
                _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
                t_s = time.time() - epoch
                bar.update(t_s, [c for c in ray.get([a.progress.remote() for a in actors]) if c])
                if on_tick:
                    events += on_tick(t_s) or []
        results = ray.get(refs)
        if hasattr(on_tick, "finish"):  # e.g. a hot swap still draining the old version
            events += on_tick.finish()
    finally:
        for a in actors:
            ray.kill(a)
    return merge(results), time.time() - epoch, events


class _Progress:
    """A rich progress bar over the arrival window: sessions, devices mid-round, tokens/s, failures."""

    def __init__(self, spec, enabled: bool):
        self.spec, self.enabled, self.last = spec, enabled, (0.0, 0)
        self.live = enabled and sys.stderr.isatty()  # else a log line every 10 s
        self.next_log = 0.0

    def __enter__(self):
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                                     TextColumn("{task.fields[stats]}"))
            self.progress.start()
            self.task = self.progress.add_task(f"{self.spec.devices} devices", total=self.spec.duration_s, stats="")
        return self

    def update(self, t_s: float, counters: list[dict]) -> None:
        if not self.enabled or not counters:
            return
        total = {k: sum(c[k] for c in counters) for k in counters[0]}
        t0, tok0 = self.last
        rate = (total["tokens"] - tok0) / max(t_s - t0, 1e-6)
        self.last = (t_s, total["tokens"])
        stats = (f"{total['in_session']} in session, {total['mid_round']} mid-round, {rate:.0f} tok/s, "
                 f"{total['sessions_completed']} done, {total['sessions_failed']} failed, {total['retries']} retries")
        desc = f"{self.spec.devices} devices" + (" (draining)" if t_s > self.spec.duration_s else "")
        if self.live:
            self.progress.update(self.task, completed=min(t_s, self.spec.duration_s), stats=stats, description=desc)
        elif t_s >= self.next_log:
            self.next_log = t_s + 10.0
            log.info("%.0f s: %s: %s", t_s, desc, stats)

    def __exit__(self, *exc):
        if self.live:
            self.progress.stop()


def run_report(spec, prompts, draft_path: str, out: Path, compare: list[str] | None = None, command: str = "",
               api_key: str | None = None, on_tick=None, show_progress: bool = True,
               edge_model_bytes: int | None = None) -> dict:
    """The main run (+ the --compare replays), the report files; returns the main run's summary."""
    from flexspec_serve.fleet.report import compare_rows, summarize, write_report
    from flexspec_serve.reports import machine

    def one(s, tick):
        run, wall_s, events = run_fleet(s, prompts, draft_path, api_key, tick, show_progress)
        meta = {"fleet": s.name, "policy": s.policy, "ahead": s.ahead.value, "tree": s.tree.value, "devices": s.devices,
                "actors": len(s.shards()),
                "transport": s.transport, "seed": s.seed, "duration_s": s.duration_s, "wall_s": round(wall_s, 1),
                "command": command, "machine": machine()}
        summary = summarize(run, meta, events)
        if edge_model_bytes is not None:  # the protocol has no message that carries model data to a device
            summary["edge_model_bytes"] = {"frozen": 0, "per_device": edge_model_bytes,
                                           "coupled": edge_model_bytes * s.devices,
                                           "downlink_round_bytes": sum(r["bytes_down"] for r in run.rounds)}
        return run, summary

    run, summary = one(spec, on_tick)
    table = None
    if compare:
        summaries = [summary]
        for policy in compare:
            other = spec.model_copy(update={"policy": policy})
            other_run, other_summary = one(other, None)
            write_report(out / policy, other_run, other_summary)
            summaries.append(other_summary)
        table = compare_rows(summaries)
    write_report(out, run, summary, table)
    return summary | ({"compare": table} if table else {})


def cmd_loadtest(args) -> int:

    import ray

    from flexspec_serve import paths

    spec = load_spec(args)
    family = paths.family_dir(args.profile)
    if not (family / "manifest.json").exists():
        raise FileNotFoundError(f"no model family at {family}: run `flexspec zoo build --profile {args.profile}`")
    prompts = fleet_prompts(spec, family / "draft")
    compare = None if args.compare is None else (args.compare or ["fixed-4", "cloud-only"])
    if args.start_app:
        from deployments.cli import family_app_config, start_local_app

        start_local_app(family_app_config(family, args.versions, emulate_cloud=args.emulate_cloud))
    else:
        ray.init(address=args.address, log_to_driver=False, configure_logging=False)
    try:
        summary = run_report(spec, prompts, str(family / "draft"), args.out, compare,
                             command="flexspec " + " ".join(sys.argv[1:]), api_key=fleet_api_key(spec))
    finally:
        if args.start_app:
            from ray import serve

            serve.shutdown()
        ray.shutdown()
    print_summary(summary, args.out)
    return 0 if summary["sessions_failed"] == 0 and summary["sessions_lost"] == 0 else 1


def print_summary(summary: dict, out: Path) -> None:
    from flexspec_serve.cli import print_table

    lat, lag = summary["per_token_latency_ms"], summary["emulation_lag_ms"]
    print_table(f"Load test: {summary['devices']} devices, policy {summary['policy']}", [{
        "sessions": summary["sessions_started"], "failed": summary["sessions_failed"], "lost": summary["sessions_lost"],
        "rounds": summary["rounds"], "fleet tok/s": summary["fleet_tokens_per_s"],
        "decode tok/s": summary["decode_tokens_per_s"], "per-token p50/p99 ms": f"{lat['p50']} / {lat['p99']}",
        "tau": summary["acceptance_length"], "lag p99 ms": lag["p99"], "max mid-round": summary["mid_round"]["max"]}])
    print_table("By target version", summary["per_version"])
    if summary.get("compare"):
        print_table("Policies on the same fleet", summary["compare"])
    print(f"report: {out / 'report.md'}")
