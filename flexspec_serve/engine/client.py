"""The edge client's half of one session: builds each round's wire message and commits the cloud's answer.

Written once and shared by the batched in-process loop (`generate.py`) and the asyncio fleet devices
(`fleet/`), so the round protocol lives in one place:

- the first round, and any round after the server asked for a resync, carries the full committed context
  and the sampling settings (the server rebuilds the session from them; results are identical);
- after the first answer the session names the version that served it (pinning survives router restarts);
- an answer commits d_1..d_n plus the recovered or bonus token and advances the sequence number (for a
  token tree: the tokens of the accepted path the answer names);
- a pipelined round (the next one, sent before this one's answer) names what this one must commit.

No I/O, no timing and no choice of K here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flexspec_serve import protocol as P
from flexspec_serve.engine.proposer import DraftProposer, EdgeSession, Proposal
from flexspec_serve.engine.ragged import tree_depth
from flexspec_serve.engine.sampling import SamplingParams
from flexspec_serve.engine.stats import AcceptanceStats

RESYNC_CODES = frozenset({"resync_required", "bad_sequence"})


@dataclass
class ClientSession:
    session_id: str
    prompt: list[int]
    sampling: SamplingParams
    edge: EdgeSession | None = None  # None: no draft on this client (cloud-only)
    target: str | None = None  # version or alias asked for on the first round
    seq: int = 0
    version: str | None = None  # the version that served the first round; named on every later round
    needs_context: bool = True  # the next message carries the full committed context
    tokens: list[int] = field(default_factory=list)  # generated tokens
    stats: AcceptanceStats = field(default_factory=AcceptanceStats)
    resyncs: int = 0
    rounds: list[P.RoundResult] = field(default_factory=list)

    @classmethod
    def start(cls, session_id: str, prompt: list[int], sampling: SamplingParams, proposer: DraftProposer | None,
              target: str | None = None) -> ClientSession:
        edge = proposer.start(session_id, prompt, sampling) if proposer else None
        return cls(session_id, list(prompt), sampling, edge, target)

    @property
    def committed(self) -> list[int]:
        return self.prompt + self.tokens

    def message(self, draft: Proposal | None, assume: list[int] | None = None) -> P.DraftRound:
        """The wire message for this round's draft (None: K = 0; a chain or a token tree). `assume`: the round
        was sent pipelined with it (a resend carries it too, so the cloud recognises a round it already
        verified); dropped when the message carries the full context."""
        full = self.needs_context
        s = self.sampling
        return P.DraftRound(
            session_id=self.session_id, seq=self.seq, target=self.version or self.target,
            draft_tokens=draft.tokens if draft else [], full_context=self.committed if full else None,
            sampling=P.Sampling(temperature=s.temperature, top_p=s.top_p, seed=s.seed) if full else None,
            assume=None if full else assume, tree_parents=draft.parents if draft else None,
        )

    def pipelined_message(self, assume: list[int], draft: Proposal) -> P.DraftRound | None:
        """The next round (seq + 1), sent before this one's answer: verified only if this round commits exactly
        `assume` (its drafts and the draft's guess of the cloud's token). None while the session cannot
        pipeline (before the first answer names its version, or while it must resend its context)."""
        if self.needs_context or self.version is None or not draft.tokens:
            return None
        return P.DraftRound(session_id=self.session_id, seq=self.seq + 1, target=self.version,
                            draft_tokens=draft.tokens, assume=assume, tree_parents=draft.parents)

    def commit(self, proposal: Proposal | None, result: P.RoundResult,
               proposer: DraftProposer | None = None) -> list[int]:
        """Apply the cloud's verdict on this round's draft (None: K = 0); returns the tokens this round added
        (accepted drafts + one). A token tree's answer names the accepted path."""
        draft, parents = (proposal.tokens, proposal.parents) if proposal else ([], None)
        path = accepted_path(result, parents)
        if result.seq != self.seq or path is None or any(not 0 <= j < len(draft) for j in path):
            raise ValueError(f"answer for seq {result.seq} ({result.accepted} accepted, path {result.path}) does "
                             f"not fit round {self.seq} with K = {len(draft)}")
        accepted = [draft[j] for j in path]
        new = accepted + [result.token]
        if proposer is not None and self.edge is not None:
            if parents is None:
                proposer.apply(self.edge, draft, result.accepted, result.token)
            else:
                proposer.apply_tree(self.edge, accepted, result.token)
        self.tokens.extend(new)
        self.stats.record(len(draft) if parents is None else tree_depth(parents), result.accepted)
        self.rounds.append(result)
        self.version, self.needs_context = result.version, False
        self.seq += 1
        return new

    def on_error(self, body: P.ErrorBody) -> bool:
        """True when resending this round with the full context fixes it (the server lost the session)."""
        if body.error.code in RESYNC_CODES:
            self.needs_context = True
            self.resyncs += 1
            return True
        return False


def accepted_path(result: P.RoundResult, parents: list[int] | None) -> list[int] | None:
    """The accepted draft tokens' indices: d_1..d_n of a chain, or the tree path the answer names if it is
    one (from the root, each node's parent the one before it); None when the answer does not fit."""
    if parents is None:
        return list(range(result.accepted)) if result.path is None else None
    path = result.path or []
    if len(path) != result.accepted or any(not 0 <= j < len(parents) for j in path):
        return None
    chained = all(parents[j] == (path[i - 1] if i else -1) for i, j in enumerate(path))
    return path if chained else None

