"""Engine forward cost with our cache layer and attention against transformers' defaults, in one run
(`python -m benchmarks.cache_copies [--profile default] [--threads 1] [--device cuda]`; printed table).

Ours (`flexspec_serve.engine.hf_compat`): caches of `RoomyLayer`s (appends in place) and `GROUPED_SDPA`
attention (KV heads grouped inside SDPA). transformers' defaults: `DynamicLayer`'s concatenating update (a
copy of every cached position per layer per forward) and its SDPA attention (with a mask on a CPU, each KV
head repeated for its query heads first). The two alternate within the run, `--repeats` times, and the table
shows the median of each:

- verify: `engine.costs.verify_cost_ms`, the target verifying K = 4 for B sessions at the given context;
- draft: one `DraftProposer.propose` of K = 4 for B sessions at that context, per draft step.

Both arms run the same forward (`engine.lean_llama`'s where it applies; `benchmarks.lean_forward` compares
that one). Ray-free. Only the timings differ between the two: the tests check that the outputs are equal.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from transformers.cache_utils import DynamicLayer

from flexspec_serve import paths
from flexspec_serve.engine import hf_compat
from flexspec_serve.engine.costs import benchmark_contexts, draft_step_times_ms, verify_cost_ms
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.engine.verifier import Verifier
from flexspec_serve.reports import machine, md_table
from flexspec_serve.zoo.loading import load_causal_lm, load_tokenizer


@contextlib.contextmanager
def transformers_defaults(models: list[torch.nn.Module]):
    """transformers' own cache update and SDPA attention, for the length of the block (a benchmark's
    baseline; the engine never does this)."""
    roomy_update = hf_compat.RoomyLayer.update
    hf_compat.RoomyLayer.update = DynamicLayer.update
    for m in models:
        m.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        hf_compat.RoomyLayer.update = roomy_update
        for m in models:
            hf_compat.prefer_fast_paths(m)


def measure(target, draft, contexts: dict[int, list[list[int]]], batches: list[int]) -> dict[tuple, float]:
    out = {}
    for ctx, pool in contexts.items():
        for b in batches:
            out[("verify", ctx, b)] = verify_cost_ms(Verifier(target, draft), pool[:b], k=4)
            out[("draft", ctx, b)] = statistics.median(draft_step_times_ms(DraftProposer(draft), pool[:b]))
    return out


def compare(description: str, baseline: Callable[[list[torch.nn.Module]], contextlib.AbstractContextManager],
            ours: str, check: Callable[[torch.nn.Module], bool] = lambda m: True) -> None:
    """Parse the command line, then time `measure` with the engine's paths (named `ours`) and inside
    `baseline(models)`, alternating, and print the medians' table (`check(model)`: whether ours applies)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--family", help="family directory (default: the profile's)")
    ap.add_argument("--target", default="v1")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (fleet actors and replicas use 1)")
    ap.add_argument("--device", default="cpu", help="where draft and target run: cpu, cuda, cuda:1, ...")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    family = paths.family_dir(args.profile) if args.family is None else Path(args.family)
    target, draft = (load_causal_lm(family / m, device=args.device) for m in (args.target, "draft"))
    if not (check(target) and check(draft)):
        raise SystemExit(f"{ours} does not apply to this family ({family}): nothing to compare")
    tok = load_tokenizer(family / args.target)
    contexts = {c: benchmark_contexts(tok, max(args.batches), c) for c in args.contexts}
    runs: dict[str, list[dict]] = {ours: [], "transformers": []}
    for _ in range(args.repeats):
        runs[ours].append(measure(target, draft, contexts, args.batches))
        with baseline([target, draft]):
            runs["transformers"].append(measure(target, draft, contexts, args.batches))
    med = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    rows = [{"what": what, "context": ctx, "batch": b, "transformers ms": round(med["transformers"][key], 2),
             f"{ours} ms": round(med[ours][key], 2), "speedup": round(med["transformers"][key] / med[ours][key], 2)}
            for key in med[ours] for what, ctx, b in [key]]
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else f"torch threads {args.threads}"
    print(f"machine: {machine()}; family {family.name}, target {args.target}; {args.device} ({where}); "
          f"medians of {args.repeats} alternating repeats\n")
    print(md_table(rows))


def main() -> None:
    compare(__doc__, transformers_defaults, "ours")


if __name__ == "__main__":
    main()
