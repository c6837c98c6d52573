"""Communication report: what FlexSpec sends over the air (`flexspec report communication`).

1. Per target update: the frozen draft sends nothing to the devices; a coupled design re-distils the draft
   and ships it to every device: its checkpoint size x fleet size, and the time one device needs to
   download it at the median downlink rate of each carried cellular trace.
2. Per generated token: uplink and downlink bytes of real speculative decoding on the family (compact
   encoding, K = 4, greedy and sampling at T = 0.8), next to a naive scheme that ships each draft token's
   probability vector (fp16, the whole vocabulary) so the cloud can run rejection sampling.

Writes `communication.md` and `communication.png`; measures in-process (no network, no Ray).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flexspec_serve.edge.channels import MTU_BYTES, TRACE_DIR, load_trace, trace_names
from flexspec_serve.engine.generate import speculative_generate
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.engine.sampling import SamplingParams
from flexspec_serve.engine.verifier import Verifier
from flexspec_serve.reports import md_table
from flexspec_serve.transport import LocalTransport

UPDATE_COLUMNS = ("trace", "median_down_mbps", "draft_mb", "seconds_per_device", "fleet_gb", "frozen_bytes")
TOKEN_COLUMNS = ("mode", "scheme", "up_bytes_per_token", "down_bytes_per_token", "tau")


@dataclass
class TokenRow:
    mode: str
    scheme: str
    up_bytes_per_token: float
    down_bytes_per_token: float
    tau: float


def median_rate_bps(stamps_ms: np.ndarray) -> float:
    """Median over whole seconds of the trace of its delivery rate (1500-byte opportunities)."""
    per_s = np.bincount((stamps_ms // 1000).astype(np.int64))
    return float(np.median(per_s)) * MTU_BYTES * 8


def update_rows(draft_dir: Path, devices: int) -> list[dict]:
    size = sum(f.stat().st_size for f in draft_dir.iterdir() if f.is_file())
    rows = []
    for name in trace_names():
        rate = median_rate_bps(load_trace(TRACE_DIR / f"{name}.down"))
        rows.append({"trace": name, "median_down_mbps": round(rate / 1e6, 2), "draft_mb": round(size / 1e6, 2),
                     "seconds_per_device": round(size * 8 / rate, 1) if rate else None,
                     "fleet_gb": round(size * devices / 1e9, 2), "frozen_bytes": 0})
    return rows


def token_rows(draft, target, prompts: list[list[int]], max_new: int, k: int = 4) -> list[TokenRow]:
    vocab = int(target.config.vocab_size)
    rows = []
    for mode, sampling in (("greedy", SamplingParams()), ("sampling T=0.8", SamplingParams(0.8, 1.0, 7))):
        up = down = rounds = drafted = 0

        def count(ev):
            nonlocal up, down, rounds, drafted
            up, down, rounds, drafted = up + ev.bytes_up, down + ev.bytes_down, rounds + 1, drafted + ev.k

        res = speculative_generate(DraftProposer(draft), LocalTransport(Verifier(target, draft)), prompts, max_new, k,
                                   sampling=sampling, on_round=count)
        tokens = sum(len(r.tokens) for r in res)
        tau = round(tokens / rounds, 3)
        rows.append(TokenRow(mode, "token ids (FlexSpec, compact)", round(up / tokens, 2), round(down / tokens, 2), tau))
        naive_up = up + drafted * vocab * 2  # plus q_i as fp16 over the vocabulary for every draft token
        rows.append(TokenRow(mode, "ids + draft probability vectors (fp16)", round(naive_up / tokens, 1),
                             round(down / tokens, 2), tau))
    return rows


def write(out: Path, updates: list[dict], tokens: list[TokenRow], meta: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Communication: bytes over the air\n",
        f"Command: `{meta['command']}`  \nmachine: {meta['machine']}; family {meta['family']} (seed {meta['seed']}), "
        f"target {meta['target']}, {meta['prompts']} HumanEval prompts x {meta['max_new']} tokens, K = 4\n",
        f"## Per target update ({meta['devices']} devices)\n",
        md_table(updates, UPDATE_COLUMNS),
        "\nfrozen_bytes: what FlexSpec sends to the devices when a target version changes (the draft never does); "
        "the other columns are what a coupled design (a draft re-distilled per version) would ship.\n",
        "## Per generated token\n",
        md_table([asdict(r) for r in tokens], TOKEN_COLUMNS),
        "\n![bytes per token](communication.png)",
    ]
    (out / "communication.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r.mode}\n{r.scheme.split(' (')[0]}" for r in tokens]
    ax.bar(range(len(tokens)), [r.up_bytes_per_token for r in tokens], label="uplink")
    ax.bar(range(len(tokens)), [r.down_bytes_per_token for r in tokens], bottom=[r.up_bytes_per_token for r in tokens],
           label="downlink")
    ax.set(yscale="log", ylabel="bytes per generated token", title="Bytes per token: ids vs probability vectors")
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "communication.png", dpi=110)
    plt.close(fig)
    return [out / "communication.md", out / "communication.png"]
