"""In-process generation loops on the engine: speculative (draft + verifier) and cloud-only.

One loop serves every caller (tests, benchmarks, the acceptance report): it advances a list of sessions
round by round, batching draft steps and verification across the sessions still running. K per round
comes from `choose_k(session_index, round_index) -> int`. No network, no channel: see `edge/` for that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.engine.sampling import SamplingParams
from flexspec_serve.engine.stats import AcceptanceStats
from flexspec_serve.engine.verifier import RoundOutcome, Verifier, VerifyRequest


@dataclass
class GenerationResult:
    prompt: list[int]
    tokens: list[int]  # generated tokens only (up to max_new_tokens)
    stats: AcceptanceStats = field(default_factory=AcceptanceStats)
    rounds: list[RoundOutcome] = field(default_factory=list)


def speculative_generate(
    proposer: DraftProposer | None,
    verifier: Verifier,
    prompts: list[list[int]],
    max_new_tokens: int,
    choose_k: Callable[[int, int], int] | int = 4,
    sampling: SamplingParams = SamplingParams(),
    session_prefix: str = "s",
    stop_token: int | None = None,
) -> list[GenerationResult]:
    """Generate for every prompt; `proposer=None` or K = 0 means cloud-only rounds."""
    pick = (lambda i, r: choose_k) if isinstance(choose_k, int) else choose_k
    sessions = [proposer.start(f"{session_prefix}{i}", p, _session_sampling(sampling, i)) if proposer else None
                for i, p in enumerate(prompts)]
    results = [GenerationResult(list(p), []) for p in prompts]
    running, round_idx = list(range(len(prompts))), 0
    while running:
        ks = [0 if proposer is None else max(0, min(pick(i, round_idx), max_new_tokens - len(results[i].tokens) - 1))
              for i in running]
        proposals = proposer.propose([sessions[i] for i in running], ks) if proposer else [None] * len(running)
        requests = []
        for i, prop in zip(running, proposals):
            draft = tuple(prop.tokens) if prop else ()
            first = round_idx == 0
            requests.append(VerifyRequest(
                session_id=f"{session_prefix}{i}", seq=round_idx, draft_tokens=draft,
                full_context=tuple(prompts[i]) if first else None, sampling=_session_sampling(sampling, i)))
        outcomes = verifier.verify(requests)
        still = []
        for i, req, out in zip(running, requests, outcomes):
            if isinstance(out, Exception):
                raise out
            new = list(req.draft_tokens[: out.accepted]) + [out.token]
            if proposer:
                proposer.apply(sessions[i], list(req.draft_tokens), out.accepted, out.token)
            res = results[i]
            res.tokens.extend(new)
            res.stats.record(len(req.draft_tokens), out.accepted)
            res.rounds.append(out)
            done = len(res.tokens) >= max_new_tokens or (stop_token is not None and stop_token in new)
            if not done:
                still.append(i)
        running, round_idx = still, round_idx + 1
    for res in results:
        del res.tokens[max_new_tokens:]
    return results


def _session_sampling(sampling: SamplingParams, i: int) -> SamplingParams:
    return SamplingParams(sampling.temperature, sampling.top_p, sampling.seed * 100_003 + i)
