"""What an edge device does while a round waits for its answer: one mode, shared by the fleet spec, the
emulator, the adaptive controller and the benchmarks (no torch here, so a fleet spec loads without it).

- `off`: the device idles until the answer comes.
- `draft`: draft-ahead. It drafts its guess d_{K+1}, then `ahead_tokens(K)` more; after a lookahead hit (all K
  accepted and the cloud's token was d_{K+1}) the next round's draft is ready. With token trees of `branches`
  it also continues the guess's runner-up s_{K+1} (a second guess, `second_guess`), one more branch in the
  same steps, so a round whose cloud token was s_{K+1} is a lookahead hit too.
- `pipeline`: draft-ahead, and it sends that next round as soon as it is drafted, before the answer; the
  cloud verifies it only if the round before it committed what it assumes (see `protocol.DraftRound.assume`).
"""

from __future__ import annotations

from enum import Enum

from flexspec_serve.tree import Tree


class Ahead(str, Enum):
    OFF = "off"
    DRAFT = "draft"
    PIPELINE = "pipeline"

    @property
    def drafts(self) -> bool:
        """The device drafts during the wait (draft-ahead or pipelining)."""
        return self is not Ahead.OFF

    @property
    def sends(self) -> bool:
        """The device sends the round it drafted ahead before the answer (pipelining)."""
        return self is Ahead.PIPELINE


def ahead_tokens(k: int) -> int:
    """Tokens drafted ahead past d_{K+1} while a K-token round waits: a next round of the same K and its
    own guess, so a hit's next round needs no draft step before it is sent."""
    return k + 1


def second_guess(ahead: Ahead, tree: Tree) -> bool:
    """Whether a device drafting ahead also continues the guess's runner-up s_{K+1}: on `branches`, whose steps
    already run one row per open branch (`flexspec_serve.tree`), and not when pipelining (the round it sends
    early assumes d_{K+1})."""
    return Ahead(ahead) is Ahead.DRAFT and Tree(tree) is Tree.BRANCHES
