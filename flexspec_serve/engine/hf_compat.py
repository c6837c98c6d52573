"""Every transformers-version difference the engine depends on, in one place.

- transformers >= 5.24 names the forward argument `cache=`, earlier 5.x `past_key_values=`;
- `DynamicCache.crop(n)` takes a negative count of tokens to drop (`crop(-n)`); `crop(0)` on 5.17 would
  drop everything, so a zero count must never reach it;
- the per-layer tensors live in `cache.layers[i].keys/.values` (5.x) or `cache.key_cache[i]` (4.x).
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_cls: type) -> str:
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: DynamicCache,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the model on `input_ids` [B, N] on top of `cache` (updated in place); returns logits [B, N, V]."""
    kwargs = {_cache_kwarg(type(model)): cache, "use_cache": True}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
    return out.logits


def drop_last(cache: DynamicCache, n: int) -> None:
    """Remove the last `n` positions from every layer of `cache`."""
    if n < 0:
        raise ValueError(f"cannot drop a negative number of positions ({n})")
    if n:
        cache.crop(-n)


def layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers 4.x


def cache_from_tensors(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding exactly these per-layer tensors [B, H, T, D], without copying them where the
    installed transformers has per-layer objects (it does since 4.56; `update` would copy each one)."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k[:, :, :0], v[:, :, :0], i)  # initialises the layer (dtype, device) with nothing in it
    if hasattr(cache, "layers"):
        for layer, (k, v) in zip(cache.layers, kv):
            layer.keys, layer.values = k, v
    else:  # transformers 4.x
        for i, (k, v) in enumerate(kv):
            cache.update(k, v, i)
    return cache


def clone_cache(cache: DynamicCache | None) -> DynamicCache | None:
    """An independent copy (a token-tree branch grows on it while the original goes on)."""
    return None if cache is None else cache_from_tensors([(k.clone(), v.clone()) for k, v in layer_tensors(cache)])


def seq_length(cache: DynamicCache | None) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def cache_nbytes(cache: DynamicCache | None) -> int:
    if cache is None:
        return 0
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layer_tensors(cache))
