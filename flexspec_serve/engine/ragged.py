"""Ragged batched forward passes over many sessions' KV caches.

Each session owns a single-sequence `DynamicCache`. To run B sessions at once, their caches are
left-padded to the longest one and stacked; the new tokens are right-padded; a 2-D attention mask hides
both paddings and explicit position ids keep every session's RoPE positions its own. Afterwards each
session gets back its own cache, padding stripped. A batch of one skips all of that and runs in place.

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

    def nbytes(self) -> int:
        return hf_compat.cache_nbytes(self.cache)


@torch.inference_mode()
def run_ragged(
    model: torch.nn.Module, seqs: list[CachedSequence], inputs: list[list[int]], pad_id: int = 0
) -> list[torch.Tensor]:
    """Feed `inputs[i]` (at least one token each) on top of `seqs[i]`; returns logits [n_i, V] per session.

    Every `seqs[i].cache` is extended by `len(inputs[i])` positions.
    """
    if len(seqs) != len(inputs):
        raise ValueError(f"{len(seqs)} sequences but {len(inputs)} inputs")
    if any(len(x) == 0 for x in inputs):
        raise ValueError("every sequence needs at least one new token")
    device = next(model.parameters()).device
    if len(seqs) == 1:
        return [_run_single(model, seqs[0], inputs[0], device)]
    past = [s.length for s in seqs]
    new = [len(x) for x in inputs]
    p_max, n_max = max(past), max(new)
    ids = torch.full((len(seqs), n_max), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), p_max + n_max), dtype=torch.long)
    for b, (x, p_len, n_len) in enumerate(zip(inputs, past, new)):
        ids[b, :n_len] = torch.tensor(x, dtype=torch.long)
        mask[b, p_max - p_len : p_max + n_len] = 1
    positions = torch.tensor(past)[:, None] + torch.arange(n_max)[None, :]  # [B, N]
    cache = _stack_left_padded(seqs, p_max) if p_max else DynamicCache()
    logits = hf_compat.forward_logits(
        model, ids.to(device), cache, attention_mask=mask.to(device), position_ids=positions.to(device)
    )  # [B, N, V]
    _split_back(cache, seqs, past, new, p_max)
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
        seq.cache = DynamicCache()
    start = seq.length
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    positions = torch.arange(start, start + len(tokens), device=device)[None, :]
    return hf_compat.forward_logits(model, ids, seq.cache, position_ids=positions)[0].float()  # [n, V]


def _stack_left_padded(seqs: list[CachedSequence], p_max: int) -> DynamicCache:
    """Every session's cache copied once into a zero-initialised [B, H, p_max, D] per layer, right-aligned."""
    per_layer = []
    layers = [hf_compat.layer_tensors(s.cache) if s.length else None for s in seqs]  # once per session
    reference = next(lt for lt in layers if lt is not None)
    for layer_idx, (k_ref, v_ref) in enumerate(reference):
        k_out = k_ref.new_zeros((len(seqs), k_ref.shape[1], p_max, k_ref.shape[3]))  # [B, H, P, D]
        v_out = v_ref.new_zeros((len(seqs), v_ref.shape[1], p_max, v_ref.shape[3]))
        for b, lt in enumerate(layers):
            if lt is not None:
                k, v = lt[layer_idx]  # [1, H, p_b, D]
                k_out[b, :, p_max - k.shape[2] :] = k[0]
                v_out[b, :, p_max - v.shape[2] :] = v[0]
        per_layer.append((k_out, v_out))
    return hf_compat.cache_from_tensors(per_layer)


def _split_back(cache: DynamicCache, seqs, past, new, p_max) -> None:
    """Each session gets its own compact copy (a view would keep the whole batch's tensor alive)."""
    layers = hf_compat.layer_tensors(cache)  # each [B, H, P + N, D]
    for b, s in enumerate(seqs):
        lo, hi = p_max - past[b], p_max + new[b]
        s.cache = hf_compat.cache_from_tensors([(k[b : b + 1, :, lo:hi].clone(), v[b : b + 1, :, lo:hi].clone())
                                                for k, v in layers])
