"""Turning logits into distributions, and the speculative accept/reject rule — defined once.

Shapes: K draft tokens; `p` target probs [K+1, V] (the last row for the bonus token); `q` draft probs
[K, V]; `draft` token ids [K]. Greedy mode (temperature 0) needs only argmax p.

Token trees: K nodes with parents (-1: the token before the tree); row 0 of p and q is the distribution
after the token before the tree, row j + 1 the one after node j, so both are [K+1, V]. A node's children are
its candidates, in the order the draft drew them. Greedy (`accept_greedy_tree`) follows the target's
argmax; sampling (`accept_sampling_tree`) tries the candidates in turn by recursive rejection sampling
(Jeon et al. 2024, "Recursive Speculative Decoding"): candidate c_1 ~ q is accepted with probability
min(1, p(c_1) / q(c_1)); when it is rejected, p becomes normalize(max(0, p - q)) and q becomes q without
c_1, renormalized, the distribution the device drew c_2 from (`sample_without`), and so on. When every
candidate is rejected the token comes from what is left of p. Either way the output follows p exactly.

Devices: p and q may live on the GPU that computed them; the random numbers always come from the session's
CPU `torch.Generator` (the uniforms are drawn on the CPU and the distributions a token is drawn from are
copied there, V floats), so a seeded round decides the same way on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


SAMPLING_EPS = 1e-5  # temperatures below this are greedy: dividing logits by them overflows to inf


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 (or below SAMPLING_EPS) means greedy; top_p 1 means no nucleus cut; seed seeds the
    per-session generator."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (0.0 <= self.temperature <= 10.0):
            raise ValueError(f"temperature={self.temperature!r}: must be within [0, 10]")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p={self.top_p!r}: must be within (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[N, V] logits -> [N, V] float32 probabilities after temperature and top-p (sampling mode only)."""
    x = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(x, dim=-1, descending=True)
        outside = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= params.top_p  # keep the smallest nucleus
        outside[..., 0] = False  # the top token always stays (a top_p below float32's range compares as 0)
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        x = torch.zeros_like(x).scatter_(-1, order, sorted_p)
        x = x / x.sum(dim=-1, keepdim=True)
    return x


def sample(dist: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a [V] probability vector (drawn on the CPU, where `generator` lives)."""
    return int(torch.multinomial(dist.cpu(), 1, generator=generator).item())


def sample_without(dist: torch.Tensor, taken: list[int], generator: torch.Generator) -> int | None:
    """One token from a [V] probability vector with the `taken` tokens removed and the rest renormalized
    (a token tree's next candidate at a position); None when nothing else has any probability."""
    rest = dist.clone()
    rest[taken] = 0.0
    return sample(rest, generator) if rest.sum() > 0 else None


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """normalize(max(0, p - q)) [V]: what a rejected candidate leaves of p (p itself when that is nothing)."""
    rest = (p - q).clamp_min(0.0)
    total = rest.sum()
    return rest / total if total > 0 else p


def tree_children(parents: list[int]) -> dict[int, list[int]]:
    """Node (-1: the token before the tree) -> its children's indices, in wire order (the draw order)."""
    children: dict[int, list[int]] = {}
    for j, parent in enumerate(parents):
        children.setdefault(parent, []).append(j)
    return children


def accept_greedy(target_logits: torch.Tensor, draft: list[int]) -> tuple[int, int]:
    """target_logits [K+1, V] -> (accepted n, recovered-or-bonus token = argmax p_{n+1})."""
    choice = target_logits.argmax(dim=-1).tolist()  # [K+1]
    n = 0
    while n < len(draft) and draft[n] == choice[n]:
        n += 1
    return n, choice[n]


def accept_greedy_tree(target_logits: torch.Tensor, draft: list[int], parents: list[int]) -> tuple[list[int], int]:
    """A token tree: node j is draft[j] under parents[j] (-1: the token before the tree). target_logits
    [K+1, V]: row 0 after the token before the tree, row j + 1 after node j -> (accepted path, as node
    indices from the root, and the target's token after it). From the root, the path follows the child whose
    token is the target's choice there (its first such child) until none is."""
    choice = target_logits.argmax(dim=-1).tolist()  # [K+1]
    children = tree_children(parents)
    path, at = [], -1
    while True:
        nxt = next((j for j in children.get(at, ()) if draft[j] == choice[at + 1]), None)
        if nxt is None:
            return path, choice[at + 1]
        path.append(nxt)
        at = nxt


def accept_sampling(
    p: torch.Tensor, q: torch.Tensor, draft: list[int], generator: torch.Generator
) -> tuple[int, int]:
    """Lossless speculative sampling: p [K+1, V], q [K, V] -> (accepted n, recovered-or-bonus token).

    Draws exactly K uniforms then one token, whatever the outcome, so a session's generator advances
    the same way in batched and one-at-a-time verification.
    """
    k = len(draft)
    u = torch.rand(k, generator=generator)  # [K]
    if k:
        idx = torch.arange(k, device=p.device)
        ratio = (p[idx, draft] / q[idx, draft].clamp_min(1e-30)).cpu()  # p_i(d_i) / q_i(d_i), [K]
        rejected = (u > ratio).nonzero()
        n = int(rejected[0, 0]) if rejected.numel() else k
    else:
        n = 0
    if n == k:
        return n, sample(p[k], generator)  # bonus token ~ p_{K+1}
    return n, sample(residual(p[n], q[n]), generator)  # recovered token ~ normalize(max(0, p - q))


def accept_sampling_tree(p: torch.Tensor, q: torch.Tensor, draft: list[int], parents: list[int],
                         generator: torch.Generator) -> tuple[list[int], int]:
    """Lossless speculative sampling over a token tree: p, q [K+1, V] (rows as in the module docstring) ->
    (accepted path, node indices from the root; the recovered or bonus token after it).

    Each node's candidates (its children, in draw order) are tried by recursive rejection sampling. Node j
    uses uniform u_j; K uniforms are drawn first and one token last, whatever the outcome, as in
    `accept_sampling`."""
    u = torch.rand(len(draft), generator=generator)  # [K]
    children = tree_children(parents)
    path, at = [], -1
    while True:
        p_at, q_at = p[at + 1], q[at + 1].clone()  # [V] each: target and draft after the path so far
        for j in children.get(at, ()):
            c = draft[j]
            if q_at[c] <= 0:  # not a draw from q_at (the device had nothing left to draw): rejected, p unchanged
                continue
            if float(u[j]) * float(q_at[c]) <= float(p_at[c]):  # accept c with probability min(1, p(c) / q(c))
                path.append(j)
                break
            p_at = residual(p_at, q_at)  # the rest of p, and q without c
            q_at[c] = 0.0
            q_at = q_at / q_at.sum() if q_at.sum() > 0 else q_at
        else:
            return path, sample(p_at, generator)  # bonus (a leaf: no candidates) or recovered token
        at = path[-1]
