"""Ragged batched forward passes over many sessions' KV caches.

Each session owns a single-sequence `DynamicCache` (of `hf_compat.RoomyLayer`s, which append in place).
To run B sessions at once, their caches are copied once, left-padded to the longest, into a batch buffer
with room for the new tokens; the new tokens are right-padded; a 2-D attention mask (none when no row is
padded) hides both paddings
and explicit position ids keep every session's RoPE positions its own. Afterwards each session's cache
gets its own new positions appended (its old ones are unchanged, so they are not copied back). A batch of
one skips all of that and runs in place.

Token trees (`trees[i]`, the parents of the last tokens of `inputs[i]`): those tokens are the nodes of a
tree hanging off the token before them, each attending to the context and to its own ancestors only, at
the position its depth gives it; the mask is then a 4-D additive one. The cache keeps every node;
`CachedSequence.keep` keeps the accepted path afterwards.

This module does not know about drafts, acceptance or sessions' token lists: callers say which tokens
to feed and read the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from flexspec_serve.engine import hf_compat


@dataclass
class CachedSequence:
    """A KV cache covering the first `length` tokens of some token list (None until first used)."""

    cache: DynamicCache | None = None

    @property
    def length(self) -> int:
        return hf_compat.seq_length(self.cache)

    def truncate(self, keep: int) -> None:
        """Roll back to the first `keep` positions (rejected drafts leave the cache this way)."""
        if keep < self.length:
            hf_compat.drop_last(self.cache, self.length - keep)

    def keep(self, prefix: int, extra: list[int]) -> None:
        """Keep the first `prefix` positions and then positions prefix + e for e in `extra` (ascending):
        the accepted path of a token tree fed after `prefix` positions. A cache that never fed past `prefix`
        (or none) is left as it is."""
        if extra == list(range(len(extra))) or self.length <= prefix:
            self.truncate(prefix + len(extra))
            return
        kept = torch.tensor(list(range(prefix)) + [prefix + e for e in extra])
        layers = hf_compat.layer_tensors(self.cache)
        kept = kept.to(layers[0][0].device)
        self.cache = hf_compat.cache_from_tensors([(k.index_select(2, kept), v.index_select(2, kept)) for k, v in layers])

    def nbytes(self) -> int:
        return hf_compat.cache_nbytes(self.cache)


@torch.inference_mode()
def run_ragged(
    model: torch.nn.Module, seqs: list[CachedSequence], inputs: list[list[int]], pad_id: int = 0,
    trees: list[list[int] | None] | None = None,
) -> list[torch.Tensor]:
    """Feed `inputs[i]` (at least one token each) on top of `seqs[i]`; returns logits [n_i, V] per session.

    Every `seqs[i].cache` is extended by `len(inputs[i])` positions. `trees[i]`, if given, are the parents
    of the last len(trees[i]) tokens of inputs[i]: -1 for the token before them, else an earlier node's index.
    """
    if len(seqs) != len(inputs):
        raise ValueError(f"{len(seqs)} sequences but {len(inputs)} inputs")
    if any(len(x) == 0 for x in inputs):
        raise ValueError("every sequence needs at least one new token")
    device = next(model.parameters()).device
    has_tree = trees is not None and any(trees)
    if len(seqs) == 1 and not has_tree:
        return [_run_single(model, seqs[0], inputs[0], device)]
    past = [s.length for s in seqs]
    new = [len(x) for x in inputs]
    p_max, n_max = max(past), max(new)
    ids = torch.full((len(seqs), n_max), pad_id, dtype=torch.long)
    for b, x in enumerate(inputs):
        ids[b, : len(x)] = torch.tensor(x, dtype=torch.long)
    positions = torch.tensor(past)[:, None] + torch.arange(n_max)[None, :]  # [B, N]
    mask = None  # nothing padded: causal order alone
    if has_tree:
        mask, positions = _tree_mask(trees, past, new, p_max, n_max, next(model.parameters()).dtype)
    elif min(past) < p_max or min(new) < n_max:
        mask = torch.zeros((len(seqs), p_max + n_max), dtype=torch.long)
        for b, (p_len, n_len) in enumerate(zip(past, new)):
            mask[b, p_max - p_len : p_max + n_len] = 1
    cache = _stack_left_padded(seqs, p_max, n_max) if p_max else hf_compat.new_cache()
    logits = hf_compat.forward_logits(
        model, ids.to(device), cache, attention_mask=None if mask is None else mask.to(device),
        position_ids=positions.to(device))  # [B, N, V]
    _append_new(cache, seqs, new, p_max)
    return [logits[b, :n_len].float() for b, n_len in enumerate(new)]


def decode_max_tokens(max_draft_tokens: int) -> int:
    """The longest input of a decode round: K draft tokens, the previous round's correction or bonus token,
    and one context token the client added. Longer inputs are prompts (or resyncs) and get their own forward."""
    return max_draft_tokens + 2


def run_ragged_by_shape(
    model: torch.nn.Module, seqs: list[CachedSequence], inputs: list[list[int]], short_max: int
) -> list[torch.Tensor]:
    """`run_ragged`, with inputs longer than `short_max` tokens (prompts) run as a forward of their own:
    padding makes every session of a batch compute the longest input, so one prompt batched with
    decode steps would multiply their cost by its length."""
    out: list[torch.Tensor | None] = [None] * len(inputs)
    for group in shape_groups([len(x) for x in inputs], short_max):
        for i, logits in zip(group, run_ragged(model, [seqs[i] for i in group], [inputs[i] for i in group])):
            out[i] = logits
    return out  # type: ignore[return-value]


def shape_groups(lengths: list[int], short_max: int) -> list[list[int]]:
    """Indices of decode-sized inputs (<= short_max tokens) and of longer ones (prompts); empty groups left out."""
    short = [i for i, n in enumerate(lengths) if n <= short_max]
    long = [i for i, n in enumerate(lengths) if n > short_max]
    return [g for g in (short, long) if g]


def _run_single(model, seq: CachedSequence, tokens: list[int], device) -> torch.Tensor:
    if seq.cache is None:
        seq.cache = hf_compat.new_cache()
    start = seq.length
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    positions = torch.arange(start, start + len(tokens), device=device)[None, :]
    return hf_compat.forward_logits(model, ids, seq.cache, position_ids=positions)[0].float()  # [n, V]


def tree_depths(parents: list[int]) -> list[int]:
    """Each node's depth (1: a child of the token before the tree); a parent must come before its child."""
    depth: list[int] = []
    for j, par in enumerate(parents):
        if not -1 <= par < j:
            raise ValueError(f"tree node {j} has parent {par}: it must be -1 (the token before the tree) "
                             "or an earlier node")
        depth.append(1 if par < 0 else depth[par] + 1)
    return depth


def tree_depth(parents: list[int]) -> int:
    """Nodes on the longest root path of a tree (0 for no nodes): the positions a round could accept."""
    return max(tree_depths(parents), default=0)


def _tree_mask(trees, past, new, p_max, n_max, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive mask [B, 1, N, P + N] and position ids [B, N]: context tokens causal, tree nodes seeing the
    context and their ancestors, each node at (position of the token before the tree) + its depth; padding
    rows see themselves only (their outputs are dropped)."""
    allowed = torch.zeros((len(past), n_max, p_max + n_max), dtype=torch.bool)
    positions = torch.tensor(past)[:, None] + torch.arange(n_max)[None, :]  # [B, N]
    for b, parents in enumerate(trees):
        parents = parents or []
        n, t = new[b], len(parents)
        c = n - t  # context tokens before the tree
        depth = tree_depths(parents)
        ancestors: list[list[bool]] = []  # [t][t]: node j sees node i
        for j, par in enumerate(parents):
            ancestors.append([*(ancestors[par] if par >= 0 else [False] * t)])
            ancestors[j][j] = True
        block = torch.ones((n_max, n_max), dtype=torch.bool).tril() & torch.eye(n_max, dtype=torch.bool).logical_or(
            torch.arange(n_max)[:, None] < n)  # causal over the inputs, the diagonal for padding rows
        if t:
            block[c:n, c:n] = torch.tensor(ancestors, dtype=torch.bool)
            positions[b, c:n] = past[b] + c - 1 + torch.tensor(depth)
        allowed[b, :, p_max - past[b] : p_max] = True  # the session's cache
        allowed[b, :, p_max:] = block
    neg = torch.finfo(dtype).min
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, neg)[:, None]  # [B, 1, N, P+N]
    return mask, positions


def _stack_left_padded(seqs: list[CachedSequence], p_max: int, n_max: int) -> DynamicCache:
    """Every session's cache copied once into a [B, H, p_max + n_max, D] buffer per layer, right-aligned in its
    first p_max positions (the padding before it zeroed); the n_max positions after are the forward's room."""
    per_layer = []
    layers = [hf_compat.layer_tensors(s.cache) if s.length else None for s in seqs]  # once per session
    reference = next(lt for lt in layers if lt is not None)
    for layer_idx, (k_ref, v_ref) in enumerate(reference):
        k_out = k_ref.new_empty((len(seqs), k_ref.shape[1], p_max + n_max, k_ref.shape[3]))  # [B, H, P + N, D]
        v_out = v_ref.new_empty((len(seqs), v_ref.shape[1], p_max + n_max, v_ref.shape[3]))
        for b, lt in enumerate(layers):
            p_b = 0 if lt is None else lt[layer_idx][0].shape[2]
            if p_b < p_max:  # masked, but garbage could be inf or NaN (0 * NaN is NaN)
                k_out[b, :, : p_max - p_b].zero_()
                v_out[b, :, : p_max - p_b].zero_()
            if lt is not None:
                k, v = lt[layer_idx]  # [1, H, p_b, D]
                k_out[b, :, p_max - p_b : p_max] = k[0]
                v_out[b, :, p_max - p_b : p_max] = v[0]
        per_layer.append((k_out, v_out))
    return hf_compat.cache_from_tensors(per_layer, length=p_max, writable=True)


def _append_new(cache: DynamicCache, seqs: list[CachedSequence], new: list[int], p_max: int) -> None:
    """Each session's cache gets its own new positions (copied: a view would keep the batch's buffer alive)."""
    layers = hf_compat.layer_tensors(cache)  # each [B, H, P + N, D]
    for b, s in enumerate(seqs):
        if s.cache is None:
            s.cache = hf_compat.new_cache()
        for layer_idx, (k, v) in enumerate(layers):
            s.cache.update(k[b : b + 1, :, p_max : p_max + new[b]], v[b : b + 1, :, p_max : p_max + new[b]], layer_idx)
