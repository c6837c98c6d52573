"""In-process generation loop on the engine: speculative (draft + verifier) and cloud-only.

One loop serves the batch callers (tests, benchmarks, the acceptance report, the edge emulator): it
advances a list of sessions round by round, batching draft steps and verification across the sessions
still running, and sends each round through a transport (the real wire encoding, in-process by default).
K per round comes from `choose_k(session_index, round_index)`; `on_round` sees every finished round.
The round protocol itself (first round, resync, pinning, commit) is `engine.client.ClientSession`.
No channel or clock here: the edge emulator adds those through the two hooks; `fleet/` drives the same
`ClientSession` from asyncio devices in real time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from flexspec_serve import protocol as P
from flexspec_serve.ahead import Ahead, ahead_tokens, second_guess
from flexspec_serve.engine.client import ClientSession
from flexspec_serve.engine.proposer import DraftProposer, Proposal
from flexspec_serve.engine.sampling import SamplingParams
from flexspec_serve.tree import Tree
from flexspec_serve.transport import Exchange, LocalTransport, RoundFailed



@dataclass(frozen=True)
class RoundEvent:
    """What `on_round` is told about one finished round of session `index`."""

    index: int
    round_index: int
    k: int
    accepted: int
    bytes_up: int
    bytes_down: int
    result: P.RoundResult
    # draft-ahead: all K accepted and the cloud's token was the draft's d_{K+1} (or a second guess, its
    # runner-up); None: no guess was drafted
    lookahead_hit: bool | None = None
    parents: tuple[int, ...] | None = None  # a token-tree round: its nodes' parents (K stays the draft steps)


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
    ahead: Ahead = Ahead.OFF,
    tree: Tree = Tree.CHAIN,
) -> list[ClientSession]:
    """Generate for every prompt; `proposer=None` or K = 0 means cloud-only rounds. A device that drafts
    `ahead` drafts d_{K+1} too (not sent) and, on a lookahead hit, `ahead_tokens(K)` past it before the answer
    is applied: what it drafted during the wait, computed only when it is used (as the fleet does); the hit's
    next round starts from them (`on_round` is told of hits; the output does not change in greedy mode).
    With branches and no pipelining the guess's runner-up counts as a second guess (`ahead.second_guess`).

    `tree`: sessions send token trees of that shape (`flexspec_serve.tree`; the K in `RoundEvent` stays
    the draft steps).

    `transport` is a `Transport` or a bare `Verifier` (wrapped in a `LocalTransport`).
    """
    if not hasattr(transport, "round_trip"):
        transport = LocalTransport(transport)
    pick = (lambda i, r: choose_k) if isinstance(choose_k, int) else choose_k
    clients = [ClientSession.start(f"{session_prefix}{i}", p, session_sampling(sampling, i), proposer, target)
               for i, p in enumerate(prompts)]
    running, round_idx = list(range(len(prompts))), 0
    second = second_guess(ahead, tree)
    while running:
        ks = [0 if proposer is None else max(0, min(pick(i, round_idx), max_new_tokens - len(clients[i].tokens) - 1))
              for i in running]
        proposals = (proposer.propose([clients[i].edge for i in running], ks, Ahead(ahead).drafts, tree=tree)
                     if proposer else [None] * len(running))
        exchanges = round_trip_resync(transport, [clients[i] for i in running], proposals)
        hits = [proposer.settle_guess(clients[i].edge, ex.result.accepted, ex.result.token, ex.result.path, second)
                for i, ex in zip(running, exchanges)] if proposer else [None] * len(running)
        if any(hits):  # what the devices drafted during the wait, computed for the rounds that use it
            proposer.draft_ahead([clients[i].edge for i, hit in zip(running, hits) if hit],
                                 [ahead_tokens(k) for k, hit in zip(ks, hits) if hit])
        still = []
        for i, k, prop, ex, hit in zip(running, ks, proposals, exchanges, hits):
            new = clients[i].commit(prop, ex.result, proposer)
            if on_round:
                parents = tuple(prop.parents) if prop and prop.parents else None
                on_round(RoundEvent(i, round_idx, k, ex.result.accepted, ex.bytes_up, ex.bytes_down, ex.result,
                                    hit, parents))
            if len(clients[i].tokens) < max_new_tokens and (stop_token is None or stop_token not in new):
                still.append(i)
        running, round_idx = still, round_idx + 1
    for c in clients:
        del c.tokens[max_new_tokens:]
    return clients


def round_trip_resync(transport, clients: list[ClientSession], drafts: list[Proposal | None]) -> list[Exchange]:
    """Send one round per client (its draft: a chain, a token tree, or None for K = 0); a round the server
    answers with `resync_required` is resent once with the full context (byte counts add up both attempts).
    Any other error raises `RoundFailed`."""
    exchanges = transport.round_trip([c.message(d) for c, d in zip(clients, drafts)])
    again = [j for j, ex in enumerate(exchanges) if isinstance(ex.result, P.ErrorBody) and clients[j].on_error(ex.result)]
    if again:
        retried = transport.round_trip([clients[j].message(drafts[j]) for j in again])
        for j, ex in zip(again, retried):
            first = exchanges[j]
            exchanges[j] = Exchange(ex.result, first.bytes_up + ex.bytes_up, first.bytes_down + ex.bytes_down)
    for ex in exchanges:
        if isinstance(ex.result, P.ErrorBody):
            raise RoundFailed(ex.result)
    return exchanges


def session_sampling(sampling: SamplingParams, i: int) -> SamplingParams:
    """Session i's own seed, derived from the run's seed."""
    return SamplingParams(sampling.temperature, sampling.top_p, sampling.seed * 100_003 + i)


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """`model`'s own greedy continuation of `prompt` (n tokens) by transformers' `generate`, on the model's
    device: what greedy speculative decoding must reproduce (tests and the engine benchmark check it)."""
    if not n:
        return []
    ids = torch.tensor([prompt], device=model.device)
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
