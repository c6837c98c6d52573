"""A/B of how the adaptive controller opens a session, emulated time (`python -m benchmarks.opening_ab`).

`overrun` (the controller): while the draft's prefill is pending, rounds are ranked by their overrun over
steady rounds, so a session opens cloud-only when that round's wait hides the prompt's prefill for less than
drafting through it (`flexspec_serve.edge.controller`, Prefill). `goodput` (before): every round, the
opening too, takes the K of the highest expected tokens per second of that round alone.

The same devices, prompts, traces and seeds both ways (the in-process emulator: real frozen draft, real target,
real wire encoding; device, link and cloud times from their models, so this host's CPU does not enter the
figures). Greedy runs generate the same text both ways; sampling runs do not (a round boundary moves where the
cloud draws), so their differences carry that noise too. Writes docs/results/opening_ab.md.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

from benchmarks.draft_ahead import CLASSES
from benchmarks.emulated_ab import ratio_row, replaced
from flexspec_serve import paths
from flexspec_serve.ahead import Ahead
from flexspec_serve.edge.bench import BenchConfig, Cell, run_bench
from flexspec_serve.edge.channels import trace_names
from flexspec_serve.edge.controller import FlexSpecController
from flexspec_serve.reports import machine, md_table
from flexspec_serve.tree import Tree

MODES = {"idle, chain": (Ahead.OFF, Tree.CHAIN), "draft-ahead, chain": (Ahead.DRAFT, Tree.CHAIN),
         "draft-ahead, branches": (Ahead.DRAFT, Tree.BRANCHES)}


def goodput_opening():
    """The rule before: rank by the round's own goodput whatever the prefill (the lowest key wins)."""
    return replaced(FlexSpecController, "overrun_ms", staticmethod(lambda row, prefill_ms, steady: -row.tokens_per_s))


def run(cfg: BenchConfig, rule: str) -> list[Cell]:
    if rule == "overrun":
        return run_bench(cfg)
    with goodput_opening():
        return run_bench(cfg)


def cloud_only_rounds(devices: int) -> Callable[[str, list[Cell]], dict]:
    """The opening shows as cloud-only rounds of the adaptive devices (per session: one per device)."""
    return lambda rule, adaptive: {f"{rule}: cloud-only rounds / session": round(
        sum(c.rounds - c.drafting_rounds for c in adaptive) / devices, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--devices-per-cell", type=int, default=16)
    ap.add_argument("--sampling-seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    lte = tuple(t for t in trace_names() if "LTE" in t)
    devices = args.devices_per_cell * len(lte) * len(CLASSES)
    base = dict(family=paths.family_dir(args.profile), classes=CLASSES, settings=lte, fixed_ks=(),
                devices_per_cell=args.devices_per_cell)
    rows = []
    for temperature, seeds in ((0.0, [0]), (0.8, args.sampling_seeds)):
        for seed in seeds:
            for label, (ahead, tree) in MODES.items():
                cfg = BenchConfig(**base, ahead=ahead, tree=tree, temperature=temperature, seed=seed)
                runs = {r: run(cfg, r) for r in ("goodput", "overrun")}
                rows.append(ratio_row(label, temperature, seed, runs, cloud_only_rounds(devices)))
                logging.info("%s", rows[-1])
    text = "\n".join([
        "# How a session opens: goodput per round vs overrun while the prefill is pending (emulated time)\n",
        f"Command: `python -m benchmarks.opening_ab --profile {args.profile} --devices-per-cell "
        f"{args.devices_per_cell}`  \n"
        f"machine: {machine()}; family {args.profile}, frozen draft against v1; LTE traces ({', '.join(lte)}), "
        f"{args.devices_per_cell} devices per (class, trace), one session of 48 new tokens each from a HumanEval "
        "prompt cut to its last 192 tokens; the same devices, traces and seeds both ways\n",
        "## Adaptive decode tokens/s over cloud-only, pooled, then per device class\n", md_table(rows),
        "`cloud-only rounds / session`: rounds the adaptive controller sent without a draft, per session. "
        "T = 0.8 rows differ by sampling noise as well as by the rule (module docstring).",
    ]) + "\n"
    (args.out / "opening_ab.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
