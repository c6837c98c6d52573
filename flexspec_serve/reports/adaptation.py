"""Adaptation report (`flexspec report adaptation`): FlexSpec's second claim, measured two ways.

1. Emulated (`edge.bench`): every (device class, channel) cell runs the same HumanEval prompts on the real
   family with adaptive K, every fixed K and cloud-only; goodput = generated tokens / emulated seconds,
   energy = J / token. Headlines: adaptive vs the best single fixed K, and vs the best fixed K in hindsight
   per cell (the oracle, within the device's energy budget).
2. End to end through Serve: the load-test summaries of one fleet replayed with the same seeds and
   prompts under each policy (`flexspec loadtest --compare` or `python -m benchmarks.fleet`, which need
   Ray), read from their `summary.json` files when given; this module runs no Serve itself.

Writes `adaptation.md`, `adaptation.csv` and `adaptation.png`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from flexspec_serve.edge.bench import Cell
from flexspec_serve.fleet.report import compare_rows
from flexspec_serve.reports import md_table

CSV_COLUMNS = ("device_class", "setting", "policy", "tokens", "seconds", "tokens_per_s", "j_per_token", "mean_k")


def table_columns(summary: dict) -> list[str]:
    best = summary["best_single_fixed"]
    return ["device_class", "setting", "adaptive tok/s", f"{best} tok/s", "cloud-only tok/s", "accept-adaptive tok/s",
            "oracle fixed K", "adaptive / oracle", "budget J/tok", "adaptive mean K", "adaptive J/tok", f"{best} J/tok",
            "cloud-only J/tok", "winner"]


def serve_comparison(summary_files: list[Path]) -> tuple[list[dict], list[str]]:
    """Rows comparing the policies of one replayed fleet, and the commands that measured them."""
    summaries = [json.loads(Path(f).read_text()) for f in summary_files]
    return compare_rows(summaries), sorted({s.get("command", "") for s in summaries})


def write(out: Path, cells: list[Cell], summary: dict, meta: dict, serve_files: list[Path] = ()) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "adaptation.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for c in cells:
            w.writerow([c.device_class, c.setting, c.policy, c.tokens, round(c.seconds, 4), round(c.tokens_per_s, 3),
                        round(c.j_per_token, 5), round(c.mean_k, 3)])
    lines = [
        "# Adaptation: adaptive draft length vs fixed K vs cloud-only\n",
        f"Command: `{meta['command']}`  \nmachine: {meta['machine']}; family {meta['family']} (seed {meta['seed']}), "
        f"frozen draft against {meta['target']}; {meta['devices_per_cell']} devices per cell (each its own trace "
        f"offset or fading seed) x {meta['max_new']} new tokens; emulated time\n",
        "## Emulated, per device class and channel\n",
        f"- best single fixed K over all cells: **{summary['best_single_fixed']}**",
        f"- adaptive goodput vs it (geometric mean over cells): **{summary['goodput_gain']:+.1%}**",
        f"- adaptive energy per token vs it: **{summary['energy_ratio'] - 1:+.1%}**",
        f"- worst cell, adaptive / best fixed K for that cell: **{summary['worst_vs_oracle']:.3f}** "
        f"({summary['worst_cell']})\n",
        md_table(summary["rows"], table_columns(summary)),
        "![goodput per cell](adaptation.png)\n",
        "## End to end through Serve (a fleet of real-time devices)\n",
    ]
    if serve_files:
        rows, commands = serve_comparison(list(serve_files))
        lines += [f"Measured by `{'`, `'.join(commands)}` (summaries: "
                  + ", ".join(f"`{Path(f).as_posix()}`" for f in serve_files) + ").\n", md_table(rows)]
    else:
        lines += ["Not included in this run: pass `--serve-summaries` with the `summary.json` files of "
                  "`flexspec loadtest --compare` (or `python -m benchmarks.fleet`).\n"]
    (out / "adaptation.md").write_text("\n".join(lines) + "\n")
    _plot(summary, out / "adaptation.png")
    return [out / "adaptation.md", out / "adaptation.csv", out / "adaptation.png"]


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    labels = [f"{r['device_class']}\n{r['setting']}" for r in rows]
    series = ["adaptive tok/s", f"{summary['best_single_fixed']} tok/s", "cloud-only tok/s"]
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.7), 4.5))
    width = 0.8 / len(series)
    for j, name in enumerate(series):
        ax.bar([i + j * width for i in range(len(rows))], [r[name] for r in rows], width, label=name.replace(" tok/s", ""))
    ax.set_xticks([i + width for i in range(len(rows))], labels, rotation=75, fontsize=7)
    ax.set_ylabel("goodput (tokens/s, emulated)")
    ax.legend()
    ax.set_title("FlexSpec adaptive K vs best single fixed K vs cloud-only")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
