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

from collections.abc import Callable

from benchmarks.draft_ahead import CLASSES
from benchmarks.emulated_ab import compare, lte_traces, parse_args, replaced, write_report
from flexspec_serve.ahead import Ahead
from flexspec_serve.edge.bench import BenchConfig, Cell, run_bench
from flexspec_serve.edge.controller import FlexSpecController
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
    args = parse_args(__doc__)
    devices = args.devices_per_cell * len(lte_traces()) * len(CLASSES)
    rows = []
    for temperature, seeds in ((0.0, [0]), (0.8, args.sampling_seeds)):
        for seed in seeds:
            rows += [compare(args, label, mode, temperature, seed, run, ("goodput", "overrun"),
                             cloud_only_rounds(devices)) for label, mode in MODES.items()]
    write_report(args, "opening_ab", "How a session opens: goodput per round vs overrun while the prefill is pending "
                 "(emulated time)", rows,
                 "`cloud-only rounds / session`: rounds the adaptive controller sent without a draft, per session. "
                 "T = 0.8 rows differ by sampling noise as well as by the rule (module docstring).")


if __name__ == "__main__":
    main()
