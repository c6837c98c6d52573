"""Token trees in emulated time (`python -m benchmarks.token_trees [--profile default] [--temperature T]`).

The same devices, prompts, traces and seeds run through the in-process emulator (real frozen draft, real
target, real wire encoding; device, link and cloud times from their models) in nine ways: rounds that send
the K draft tokens as a chain, with second choices (each draft step's runner-up beside its token: 2K nodes,
no extra draft step) or with branches (each runner-up also continued by the draft in the same K steps;
`flexspec_serve.tree`), each with the device idle during the wait, drafting ahead, or pipelining. Greedy by
default; `--temperature T` samples (the cloud decides a tree's candidates by recursive rejection sampling,
`engine.sampling`); `--cloud graphs-8b` prices the cloud's verify time as a CUDA-graphs 8B server measured
on an H200 (`edge.devices.CLOUD_PROFILES`; default `eager-8b`). Decode tokens/s against cloud-only, pooled
over the LTE traces for the adaptive controller and fixed K = 4, and per device class and trace for the adaptive
controller; tokens per round.

`benchmarks.tree_headroom` modelled these shapes (`chain-K+1`, `branches-K`); this measures them. Writes
docs/results/token_trees.md (greedy) or token_trees_T<T>.md, with `_<cloud>` added for another cloud profile.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks.draft_ahead import CLASSES, pooled
from flexspec_serve import paths
from flexspec_serve.ahead import Ahead
from flexspec_serve.edge.bench import BenchConfig, Cell, run_bench
from flexspec_serve.edge.channels import trace_names
from flexspec_serve.edge.devices import CLOUD_PROFILES, DEFAULT_CLOUD
from flexspec_serve.reports import machine, md_table
from flexspec_serve.tree import Tree

WAITS = {Ahead.OFF: "", Ahead.DRAFT: " + draft-ahead", Ahead.PIPELINE: " + pipelined"}
MODES = {f"{tree.value}{label}": (ahead, tree) for ahead, label in WAITS.items() for tree in Tree}  # label: (wait, shape)


def rows(runs: dict[str, list[Cell]], policy: str) -> list[dict]:
    """One row per (class, trace): the policy's speed-up against cloud-only in every mode, tokens per round."""
    by = {(c.device_class, c.setting, c.policy, mode): c for mode, cells in runs.items() for c in cells}
    out = []
    for cls, setting in sorted({(c.device_class, c.setting) for c in runs["chain"]}):
        base = by[(cls, setting, "cloud-only", "chain")].tokens_per_s
        cells = {mode: by[(cls, setting, policy, mode)] for mode in MODES}
        out.append({"device class": cls, "trace": setting,
                    **{mode: round(c.tokens_per_s / base, 2) for mode, c in cells.items()},
                    "tokens/round chain / second / branches": " / ".join(
                        f"{cells[t].tokens / max(1, cells[t].rounds):.2f}" for t in ("chain", "second", "branches"))})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--devices-per-cell", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sample at this temperature")
    ap.add_argument("--cloud", default=DEFAULT_CLOUD, choices=sorted(CLOUD_PROFILES),
                    help="the emulated cloud's verify-time profile")
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = dict(family=paths.family_dir(args.profile), classes=CLASSES, settings=tuple(trace_names()), fixed_ks=(4,),
               devices_per_cell=args.devices_per_cell, temperature=args.temperature, cloud=CLOUD_PROFILES[args.cloud])
    runs = {mode: run_bench(BenchConfig(**cfg, ahead=ahead, tree=tree)) for mode, (ahead, tree) in MODES.items()}
    lte = {mode: [c for c in cells if "LTE" in c.setting] for mode, cells in runs.items()}
    base = pooled(lte["chain"], "cloud-only")
    summary = [{"mode": mode, **{f"{p} vs cloud-only": round(pooled(lte[mode], p) / base, 2)
                                 for p in ("adaptive", "fixed-4")}} for mode in MODES]
    sampled, cloud = args.temperature > 0, CLOUD_PROFILES[args.cloud]
    decoding = f"sampling at temperature {args.temperature}" if sampled else "greedy"
    lines = [
        f"# Token trees: second choices and branches against chains (emulated time, {decoding})\n",
        f"Command: `python -m benchmarks.token_trees --profile {args.profile}"
        f"{f' --temperature {args.temperature}' if sampled else ''}"
        f"{f' --cloud {args.cloud}' if args.cloud != DEFAULT_CLOUD else ''}`  \n"
        f"machine: {machine()}; family {args.profile}, frozen draft against v1; {args.devices_per_cell} devices "
        f"per cell x 48 new tokens, {decoding}; the same devices, traces and seeds in every mode; cloud verify "
        f"time {cloud.verify_base_ms} ms + {cloud.verify_ms_per_token} ms per verified position ({args.cloud})\n",
        "## LTE traces, pooled over both phone classes: decode tokens/s against cloud-only\n", md_table(summary),
        "## Adaptive controller, per device class and trace: decode tokens/s against cloud-only\n",
        md_table(rows(runs, "adaptive")),
        "`second`: each draft step's runner-up sent beside its token (2K tree nodes; sampling: drawn from q without "
        "the step's token). `branches`: each runner-up "
        "also continued by the draft, in the same K draft steps (a step over several rows costs one "
        "row's time: a memory-bound phone). `draft-ahead`: the device drafts during the wait, and a lookahead hit "
        "(all K chain tokens accepted and the guess right) starts the next round drafted (its branches grown during "
        "the wait too); `pipelined`: that round is also sent before the answer. A round whose "
        "path leaves the chain is a miss for the lookahead.",
    ]
    text = "\n".join(lines) + "\n"
    name = "token_trees" + (f"_T{args.temperature:g}" if sampled else "") + (
        f"_{args.cloud}" if args.cloud != DEFAULT_CLOUD else "")
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
