"""A/B of the second guess, emulated time (`python -m benchmarks.second_guess_ab`).

`both` (devices now): a device that drafts ahead on `branches` also continues its guess's runner-up s_{K+1}
during the wait, so a round whose cloud token was s_{K+1} is a lookahead hit too and the next round starts
drafted (`flexspec_serve.ahead.second_guess`). `first` (before): only d_{K+1} counts; such a round's
next one drafts all K. The rule applies to draft-ahead on branches only, so that is the mode compared.

The same devices, prompts, traces and seeds both ways (`benchmarks.emulated_ab`). Greedy runs generate the
same text both ways; sampling runs do not (a hit changes when the session's generator draws), so their
differences carry that noise too. Writes docs/results/second_guess_ab.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks.draft_ahead import CLASSES
from benchmarks.emulated_ab import ratio_row, replaced
from flexspec_serve import paths
from flexspec_serve.ahead import Ahead
from flexspec_serve.edge.bench import BenchConfig, Cell, run_bench
from flexspec_serve.edge.channels import trace_names
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.reports import machine, md_table
from flexspec_serve.tree import Tree


def first_guess_only():
    """The rule before: the runner-up of d_{K+1} is never taken."""
    return replaced(DraftProposer, "take_second_guess", staticmethod(lambda s, accepted, token, path=None: False))


def run(cfg: BenchConfig, arm: str) -> list[Cell]:
    if arm == "both":
        return run_bench(cfg)
    with first_guess_only():
        return run_bench(cfg)


def hits_and_k(arm: str, adaptive: list[Cell]) -> dict:
    out = {}
    for cls in CLASSES:
        mine = [c for c in adaptive if c.device_class == cls]
        drafting = sum(c.drafting_rounds for c in mine)
        out[f"{cls} {arm}: hits / K"] = (f"{sum(c.lookahead_hits for c in mine) / max(1, drafting):.3f} / "
                                         f"{sum(c.mean_k * c.rounds for c in mine) / max(1, sum(c.rounds for c in mine)):.2f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--devices-per-cell", type=int, default=16)
    ap.add_argument("--sampling-seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    lte = tuple(t for t in trace_names() if "LTE" in t)
    base = dict(family=paths.family_dir(args.profile), classes=CLASSES, settings=lte, fixed_ks=(),
                devices_per_cell=args.devices_per_cell, ahead=Ahead.DRAFT, tree=Tree.BRANCHES)
    rows = []
    for temperature, seeds in ((0.0, [0]), (0.8, args.sampling_seeds)):  # greedy: the seed changes nothing
        for seed in seeds:
            cfg = BenchConfig(**base, temperature=temperature, seed=seed)
            runs = {arm: run(cfg, arm) for arm in ("first", "both")}
            rows.append(ratio_row("draft-ahead, branches", temperature, seed, runs, hits_and_k))
            logging.info("%s", rows[-1])
    text = "\n".join([
        "# Second guess: drafting ahead from the guess's runner-up too (emulated time)\n",
        f"Command: `python -m benchmarks.second_guess_ab --profile {args.profile} --devices-per-cell "
        f"{args.devices_per_cell}`  \n"
        f"machine: {machine()}; family {args.profile}, frozen draft against v1; LTE traces ({', '.join(lte)}), "
        f"{args.devices_per_cell} devices per (class, trace), one session of 48 new tokens each from a HumanEval "
        "prompt cut to its last 192 tokens; the same devices, traces and seeds both ways\n",
        "## Adaptive decode tokens/s over cloud-only, pooled, then per device class\n", md_table(rows),
        "`hits / K`: lookahead hits per drafting round, and the mean K of all rounds, of the adaptive devices. "
        "T = 0.8 rows differ by sampling noise as well as by the rule (module docstring).",
    ]) + "\n"
    (args.out / "second_guess_ab.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
