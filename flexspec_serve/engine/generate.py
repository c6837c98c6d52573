"""In-process generation loop on the engine: speculative (draft + verifier) and cloud-only.

One loop serves every caller (tests, benchmarks, the acceptance report, the edge emulator): it advances
a list of sessions round by round, batching draft steps and verification across the sessions still
running, and sends each round through a transport (the real wire encoding, in-process by default).
K per round comes from `choose_k(session_index, round_index)`; `on_round` sees every finished round.
No channel or clock here: the edge emulator adds those through the two hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from flexspec_serve import protocol as P
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.engine.sampling import SamplingParams
from flexspec_serve.engine.stats import AcceptanceStats
from flexspec_serve.transport import LocalTransport, RoundFailed


@dataclass
class GenerationResult:
    prompt: list[int]
    tokens: list[int]  # generated tokens only (up to max_new_tokens)
    stats: AcceptanceStats = field(default_factory=AcceptanceStats)
    rounds: list = field(default_factory=list)  # RoundResult per round


@dataclass(frozen=True)
class RoundEvent:
    """What `on_round` is told about one finished round of session `index`."""

    index: int
    round_index: int
    k: int
    accepted: int
    prefill_tokens: int  # context tokens the draft had to feed before drafting
    bytes_up: int
    bytes_down: int
    result: object  # protocol.RoundResult


def speculative_generate(
    proposer: DraftProposer | None,
    transport,
    prompts: list[list[int]],
    max_new_tokens: int,
    choose_k: Callable[[int, int], int] | int = 4,
    sampling: SamplingParams = SamplingParams(),
    session_prefix: str = "s",
    stop_token: int | None = None,
    on_round: Callable[[RoundEvent], None] | None = None,
    target: str | None = None,
) -> list[GenerationResult]:
    """Generate for every prompt; `proposer=None` or K = 0 means cloud-only rounds.

    `transport` is a `Transport` or a bare `Verifier` (wrapped in a `LocalTransport`).
    """
    if not hasattr(transport, "round_trip"):
        transport = LocalTransport(transport)
    pick = (lambda i, r: choose_k) if isinstance(choose_k, int) else choose_k
    per_session = [_session_sampling(sampling, i) for i in range(len(prompts))]
    sessions = [proposer.start(f"{session_prefix}{i}", p, per_session[i]) if proposer else None
                for i, p in enumerate(prompts)]
    results = [GenerationResult(list(p), []) for p in prompts]
    pinned: dict[int, str] = {}  # after round 0 each session names the version that served it
    running, round_idx = list(range(len(prompts))), 0
    while running:
        ks = [0 if proposer is None else max(0, min(pick(i, round_idx), max_new_tokens - len(results[i].tokens) - 1))
              for i in running]
        prefill = [len(sessions[i].tokens) - sessions[i].cache.length if proposer else 0 for i in running]
        proposals = proposer.propose([sessions[i] for i in running], ks) if proposer else [None] * len(running)
        rounds = []
        for i, prop in zip(running, proposals):
            s = per_session[i]
            rounds.append(P.DraftRound(
                session_id=f"{session_prefix}{i}", seq=round_idx, target=pinned.get(i, target),
                draft_tokens=prop.tokens if prop else [],
                full_context=list(prompts[i]) if round_idx == 0 else None,
                sampling=P.Sampling(temperature=s.temperature, top_p=s.top_p, seed=s.seed) if round_idx == 0 else None))
        exchanges = transport.round_trip(rounds)
        still = []
        for pos, (i, rnd, ex) in enumerate(zip(running, rounds, exchanges)):
            if isinstance(ex.result, P.ErrorBody):
                raise RoundFailed(ex.result)
            out, draft = ex.result, rnd.draft_tokens
            pinned[i] = out.version
            if proposer:
                proposer.apply(sessions[i], draft, out.accepted, out.token)
            res = results[i]
            new = draft[: out.accepted] + [out.token]
            res.tokens.extend(new)
            res.stats.record(len(draft), out.accepted)
            res.rounds.append(out)
            if on_round:
                on_round(RoundEvent(i, round_idx, len(draft), out.accepted, prefill[pos], ex.bytes_up,
                                    ex.bytes_down, out))
            if len(res.tokens) < max_new_tokens and (stop_token is None or stop_token not in new):
                still.append(i)
        running, round_idx = still, round_idx + 1
    for res in results:
        del res.tokens[max_new_tokens:]
    return results


def _session_sampling(sampling: SamplingParams, i: int) -> SamplingParams:
    return SamplingParams(sampling.temperature, sampling.top_p, sampling.seed * 100_003 + i)
