"""The load-test report: merge the shards of a run, summarise, and write the files.

Files (under the run's output directory):
- `summary.json`: run settings, totals, latency and lag percentiles, per class and per version tables;
- `rounds.csv`: one row per round (the `RoundRecord` fields; times in ms since the run's start);
- `sessions.jsonl`: one line per session (outcome, version, generated token ids);
- `report.md`: the tables and the plots below; with `--compare`, the comparison of policies;
- plots: `latency_cdf.png` (per-token latency by device class), `tokens_per_s.png` (fleet tokens/s over
  time, version changes marked), `acceptance_by_version.png`, `k_vs_rate.png` (chosen K against the
  uplink rate the device saw), `bytes_energy.png` (bytes and energy per generated token by class).

Draft-ahead figures: `lookahead_hit_rate` (drafting rounds whose cloud token the draft had guessed, all K
accepted) and `predrafted_round_rate` (drafting rounds that started with tokens drafted during the wait);
pipelining adds `pipelined_round_rate` (drafting rounds sent before the previous answer and verified; such
a round's round time runs from that answer to its own, so round times still add up to a session's time).

Per-token latency of a round is its round time divided by the tokens it produced; decode tokens/s is
tokens over the time devices spent in rounds (think time excluded), the speed a user of a device sees.

Controller fit: `model_speed_ratio` is the adaptive controller's expected decode speed over the rounds it
chose (expected tokens over expected round time, `RoundRecord.expected_*`: the round's own draft and wait, as
its `round_ms` measures it) divided by the speed those rounds had; above 1 the model was optimistic. None for
policies without a model.
"""

from __future__ import annotations

import csv
import json
from array import array
from collections import defaultdict
from pathlib import Path

import numpy as np

from flexspec_serve.fleet.records import ShardResult
from flexspec_serve.reports import md_table

PLOTS = ("latency_cdf.png", "tokens_per_s.png", "acceptance_by_version.png", "k_vs_rate.png", "bytes_energy.png")
SUMMARY_FIELDS = ("policy", "devices", "sessions_started", "sessions_completed", "sessions_failed", "sessions_lost",
                  "rounds", "tokens", "fleet_tokens_per_s", "decode_tokens_per_s", "per_token_latency_ms",
                  "round_ms", "acceptance_length", "mean_k", "bytes_up_per_token", "bytes_down_per_token",
                  "energy_j_per_token", "lookahead_hit_rate", "predrafted_round_rate", "pipelined_round_rate",
                  "model_speed_ratio",
                  "emulation_lag_ms",
                  "mid_round", "in_session", "server_mean_batch", "cloud_per_round",
                  "retries", "resyncs",
                  "errors", "device_crashes", "per_class", "per_version", "version_changes")


def merge(shards: list[ShardResult]) -> ShardResult:
    out = ShardResult()
    per_second: dict[int, dict] = defaultdict(lambda: {"in_session": 0, "mid_round": 0, "tokens": 0, "rounds": 0})
    for s in shards:
        out.rounds += s.rounds
        out.sessions += s.sessions
        for kind, lags in s.lags_by_kind.items():
            out.lags_by_kind.setdefault(kind, array("d")).extend(lags)
        out.sessions_started += s.sessions_started
        out.device_crashes += s.device_crashes
        for row in s.timeline:
            slot = per_second[round(row["t_s"])]
            for key in slot:
                slot[key] += row[key]
    out.timeline = [{"t_s": t, **v} for t, v in sorted(per_second.items())]
    out.draft_mean_batch = round(float(np.mean([s.draft_mean_batch for s in shards])), 3) if shards else 0.0
    return out


def _pct(values, qs=(50, 90, 99)) -> dict:
    if len(values) == 0:
        return {f"p{q}": None for q in qs}
    arr = np.asarray(values, dtype=float)
    return {f"p{q}": round(float(np.percentile(arr, q)), 2) for q in qs} | {"max": round(float(arr.max()), 2)}


def round_metrics(rounds: list[dict]) -> dict:
    """The per-round figures every table of the report shows, defined once (see the module docstring)."""
    tokens = sum(r["tokens"] for r in rounds)
    busy_s = sum(r["round_ms"] for r in rounds) / 1e3
    drafted = [r for r in rounds if r["k"] > 0]
    per_token = np.repeat([r["round_ms"] / r["tokens"] for r in rounds], [r["tokens"] for r in rounds]) if rounds else []
    return {
        "rounds": len(rounds), "tokens": tokens,
        "decode_tokens_per_s": round(tokens / busy_s, 2) if busy_s else 0.0,
        "per_token_latency_ms": _pct(per_token),
        "acceptance_length": round(sum(r["tokens"] for r in drafted) / len(drafted), 3) if drafted else None,
        "mean_k": round(sum(r["k"] for r in rounds) / len(rounds), 3) if rounds else 0.0,
        "bytes_up_per_token": round(sum(r["bytes_up"] for r in rounds) / max(1, tokens), 2),
        "bytes_down_per_token": round(sum(r["bytes_down"] for r in rounds) / max(1, tokens), 2),
        "energy_j_per_token": round(sum(r["energy_j"] for r in rounds) / max(1, tokens), 4),
        # draft-ahead: share of drafting rounds whose answer the draft had guessed, and of those that
        # started with tokens drafted during the previous wait
        "lookahead_hit_rate": round(sum(r["lookahead_hit"] for r in drafted) / len(drafted), 3) if drafted else None,
        "predrafted_round_rate": round(sum(r["predrafted"] > 0 for r in drafted) / len(drafted), 3) if drafted else None,
        # pipelining: share of drafting rounds sent before the previous round's answer (and verified)
        "pipelined_round_rate": round(sum(r.get("pipelined", False) for r in drafted) / len(drafted), 3)
        if drafted else None,
        "model_speed_ratio": model_speed_ratio(rounds),
    }


def model_speed_ratio(rounds: list[dict]) -> float | None:
    """Expected over realized decode speed of the rounds a model-based policy chose (see the module docstring)."""
    modelled = [r for r in rounds if r.get("expected_round_ms") is not None]
    expected_ms = sum(r["expected_round_ms"] for r in modelled)
    realized_ms = sum(r["round_ms"] for r in modelled)
    if not modelled or not expected_ms or not realized_ms:
        return None
    expected = sum(r["expected_tokens"] for r in modelled) / expected_ms
    return round(expected / (sum(r["tokens"] for r in modelled) / realized_ms), 3)


def _group(rounds: list[dict], key: str) -> list[dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rounds:
        groups[r[key]].append(r)
    rows = []
    for name, rs in sorted(groups.items()):
        m = round_metrics(rs)
        rows.append({key: name, "rounds": m["rounds"], "tokens": m["tokens"],
                     "decode_tokens_per_s": m["decode_tokens_per_s"],
                     "per_token_latency_p50_ms": m["per_token_latency_ms"]["p50"],
                     "acceptance_length": m["acceptance_length"], "mean_k": m["mean_k"],
                     "energy_j_per_token": m["energy_j_per_token"], "bytes_up_per_token": m["bytes_up_per_token"],
                     "model_speed_ratio": m["model_speed_ratio"]})
    return rows


def summarize(run: ShardResult, meta: dict, events: list[dict] | None = None) -> dict:
    rounds, sessions = run.rounds, run.sessions
    m = round_metrics(rounds)
    span_s = (max(r["t_start_ms"] + r["round_ms"] for r in rounds) - min(r["t_start_ms"] for r in rounds)) / 1e3 \
        if rounds else 0.0
    errors: dict[str, int] = defaultdict(int)
    for s in sessions:
        if s["error"]:
            errors[s["error"].split(":")[0]] += 1
    started = run.sessions_started
    timeline = run.timeline
    return {
        **meta, "sessions_started": started,
        "sessions_completed": sum(s["completed"] for s in sessions),
        "sessions_failed": sum(not s["completed"] for s in sessions),
        "sessions_lost": started - len(sessions),  # started but never reported back
        **m, "fleet_tokens_per_s": round(m["tokens"] / span_s, 2) if span_s else 0.0,
        "round_ms": _pct([r["round_ms"] for r in rounds]),
        "emulation_lag_ms": {**_pct(lags := run.lags_ms), "events": len(lags),
                             "by_kind": {kind: {**_pct(lags, (99,)), "events": len(lags)}
                                         for kind, lags in run.lags_by_kind.items() if lags}},
        "mid_round": {"mean": round(float(np.mean([t["mid_round"] for t in timeline])), 1) if timeline else 0,
                      "max": max((t["mid_round"] for t in timeline), default=0)},
        "in_session": {"mean": round(float(np.mean([t["in_session"] for t in timeline])), 1) if timeline else 0,
                       "max": max((t["in_session"] for t in timeline), default=0)},
        "draft_mean_batch": run.draft_mean_batch,
        "server_mean_batch": round(float(np.mean([r["batch_size"] for r in rounds])), 2) if rounds else None,
        "cloud_per_round": cloud_per_round(rounds),
        "retries": sum(r["attempts"] - 1 for r in rounds), "resyncs": sum(s["resyncs"] for s in sessions),
        "errors": dict(errors), "device_crashes": run.device_crashes[:20], "per_class": _group(rounds, "device_class"), "per_version": _group(rounds, "version"),
        "version_changes": version_changes(rounds, events or []),
    }


def cloud_per_round(rounds: list[dict]) -> dict | None:
    """Means per round of the cloud's share of round time as the device saw it (uplink arrival to downlink
    start), split into the server's queue, its forward passes, an emulated cloud's hold
    (`VersionSpec.emulate_cloud`), and the rest: `path_ms`, the hops between device and replica (handles,
    router, event loops; with any emulation lag). `held_rate`: share of rounds held; the others' batches took
    the host longer than the emulated profile."""
    if not rounds:
        return None
    mean = {k: float(np.mean([r[col] for r in rounds])) for k, col in (
        ("seen_ms", "verify_ms"), ("queue_ms", "queue_ms"), ("verify_ms", "server_verify_ms"),
        ("held_ms", "server_held_ms"))}
    mean["path_ms"] = mean["seen_ms"] - mean["queue_ms"] - mean["verify_ms"] - mean["held_ms"]
    return {**{k: round(v, 2) for k, v in mean.items()},
            "held_rate": round(float(np.mean([r["server_held_ms"] > 0 for r in rounds])), 3)}


def cloud_text(s: dict) -> str:
    c = s["cloud_per_round"]
    if c is None:
        return ""
    held = f", held {c['held_ms']} ms ({c['held_rate']:.0%} of rounds; emulated cloud)" if c["held_ms"] else ""
    return (f" The cloud's share of a round, as devices saw it: {c['seen_ms']} ms: queue {c['queue_ms']}, verify "
            f"{c['verify_ms']}{held}, path {c['path_ms']} (handles, router, event loops).")


def version_changes(rounds: list[dict], events: list[dict]) -> list[dict]:
    """When each version first served a round, plus the run's own events (e.g. a hot swap)."""
    first: dict[str, float] = {}
    for r in sorted(rounds, key=lambda r: r["t_start_ms"]):
        first.setdefault(r["version"], r["t_start_ms"])
    marks = [{"t_s": round(t / 1e3, 2), "label": f"{v} serves"} for v, t in first.items()]
    return sorted(marks + [{"t_s": e["t_s"], "label": e["label"]} for e in events], key=lambda m: m["t_s"])


def write_report(out: Path, run: ShardResult, summary: dict, compare: list[dict] | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary | ({"compare": compare} if compare else {}), indent=2))
    if run.rounds:
        with (out / "rounds.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(run.rounds[0]))
            writer.writeheader()
            writer.writerows(sorted(run.rounds, key=lambda r: r["t_start_ms"]))
    with (out / "sessions.jsonl").open("w") as fh:
        for s in run.sessions:
            fh.write(json.dumps(s) + "\n")
    from flexspec_serve.fleet import plots

    written = plots.write_all(out, run, summary)
    (out / "report.md").write_text(markdown(summary, compare, [p.name for p in written]))
    return [out / n for n in ("summary.json", "rounds.csv", "sessions.jsonl", "report.md")] + written


def run_label(s: dict) -> str:
    """A run's policy, and whether its devices drafted ahead, pipelined or sent second choices (cloud-only rounds draft nothing)."""
    if s["policy"] == "cloud-only":
        return s["policy"]
    return (s["policy"] + {"pipeline": " + pipelined", "draft": " + draft-ahead"}.get(s.get("ahead"), "")
            + {"second": " + second choices", "branches": " + branches"}.get(s.get("tree"), ""))


def cloud_only(summaries: list[dict]) -> dict | None:
    """The cloud-only run among `summaries`, the one every speed-up divides by (None when there is none)."""
    return next((s for s in summaries if s["policy"] == "cloud-only"), None)


def speedup(s: dict, base: dict | None) -> float | None:
    """Run `s`'s decode speed over the cloud-only run `base`'s, unrounded (None without a base)."""
    return None if base is None else s["decode_tokens_per_s"] / base["decode_tokens_per_s"]


def class_speedups(s: dict, base: dict | None) -> dict[str, float]:
    """Per device class, run `s`'s decode speed over that class's in the cloud-only run `base`, unrounded."""
    base_cls = {c["device_class"]: c["decode_tokens_per_s"] for c in base["per_class"]} if base else {}
    return {c["device_class"]: c["decode_tokens_per_s"] / base_cls[c["device_class"]]
            for c in s["per_class"] if base_cls.get(c["device_class"])}


def compare_rows(summaries: list[dict]) -> list[dict]:
    """One row per policy; speed-ups against the cloud-only run when there is one."""
    base = cloud_only(summaries)
    rows = []
    for s in summaries:
        row = {"policy": run_label(s), "decode tok/s": s["decode_tokens_per_s"],
               "per-token p50 ms": s["per_token_latency_ms"]["p50"], "per-token p99 ms": s["per_token_latency_ms"]["p99"],
               "tau": s["acceptance_length"], "mean K": s["mean_k"], "J/token": s["energy_j_per_token"],
               "uplink B/token": s["bytes_up_per_token"], "lookahead hits": s.get("lookahead_hit_rate"),
               "pipelined rounds": s.get("pipelined_round_rate"),
               "failed sessions": s["sessions_failed"]}
        ratio = speedup(s, base)
        if ratio is not None:
            row["vs cloud-only"] = round(ratio, 2)
        rows.append(row)
    return rows


def class_compare_rows(summaries: list[dict]) -> list[dict]:
    """Decode tokens/s per device class and policy, with the speed-up over cloud-only for that class."""
    base = cloud_only(summaries)
    rows = []
    for s in summaries:
        by_class = class_speedups(s, base)
        for c in s["per_class"]:
            row = {"device class": c["device_class"], "policy": run_label(s), "decode tok/s": c["decode_tokens_per_s"],
                   "tau": c["acceptance_length"], "mean K": c["mean_k"],
                   "model / realized speed": c.get("model_speed_ratio")}
            if c["device_class"] in by_class:
                row["vs cloud-only"] = round(by_class[c["device_class"]], 2)
            rows.append(row)
    return sorted(rows, key=lambda r: r["device class"])


def repeat_rows(runs_by_seed: dict[int, list[dict]]) -> list[dict]:
    """Speed-up over cloud-only per policy across repeats of one comparison under other seeds (other trace
    offsets, prompts and arrivals): each repeat divides by its own cloud-only run, then the ratios are
    averaged, overall and per device class; `sd` is their sample standard deviation across the seeds (None
    from one seed). A policy missing from a repeat is left out of that repeat."""
    ratios: dict[str, dict[int, float]] = defaultdict(dict)
    per_class: dict[tuple[str, str], list[float]] = defaultdict(list)
    for seed, summaries in runs_by_seed.items():
        base = cloud_only(summaries)
        if base is None:
            raise ValueError(f"the repeat under seed {seed} has no cloud-only run to divide by")
        for s in summaries:
            ratios[run_label(s)][seed] = speedup(s, base)
            for cls, r in class_speedups(s, base).items():
                per_class[(run_label(s), cls)].append(r)
    classes = sorted({cls for _, cls in per_class})
    rows = []
    for label, by_seed in ratios.items():
        vals = list(by_seed.values())
        sd = round(float(np.std(vals, ddof=1)), 2) if len(vals) > 1 else None
        row = {"policy": label, **{f"seed {seed}": round(v, 2) for seed, v in by_seed.items()},
               "mean": round(float(np.mean(vals)), 2), "sd": sd, "min": round(min(vals), 2), "max": round(max(vals), 2)}
        for cls in classes:
            row[f"{cls} mean"] = round(float(np.mean(per_class[(label, cls)])), 2) if per_class[(label, cls)] else None
        rows.append(row)
    return rows


def _by_kind(lag: dict) -> str:
    return ", ".join(f"{kind} {v['p99']} ms" for kind, v in lag.get("by_kind", {}).items()) or "none"


def markdown(s: dict, compare: list[dict] | None, plot_names: list[str]) -> str:
    lag, lat = s["emulation_lag_ms"], s["per_token_latency_ms"]
    lines = [
        f"# Load test: {s.get('fleet', 'fleet')} ({s['policy']})\n",
        f"Command: `{s.get('command', '')}`  \nmachine: {s.get('machine', '')}  \ntransport: {s.get('transport')}, "
        f"{s['devices']} devices over {s.get('actors')} actors, seed {s.get('seed')}, {s.get('duration_s')} s of arrivals\n",
        "| sessions started | completed | failed | lost | rounds | tokens | fleet tok/s | decode tok/s | "
        "per-token p50 / p99 ms | tau | mean K | J/token | uplink B/token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['sessions_started']} | {s['sessions_completed']} | {s['sessions_failed']} | {s['sessions_lost']} | "
        f"{s['rounds']} | {s['tokens']} | {s['fleet_tokens_per_s']} | {s['decode_tokens_per_s']} | {lat['p50']} / "
        f"{lat['p99']} | {s['acceptance_length']} | {s['mean_k']} | {s['energy_j_per_token']} | {s['bytes_up_per_token']} |\n",
        f"Emulation lag over {lag['events']} events: p50 {lag['p50']} ms, p99 {lag['p99']} ms, max {lag['max']} ms "
        f"(p99 by kind: {_by_kind(lag)}). "
        f"Devices mid-round at once: mean {s['mid_round']['mean']}, max {s['mid_round']['max']}; in a session: mean "
        f"{s['in_session']['mean']}, max {s['in_session']['max']}. Devices per draft step (per actor): {s['draft_mean_batch']}; "
        f"verify batch seen by rounds: {s['server_mean_batch']}.{cloud_text(s)} Retries {s['retries']}, resyncs {s['resyncs']}, "
        f"errors {s['errors'] or 'none'}.\n",
        "## By device class\n", md_table(s["per_class"]), "## By target version\n", md_table(s["per_version"]),
        "## Version changes\n", md_table(s["version_changes"]),
    ]
    if compare:
        lines += ["## Policies on the same fleet, seeds and prompts\n", md_table(compare)]
    lines += ["## Plots\n"] + [f"![{n}]({n})" for n in plot_names]
    return "\n".join(lines) + "\n"
