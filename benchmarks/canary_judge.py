"""The canary judge replayed on real sessions (`python -m benchmarks.canary_judge [--rounds CSV]`).

A canary's acceptance verdict rests on the sessions that ran on each version. This replays the judge
(`flexspec_serve.canary.judge_canary`) on the sessions of a committed fleet run (per-session accepted and
draft tokens from its `rounds.csv`), drawn at random into a baseline and a candidate stream (the candidate
gets `--weight` of new sessions), judging after every session until the candidate has `--sessions`:

- `same`: both streams draw from the same sessions, as for a candidate that accepts as well as the baseline:
  every rollback is a false one;
- `thinned f`: the candidate's accepted tokens are binomially thinned by f (alpha about f times lower).
  Below the limit's alpha (a tau(K=4) drop of `max_acceptance_drop`) a rollback is right, above it wrong.

Two judges: `rounds` counts rounds only (the windows carry no sessions: the judge before `SessionSpread`),
`sessions` weighs the drop against the spread between sessions (`--z` standard errors). The limit, 20 %
lower tau(K=4), sits near f = 0.7 at the default data's alpha (0.48). No Ray, no models; seeded.
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from collections import defaultdict
from pathlib import Path

from flexspec_serve.canary import CanaryRules, VersionWindow, judge_canary
from flexspec_serve.engine.stats import AcceptanceStats
from flexspec_serve.reports import md_table

DEFAULT_ROUNDS = Path(__file__).resolve().parents[1] / "docs/results/canary_judge_rounds.csv"  # a fleet run's, kept


def load_sessions(path: Path) -> list[AcceptanceStats]:
    """One `AcceptanceStats` per session of a fleet run (its drafting rounds)."""
    by: dict[str, AcceptanceStats] = defaultdict(AcceptanceStats)
    with path.open() as f:
        for row in csv.DictReader(f):
            if int(row["k"]) > 0:
                by[row["session"]].record(int(row["k"]), int(row["accepted"]))
    return [s for s in by.values() if s.draft_tokens]


def thinned(s: AcceptanceStats, f: float, rng: random.Random) -> AcceptanceStats:
    kept = sum(rng.random() < f for _ in range(s.accepted_tokens))
    return AcceptanceStats(rounds=s.rounds, draft_tokens=s.draft_tokens, accepted_tokens=kept,
                           generated_tokens=s.rounds + kept)


def first_rollback(pool, f, rules, counted, weight, max_sessions, rng) -> int | None:
    """Candidate sessions seen when the judge first rolled back (None: it never did)."""
    base, cand = [], []
    while len(cand) < max_sessions:
        s = rng.choice(pool)
        if rng.random() < weight:
            cand.append(thinned(s, f, rng) if f < 1.0 else s)
        else:
            base.append(s)
        if cand and base and judge_canary(rules, 0.0, VersionWindow.of_sessions(base, counted=counted),
                                          VersionWindow.of_sessions(cand, counted=counted)).action == "rollback":
            return len(cand)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=Path, default=DEFAULT_ROUNDS, help="a fleet run's rounds.csv")
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--sessions", type=int, default=40, help="candidate sessions per trial")
    ap.add_argument("--weight", type=float, default=0.3, help="candidate share of new sessions")
    ap.add_argument("--thin", type=float, nargs="+", default=[0.9, 0.8, 0.6, 0.4])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--z", type=float, default=CanaryRules.z, help="standard errors a drop must stand out by")
    args = ap.parse_args()
    pool = load_sessions(args.rounds)
    rows = []
    for min_rounds in (30, 100):  # the demo's and swap benchmark's, and the default
        rules = CanaryRules(min_rounds=min_rounds, z=args.z)
        for f in (1.0, *args.thin):
            row = {"min rounds": min_rounds, "candidate": "same" if f == 1.0 else f"thinned {f:g}"}
            for counted, label in ((False, "rounds"), (True, "sessions")):
                rng = random.Random(args.seed)
                hits = [first_rollback(pool, f, rules, counted, args.weight, args.sessions, rng)
                        for _ in range(args.trials)]
                done = sorted(h for h in hits if h is not None)
                row[f"{label}: rolled back"] = f"{len(done) / len(hits):.1%}"
                row[f"{label}: median sessions"] = done[len(done) // 2] if done else "-"
            rows.append(row)
    repo = Path(__file__).resolve().parents[1]
    shown = args.rounds.resolve().relative_to(repo) if args.rounds.resolve().is_relative_to(repo) else args.rounds
    print(f"# Canary judge on {len(pool)} sessions of `{shown}`\n")
    print(f"Command: `python -m benchmarks.canary_judge {' '.join(sys.argv[1:])}` (trials {args.trials}, up to "
          f"{args.sessions} candidate sessions, weight {args.weight:g}, seed {args.seed})\n")
    print(md_table(rows))


if __name__ == "__main__":
    main()
