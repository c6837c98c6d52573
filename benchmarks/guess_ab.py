"""A/B/C of how a device drafting ahead guesses the cloud's token, emulated time (`python -m benchmarks.guess_ab`).

- `first`: one guess, d_{K+1}, a draw from q in sampling sessions (the rule two changes ago).
- `second`: a device that drafts ahead on `branches` also continues the guess's runner-up s_{K+1}, so a round
  whose cloud token was s_{K+1} is a lookahead hit too (`flexspec_serve.ahead.second_guess`).
- `now`: and in sampling sessions both guesses are q's top two instead of draws (`DraftProposer._choose`); a
  guess is never sent as a draft, so it need not be a sample. In greedy sessions `now` is `second`.

The second guess applies to draft-ahead on branches, the mode compared at every temperature; at T = 0.8 the
first sampling seed also runs the other drafting-ahead modes, where only the likeliest guesses apply. The same
devices, prompts, traces and seeds every way (`benchmarks.emulated_ab`). Greedy runs generate the same text
every way; sampling runs do not (a hit changes when the session's generator draws), so their differences
carry that noise too. Writes docs/results/guess_ab.md.
"""

from __future__ import annotations

import contextlib

from benchmarks.draft_ahead import CLASSES
from benchmarks.emulated_ab import compare, parse_args, replaced, write_report
from flexspec_serve.ahead import Ahead
from flexspec_serve.edge.bench import BenchConfig, Cell, run_bench
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.tree import Tree


# the second guess applies to the first; the likeliest guesses to every mode's sampling sessions
MODES = {"draft-ahead, branches": (Ahead.DRAFT, Tree.BRANCHES), "draft-ahead, chain": (Ahead.DRAFT, Tree.CHAIN),
         "pipelined, branches": (Ahead.PIPELINE, Tree.BRANCHES), "pipelined, chain": (Ahead.PIPELINE, Tree.CHAIN)}


def first_guess_only():
    """The runner-up of d_{K+1} is never taken."""
    return replaced(DraftProposer, "take_second_guess", staticmethod(lambda s, accepted, token, path=None: False))


def drawn_guesses():
    """Sampling sessions draw their guesses from q, as they draw their drafts."""
    choose = DraftProposer._choose
    return replaced(DraftProposer, "_choose", lambda self, logits, s, runner_up=True, guess=False:
                    choose(self, logits, s, runner_up))


def run(cfg: BenchConfig, arm: str) -> list[Cell]:
    with contextlib.ExitStack() as rules_before:
        if arm in ("first", "second"):
            rules_before.enter_context(drawn_guesses())
        if arm == "first":
            rules_before.enter_context(first_guess_only())
        return run_bench(cfg)


def hits_and_k(arm: str, adaptive: list[Cell]) -> dict:
    out = {}
    for cls in CLASSES:
        mine = [c for c in adaptive if c.device_class == cls]
        drafting, rounds = sum(c.drafting_rounds for c in mine), sum(c.rounds for c in mine)
        hits, k = sum(c.lookahead_hits for c in mine) / max(1, drafting), sum(c.mean_k * c.rounds for c in mine)
        out[f"{cls} {arm}: hits / K"] = f"{hits:.3f} / {k / max(1, rounds):.2f}"
    return out


def main() -> None:
    args = parse_args(__doc__)
    rows = []
    for temperature, seed, modes in ((0.0, 0, ["draft-ahead, branches"]),  # greedy: the seed changes nothing
                                     *((0.8, seed, list(MODES) if seed == args.sampling_seeds[0] else
                                        ["draft-ahead, branches"]) for seed in args.sampling_seeds)):
        rows += [compare(args, label, MODES[label], temperature, seed, run, ("first", "second", "now"), hits_and_k)
                 for label in modes]
    write_report(args, "guess_ab", "Guessing the cloud's token: one drawn guess, a second guess, and q's top two "
                 "(emulated time)", rows,
                 "`hits / K`: lookahead hits per drafting round, and the mean K of all rounds, of the adaptive "
                 "devices. T = 0.8 rows differ by sampling noise as well as by the rules (module docstring).")


if __name__ == "__main__":
    main()
