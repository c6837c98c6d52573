"""Engine benchmarks (printed tables; `python -m benchmarks.engine [--profile default] [--device cuda]`).

0. on the chosen device, greedy speculative output equals the target's own greedy output (a check, not a
   timing: the engine's first run on a GPU should show it);
1. verify time vs batch size (K = 4 by default, `--k 4 8 16` for more, on a 256-token context, rolled back
   after every call);
2. batched vs one-at-a-time verification throughput at batch 16;
3. speculative vs cloud-only generation, with zero network delay and with an emulated round trip,
   split into draft time, verify time and round trips so it is clear where the win comes from.

Ray-free: it runs where torch and transformers are (a GPU machine without Ray, too).
"""

from __future__ import annotations

import argparse
import time

import torch

from flexspec_serve import paths
from flexspec_serve.engine.generate import reference_greedy, speculative_generate
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
    ap.add_argument("--device", default="cpu", help="where draft and target run: cpu, cuda, cuda:1, ...")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--k", type=int, nargs="+", default=[4], help="draft tokens per verify call (one table each)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fam = paths.family_dir(args.profile) if args.family is None else args.family
    tok = load_tokenizer(f"{fam}/v1")
    draft, target = (load_causal_lm(f"{fam}/{m}", args.dtype, device=args.device) for m in ("draft", "v1"))
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"{args.threads} threads"
    print(f"family {fam}; device {args.device} ({where}); {args.dtype}; torch {torch.__version__}")

    prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in humaneval_problems(16)]
    equal = greedy_check(draft, target, prompts, 48)
    print(f"\ngreedy check: speculative (K = 4) output equals the target's greedy output for {equal}/{len(prompts)} "
          "prompts (48 tokens)")

    verify_tables(Verifier(target, draft), benchmark_contexts(tok, max(args.batches)), args.k, args.batches,
                  args.reps)
    generation_table(draft, target, prompts[:4], args.rtt_ms)
    uplink_table(draft, target, prompts[:4])


def verify_tables(verifier: Verifier, contexts: list[list[int]], ks: list[int], batches: list[int], reps: int
                  ) -> None:
    """Verify time against batch size for each K; then, for the first K, 16 sessions batched against one at
    a time (when batches 1 and 16 were timed)."""
    profiles = {k: cost_profile(verifier, contexts, k, batches=batches, reps=reps) for k in ks}
    for k, per_b in profiles.items():
        rows = [[b, ms, ms / b, b * (k + 1) / ms * 1e3] for b, ms in per_b.items()]
        table(f"verify time vs batch size (K = {k}, 256-token context)",
              ["batch", "ms/call", "ms/session", "verified tok/s"], rows)
    k, per_b = ks[0], profiles[ks[0]]
    if 1 in per_b and 16 in per_b:
        single, batched = per_b[1], per_b[16]
        table(f"batched vs one at a time (16 sessions, K = {k})", ["mode", "ms for 16", "verified tok/s"],
              [["one-at-a-time", 16 * single, 16 * (k + 1) / (16 * single) * 1e3],
               ["batched", batched, 16 * (k + 1) / batched * 1e3],
               ["speedup", 16 * single / batched, ""]])


def generation_table(draft, target, prompts: list[list[int]], rtt_ms: float) -> None:
    """One session at a time (a single device's latency), 64 tokens: cloud-only against K = 4, split into
    draft time, verify time and round trips."""
    rows = []
    for name, k in (("cloud-only", 0), ("speculative-K4", 4)):
        timing = {"draft": 0.0, "verify": 0.0}
        proposer = DraftProposer(draft) if k else None
        if proposer:
            proposer.propose = _timed(proposer.propose, timing, "draft")
        verifier = Verifier(target, draft)
        verifier.verify = _timed(verifier.verify, timing, "verify")
        tokens = rounds = 0
        for i, p in enumerate(prompts):
            res = speculative_generate(proposer, verifier, [p], 64, k, session_prefix=f"{name}{i}")[0]
            tokens += len(res.tokens)
            rounds += res.stats.rounds
        compute_s = (timing["draft"] + timing["verify"]) / 1e3
        rtt_s = rounds * rtt_ms / 1e3
        rows.append([name, rounds, timing["draft"] / tokens, timing["verify"] / tokens, tokens / compute_s,
                     tokens / (compute_s + rtt_s)])
    table(f"speculative vs cloud-only, one session, 64 tokens x {len(prompts)} prompts",
          ["mode", "rounds", "draft ms/tok", "verify ms/tok", "tok/s (0 RTT)", f"tok/s ({rtt_ms:.0f} ms RTT)"], rows)


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


def greedy_check(draft, target, prompts: list[list[int]], n: int) -> int:
    """How many prompts' greedy speculative output (K = 4) equals `target.generate`'s greedy output."""
    out = speculative_generate(DraftProposer(draft), Verifier(target, draft), prompts, n, 4, session_prefix="check")
    return sum(client.tokens == reference_greedy(target, p, n) for p, client in zip(prompts, out))


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
