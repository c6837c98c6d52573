"""Cloud side: verify draft tokens for many sessions of one target version in one forward pass.

The verifier keeps, per session, the committed tokens and a target KV cache (plus a draft KV cache in
sampling mode, where it recomputes q with its own copy of the frozen draft, so the uplink carries only
token ids). Sessions live in an LRU store bounded by count and by KV bytes; a session it no longer
holds answers `ResyncRequired` until the client resends its full context. Rounds are idempotent by
sequence number (the last two rounds' answers are kept, so a retry of round s still finds its answer after
a pipelined round s + 1 was verified), and each round's random numbers come from a generator seeded by
(session seed, seq), so retries, resyncs and batching never change a result.

Pipelined rounds (`VerifyRequest.assume`): a client may send round s+1 before round s is answered, assuming
round s commits exactly `assume` (all its drafts and the draft's guess of the cloud's token). Round s+1 is
verified only if that is what round s committed; otherwise it answers `ConditionNotMet` and changes nothing
(it is also refused when round s has not been verified yet: the client then resends it).
A verified pipelined round is an ordinary round on the true context, so outputs stay lossless.

Token trees (`VerifyRequest.parents`): the K draft tokens are the nodes of a tree (several candidates per
position), verified in the same forward pass under a tree attention mask. The accepted path
(`RoundOutcome.path`) follows the target's greedy choice from the root, or in sampling mode the candidates
recursive rejection sampling accepts (`engine.sampling`), with q from the draft copy run over the same tree;
the path's tokens and the target's token after it are committed, and the caches keep only that path's
positions.

It does not batch across time (the caller hands it a batch) and knows nothing of Serve or the network.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from flexspec_serve.engine import sampling as S
from flexspec_serve.engine.errors import (ConditionNotMet, ContextTooLong, EngineError, InvalidRequest, ResyncRequired,
                                          RoundFailed, SequenceError)
from flexspec_serve.engine.ragged import (CachedSequence, decode_max_tokens, run_ragged, shape_groups, tree_depth,
                                          tree_depths)
from flexspec_serve.engine.stats import AcceptanceStats, SessionSpread, merge_sessions
from flexspec_serve.tree import ends_on_leaf

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VerifyRequest:
    session_id: str
    seq: int
    draft_tokens: tuple[int, ...] = ()
    new_context: tuple[int, ...] = ()
    full_context: tuple[int, ...] | None = None  # set on a session's first round and on resync
    sampling: S.SamplingParams = S.SamplingParams()
    assume: tuple[int, ...] | None = None  # pipelined: what round seq - 1 must have committed
    parents: tuple[int, ...] | None = None  # a token tree: each draft token's parent (-1: the last context token)


@dataclass(frozen=True)
class RoundOutcome:
    session_id: str
    seq: int
    accepted: int  # n: draft tokens kept
    token: int  # the recovered token (n < K) or the bonus token (n == K)
    bonus: bool
    context_len: int  # committed tokens after this round
    verify_ms: float
    batch_size: int
    cache_hit: bool  # False when this round had to (re)build the session's cache
    path: tuple[int, ...] | None = None  # a token tree: the accepted nodes, root first (n = len(path))


@dataclass
class _Session:
    tokens: list[int]
    sampling: S.SamplingParams
    seed: int
    target: CachedSequence = field(default_factory=CachedSequence)
    draft: CachedSequence = field(default_factory=CachedSequence)
    answered: dict[tuple, RoundOutcome] = field(default_factory=dict)  # the last two rounds' outcomes, by key
    stats: AcceptanceStats = field(default_factory=AcceptanceStats)
    created_at: float = 0.0  # wall time of its first round (0 for sessions rebuilt by a resync)
    last_used: float = 0.0  # clock time of its last round (idle sessions expire after session_ttl_s)

    @property
    def last_outcome(self) -> RoundOutcome | None:
        return max(self.answered.values(), key=lambda o: o.seq, default=None)

    def nbytes(self) -> int:
        return self.target.nbytes() + self.draft.nbytes()


@dataclass(frozen=True)
class VerifierLimits:
    max_draft_tokens: int = 16
    max_sessions: int = 4096
    max_cache_bytes: int = 2 << 30
    session_ttl_s: float = float("inf")  # a session idle this long is dropped (a client that returns resyncs)


class Verifier:
    def __init__(self, target: torch.nn.Module, draft: torch.nn.Module | None = None, *, name: str = "target",
                 limits: VerifierLimits = VerifierLimits(), clock=time.monotonic):
        self.target, self.draft, self.name, self.limits = target.eval(), draft, name, limits
        self.clock = clock
        self.expired = 0
        self.vocab_size = int(target.config.vocab_size)
        self.max_positions = int(target.config.max_position_embeddings)
        self.sessions: OrderedDict[str, _Session] = OrderedDict()
        self.stats = AcceptanceStats()
        self.cache_hits = 0
        self.cache_misses = 0
        self.evictions = 0
        self._nbytes: dict[str, int] = {}  # KV bytes per session, updated as sessions change
        self._total_bytes = 0

    # ------------------------------------------------------------------ public
    def verify(self, requests: list[VerifyRequest]) -> list[RoundOutcome | EngineError]:
        """Verify a batch; one result (or the error for that request) per request, in order."""
        results: list[RoundOutcome | EngineError | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        while pending:  # a session that appears twice in one batch is handled in a later pass
            seen, this_pass, later = set(), [], []
            for i in pending:
                (later if requests[i].session_id in seen else this_pass).append(i)
                seen.add(requests[i].session_id)
            self._verify_pass(requests, this_pass, results)
            pending = later
        self._evict()
        return results  # type: ignore[return-value]

    def drop_session(self, session_id: str) -> bool:
        self._total_bytes -= self._nbytes.pop(session_id, 0)
        return self.sessions.pop(session_id, None) is not None

    def session_stats(self, session_id: str) -> AcceptanceStats:
        return self.sessions[session_id].stats

    def stats_since(self, t: float) -> tuple[AcceptanceStats, SessionSpread]:
        """Acceptance over the sessions (still held) that started at or after wall time `t`, and how it
        varies between them."""
        held = list(self.sessions.values())  # a batch may be changing the store on another thread
        return merge_sessions(s.stats for s in held if s.created_at >= t)

    def cache_bytes(self) -> int:
        return self._total_bytes

    # ------------------------------------------------------------------ one pass
    def _verify_pass(self, requests, indices, results) -> None:
        ready: list[tuple[int, _Session, bool]] = []
        for i in indices:
            try:
                prepared = self._prepare(requests[i])
            except EngineError as err:
                results[i] = err
                continue
            if isinstance(prepared, RoundOutcome):
                results[i] = prepared  # idempotent retry
            else:
                ready.append((i, *prepared))
        # A ragged forward pads every session to the longest input, so a first round (a whole prompt) batched
        # with decode rounds (K + 1 tokens) would make each of them compute the prompt's length: run the two
        # shapes as separate forwards.
        lengths = [len(s.tokens) - s.target.length + len(requests[i].draft_tokens) for i, s, _ in ready]
        for group in shape_groups(lengths, decode_max_tokens(self.limits.max_draft_tokens)):
            self._forward_and_decide(requests, [ready[j] for j in group], results)

    def _forward_and_decide(self, requests, ready, results) -> None:
        started = time.perf_counter()
        target_logits = run_ragged(
            self.target, [s.target for _, s, _ in ready],
            [s.tokens[s.target.length :] + list(requests[i].draft_tokens) for i, s, _ in ready],
            trees=[list(requests[i].parents) if requests[i].parents else None for i, _, _ in ready],
        )
        draft_probs = self._draft_probs(requests, ready)
        verify_ms = (time.perf_counter() - started) * 1e3
        for (i, session, hit), logits in zip(ready, target_logits):
            req = requests[i]
            k = len(req.draft_tokens)
            try:
                path, token = self._decide(req, session, logits[-(k + 1) :], draft_probs.get(i))
            except (RuntimeError, ValueError) as err:  # isolate: this round fails, its batch-mates do not
                log.exception("%s: deciding round %s of %r failed", self.name, req.seq, req.session_id)
                self.drop_session(req.session_id)  # its caches hold this round's positions; the client resyncs
                results[i] = RoundFailed(f"round {req.seq} of {req.session_id!r} failed in the engine: {err}")
                continue
            results[i] = self._commit(req, session, path, token, verify_ms, len(ready), hit)

    def _prepare(self, req: VerifyRequest) -> tuple[_Session, bool] | RoundOutcome:
        self._validate(req)
        session = self.sessions.get(req.session_id)
        if session is not None and _round_key(req) in session.answered:
            session.last_used = self.clock()
            self.sessions.move_to_end(req.session_id)
            return session.answered[_round_key(req)]  # the same round again: same answer, applied once
        hit = req.full_context is None
        if req.assume is not None:
            self._check_assumption(req, session)
        if req.full_context is not None:
            seed = _session_seed(req.session_id, req.sampling.seed)
            session = _Session(tokens=list(req.full_context), sampling=req.sampling, seed=seed,
                               created_at=time.time() if req.seq == 0 else 0.0)
            self.sessions[req.session_id] = session
            self.cache_misses += 1
        elif session is None:
            raise ResyncRequired(f"session {req.session_id!r} is not held by {self.name}; resend full_context")
        elif session.last_outcome is not None and req.seq != session.last_outcome.seq + 1:
            raise SequenceError(
                f"session {req.session_id!r}: round seq {req.seq} does not follow {session.last_outcome.seq}; "
                "resend with full_context"
            )
        else:
            self.cache_hits += 1
        self._check_length(req, session)
        session.tokens.extend(req.new_context)
        session.last_used = self.clock()
        self.sessions.move_to_end(req.session_id)
        return session, hit

    def _check_assumption(self, req: VerifyRequest, session: _Session | None) -> None:
        """A pipelined round goes ahead only if round seq - 1 committed exactly what it assumes."""
        last = session.last_outcome if session is not None else None
        if last is None or last.seq != req.seq - 1:
            got = "no round" if last is None else f"round {last.seq}"
            raise ConditionNotMet(f"session {req.session_id!r}: pipelined round {req.seq} needs round "
                                  f"{req.seq - 1} verified first ({got} is)")
        n = len(req.assume)
        if last.accepted + 1 != n or tuple(session.tokens[-n:]) != req.assume:
            raise ConditionNotMet(f"session {req.session_id!r}: round {last.seq} did not commit the "
                                  f"{n} tokens pipelined round {req.seq} assumed")

    def _validate(self, req: VerifyRequest) -> None:
        k = len(req.draft_tokens)
        if k > self.limits.max_draft_tokens:
            raise InvalidRequest("draft_tokens", k, f"K must be at most {self.limits.max_draft_tokens}")
        for name in ("draft_tokens", "new_context", "full_context", "assume"):
            for t in getattr(req, name) or ():
                if not 0 <= t < self.vocab_size:
                    raise InvalidRequest(name, t, f"token id outside the vocabulary [0, {self.vocab_size})")
        if req.parents is not None:
            self._validate_tree(req)
        if req.assume is not None and (req.full_context is not None or req.new_context or not req.assume
                                       or req.seq == 0):
            raise InvalidRequest("assume", list(req.assume), "a pipelined round follows a verified round: "
                                 "seq > 0, at least one assumed token, no full_context or new_context")
        if req.full_context is not None and not req.full_context and not req.new_context:
            raise InvalidRequest("full_context", [], "a session needs at least one context token")
        if not req.sampling.greedy and k and self.draft is None:
            raise InvalidRequest("sampling", req.sampling.temperature,
                                 f"{self.name} holds no draft copy, so only greedy drafts can be verified")

    @staticmethod
    def _validate_tree(req: VerifyRequest) -> None:
        parents = list(req.parents)
        if len(parents) != len(req.draft_tokens):
            raise InvalidRequest("parents", parents, f"one parent per draft token ({len(req.draft_tokens)})")
        try:
            tree_depths(parents)
        except ValueError as err:
            raise InvalidRequest("parents", parents, str(err)) from None

    def _check_length(self, req: VerifyRequest, session: _Session) -> None:
        total = len(session.tokens) + len(req.new_context) + len(req.draft_tokens) + 1
        if total > self.max_positions:
            raise ContextTooLong(total, self.max_positions)

    def _draft_probs(self, requests, ready) -> dict[int, torch.Tensor]:
        """q per sampling-mode request, recomputed with the cloud's copy of the frozen draft: [K, V] for a
        chain (fed d_1..d_{K-1}), [K+1, V] for a token tree (fed every node under its tree mask)."""
        rows = [(i, s) for i, s, _ in ready if not s.sampling.greedy and requests[i].draft_tokens]
        if not rows:
            return {}
        trees = [list(requests[i].parents) if requests[i].parents else None for i, _ in rows]
        inputs = [s.tokens[s.draft.length :] + list(requests[i].draft_tokens[: None if tree else -1])
                  for (i, s), tree in zip(rows, trees)]
        logits = run_ragged(self.draft, [s.draft for _, s in rows], inputs, trees=trees)
        out = {}
        for (i, s), tree, lg in zip(rows, trees, logits):
            k = len(requests[i].draft_tokens)
            out[i] = S.probs(lg[-(k + 1 if tree else k):], s.sampling)
        return out

    def _decide(self, req, session: _Session, logits: torch.Tensor, q: torch.Tensor | None
                ) -> tuple[list[int], int]:
        """(accepted nodes, root first: d_1..d_n for a chain; the recovered or bonus token)."""
        draft, parents = list(req.draft_tokens), req.parents and list(req.parents)
        if session.sampling.greedy:
            if parents:
                return S.accept_greedy_tree(logits, draft, parents)
            n, token = S.accept_greedy(logits, draft)
            return list(range(n)), token
        generator = torch.Generator().manual_seed((session.seed * 1_000_003 + req.seq) % (1 << 63))
        p = S.probs(logits, session.sampling)  # [K+1, V]
        if parents:
            return S.accept_sampling_tree(p, q, draft, parents, generator)
        n, token = S.accept_sampling(p, q if q is not None else p[:0], draft, generator)
        return list(range(n)), token

    def _commit(self, req, session: _Session, path: list[int], token: int, verify_ms, batch_size, hit
                ) -> RoundOutcome:
        k, n, tree = len(req.draft_tokens), len(path), req.parents is not None
        before = len(session.tokens)
        session.tokens.extend(req.draft_tokens[j] for j in path)
        session.tokens.append(token)
        session.target.keep(before, path)  # drop rejected drafts; `token` is fed next round
        session.draft.keep(before, path)  # (sampling: the draft copy fed this round's nodes; greedy: it holds none)
        depth = tree_depth(list(req.parents)) if tree else k  # positions a round could accept
        session.stats.record(depth, n)
        self.stats.record(depth, n)
        bonus = ends_on_leaf(path, req.parents) if tree else n == k  # nothing was drafted past the path
        outcome = RoundOutcome(req.session_id, req.seq, n, token, bonus, len(session.tokens), round(verify_ms, 3),
                               batch_size, hit, tuple(path) if tree else None)
        # keep round s's answer beside this one's: its retry may come after pipelined round s + 1 was verified
        session.answered = {key: o for key, o in session.answered.items() if o.seq == req.seq - 1}
        session.answered[_round_key(req)] = outcome
        nbytes = session.nbytes()
        self._total_bytes += nbytes - self._nbytes.get(req.session_id, 0)
        self._nbytes[req.session_id] = nbytes
        return outcome

    def _evict(self) -> None:
        horizon = self.clock() - self.limits.session_ttl_s
        while self.sessions and next(iter(self.sessions.values())).last_used < horizon:  # least recent first
            self.drop_session(next(iter(self.sessions)))
            self.expired += 1
        while self.sessions and (len(self.sessions) > self.limits.max_sessions
                                 or self._total_bytes > self.limits.max_cache_bytes):
            oldest = next(iter(self.sessions))
            self.drop_session(oldest)
            self.evictions += 1


def _round_key(req: VerifyRequest) -> tuple:
    """What makes a retried round the same round (answered from the stored outcome, applied once)."""
    return (req.seq, req.draft_tokens, req.new_context, req.full_context is not None, req.assume, req.parents)


def _session_seed(session_id: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:{session_id}".encode()).digest()
    return int.from_bytes(digest[:6], "little")
