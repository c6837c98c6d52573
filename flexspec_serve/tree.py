"""The shape of a round's draft: a chain, or a token tree grown from the draft's own steps.

- `chain`: d_1..d_K, one per draft step.
- `second`: second choices. Each step's runner-up s_i rides beside d_i as a leaf: 2K nodes, no extra draft step.
  Greedy sessions take q's top two; sampling sessions draw s_i from q without d_i.
- `branches`: second choices, and each runner-up continued by the draft for up to `BRANCH_TOKENS` more
  tokens (never deeper than d_K). The draft feeds s_i beside d_{i+1}'s step and each branch's last token
  beside later steps, so a round still takes K draft steps, each over 1 + (open branches) rows. That costs
  about one row's time on a memory-bound phone, the assumption `benchmarks.tree_headroom` states; its table
  puts this shape within a few percent of the best tree of any shape. Tokens drafted ahead grow their
  branches the same way, for a next round of the same K.

Node order on the wire: d_1..d_K first, then for each i, s_i followed by its continuation. A root path is
the chain's exactly when it is 0, 1, ..., n-1 (`on_chain`). Nodes past the server's limit are not grown:
runner-ups always ride (2K nodes), and continuations go to the shallowest branches first (`continuations`).

No torch here: the controller and the fleet spec use it too.
"""

from __future__ import annotations

import functools
from enum import Enum

BRANCH_TOKENS = 2  # continuation of a runner-up: `tree_headroom` finds little past 2 at the K it picks
MAX_NODES = 16  # the verifier's default max_draft_tokens: a round's nodes must fit in it


class Tree(str, Enum):
    CHAIN = "chain"
    SECOND = "second"
    BRANCHES = "branches"

    @property
    def siblings(self) -> bool:
        """Rounds carry each draft step's runner-up (a token tree)."""
        return self is not Tree.CHAIN


def continuations(k: int, tree: Tree, max_nodes: int = MAX_NODES) -> list[int]:
    """Tokens drafted after each runner-up s_1..s_K (0 for `second`), within `max_nodes` in all."""
    if tree is not Tree.BRANCHES:
        return [0] * k
    budget, out = max_nodes - 2 * k, []
    for i in range(k):  # the shallowest branches first: a path reaches them more often
        n = max(0, min(BRANCH_TOKENS, k - 1 - i, budget))
        budget -= n
        out.append(n)
    return out


@functools.cache  # the controller asks for every K of every plan, once per round
def tree_nodes(k: int, tree: Tree, max_nodes: int = MAX_NODES) -> int:
    """Draft tokens a K-step round sends and the cloud verifies."""
    return k + (k + sum(continuations(k, tree, max_nodes)) if tree.siblings and k else 0)


def tree_parents(k: int, conts: list[int]) -> list[int]:
    """Parents of the nodes d_1..d_K, then s_i and its conts[i] tokens for each i (-1: the last committed token)."""
    parents = list(range(-1, k - 1))
    for i, n in enumerate(conts):
        parents.append(i - 1)  # s_i hangs where d_i does
        parents += [len(parents) - 1 + j for j in range(n)]
    return parents


def on_chain(path: list[int] | None) -> bool:
    """The accepted path runs along d_1, d_2, ... (None or []: nothing accepted, also the chain's)."""
    return not path or path == list(range(len(path)))


def ends_on_leaf(path: list[int] | None, parents: list[int] | tuple[int, ...] | None) -> bool:
    """The path's last node has no child in the tree (the draft never fed it)."""
    return bool(path) and parents is not None and path[-1] not in parents
