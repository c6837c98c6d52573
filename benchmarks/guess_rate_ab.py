"""A/B of the lookahead-hit estimate, emulated time (`python -m benchmarks.guess_rate_ab TEMPERATURE DEVICES_PER_CELL`).

`new`: `AcceptanceEstimator.guess_rate` learns P(lookahead hit | all K accepted) from the hits a device sees.
`old`: that rate is position K+1's acceptance rate (what it is for a greedy chain; the estimate before).
For every (draft-ahead or pipelined) x (chain, second, branches): the adaptive controller's decode tokens/s
against cloud-only, pooled over both phone classes on the LTE traces, the same devices, traces and seeds
both ways. Prints one line per mode (docs/results/guess_rate_ab.log holds the lines of the committed runs).
"""

from __future__ import annotations

import sys

from benchmarks.draft_ahead import CLASSES, pooled
from flexspec_serve import paths
from flexspec_serve.ahead import Ahead
from flexspec_serve.edge import controller as C
from flexspec_serve.edge.bench import BenchConfig, run_bench
from flexspec_serve.edge.channels import trace_names
from flexspec_serve.tree import Tree


def main() -> None:
    temperature, per_cell = float(sys.argv[1]), int(sys.argv[2])
    rates = {"old": lambda self, k: self.position_alpha(k), "new": C.AcceptanceEstimator.guess_rate}
    lte = tuple(t for t in trace_names() if "LTE" in t)
    cfg = dict(family=paths.family_dir("default"), classes=CLASSES, settings=lte, fixed_ks=(),
               devices_per_cell=per_cell, temperature=temperature)
    for ahead in (Ahead.DRAFT, Ahead.PIPELINE):
        for tree in Tree:
            row = {}
            for name, rate in rates.items():
                C.AcceptanceEstimator.guess_rate = rate
                cells = run_bench(BenchConfig(**cfg, ahead=ahead, tree=tree))
                row[name] = round(pooled(cells, "adaptive") / pooled(cells, "cloud-only"), 3)
            print(temperature, ahead.value, tree.value, row, flush=True)


if __name__ == "__main__":
    main()
