"""Compatibility report (`flexspec report compat`): FlexSpec's first claim, measured.

One frozen draft serves every target version that evolved from the shared backbone. For each version:
the frozen draft's acceptance length (tau, K = 4, greedy and sampling at T = 0.8, HumanEval prompts),
next to a draft re-distilled against that version (coupled SD, the upper reference) and next to the
unconstrained version (trained without the backbone constraint, the contrast). Goal: on every
constrained version the frozen draft keeps >= 90 % of the coupled draft's tau, in both modes.

Writes `compat.md`, `compat.png` and `compat.json`. It measures (through `zoo.report`); it trains nothing,
so the family must have been built with coupled drafts (`flexspec zoo build --coupled`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from flexspec_serve.reports import md_table
from flexspec_serve.zoo.manifest import Manifest
from flexspec_serve.zoo.report import PairRow

GOAL_FRACTION = 0.9
PAIR_COLUMNS = tuple(PairRow.__dataclass_fields__)
GOAL_COLUMNS = ("version", "role", "mode", "frozen_tau", "coupled_tau", "frozen_vs_coupled", "goal")


class MissingCoupledDrafts(ValueError):
    """The family has no re-distilled drafts to compare against."""


def require_coupled(family: Path) -> Manifest:
    manifest = Manifest.load(family)
    if not manifest.coupled:
        raise MissingCoupledDrafts(f"family {family} has no coupled drafts: build it with "
                                   f"`flexspec zoo build --profile {manifest.profile} --seed {manifest.seed} --coupled`")
    return manifest


def goal_rows(rows: list[PairRow], manifest: Manifest) -> list[dict]:
    """Frozen vs coupled tau per version and mode; the goal applies to constrained versions only."""
    role = {m.name: m.role for m in manifest.members}
    by_pair = {(r.draft, r.version): r for r in rows}
    out = []
    for r in rows:
        if r.draft != "draft":
            continue
        coupled = by_pair.get((f"coupled/draft-{r.version}", r.version))
        for mode, field in (("greedy", "tau_greedy"), ("sampling", "tau_sampling")):
            frozen = getattr(r, field)
            ref = getattr(coupled, field) if coupled else None
            ratio = round(frozen / ref, 3) if ref else None
            constrained = role[r.version] == "target"
            goal = ("met" if ratio >= GOAL_FRACTION else "missed") if constrained and ratio is not None else "n/a"
            out.append({"version": r.version, "role": role[r.version], "mode": mode, "frozen_tau": frozen,
                        "coupled_tau": ref if ref is not None else "-", "frozen_vs_coupled": ratio if ratio is not None
                        else "-", "goal": goal})
    return out


def write(out: Path, rows: list[PairRow], goals: list[dict], meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    constrained = [g for g in goals if g["goal"] != "n/a"]
    verdict = "met" if constrained and all(g["goal"] == "met" for g in constrained) else "missed"
    worst = min(constrained, key=lambda g: g["frozen_vs_coupled"]) if constrained else None
    lines = [
        "# Frozen-draft compatibility\n",
        f"Command: `{meta['command']}`  \nmachine: {meta['machine']}; family {meta['family']} (profile "
        f"{meta['profile']}, seed {meta['seed']}); versions {', '.join(meta['versions'])}; {meta['prompts']} HumanEval "
        f"prompts x {meta['max_new']} tokens, K = 4, sampling at T = 0.8 (seed 7)\n",
        f"**Goal (frozen >= {GOAL_FRACTION:.0%} of re-distilled on every constrained version, greedy and sampling): "
        f"{verdict}**" + (f"; lowest {worst['frozen_vs_coupled']:.1%} ({worst['version']}, {worst['mode']})."
                          if worst else "."),
        "\n## Frozen vs re-distilled draft (acceptance length tau)\n", md_table(goals, GOAL_COLUMNS),
        "role `target-unconstrained`: a version trained without the backbone constraint, shown as the contrast "
        "(no coupled draft is built for it; the goal does not apply).\n",
        "## Every (draft, version) pair\n", md_table([asdict(r) for r in rows], PAIR_COLUMNS),
        "alpha: teacher-forced agreement on HumanEval prompt + canonical solution and held-out stdlib files "
        "(greedy: argmax match; sampling: sum min(p, q) at T = 0.8); tau_implied_k4 = (1 - alpha^5) / (1 - alpha); "
        "tau_greedy / tau_sampling: measured by speculative decoding; distinct_share: distinct tokens / tokens in "
        "the target's greedy output (a version collapsing into repetition shows here).\n",
        "![acceptance length per version](compat.png)",
    ]
    (out / "compat.md").write_text("\n".join(lines) + "\n")
    (out / "compat.json").write_text(json.dumps({"meta": meta, "goal": verdict, "goals": goals,
                                                 "pairs": [asdict(r) for r in rows]}, indent=1))
    _plot(goals, out / "compat.png")
    return [out / "compat.md", out / "compat.png", out / "compat.json"]


def _plot(goals: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = list(dict.fromkeys(g["version"] for g in goals))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, mode in zip(axes, ("greedy", "sampling")):
        row = {g["version"]: g for g in goals if g["mode"] == mode}
        xs = range(len(versions))
        ax.bar([x - 0.2 for x in xs], [row[v]["frozen_tau"] for v in versions], 0.4, label="frozen draft")
        ax.bar([x + 0.2 for x in xs], [row[v]["coupled_tau"] if row[v]["coupled_tau"] != "-" else 0 for v in versions],
               0.4, label="re-distilled (coupled)")
        ax.set_xticks(list(xs), versions, fontsize=8)
        ax.set_title(f"{mode}, K = 4")
    axes[0].set_ylabel("acceptance length tau")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
