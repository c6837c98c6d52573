"""A lean forward for Llama-architecture causal LMs: transformers' `LlamaForCausalLM` math, op for op,
without its per-call machinery.

At the sizes this project serves on a CPU (a 2-layer draft stepping one token, a 6-layer target verifying a
few), transformers' forward spends as long around the math as in it: building the causal mask through
its mask interface, module calls and hooks, output records. This forward reads the same weights and runs
the same ops in the same order (RMSNorm in float32, RoPE from the model's own `inv_freq`, attention through
the model's own attention function), so its logits equal transformers' (tested bit for bit on CPU).

The same layout covers `Qwen2ForCausalLM` (biases on q, k, v) and `MistralForCausalLM` when every layer
attends to the whole context (no sliding window). `hf_compat.prefer_fast_paths` (which `load_causal_lm`
calls) turns it on for a model it applies to (`applies_to`): one of those classes, SDPA attention
(transformers' or `hf_compat.GROUPED_SDPA`), static RoPE (no `dynamic` or `longrope` rescaling), SiLU, plain
`nn.Linear` projections (merged adapters, no wrappers or quantized layers) and no hooks on any module (e.g.
accelerate's offloading). Everything else runs transformers' forward (`hf_compat.forward_logits` decides).

What it does not do: training (no dropout), other architectures (Qwen3's per-head norms, Gemma's scaled
embeddings, sliding windows, ...), attention outputs or hidden states, or building masks beyond what the engine
passes (none, a 2-D padding mask, or a 4-D additive one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_MARK = "_flexspec_lean_llama"
_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}  # one layout, up to biases
_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}  # inv_freq does not change with the sequence length
_ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def applies_to(model: torch.nn.Module, attention: tuple[str, ...] = ("sdpa",)) -> bool:
    """Whether `forward` computes what transformers' forward would for this model; `attention`: the
    attention implementations allowed (SDPA-like: they take a boolean mask, True to attend, or None)."""
    cfg = model.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
    if not (type(model).__name__ in _ARCHITECTURES and cfg._attn_implementation in attention
            and rope in _STATIC_ROPE and cfg.hidden_act == "silu" and getattr(cfg, "pretraining_tp", 1) == 1
            and _full_attention(cfg)):
        return False
    try:
        linears = [model.lm_head, *(getattr(layer.self_attn, n) for layer in model.model.layers for n in _ATTN_LINEARS),
                   *(getattr(layer.mlp, n) for layer in model.model.layers for n in _MLP_LINEARS)]
    except AttributeError:  # a class of the same name laid out differently (remote code)
        return False
    hooked = any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook") for m in model.modules())
    return all(type(lin) is torch.nn.Linear for lin in linears) and not hooked


def _full_attention(cfg) -> bool:
    """Every layer attends to the whole context (Qwen2 names each layer's kind, Mistral has one window)."""
    kinds = getattr(cfg, "layer_types", None)
    if kinds is not None:
        return all(kind == "full_attention" for kind in kinds)
    return getattr(cfg, "sliding_window", None) is None


def prefer(model: torch.nn.Module, attention: tuple[str, ...] = ("sdpa",)) -> bool:
    """Mark `model` to run `forward` from now on, while its attention is one of `attention`, if it applies
    (`applies_to`); returns whether it does."""
    ok = applies_to(model, attention)
    setattr(model, _MARK, attention if ok else ())
    return ok


def forgo(model: torch.nn.Module) -> None:
    """Run transformers' forward for `model` again (a benchmark's or a test's baseline)."""
    setattr(model, _MARK, ())


def preferred(model: torch.nn.Module) -> bool:
    """Whether `prefer` marked `model` and its attention is still one it allowed (switched to another,
    e.g. eager, it runs transformers' forward)."""
    return model.config._attn_implementation in getattr(model, _MARK, ())


def forward(model: torch.nn.Module, input_ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, N, V] of `input_ids` [B, N] on top of `cache` (a `DynamicCache`, appended to in place).
    `attention_mask`: None, [B, P + N] (1: attend; causal order is added) or an additive [B, 1, N, P + N]
    used as given; `position_ids` [B, N] (default: the positions after the cache's)."""
    m, cfg = model.model, model.config
    b, n = input_ids.shape
    past = cache.get_seq_length()
    if position_ids is None:
        position_ids = torch.arange(past, past + n, device=input_ids.device)[None].expand(b, n)
    h = F.embedding(input_ids, m.embed_tokens.weight)  # [B, N, H]
    cos, sin = _rope(m.rotary_emb, position_ids, h.dtype)  # [B, 1, N, D] each
    mask = _mask(attention_mask, past, n, input_ids.device)
    attend = ALL_ATTENTION_FUNCTIONS[cfg._attn_implementation]
    eps = cfg.rms_norm_eps
    for i, layer in enumerate(m.layers):
        a, mlp = layer.self_attn, layer.mlp
        x = _rms(h, layer.input_layernorm.weight, eps)
        q = _heads(_linear(x, a.q_proj), a.head_dim)  # [B, Hq, N, D]
        k = _heads(_linear(x, a.k_proj), a.head_dim)  # [B, Hkv, N, D]
        v = _heads(_linear(x, a.v_proj), a.head_dim)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = cache.update(k, v, i)  # [B, Hkv, P + N, D]
        o, _ = attend(a, q, k, v, mask, dropout=0.0, scaling=a.scaling)  # [B, N, Hq, D]
        h = h + _linear(o.reshape(b, n, -1), a.o_proj)
        x = _rms(h, layer.post_attention_layernorm.weight, eps)
        h = h + _linear(F.silu(_linear(x, mlp.gate_proj)) * _linear(x, mlp.up_proj), mlp.down_proj)
    return _linear(_rms(h, m.norm.weight, eps), model.lm_head)  # [B, N, V]


def _mask(attention_mask: torch.Tensor | None, past: int, n: int, device) -> torch.Tensor | None:
    """The boolean mask [B or 1, 1, N, P + N] transformers' SDPA path gets (None where it needs none: one new
    token and no padding, or a prompt on an empty cache, which SDPA runs causally itself). A 2-D mask is
    taken to pad something (the engine passes none otherwise); one of all ones gives the same attention."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask
    if attention_mask is None and (n == 1 or past == 0):
        return None
    causal = torch.arange(past + n, device=device)[None, :] <= torch.arange(past, past + n, device=device)[:, None]
    mask = causal[None, None]  # [1, 1, N, P + N]
    return mask if attention_mask is None else mask & attention_mask[:, None, None, :].bool()


def _rope(rotary: torch.nn.Module, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = position_ids[..., None].float() * rotary.inv_freq.float()[None, None, :]  # [B, N, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, N, D]
    scale = rotary.attention_scaling
    return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


def _linear(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    return F.linear(x, linear.weight, linear.bias)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, n, _ = x.shape
    return x.view(b, n, -1, head_dim).transpose(1, 2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
