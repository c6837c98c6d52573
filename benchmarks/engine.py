"""Engine benchmarks on CPU (printed tables; `python -m benchmarks.engine [--profile default]`).

1. verify time vs batch size (K = 4 on a 256-token context, rolled back after every call);
2. batched vs one-at-a-time verification throughput at batch 16;
3. speculative vs cloud-only generation, with zero network delay and with an emulated round trip,
   split into draft time, verify time and round trips so it is clear where the win comes from.
"""

from __future__ import annotations

import argparse
import time

import torch

from flexspec_serve import paths
from flexspec_serve.engine.generate import speculative_generate
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.engine.costs import benchmark_contexts, cost_profile
from flexspec_serve.engine.verifier import Verifier
from flexspec_serve.zoo.corpus import humaneval_problems
from flexspec_serve.zoo.loading import load_causal_lm, load_tokenizer


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    print(" | ".join(f"{h:>14}" for h in header))
    for r in rows:
        print(" | ".join(f"{v:>14.2f}" if isinstance(v, float) else f"{v!s:>14}" for v in r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--family", help="family directory (default: the profile's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fam = paths.family_dir(args.profile) if args.family is None else args.family
    tok, draft, target = load_tokenizer(f"{fam}/v1"), load_causal_lm(f"{fam}/draft"), load_causal_lm(f"{fam}/v1")
    print(f"family {fam}; torch threads {args.threads}")

    per_b = cost_profile(Verifier(target, draft), benchmark_contexts(tok, 32), 4, reps=args.reps)
    rows = [[b, ms, ms / b, b * 5 / ms * 1e3] for b, ms in per_b.items()]
    table("verify time vs batch size (K = 4, 256-token context)", ["batch", "ms/call", "ms/session", "verified tok/s"],
          rows)

    single, batched = per_b[1], per_b[16]
    table("batched vs one at a time (16 sessions, K = 4)", ["mode", "ms for 16", "verified tok/s"],
          [["one-at-a-time", 16 * single, 16 * 5 / (16 * single) * 1e3], ["batched", batched, 16 * 5 / batched * 1e3],
           ["speedup", 16 * single / batched, ""]])

    prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in humaneval_problems(4)]
    rows = []
    for name, k in (("cloud-only", 0), ("speculative-K4", 4)):
        timing = {"draft": 0.0, "verify": 0.0}
        proposer = DraftProposer(draft) if k else None
        if proposer:
            proposer.propose = _timed(proposer.propose, timing, "draft")
        verifier = Verifier(target, draft)
        verifier.verify = _timed(verifier.verify, timing, "verify")
        tokens = rounds = 0
        for i, p in enumerate(prompts):  # one session at a time: a single device's latency
            res = speculative_generate(proposer, verifier, [p], 64, k, session_prefix=f"{name}{i}")[0]
            tokens += len(res.tokens)
            rounds += res.stats.rounds
        compute_s = (timing["draft"] + timing["verify"]) / 1e3
        rtt_s = rounds * args.rtt_ms / 1e3
        rows.append([name, rounds, timing["draft"] / tokens, timing["verify"] / tokens, tokens / compute_s,
                     tokens / (compute_s + rtt_s)])
    table(f"speculative vs cloud-only, one session, 64 tokens x {len(prompts)} prompts",
          ["mode", "rounds", "draft ms/tok", "verify ms/tok", "tok/s (0 RTT)", f"tok/s ({args.rtt_ms:.0f} ms RTT)"], rows)
    uplink_table(draft, target, prompts)


def uplink_table(draft, target, prompts) -> None:
    """Encoded uplink size of real rounds (after the first, which carries the prompt), compact vs JSON."""
    from flexspec_serve.transport import LocalTransport

    rows = []
    for k in (2, 4, 8):
        sizes = {}
        for compact in (True, False):
            seen = {"bytes": 0, "drafts": 0, "rounds": 0}

            def count(ev, seen=seen):
                if ev.round_index > 0 and ev.k:
                    seen["bytes"] += ev.bytes_up
                    seen["drafts"] += ev.k
                    seen["rounds"] += 1

            speculative_generate(DraftProposer(draft), LocalTransport(Verifier(target, draft), compact=compact),
                                 prompts, 64, k, on_round=count, session_prefix=f"up{k}{int(compact)}-")
            sizes[compact] = seen
        c, j = sizes[True], sizes[False]
        rows.append([k, c["bytes"] / c["rounds"], c["bytes"] / c["drafts"], j["bytes"] / j["rounds"],
                     j["bytes"] / j["drafts"]])
    table("uplink payload per round after the first (ids only; session id, seq and version included)",
          ["K", "compact B/round", "compact B/draft", "JSON B/round", "JSON B/draft"], rows)


def _timed(fn, acc: dict, key: str):
    def wrapper(*a, **kw):
        started = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[key] += (time.perf_counter() - started) * 1e3

    return wrapper


if __name__ == "__main__":
    main()
