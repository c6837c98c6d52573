"""Draft-ahead and pipelining in emulated time (`python -m benchmarks.draft_ahead [--profile default]`).

The same devices, prompts, traces and seeds run three times through the in-process emulator (real frozen
draft, real target, real wire encoding; device, link and cloud times from their models, so this host's CPU
does not enter the figures): once waiting idle for each answer, once drafting ahead during the wait, once
also sending the round drafted ahead before the answer (pipelined). Per
device class and cellular trace: decode tokens/s of the adaptive controller and of fixed K = 4 both ways,
cloud-only, the lookahead hit rate and the energy per token.

The real-time fleet benchmark (`benchmarks.fleet`) runs the same feature through Serve; there the fleet
actors do the extra draft work on this host's two cores, which this benchmark leaves out.
Writes docs/results/draft_ahead.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from flexspec_serve import paths
from flexspec_serve.ahead import Ahead
from flexspec_serve.edge.bench import BenchConfig, Cell, run_bench
from flexspec_serve.edge.channels import trace_names
from flexspec_serve.reports import machine, md_table

CLASSES = ("flagship-phone", "midrange-phone")


MODES = {"idle": Ahead.OFF, "draft-ahead": Ahead.DRAFT, "pipelined": Ahead.PIPELINE}  # column label: mode


def rows(runs: dict[str, list[Cell]]) -> list[dict]:
    by = {(c.device_class, c.setting, c.policy, mode): c for mode, cells in runs.items() for c in cells}
    out = []
    for cls, setting in sorted({(c.device_class, c.setting) for c in runs["idle"]}):
        base = by[(cls, setting, "cloud-only", "idle")].tokens_per_s
        for policy in ("adaptive", "fixed-4"):
            a, b, p = (by[(cls, setting, policy, mode)] for mode in MODES)
            out.append({
                "device class": cls, "trace": setting, "policy": policy,
                **{f"tok/s {mode}": round(c.tokens_per_s, 2) for mode, c in zip(MODES, (a, b, p))},
                **{f"vs cloud-only {mode}": round(c.tokens_per_s / base, 2) for mode, c in zip(MODES, (a, b, p))},
                "lookahead hits ahead / piped": f"{b.lookahead_hits / max(1, b.drafting_rounds):.3f} / "
                                                f"{p.lookahead_hits / max(1, p.drafting_rounds):.3f}",
                "mean K idle / ahead / piped": f"{a.mean_k:.2f} / {b.mean_k:.2f} / {p.mean_k:.2f}",
                "J/token idle / ahead / piped": f"{a.j_per_token:.4f} / {b.j_per_token:.4f} / {p.j_per_token:.4f}",
            })
    return out


def pooled(cells: list[Cell], policy: str) -> float:
    picked = [c for c in cells if c.policy == policy]
    return sum(c.tokens for c in picked) / sum(c.seconds for c in picked)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--devices-per-cell", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    family = paths.family_dir(args.profile)
    traces = tuple(trace_names())
    cfg = dict(family=family, classes=CLASSES, settings=traces, fixed_ks=(4,), devices_per_cell=args.devices_per_cell)
    runs = {mode: run_bench(BenchConfig(**cfg, ahead=ahead)) for mode, ahead in MODES.items()}
    lte = {mode: [c for c in cells if "LTE" in c.setting] for mode, cells in runs.items()}
    base = pooled(lte["idle"], "cloud-only")
    summary = [{"policy": p + ("" if mode == "idle" else f" + {mode}"),
                "LTE decode tok/s (pooled)": round(pooled(lte[mode], p), 2),
                "vs cloud-only": round(pooled(lte[mode], p) / base, 2)}
               for p in ("adaptive", "fixed-4") for mode in MODES]
    lines = [
        "# Draft-ahead and pipelining: drafting, and sending, while the round is on the air (emulated time)\n",
        f"Command: `python -m benchmarks.draft_ahead --profile {args.profile}`  \n"
        f"machine: {machine()}; family {args.profile}, frozen draft against v1; {args.devices_per_cell} devices "
        f"per cell x 48 new tokens, greedy; the same devices, traces and seeds every way\n",
        "## LTE traces, pooled over both phone classes\n", md_table(summary),
        "## Per device class and trace\n", md_table(rows(runs)),
        "`lookahead hits`: drafting rounds whose answer accepted all K and added the draft's own guess d_{K+1}; "
        "the next round then starts with the tokens drafted during the wait. `pipelined`: that next round "
        "was sent as soon as it was drafted, before the answer, and verified after it (the cloud here costs a "
        "round only its `CloudProfile` verify time). Energy counts the draft-ahead work on every round, hit or "
        "miss.",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "draft_ahead.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
