"""The one place that knows transformers' API differences."""

import pytest
import torch

from flexspec_serve.engine import hf_compat


def test_dropping_zero_positions_is_a_no_op():
    cache = hf_compat.cache_from_tensors([(torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4))])
    hf_compat.drop_last(cache, 0)
    assert hf_compat.seq_length(cache) == 5
    hf_compat.drop_last(cache, 2)
    assert hf_compat.seq_length(cache) == 3
    with pytest.raises(ValueError):
        hf_compat.drop_last(cache, -1)


def test_cache_bytes_count_keys_and_values():
    cache = hf_compat.cache_from_tensors([(torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4))] * 3)
    assert hf_compat.cache_nbytes(cache) == 3 * 2 * 40 * 4
    assert hf_compat.cache_nbytes(None) == 0


def test_forward_uses_the_installed_versions_cache_argument(family_models):
    model = family_models["v1"]
    cache = hf_compat.cache_from_tensors([])
    logits = hf_compat.forward_logits(model, torch.tensor([[1, 2, 3]], device=model.device), cache)
    assert logits.shape == (1, 3, model.config.vocab_size) and hf_compat.seq_length(cache) == 3


def _appended(layer, chunks):
    for k in chunks:
        keys, values = layer.update(k, -k)
    return keys, values


@pytest.mark.parametrize("inference", [True, False], ids=["inference-mode", "grad-mode"])
def test_a_roomy_layer_appends_in_place_and_holds_what_concatenation_would(inference):
    chunks = [torch.randn(1, 2, n, 4) for n in (5, 1, 3, 1, 1)]
    layer = hf_compat.RoomyLayer()
    with torch.inference_mode(inference):  # the engine's forwards run in inference mode (views have no _base)
        first, _ = layer.update(chunks[0], -chunks[0])  # held: a new buffer could not reuse its memory
        layer.crop(-1)
        keys, values = _appended(layer, chunks[1:])
    chunks[0] = chunks[0][:, :, :-1]
    assert keys.data_ptr() == first.data_ptr()  # the same buffer: no copy of the positions already held
    torch.testing.assert_close(keys, torch.cat(chunks, dim=2), rtol=0, atol=0)
    torch.testing.assert_close(values, -torch.cat(chunks, dim=2), rtol=0, atol=0)


def test_a_roomy_layer_grows_past_its_room_and_appends_after_a_crop():
    layer = hf_compat.RoomyLayer()
    first = torch.randn(1, 2, 10, 4)
    layer.update(first, first)
    more = torch.randn(1, 2, hf_compat.MIN_ROOM + 10, 4)  # past the room: a bigger buffer, old positions copied
    keys, _ = layer.update(more, more)
    torch.testing.assert_close(keys, torch.cat([first, more], dim=2), rtol=0, atol=0)
    layer.crop(-(more.shape[2] + 4))  # keep 6
    last = torch.randn(1, 2, 2, 4)
    keys, values = layer.update(last, last)  # written over the positions the crop gave up
    torch.testing.assert_close(keys, torch.cat([first[:, :, :6], last], dim=2), rtol=0, atol=0)
    assert keys.shape[2] == values.shape[2] == 8


def test_tensors_a_cache_adopts_are_never_written():
    keys = torch.randn(1, 2, 6, 4)
    original = keys.clone()
    cache = hf_compat.cache_from_tensors([(keys, keys)], length=4)  # not writable: positions 4, 5 are not room
    cache.update(torch.zeros(1, 2, 2, 4), torch.zeros(1, 2, 2, 4), 0)
    torch.testing.assert_close(keys, original, rtol=0, atol=0)
    assert hf_compat.seq_length(cache) == 6
    torch.testing.assert_close(hf_compat.layer_tensors(cache)[0][0][:, :, :4], original[:, :, :4], rtol=0, atol=0)


def test_grouped_sdpa_equals_transformers_sdpa_on_padded_and_tree_batches(family_models):
    from tests.test_lean_llama import engine_forwards

    model = family_models["v1"]
    assert model.config._attn_implementation == hf_compat.GROUPED_SDPA
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # the grouping is exercised

    grouped = engine_forwards(model)
    model.set_attn_implementation("sdpa")
    try:
        reference = engine_forwards(model)
    finally:
        hf_compat.prefer_fast_paths(model)
    assert model.config._attn_implementation == hf_compat.GROUPED_SDPA
    for g, r in zip(grouped, reference):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_a_batch_buffer_handed_over_is_appended_into_in_place():
    buffer = torch.zeros(2, 2, 7, 4)  # 5 positions held, room for 2 (what a ragged batch forward builds)
    with torch.inference_mode():
        cache = hf_compat.cache_from_tensors([(buffer, buffer.clone())], length=5, writable=True)
        new = torch.ones(2, 2, 2, 4)
        keys, _ = cache.update(new, new, 0)
    assert keys.data_ptr() == buffer.data_ptr() and keys.shape[2] == 7
    torch.testing.assert_close(buffer[:, :, 5:], new, rtol=0, atol=0)
