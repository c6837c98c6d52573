"""Measured verify cost against batch size: what the capacity planner and the engine benchmark use.

`verify_cost_ms(verifier, contexts, k)` times one verify call over len(contexts) sessions with warm caches,
every session kept at the same length (the round's tokens are rolled back after each call), and returns
the median. `cost_profile` does it for several batch sizes. `draft_step_times_ms` times the draft side's
steps. Nothing here decides replicas.
"""

from __future__ import annotations

import statistics
import time

from flexspec_serve.engine import sampling as S
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.engine.verifier import Verifier, VerifyRequest


def benchmark_contexts(tokenizer, n: int, length: int = 256) -> list[list[int]]:
    """`n` real-code contexts of `length` tokens (HumanEval prompts + solutions, windows 37 tokens apart):
    what the engine and serving benchmarks time verification on."""
    from flexspec_serve.zoo.corpus import humaneval_problems

    text = "".join(p.prompt + p.canonical_solution for p in humaneval_problems(60))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i * 37 : i * 37 + length] for i in range(n)]


def verify_cost_ms(verifier: Verifier, contexts: list[list[int]], k: int, reps: int = 5) -> float:
    reqs = [VerifyRequest(f"b{i}", 0, (), full_context=tuple(c)) for i, c in enumerate(contexts)]
    verifier.verify(reqs)  # build the caches
    times, seq = [], 1
    for _ in range(reps):
        for i, c in enumerate(contexts):  # keep every session at the same length: drop last round's tokens
            s = verifier.sessions[f"b{i}"]
            s.tokens = s.tokens[: len(c) + 1]
            s.target.truncate(len(c))
        batch = [VerifyRequest(f"b{i}", seq, tuple(c[1 : k + 1])) for i, c in enumerate(contexts)]
        started = time.perf_counter()
        out = verifier.verify(batch)
        times.append((time.perf_counter() - started) * 1e3)
        failed = [o for o in out if isinstance(o, Exception)]
        if failed:
            raise RuntimeError(f"verify failed while profiling: {failed[0]}")
        seq += 1
    for i in range(len(contexts)):
        verifier.drop_session(f"b{i}")
    return statistics.median(times)


def cost_profile(verifier: Verifier, contexts: list[list[int]], k: int, batches=(1, 2, 4, 8, 16, 32),
                 reps: int = 5) -> dict[int, float]:
    """{batch size: median ms per verify call}; contexts are reused cyclically to fill a batch."""
    return {b: round(verify_cost_ms(verifier, [contexts[i % len(contexts)] for i in range(b)], k, reps), 3)
            for b in batches}


def draft_step_times_ms(proposer: DraftProposer, contexts: list[list[int]], k: int = 4, rounds: int = 4) -> list[float]:
    """ms per draft step of each of `rounds` greedy proposals of K for len(contexts) sessions, after one
    untimed round that feeds the contexts; each round commits 2 of its tokens and the cloud's, as a round
    with a rejection would."""
    sessions = [proposer.start(f"d{i}", c, S.SamplingParams()) for i, c in enumerate(contexts)]
    times = []
    for _ in range(rounds + 1):
        started = time.perf_counter()
        proposer.propose(sessions, [k] * len(sessions))
        times.append((time.perf_counter() - started) * 1e3 / k)
        for s in sessions:
            proposer.apply(s, [t for t, *_ in s.drafted[:k]], 2, 7)
    return times[1:]
