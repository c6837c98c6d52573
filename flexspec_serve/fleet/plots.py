"""The load-test report's PNG plots (matplotlib, headless). Each function draws one figure from the
merged round records; `write_all` writes the ones the data supports and returns their paths."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_cdf(ax, rounds: list[dict]) -> None:
    by_class: dict[str, list[float]] = defaultdict(list)
    for r in rounds:
        by_class[r["device_class"]] += [r["round_ms"] / r["tokens"]] * r["tokens"]
    for name, values in sorted(by_class.items()):
        v = np.sort(values)
        ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=name)
    ax.set(xscale="log", xlabel="per-token latency (ms)", ylabel="CDF", title="Per-token latency by device class")
    ax.legend(fontsize=8)


def tokens_over_time(ax, rounds: list[dict], marks: list[dict]) -> None:
    ends = np.array([(r["t_start_ms"] + r["round_ms"]) / 1e3 for r in rounds])
    tokens = np.array([r["tokens"] for r in rounds])
    bins = np.arange(0, np.ceil(ends.max()) + 1)
    per_s, _ = np.histogram(ends, bins=bins, weights=tokens)
    ax.plot(bins[:-1], per_s, drawstyle="steps-post")
    for m in marks:
        ax.axvline(m["t_s"], color="tab:red", linestyle="--", linewidth=0.8)
        ax.annotate(m["label"], (m["t_s"], per_s.max() * 0.95 if len(per_s) else 1), rotation=90, fontsize=7,
                    va="top", ha="right")
    ax.set(xlabel="time since start (s)", ylabel="generated tokens/s", title="Fleet tokens/s (versions marked)")


def acceptance_by_version(ax, rounds: list[dict]) -> None:
    groups: dict[str, list[int]] = defaultdict(list)
    for r in rounds:
        if r["k"] > 0:
            groups[r["version"]].append(r["tokens"])
    names = sorted(groups)
    ax.bar(names, [np.mean(groups[n]) for n in names],
           yerr=[np.std(groups[n]) / np.sqrt(len(groups[n])) for n in names], capsize=4)
    ax.set(ylabel="acceptance length tau (accepted + 1)", title="Acceptance length by target version")


def k_vs_rate(ax, rounds: list[dict], rng: np.random.Generator) -> None:
    by_class: dict[str, list[dict]] = defaultdict(list)
    for r in rounds:
        by_class[r["device_class"]].append(r)
    for name, rs in sorted(by_class.items()):
        rate = np.array([max(r["rate_up_bps"], 1.0) for r in rs]) / 1e6
        k = np.array([r["k"] for r in rs]) + rng.uniform(-0.2, 0.2, len(rs))
        ax.scatter(rate, k, s=4, alpha=0.4, label=name)
    ax.set(xscale="log", xlabel="uplink rate reported at round start (Mbit/s)", ylabel="chosen K",
           title="Chosen K against channel rate")
    ax.legend(fontsize=8, markerscale=3)


def bytes_energy(axes, rounds: list[dict]) -> None:
    by_class: dict[str, list[dict]] = defaultdict(list)
    for r in rounds:
        by_class[r["device_class"]].append(r)
    names = sorted(by_class)
    tok = [sum(r["tokens"] for r in by_class[n]) for n in names]
    up = [sum(r["bytes_up"] for r in by_class[n]) / t for n, t in zip(names, tok)]
    down = [sum(r["bytes_down"] for r in by_class[n]) / t for n, t in zip(names, tok)]
    x = np.arange(len(names))
    axes[0].bar(x - 0.2, up, 0.4, label="uplink")
    axes[0].bar(x + 0.2, down, 0.4, label="downlink")
    axes[0].set(xticks=x, ylabel="bytes per generated token", title="Bytes per token")
    axes[0].set_xticklabels(names, rotation=20, fontsize=8)
    axes[0].legend(fontsize=8)
    axes[1].bar(x, [sum(r["energy_j"] for r in by_class[n]) / t for n, t in zip(names, tok)])
    axes[1].set(xticks=x, ylabel="J per generated token", title="Device energy per token")
    axes[1].set_xticklabels(names, rotation=20, fontsize=8)


def write_all(out: Path, run, summary: dict) -> list[Path]:
    if not run.rounds:
        return []
    plt = _plt()
    rounds, written = run.rounds, []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(6, 4))
    latency_cdf(ax, rounds)
    save(fig, "latency_cdf.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    tokens_over_time(ax, rounds, summary["version_changes"])
    save(fig, "tokens_per_s.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    acceptance_by_version(ax, rounds)
    save(fig, "acceptance_by_version.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    k_vs_rate(ax, rounds, np.random.default_rng(0))
    save(fig, "k_vs_rate.png")
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    bytes_energy(axes, rounds)
    save(fig, "bytes_energy.png")
    return written
