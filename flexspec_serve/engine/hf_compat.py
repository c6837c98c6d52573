"""Every transformers-version difference the engine depends on, in one place.

- transformers >= 5.24 names the forward argument `cache=`, earlier 5.x `past_key_values=`;
- `DynamicCache.crop(n)` takes a negative count of tokens to drop (`crop(-n)`); `crop(0)` on 5.17 would
  drop everything, so a zero count must never reach it;
- the per-layer tensors live in `cache.layers[i].keys/.values` (every 5.x).

Two things here are ours, because transformers' defaults copy every cached position on every forward:
- `RoomyLayer`, the cache layer of every cache the engine makes (`new_cache`, `cache_from_tensors`):
  `DynamicLayer` concatenates the whole sequence again per forward; this one appends into spare room;
- `GROUPED_SDPA`, the attention `load_causal_lm` selects: with a mask on a CPU, transformers' SDPA
  attention repeats each KV head for its query heads (a copy of the layer's whole cache) before calling
  SDPA; this one lets SDPA group them (`enable_gqa`). Same outputs (tested); elsewhere it is theirs.
And `forward_logits` runs `lean_llama.forward` for the models `prefer_fast_paths` marked for it.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from flexspec_serve.engine import lean_llama

GROUPED_SDPA = "flexspec_grouped_sdpa"

MIN_ROOM = 64  # spare positions a layer allocates at least when it has to grow (a few rounds of K + 1)


class RoomyLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of the first positions of buffers with spare room
    after them, so an append writes the new positions in place (growing by a quarter, at least `MIN_ROOM`,
    when full). It writes only into buffers it allocated: tensors it was handed (`adopt`) are copied into
    a buffer of its own on the first append. A view read from it stays valid until it is cropped and then
    appended to (the append reuses the positions the crop gave up)."""

    _k_buf: torch.Tensor | None = None
    _v_buf: torch.Tensor | None = None

    @classmethod
    def adopt(cls, keys: torch.Tensor, values: torch.Tensor, length: int | None = None,
              writable: bool = False) -> RoomyLayer:
        """A layer over `keys`/`values` [B, H, T, D], holding their first `length` positions (all by default);
        `writable`: the caller hands over the buffers, so the positions past `length` are room to append into."""
        layer = cls()
        layer.lazy_initialization(keys, values)
        length = keys.shape[-2] if length is None else length
        layer.keys, layer.values = keys[..., :length, :], values[..., :length, :]
        if writable:
            layer._k_buf, layer._v_buf = keys, values
        return layer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, add = self.get_seq_length(), key_states.shape[-2]
        if not self._has_room(key_states, n + add):
            cap = n + add + max(MIN_ROOM, (n + add) // 4)
            k_buf = key_states.new_empty((*key_states.shape[:2], cap, key_states.shape[-1]))
            v_buf = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))
            if n:
                k_buf[..., :n, :].copy_(self.keys)
                v_buf[..., :n, :].copy_(self.values)
            self._k_buf, self._v_buf = k_buf, v_buf
        self._k_buf[..., n : n + add, :].copy_(key_states)
        self._v_buf[..., n : n + add, :].copy_(value_states)
        self.keys, self.values = self._k_buf[..., : n + add, :], self._v_buf[..., : n + add, :]
        return self.keys, self.values

    def _has_room(self, new: torch.Tensor, length: int) -> bool:
        """Whether the current keys are the head of this layer's own buffer and `length` positions fit it."""
        buf = self._k_buf
        if buf is None or length > buf.shape[-2] or buf.shape[:2] != new.shape[:2] or buf.dtype != new.dtype:
            return False
        return self.keys.numel() == 0 or (self.keys.data_ptr() == buf.data_ptr() and self.keys.stride() == buf.stride()
                                          and self.values.data_ptr() == self._v_buf.data_ptr())


def _grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except with a mask on a CPU: query [B, Hq, N, D] against key/value
    [B, Hkv, T, D] with Hkv < Hq, grouped inside SDPA instead of repeated first. (On CUDA, SDPA with a mask
    and grouping falls back to its math kernel, so there transformers' own choice stands.)"""
    grouped = query.shape[1] != key.shape[1]
    if attention_mask is None or not grouped or query.device.type != "cpu" or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True)  # [B, Hq, N, D]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa)
AttentionMaskInterface.register(GROUPED_SDPA, sdpa_mask)


def prefer_fast_paths(model: torch.nn.Module) -> None:
    """Switch a model that uses transformers' SDPA attention to `GROUPED_SDPA` (others are left as they
    are), then mark it for `lean_llama.forward` where that applies."""
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(GROUPED_SDPA)
    lean_llama.prefer(model, attention=("sdpa", GROUPED_SDPA))


def new_cache() -> DynamicCache:
    """An empty cache whose layers are `RoomyLayer`s."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = RoomyLayer
    return cache


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
    """Run the model on `input_ids` [B, N] on top of `cache` (updated in place); returns logits [B, N, V].
    A model `lean_llama.prefer` marked runs that forward instead of transformers' (same logits)."""
    if lean_llama.preferred(model):
        return lean_llama.forward(model, input_ids, cache, attention_mask=attention_mask, position_ids=position_ids)
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
    """Each layer's keys and values [B, H, T, D]: views, valid until the cache next changes."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_from_tensors(kv: list[tuple[torch.Tensor, torch.Tensor]], length: int | None = None,
                       writable: bool = False) -> DynamicCache:
    """A cache holding these per-layer tensors [B, H, T, D] without copying them (their first `length`
    positions; `writable`: the positions past it are room the cache may append into, see `RoomyLayer`)."""
    cache = new_cache()
    cache.layers = [RoomyLayer.adopt(k, v, length, writable) for k, v in kv]
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
