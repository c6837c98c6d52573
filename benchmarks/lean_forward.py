"""Engine forward cost with the lean Llama forward against transformers' forward, in one run
(`python -m benchmarks.lean_forward [--profile default] [--threads 1] [--device cuda]`; printed table).

Lean (`flexspec_serve.engine.lean_llama`): the same ops on the same weights, without transformers' mask
building, module calls and output records. Both arms use the engine's cache layer and attention
(`hf_compat.RoomyLayer`, `GROUPED_SDPA`); only the forward differs. The two alternate within the run,
`--repeats` times, and the table shows the median of each:

- verify: `engine.costs.verify_cost_ms`, the target verifying K = 4 for B sessions at the given context;
- draft: one `DraftProposer.propose` of K = 4 for B sessions at that context, per draft step.

Ray-free. Only the timings differ between the two: the tests check that the logits are equal.
"""

from __future__ import annotations

import contextlib

import torch

from benchmarks.cache_copies import compare
from flexspec_serve.engine import hf_compat, lean_llama


@contextlib.contextmanager
def transformers_forward(models: list[torch.nn.Module]):
    """transformers' own forward for the length of the block (a benchmark's baseline)."""
    for m in models:
        lean_llama.forgo(m)
    try:
        yield
    finally:
        for m in models:
            hf_compat.prefer_fast_paths(m)


def main() -> None:
    compare(__doc__, transformers_forward, "lean", check=lean_llama.preferred)


if __name__ == "__main__":
    main()
