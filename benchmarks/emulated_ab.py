"""What the emulated A/Bs of one rule share (`opening_ab`, `guess_ab`): an arm that puts the rule before back
for the length of a run, a row of adaptive-over-cloud-only ratios per arm, pooled and per device class, and
their options, setting and report.

Both arms run the in-process emulator (`flexspec_serve.edge.bench`: the real frozen draft and target, the real
wire encoding; device, link and cloud times from their models), so this host's speed does not enter them.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.draft_ahead import CLASSES, pooled
from flexspec_serve import paths
from flexspec_serve.ahead import Ahead
from flexspec_serve.edge.bench import BenchConfig, Cell
from flexspec_serve.edge.channels import trace_names
from flexspec_serve.reports import machine, md_table
from flexspec_serve.tree import Tree


@contextmanager
def replaced(owner: type, name: str, stand_in) -> Iterator[None]:
    """`owner.name` is `stand_in` (a function, staticmethod or property, as stored on the class) for the block."""
    kept = vars(owner)[name]  # as stored: a staticmethod stays one
    setattr(owner, name, stand_in)
    try:
        yield
    finally:
        setattr(owner, name, kept)


def ratio_row(label: str, temperature: float, seed: int, runs: dict[str, list[Cell]],
              extra: Callable[[str, list[Cell]], dict] | None = None) -> dict:
    """Adaptive tokens/s over cloud-only for each arm (`runs`: arm -> cells), pooled and then per class;
    `extra(arm, adaptive cells)` adds columns of an arm's own."""
    out = {"mode": label, "T": temperature, "seed": seed}
    for arm, cells in runs.items():
        out[f"{arm}: vs cloud-only"] = round(pooled(cells, "adaptive") / pooled(cells, "cloud-only"), 3)
    for cls in CLASSES:
        for arm, cells in runs.items():
            mine = [c for c in cells if c.device_class == cls]
            out[f"{cls} {arm}"] = round(pooled(mine, "adaptive") / pooled(mine, "cloud-only"), 3)
    for arm, cells in runs.items():
        if extra is not None:
            out.update(extra(arm, [c for c in cells if c.policy == "adaptive"]))
    return out


def parse_args(doc: str) -> argparse.Namespace:
    """The options every emulated A/B takes (and logging set up for its progress)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--devices-per-cell", type=int, default=16)
    ap.add_argument("--sampling-seeds", type=int, nargs="*", default=[0, 1])
    ap.add_argument("--out", type=Path, default=Path("docs/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return args


def lte_traces() -> tuple[str, ...]:
    return tuple(t for t in trace_names() if "LTE" in t)


def base_config(args: argparse.Namespace) -> dict:
    """`BenchConfig` fields every arm shares: both phone classes on the LTE traces, adaptive and cloud-only."""
    return dict(family=paths.family_dir(args.profile), classes=CLASSES, settings=lte_traces(), fixed_ks=(),
                devices_per_cell=args.devices_per_cell)


def compare(args: argparse.Namespace, label: str, mode: tuple[Ahead, Tree], temperature: float, seed: int,
            run: Callable[[BenchConfig, str], list[Cell]], arms: tuple[str, ...],
            extra: Callable[[str, list[Cell]], dict] | None = None) -> dict:
    """One row: every arm (`run(cfg, arm)`) in one (ahead, tree) mode at one temperature and seed (`ratio_row`)."""
    ahead, tree = mode
    cfg = BenchConfig(**base_config(args), ahead=ahead, tree=tree, temperature=temperature, seed=seed)
    row = ratio_row(label, temperature, seed, {arm: run(cfg, arm) for arm in arms}, extra)
    logging.info("%s", row)
    return row


def write_report(args: argparse.Namespace, name: str, title: str, rows: list[dict], legend: str) -> None:
    """docs/results/<name>.md (under `--out`): the command, the setting, the rows, `legend`; printed too."""
    text = "\n".join([
        f"# {title}\n",
        f"Command: `python -m benchmarks.{name} --profile {args.profile} --devices-per-cell "
        f"{args.devices_per_cell}`  \n"
        f"machine: {machine()}; family {args.profile}, frozen draft against v1; LTE traces "
        f"({', '.join(lte_traces())}), {args.devices_per_cell} devices per (class, trace), one session of 48 new "
        "tokens each from a HumanEval prompt cut to its last 192 tokens; the same devices, traces and seeds in "
        "every arm\n",
        "## Adaptive decode tokens/s over cloud-only, pooled, then per device class\n", md_table(rows), legend,
    ]) + "\n"
    (args.out / f"{name}.md").write_text(text)
    print(text)
