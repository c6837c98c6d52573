"""Edge side: the frozen draft proposes K tokens per round for one or many sessions.

Each edge session keeps its committed tokens, a draft KV cache and its own seeded `torch.Generator`.
`propose` runs K autoregressive draft steps, batched across the sessions given (ragged K allowed, K = 0
included); `apply` takes the cloud's verdict and rolls the draft cache back to what was accepted.

It does not choose K (the controller in `edge/` does) and does not talk to the cloud.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flexspec_serve.engine import sampling as S
from flexspec_serve.engine.ragged import CachedSequence, decode_max_tokens, run_ragged_by_shape


@dataclass
class Proposal:
    tokens: list[int]  # d_1..d_K
    q_token_probs: list[float]  # q_i(d_i), for accounting; the cloud recomputes full q itself


@dataclass
class EdgeSession:
    session_id: str
    tokens: list[int]  # committed tokens: prompt + everything the target approved
    sampling: S.SamplingParams
    generator: torch.Generator
    cache: CachedSequence = field(default_factory=CachedSequence)
    prompt_len: int = 0

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class DraftProposer:
    def __init__(self, draft: torch.nn.Module, max_draft_tokens: int = 16):
        self.model = draft.eval()
        self.vocab_size = int(draft.config.vocab_size)
        self.decode_max = decode_max_tokens(max_draft_tokens)  # longer first-step inputs get their own forward

    def start(self, session_id: str, prompt: list[int], sampling: S.SamplingParams) -> EdgeSession:
        if not prompt:
            raise ValueError("a session needs a non-empty prompt")
        gen = torch.Generator().manual_seed(sampling.seed)
        return EdgeSession(session_id, list(prompt), sampling, gen, prompt_len=len(prompt))

    @torch.inference_mode()
    def propose(self, sessions: list[EdgeSession], ks: list[int]) -> list[Proposal]:
        """K_i draft tokens for each session, one batched draft step per draft position."""
        proposals = [Proposal([], []) for _ in sessions]
        for step in range(max(ks, default=0)):
            active = [i for i, k in enumerate(ks) if k > step]
            inputs = []
            for i in active:
                s = sessions[i]
                # first step feeds every committed token not yet cached; later steps feed the last draft
                inputs.append(s.tokens[s.cache.length :] if step == 0 else [proposals[i].tokens[-1]])
            logits = run_ragged_by_shape(self.model, [sessions[i].cache for i in active], inputs, self.decode_max)
            for i, lg in zip(active, logits):
                token, prob = self._choose(lg[-1], sessions[i])
                proposals[i].tokens.append(token)
                proposals[i].q_token_probs.append(prob)
        return proposals

    def _choose(self, logits: torch.Tensor, s: EdgeSession) -> tuple[int, float]:
        if s.sampling.greedy:
            return int(logits.argmax()), 1.0
        q = S.probs(logits[None], s.sampling)[0]  # [V]
        token = S.sample(q, s.generator)
        return token, float(q[token])

    def apply(self, s: EdgeSession, draft: list[int], accepted: int, token: int) -> None:
        """Commit d_1..d_n and the cloud's token; keep the cache only over committed tokens."""
        keep = len(s.tokens) + accepted
        s.tokens.extend(draft[:accepted])
        s.tokens.append(token)
        s.cache.truncate(keep)

    def resync(self, s: EdgeSession) -> None:
        """Forget the draft cache (it is rebuilt from the committed tokens on the next proposal)."""
        s.cache = CachedSequence()
