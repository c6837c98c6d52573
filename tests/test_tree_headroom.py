"""The token-tree headroom benchmark's decoding model (pure functions; the models are not loaded)."""

from __future__ import annotations

import pytest

from benchmarks.tree_headroom import accepted, best_tree, chain, chain_plus_alternates, path_counts, tau, widths


def test_a_round_accepts_the_longest_matching_rank_path_and_adds_the_targets_token():
    rho = [0, 0, 1, 0, 3, 0]  # rank of the target's token among the draft's candidates, per position
    assert accepted(chain(4), rho, 0) == 2  # the third token was the draft's second choice
    assert accepted(chain_plus_alternates(4), rho, 0) == 3  # ... which the sibling at depth 3 holds
    # chain-4 decodes [0 0 | 1] [0 | 3] [0]: 6 tokens in 3 rounds
    assert tau(chain(4), [rho]) == (pytest.approx(2.0), 3)
    assert tau(set(), [rho]) == (1.0, 6)  # no draft: one token per round (cloud-only)


def test_best_tree_is_prefix_closed_within_its_depth_and_siblings_cost_no_draft_step():
    ranks = [[0, 1, 0, 0, 2, 0, 1, 0] * 4]
    tree = best_tree(path_counts(ranks), 6, max_depth=2)
    assert len(tree) == 6 and max(map(len, tree)) <= 2
    assert all(p[:-1] in tree for p in tree if len(p) > 1)
    assert widths(chain_plus_alternates(3)) == [1, 1, 1] and widths({(0,), (1,), (0, 0), (1, 0)}) == [1, 2]


def test_the_branches_shape_is_the_one_devices_send():
    from flexspec_serve.tree import Tree, tree_nodes

    from benchmarks.tree_headroom import branches

    assert branches(3) == chain(3) | {(1,), (1, 0), (1, 0, 0), (0, 1), (0, 1, 0), (0, 0, 1)}
    assert all(len(branches(k)) == tree_nodes(k, Tree.BRANCHES) for k in range(1, 7))
    assert all(p[:-1] in branches(5) for p in branches(5) if len(p) > 1)
