"""The lean Llama forward: transformers' logits, for the models it applies to, and no others."""

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

from flexspec_serve.engine import hf_compat, lean_llama
from flexspec_serve.engine.ragged import CachedSequence, run_ragged
from flexspec_serve.zoo import lora


def engine_forwards(model) -> list[torch.Tensor]:
    """Every kind of forward the engine runs: prompts, single steps, batches with and without padding,
    token-tree batches (also what `test_hf_compat` compares attentions on)."""
    seqs = [CachedSequence() for _ in range(3)]
    out = [run_ragged(model, [s], [list(range(2 + i, 9 + 3 * i))])[0] for i, s in enumerate(seqs)]  # prompts
    out += [run_ragged(model, [seqs[0]], [[4]])[0], run_ragged(model, [seqs[1]], [[4, 5, 6]])[0]]  # steps on a cache
    out += run_ragged(model, seqs, [[5], [6, 7], [8, 9, 10]])  # left and right padding: a 2-D mask
    out += run_ragged(model, seqs, [[11, 12, 13]] * 3, trees=[[-1, 0, -1], None, [-1, -1, 1]])  # 4-D masks
    even = [CachedSequence(), CachedSequence()]
    for s, start in zip(even, (20, 30)):
        run_ragged(model, [s], [list(range(start, start + 6))])
    out += run_ragged(model, even, [[7, 8], [9, 10]])  # nothing padded: no mask
    return out


def _lean_and_transformers(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    assert lean_llama.preferred(model)
    lean = engine_forwards(model)
    lean_llama.forgo(model)
    try:
        reference = engine_forwards(model)
    finally:
        hf_compat.prefer_fast_paths(model)
    return lean, reference


@pytest.mark.parametrize("name", ["draft", "v1"])
def test_lean_forward_gives_transformers_logits_for_every_engine_forward(family_models, name):
    lean, reference = _lean_and_transformers(family_models[name])
    for a, b in zip(lean, reference):
        tol = 1e-6 if a.device.type == "cpu" else 1e-4  # (GPU kernels may pick other reduction orders per call)
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        assert torch.equal(a.argmax(-1), b.argmax(-1))


_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")


def _tiny(model_cls=LlamaForCausalLM, config_cls=LlamaConfig, **overrides):
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**_TINY, **overrides})).eval()
    for name, p in model.named_parameters():  # biases start at zero: make them count
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.5)
    return model


def _tiny_llama(**overrides) -> LlamaForCausalLM:
    return _tiny(**overrides)


@pytest.mark.parametrize("model_cls, config_cls, overrides", [
    (LlamaForCausalLM, LlamaConfig, {"attention_bias": True, "mlp_bias": True}),
    (Qwen2ForCausalLM, Qwen2Config, {}),  # biases on q, k, v
    (MistralForCausalLM, MistralConfig, {"sliding_window": None}),
], ids=["llama-biases", "qwen2", "mistral"])
def test_lean_forward_gives_transformers_logits_for_llama_like_architectures(model_cls, config_cls, overrides):
    model = _tiny(model_cls, config_cls, **overrides)
    hf_compat.prefer_fast_paths(model)
    lean, reference = _lean_and_transformers(model)
    for a, b in zip(lean, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
])
def test_lean_forward_follows_each_static_rope_scaling(rope):
    model = _tiny_llama(rope_parameters=rope)
    hf_compat.prefer_fast_paths(model)
    lean, reference = _lean_and_transformers(model)
    for a, b in zip(lean, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_models_it_cannot_reproduce_keep_transformers_forward(family_models):
    assert all(lean_llama.applies_to(m, ("sdpa", hf_compat.GROUPED_SDPA)) for m in family_models.values())
    assert lean_llama.applies_to(_tiny_llama())
    assert not lean_llama.applies_to(_tiny_llama(attn_implementation="eager"))
    assert not lean_llama.applies_to(_tiny(Qwen2ForCausalLM, Qwen2Config, use_sliding_window=True, sliding_window=8,
                                           max_window_layers=0))
    assert not lean_llama.applies_to(_tiny(MistralForCausalLM, MistralConfig, sliding_window=8))
    assert not lean_llama.applies_to(_tiny_llama(hidden_act="gelu"))
    assert not lean_llama.applies_to(_tiny_llama(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                                  "factor": 2.0}))
    wrapped = _tiny_llama()
    lora.add_adapters(wrapped, [1], rank=2, alpha=4.0, seed=0)  # unmerged adapters: not plain Linear weights
    assert not lean_llama.applies_to(wrapped)
    lora.merge_adapters(wrapped)
    assert lean_llama.applies_to(wrapped)
    hooked = _tiny_llama()
    hooked.model.layers[0].mlp.register_forward_hook(lambda *_: None)
    assert not lean_llama.applies_to(hooked)
    hf_compat.prefer_fast_paths(hooked)
    assert not lean_llama.preferred(hooked)


def test_a_model_switched_to_another_attention_runs_transformers_forward():
    model = _tiny_llama()
    hf_compat.prefer_fast_paths(model)
    assert lean_llama.preferred(model)
    model.set_attn_implementation("eager")  # takes an additive mask, which the lean forward does not build
    assert not lean_llama.preferred(model)
    seqs = [CachedSequence(), CachedSequence()]
    run_ragged(model, seqs, [[1, 2, 3], [4, 5]])  # padded: a mask
    eager = run_ragged(model, seqs, [[6], [7, 8]])
    model.set_attn_implementation("sdpa")
    assert lean_llama.preferred(model)
    seqs = [CachedSequence(), CachedSequence()]
    run_ragged(model, seqs, [[1, 2, 3], [4, 5]])
    for a, b in zip(eager, run_ragged(model, seqs, [[6], [7, 8]])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
