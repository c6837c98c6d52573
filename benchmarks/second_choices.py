"""Second choices in emulated time (`python -m benchmarks.second_choices [--profile default]`).

The same devices, prompts, traces and seeds run twice through the in-process emulator (real frozen draft,
real target, real wire encoding; device, link and cloud times from their models): rounds that send the K
draft tokens as a chain, and rounds that also send each draft step's runner-up beside its token (a token
tree of 2K nodes, verified in one forward pass; no extra draft step, 2K verified positions and more
uplink bytes). Greedy. Per device class and trace: decode tokens/s of the adaptive controller and of fixed
K = 4 both ways, against cloud-only; tokens per round; uplink bytes per token.

`benchmarks.tree_headroom` modelled this tree as `chain-K+1`; this measures it. Devices idle during the
wait here (no draft-ahead or pipelining: those do not combine with trees yet). Writes
docs/results/second_choices.md.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from benchmarks.draft_ahead import CLASSES, pooled
from flexspec_serve import paths
from flexspec_serve.edge.bench import BenchConfig, Cell, run_bench
from flexspec_serve.edge.channels import trace_names
from flexspec_serve.reports import machine, md_table

MODES = {"chain": False, "second choices": True}  # column label: BenchConfig.siblings


def rows(runs: dict[str, list[Cell]]) -> list[dict]:
    by = {(c.device_class, c.setting, c.policy, mode): c for mode, cells in runs.items() for c in cells}
    out = []
    for cls, setting in sorted({(c.device_class, c.setting) for c in runs["chain"]}):
        base = by[(cls, setting, "cloud-only", "chain")].tokens_per_s
        for policy in ("adaptive", "fixed-4"):
            a, b = (by[(cls, setting, policy, mode)] for mode in MODES)
            out.append({
                "device class": cls, "trace": setting, "policy": policy,
                **{f"tok/s {mode}": round(c.tokens_per_s, 2) for mode, c in zip(MODES, (a, b))},
                **{f"vs cloud-only {mode}": round(c.tokens_per_s / base, 2) for mode, c in zip(MODES, (a, b))},
                "tokens/round chain / second": f"{a.tokens / max(1, a.rounds):.2f} / {b.tokens / max(1, b.rounds):.2f}",
                "mean K chain / second": f"{a.mean_k:.2f} / {b.mean_k:.2f}",
                "J/token chain / second": f"{a.j_per_token:.4f} / {b.j_per_token:.4f}",
            })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--devices-per-cell", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = dict(family=paths.family_dir(args.profile), classes=CLASSES, settings=tuple(trace_names()), fixed_ks=(4,),
               devices_per_cell=args.devices_per_cell)
    runs = {mode: run_bench(BenchConfig(**cfg, siblings=siblings)) for mode, siblings in MODES.items()}
    lte = {mode: [c for c in cells if "LTE" in c.setting] for mode, cells in runs.items()}
    base = pooled(lte["chain"], "cloud-only")
    summary = [{"policy": p + ("" if mode == "chain" else f" + {mode}"),
                "LTE decode tok/s (pooled)": round(pooled(lte[mode], p), 2),
                "vs cloud-only": round(pooled(lte[mode], p) / base, 2)}
               for p in ("adaptive", "fixed-4") for mode in MODES]
    lines = [
        "# Second choices: each draft step's runner-up sent beside its token (emulated time)\n",
        f"Command: `python -m benchmarks.second_choices --profile {args.profile}`  \n"
        f"machine: {machine()}; family {args.profile}, frozen draft against v1; {args.devices_per_cell} devices "
        f"per cell x 48 new tokens, greedy; the same devices, traces and seeds both ways; devices idle during "
        "the wait\n",
        "## LTE traces, pooled over both phone classes\n", md_table(summary),
        "## Per device class and trace\n", md_table(rows(runs)),
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "second_choices.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
