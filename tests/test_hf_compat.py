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
