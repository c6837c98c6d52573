"""Turning logits into distributions, and the speculative accept/reject rule — defined once.

Shapes: K draft tokens; `p` target probs [K+1, V] (the last row for the bonus token); `q` draft probs
[K, V]; `draft` token ids [K]. Greedy mode (temperature 0) needs only argmax p; it also decides token trees
(`accept_greedy_tree`: K nodes with parents, the accepted path and the token after it).
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
    """One token from a [V] probability vector."""
    return int(torch.multinomial(dist, 1, generator=generator).item())


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
    children: dict[int, list[int]] = {}
    for j, parent in enumerate(parents):
        children.setdefault(parent, []).append(j)
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
        idx = torch.arange(k)
        ratio = p[idx, draft] / q[idx, draft].clamp_min(1e-30)  # p_i(d_i) / q_i(d_i)
        rejected = (u > ratio).nonzero()
        n = int(rejected[0, 0]) if rejected.numel() else k
    else:
        n = 0
    if n == k:
        return n, sample(p[k], generator)  # bonus token ~ p_{K+1}
    residual = (p[n] - q[n]).clamp_min(0.0)  # recovered token ~ normalize(max(0, p - q))
    total = residual.sum()
    return n, sample(residual / total if total > 0 else p[n], generator)
