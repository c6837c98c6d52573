"""Edge side: the frozen draft proposes K tokens per round for one or many sessions.

Each edge session keeps its committed tokens, a draft KV cache and its own seeded `torch.Generator`.
`propose` runs K autoregressive draft steps, batched across the sessions given (ragged K allowed, K = 0
included); `apply` takes the cloud's verdict and rolls the draft cache back to what was accepted.

Draft-ahead: `propose(..., lookahead=True)` drafts one more step, d_{K+1}, the draft's own guess of the
token the cloud adds when it accepts all K; it is not sent. `draft_ahead` continues from there while the
round waits for its answer. On a *lookahead hit* (all K accepted and the cloud's token is d_{K+1}) `apply`
keeps those tokens as the session's `ready` draft and the next `propose` starts from them; on a miss they
are dropped with the rest of the rejected draft. A client that already sent the first of them as a
pipelined round (see `engine.verifier`) marks them sent with `promote`. Either way the drafted tokens are the ones drafting after
the answer would give (greedy: the same tokens; sampling: the same distribution). A second guess (the guess
step's runner-up s_{K+1}, for devices that grow it: `flexspec_serve.ahead.second_guess`) is taken when the
answer is settled against the guesses (`settle_guess`), before drafting on from it. The guesses are q's top
two in sampling sessions as well (`_choose`): only the tokens drafted after them must be samples.

Token trees (`propose(..., tree=...)`; shapes in `flexspec_serve.tree`): with `second`, every draft step's
runner-up s_i rides beside its token, so the round is a tree of 2K nodes that costs no extra draft step;
every drafted token keeps its step's runner-up, those drafted ahead too. Greedy sessions take the top two
tokens of q; sampling sessions draw d_i from q and s_i from q without d_i (what the cloud's recursive
rejection sampling expects, `engine.sampling`). With `branches`, each runner-up is also continued by the
draft (greedy or sampled, as the session decodes) in the same K steps, on its own copy of the draft
cache; tokens drafted ahead grow their branches too (for a next round of the same K), so a round that
starts from them carries its branches as well. When the target's token
at position i is s_i, the round keeps d_1..d_{i-1}, s_i, what of its branch the target also chose, and the
target's token after that (see `engine.verifier`); `apply_tree` commits such an answer and keeps the
branch's cache. A round whose path leaves the chain is never a lookahead hit: what was drafted ahead
followed d_K.

It does not choose K (the controller in `edge/` does) and does not talk to the cloud.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flexspec_serve.engine import hf_compat
from flexspec_serve.engine import sampling as S
from flexspec_serve.engine.ragged import CachedSequence, decode_max_tokens, run_ragged_by_shape
from flexspec_serve.tree import MAX_NODES, Tree, continuations, on_chain, tree_parents

Step = tuple[int, float, int]  # a draft step: (token, q(token), runner-up; -1 in sampling chain sessions)
Branch = tuple[list[int], CachedSequence]  # a runner-up's continuation and its own draft cache


@dataclass
class Proposal:
    """A round's draft as it goes on the wire: a chain, or the nodes of a token tree with their parents."""

    tokens: list[int]  # d_1..d_K (a token tree: then s_1 and its branch, s_2 and its branch, ...)
    q_token_probs: list[float] = field(default_factory=list)  # q_i(d_i), for accounting (the cloud recomputes q)
    parents: list[int] | None = None  # a token tree: each node's parent (-1: the last committed token)


@dataclass
class EdgeSession:
    session_id: str
    tokens: list[int]  # committed tokens: prompt + everything the target approved
    sampling: S.SamplingParams
    generator: torch.Generator
    cache: CachedSequence = field(default_factory=CachedSequence)
    prompt_len: int = 0
    # draft-ahead: the last proposal's draft (d_1..d_K, then d_{K+1} and what was drafted ahead past it),
    # how many of it were sent (K), and what a lookahead hit left for the next round; (token, q, runner-up)
    # per draft step (runner-up -1 in sampling sessions)
    drafted: list[Step] = field(default_factory=list)
    sent: int = 0
    ready: list[Step] = field(default_factory=list)
    shape: Tree = Tree.CHAIN  # the shape of the session's rounds
    # token-tree branches: drafted index i -> the branch after the runner-up of step i (its tokens past that
    # runner-up, and a draft cache covering the committed tokens, the draft before step i, the runner-up and
    # all of the branch but its last token); `branches` for the round in flight (index = position in it),
    # `ahead_branches` for the tokens drafted ahead (index into `drafted`)
    branches: dict[int, Branch] = field(default_factory=dict)
    ahead_branches: dict[int, Branch] = field(default_factory=dict)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


@dataclass
class DraftJob:
    """A session's draft in progress: `out` (its draft past the committed tokens) grows by `left` more steps;
    `plan` says how far to grow the branch after each drafted step's runner-up (kept in `branches`);
    `on_done(out)` when it has all of them."""

    session: EdgeSession
    out: list[Step]
    left: int
    plan: dict[int, int]
    branches: dict[int, Branch]
    on_done: Callable[[list[Step]], None]
    feed_only: bool = False  # feed the session's backlog and draft nothing (`DraftProposer.prefill_job`)
    guess_at: int | None = None  # the index in `out` of the guess d_{K+1}, if this job drafts it


class DraftProposer:
    def __init__(self, draft: torch.nn.Module, max_draft_tokens: int = MAX_NODES):
        self.model = draft.eval()
        self.vocab_size = int(draft.config.vocab_size)
        self.decode_max = decode_max_tokens(max_draft_tokens)  # longer first-step inputs get their own forward
        self.max_nodes = max_draft_tokens  # a token tree's nodes must fit the verifier's limit

    def start(self, session_id: str, prompt: list[int], sampling: S.SamplingParams) -> EdgeSession:
        if not prompt:
            raise ValueError("a session needs a non-empty prompt")
        gen = torch.Generator().manual_seed(sampling.seed)
        return EdgeSession(session_id, list(prompt), sampling, gen, prompt_len=len(prompt))

    @staticmethod
    def steps_needed(s: EdgeSession, k: int) -> int:
        """Draft forward steps `propose` would run for K tokens (0: served from the session's ready tokens)."""
        return max(0, k - len(s.ready))

    def propose(self, sessions: list[EdgeSession], ks: list[int], lookahead: bool = False,
                on_done: Callable[[int, Proposal], None] | None = None, tree: Tree = Tree.CHAIN) -> list[Proposal]:
        """K_i draft tokens for each session, one batched draft step per draft position (tokens a lookahead
        hit left ready come first); with `lookahead`, sessions with K_i > 0 draft one more token. Ready
        tokens past K_i stay drafted; `guess` is d_{K+1} when there is one. `on_done(i, proposal)` is
        called (on this thread) as soon as session i is drafted, while longer drafts go on; that session
        is not touched again by this call. `tree`: the proposals are token trees of that shape (see the
        module docstring)."""
        proposals: list[Proposal | None] = [None] * len(sessions)

        def finish(i: int, proposal: Proposal) -> None:
            proposals[i] = proposal
            if on_done is not None:
                on_done(i, proposal)

        self.run_jobs([self.propose_job(s, k, functools.partial(finish, i), lookahead, tree)
                       for i, (s, k) in enumerate(zip(sessions, ks))])
        return proposals  # type: ignore[return-value]

    def propose_job(self, s: EdgeSession, k: int, on_done: Callable[[Proposal], None], lookahead: bool = False,
                    tree: Tree = Tree.CHAIN) -> DraftJob:
        """One session's part of `propose`, as a job for `run_jobs` (which calls `on_done(proposal)`)."""
        start = s.ready if k else []  # k = 0: apply drops the cache past it
        s.shape = Tree(tree)
        s.ready, s.ahead_branches, s.branches = [], {}, s.branches if start else {}  # a hit's grown branches stay

        def finish(out: list[Step]) -> None:
            s.drafted, s.sent = out, k
            on_done(proposal_of(out[:k], s.shape, {p: b for p, (b, _) in s.branches.items()}, self.max_nodes))

        wants = k + (lookahead and k > 0)
        return DraftJob(s, list(start), max(0, wants - len(start)), self._plan(s.shape, k), s.branches, finish,
                        guess_at=k if wants > k else None)

    def ahead_proposal(self, s: EdgeSession, k: int) -> Proposal:
        """The next round as drafted ahead (its first k tokens past d_{K+1}, with their branches): what a
        pipelining device sends before this round's answer."""
        base = s.sent + 1
        return proposal_of(s.drafted[base : base + k], s.shape,
                           {j - base: b for j, (b, _) in s.ahead_branches.items() if j >= base}, self.max_nodes)

    def _plan(self, shape: Tree, k: int, offset: int = 0) -> dict[int, int]:
        """Drafted index -> tokens to grow after that step's runner-up, for a K-token round starting there."""
        return {offset + p: n for p, n in enumerate(continuations(k, shape, self.max_nodes)) if n}

    def draft_ahead(self, sessions: list[EdgeSession], ns: list[int]) -> None:
        """While the round waits: n_i more draft tokens past what each session has drafted (d_{K+1} first)."""
        self.run_jobs([job for s, n in zip(sessions, ns) if (job := self.ahead_job(s, n)) is not None])

    def ahead_job(self, s: EdgeSession, n: int, on_done: Callable[[], None] | None = None) -> DraftJob | None:
        """`draft_ahead` for one session, as a job for `run_jobs`, which calls `on_done()` after it (None:
        nothing to draft)."""
        if not (s.sent and n > 0):
            return None

        def finish(out: list[Step]) -> None:
            s.drafted = out
            if on_done is not None:
                on_done()

        # the next round's branches, assuming it has this one's K
        return DraftJob(s, list(s.drafted), n, self._plan(s.shape, s.sent, s.sent + 1), s.ahead_branches, finish,
                        guess_at=s.sent)

    def prefill_job(self, s: EdgeSession, on_done: Callable[[], None] | None = None) -> DraftJob | None:
        """While a cloud-only round waits: feed the draft cache the committed tokens it has not seen (a
        session's prompt, at first), as a job for `run_jobs` that takes one step's forward and drafts nothing,
        so the next round's first step feeds only the cloud's token. None when there is nothing to feed (or a
        draft is in flight: a K = 0 round has none)."""
        if not self.backlog(s) or s.drafted or s.ready:
            return None

        def finish(out: list[Step]) -> None:
            if on_done is not None:
                on_done()

        return DraftJob(s, [], 1, {}, {}, finish, feed_only=True)

    @staticmethod
    def backlog(s: EdgeSession) -> int:
        """Committed tokens the draft cache has not fed yet (0 when it is ahead of them, after a hit)."""
        return max(0, len(s.tokens) - s.cache.length)

    @staticmethod
    def drafted_past_sent(s: EdgeSession) -> int:
        """Tokens drafted past the sent K (d_{K+1} first)."""
        return len(s.drafted) - s.sent

    @staticmethod
    def guess(s: EdgeSession) -> int | None:
        """d_{K+1}: the draft's guess of the token the cloud adds to the round in flight (None: not drafted)."""
        return s.drafted[s.sent][0] if s.sent and len(s.drafted) > s.sent else None

    @staticmethod
    def take_second_guess(s: EdgeSession, accepted: int, token: int, path: list[int] | None = None) -> bool:
        """Second guess (`flexspec_serve.ahead.second_guess`): when the cloud accepted all K sent on the chain and
        added the guess step's runner-up s_{K+1}, s_{K+1} takes d_{K+1}'s place, so what is drafted ahead from
        here continues it and the round is a lookahead hit. Only while nothing is drafted past the guess (the
        device grew both continuations in the same steps; a caller that drafts lazily, after the answer,
        drafts the one the answer chose). Returns whether it did."""
        if not (s.sent and DraftProposer.drafted_past_sent(s) == 1 and accepted == s.sent and on_chain(path)):
            return False
        guess, _, runner_up = s.drafted[s.sent]
        if runner_up < 0 or token != runner_up:
            return False
        s.drafted[s.sent] = (runner_up, 0.0, guess)  # (q of the runner-up is not kept: only sent tokens need one)
        return True

    @staticmethod
    def settle_guess(s: EdgeSession, accepted: int, token: int, path: list[int] | None, second: bool) -> bool | None:
        """The answer against the round's guesses: with `second` (`flexspec_serve.ahead.second_guess`) a second
        guess that the answer chose is taken first; then whether the round is a lookahead hit (None: no guess)."""
        if second:
            DraftProposer.take_second_guess(s, accepted, token, path)
        return DraftProposer.lookahead_hit(s, accepted, token, path)

    @staticmethod
    def lookahead_hit(s: EdgeSession, accepted: int, token: int, path: list[int] | None = None) -> bool | None:
        """Whether the cloud accepted all K sent (the chain: a token tree's `path` did not leave it) and added
        exactly the draft's d_{K+1}; None when no guess was drafted (no hit was possible)."""
        guess = DraftProposer.guess(s)
        return None if guess is None else accepted == s.sent and guess == token and on_chain(path)

    @torch.inference_mode()
    def run_jobs(self, jobs: list[DraftJob], take: Callable[[bool], list[DraftJob]] | None = None,
                 on_step: Callable[[int], None] | None = None) -> None:
        """Run draft jobs to their ends, one batched forward per draft step over every job still drafting;
        each job's `on_done` is called (on this thread) as soon as its own steps are done. `take(idle)`, if
        given, is asked before every step for jobs that join from that step on (`idle`: no job is left);
        the run ends when no job is left and it returns none. `on_step(jobs)` after each step (jobs: how many
        took it), before the jobs it finished are done."""
        active = []
        while True:
            for job in [*jobs, *(take(not (active or jobs)) if take is not None else [])]:
                if job.left > 0:
                    active.append(job)
                else:
                    job.on_done(job.out)
            jobs = []
            if not active:
                return
            self._step(active)
            if on_step is not None:
                on_step(len(active))
            for job in (j for j in active if j.left == 0):
                job.on_done(job.out)
            active = [j for j in active if j.left > 0]

    def _step(self, jobs: list[DraftJob]) -> None:
        """One draft step of each job: it feeds whatever its cache has not seen yet (the backlog, then the
        last draft token) and drafts the next token (a feed-only job drafts none); the branches its plan grows
        take a step too."""
        rows = [(j.session.cache, self._unfed(j.session, j.out)) for j in jobs]
        twigs = [(j, *r) for j, (cache, x) in zip(jobs, rows) for r in self._branch_rows(cache, x, j.out, j.plan, j.branches)]
        logits = run_ragged_by_shape(self.model, [r[0] for r in rows] + [t[1] for t in twigs],
                                     [r[1] for r in rows] + [t[2] for t in twigs], self.decode_max)
        for j, lg in zip(jobs, logits):
            j.left -= 1
            if not j.feed_only:
                j.out.append(self._choose(lg[-1], j.session, guess=len(j.out) == j.guess_at))
        for (j, _, _, tokens), lg in zip(twigs, logits[len(rows):]):
            tokens.append(self._choose(lg[-1], j.session, runner_up=False)[0])

    @staticmethod
    def _branch_rows(cache: CachedSequence, fed: list[int], out: list[Step], plan: dict[int, int],
                     branches: dict[int, Branch]) -> list[tuple[CachedSequence, list[int], list[int]]]:
        """(cache, input, tokens grown) of every branch of one session this step grows, while its chain feeds
        `fed` on `cache`. The branch of the runner-up of the step just drafted opens on a copy of that cache,
        which then covers everything before that step's token (when the chain feeds that token alone), and
        feeds the runner-up; an open branch feeds its last token."""
        j = len(out) - 1
        if plan.get(j) and j not in branches and len(fed) == 1:
            branches[j] = ([], CachedSequence(hf_compat.clone_cache(cache.cache)))
        return [(c, [tokens[-1]] if tokens else [out[q][2]], tokens)
                for q, (tokens, c) in branches.items() if len(tokens) < plan.get(q, 0)]

    @staticmethod
    def _unfed(s: EdgeSession, drafted: list[Step]) -> list[int]:
        """The tokens of committed + drafted that the draft cache has not fed (no copy of the context)."""
        fed, n = s.cache.length, len(s.tokens)
        head = s.tokens[fed:] if fed < n else []
        return head + [t for t, *_ in drafted[max(0, fed - n):]]

    def _choose(self, logits: torch.Tensor, s: EdgeSession, runner_up: bool = True, guess: bool = False) -> Step:
        """(token, q(token), runner-up): greedy takes the top two. Sampling draws the token from q and, when
        the session sends trees, the runner-up from q without it (-1 in chains; when q has nothing else, the
        top other logit, which the cloud then never accepts). A `guess` (d_{K+1}) is q's top two in sampling
        sessions too: it is never sent as a draft token, only where drafting ahead goes on from (lossless
        whichever token it is), and q's likeliest tokens match a token the cloud draws from p more often than
        a draw from q does."""
        if s.sampling.greedy or guess:
            top = logits.topk(2).indices.tolist()
            return top[0], 1.0, top[1]
        q = S.probs(logits[None], s.sampling)[0]  # [V]
        token = S.sample(q, s.generator)
        if not (runner_up and s.shape.siblings):
            return token, float(q[token]), -1
        alt = S.sample_without(q, [token], s.generator)
        if alt is None:
            alt = next(t for t in logits.topk(2).indices.tolist() if t != token)
        return token, float(q[token]), alt

    def apply(self, s: EdgeSession, draft: list[int], accepted: int, token: int) -> None:
        """Commit d_1..d_n and the cloud's token; keep the cache only over committed tokens (and, after a
        lookahead hit, over the tokens drafted ahead, which become the next round's `ready` draft)."""
        k = len(draft)
        hit = k == s.sent and self.lookahead_hit(s, accepted, token)
        keep = len(s.tokens) + accepted
        s.tokens.extend(draft[:accepted])
        s.tokens.append(token)
        s.ready = s.drafted[k + 1 :] if hit else []
        s.branches = {j - k - 1: b for j, b in s.ahead_branches.items() if j > k} if hit else {}
        s.drafted, s.sent, s.ahead_branches = [], 0, {}
        s.cache.truncate(len(s.tokens) + len(s.ready) - 1 if s.ready else keep)

    def apply_tree(self, s: EdgeSession, accepted: list[int], token: int) -> None:
        """Commit a token tree's accepted path (d_1..d_n, or d_1..d_{i-1}, the runner-up s_i and part of its
        branch) and the cloud's token: the cache keeps the accepted tokens it fed (a branch's own cache when
        the path took one); what it did not feed is fed next round."""
        chain = [t for t, *_ in s.drafted[: s.sent]]
        n = 0
        while n < len(accepted) and n < len(chain) and accepted[n] == chain[n]:
            n += 1
        if n == len(accepted):
            self.apply(s, chain, n, token)
            return
        branch = s.branches.get(n)
        self.apply(s, chain, n, accepted[n])  # the runner-up stands in for the cloud's token at its position
        s.tokens.extend(accepted[n + 1 :] + [token])
        if branch is not None:
            s.cache = branch[1]
            s.cache.truncate(len(s.tokens) - 1)

    @staticmethod
    def promote(s: EdgeSession, k: int) -> None:
        """After a lookahead hit: the first k ready tokens were already sent as a pipelined round, so they are
        the session's in-flight draft now (as if `propose` had just drafted them)."""
        if k > len(s.ready):
            raise ValueError(f"{s.session_id}: {k} tokens sent ahead but only {len(s.ready)} ready")
        s.drafted, s.sent, s.ready = s.ready, k, []

    def resync(self, s: EdgeSession) -> None:
        """Forget the draft cache (it is rebuilt from the committed tokens on the next proposal)."""
        s.cache, s.ready, s.drafted, s.sent, s.branches, s.ahead_branches = CachedSequence(), [], [], 0, {}, {}


def proposal_of(steps: list[Step], tree: Tree = Tree.CHAIN, branches: dict[int, list[int]] | None = None,
                max_nodes: int = MAX_NODES) -> Proposal:
    """The proposal of these drafted steps (token, q, runner-up): a chain, or a token tree with each
    step's runner-up beside its token, followed by what of the tokens `branches[i]` grown after runner-up i
    the shape has room for at this K."""
    chain = Proposal([t for t, *_ in steps], [q for _, q, _ in steps])
    if not (Tree(tree).siblings and steps) or any(alt < 0 for *_, alt in steps):
        return chain  # (steps drafted for a chain have no runner-ups)
    branches, room = branches or {}, continuations(len(steps), Tree(tree), max_nodes)
    grown = [[alt, *branches.get(i, [])[:n]] for i, ((*_, alt), n) in enumerate(zip(steps, room))]
    tokens = chain.tokens + [t for b in grown for t in b]
    q = chain.q_token_probs + [0.0] * (len(tokens) - len(steps))
    return Proposal(tokens, q, tree_parents(len(steps), [len(b) - 1 for b in grown]))
