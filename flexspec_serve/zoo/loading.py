"""Loading family members or any Hugging Face checkpoint, offline, with the draft/target tokenizer check."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from flexspec_serve.engine import hf_compat

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TokenizerMismatch(ValueError):
    pass


def load_causal_lm(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
                   device: str | None = None) -> torch.nn.Module:
    """`AutoModelForCausalLM.from_pretrained` from a local directory or the local HF cache only, with
    `hf_compat.GROUPED_SDPA` attention where it would use SDPA, and marked for `lean_llama.forward` where
    that applies."""
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        os.path.expanduser(str(path)), dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code, local_files_only=True
    )
    if device:
        model.to(device)
    hf_compat.prefer_fast_paths(model)
    return model.eval()


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(os.path.expanduser(str(path)), trust_remote_code=trust_remote_code, local_files_only=True)


def check_tokenizers_match(draft_name: str, draft_tok: PreTrainedTokenizerBase, target_name: str,
                           target_tok: PreTrainedTokenizerBase) -> None:
    """Draft and target must map every token identically, or speculative decoding is meaningless."""
    dv, tv = draft_tok.get_vocab(), target_tok.get_vocab()
    if dv == tv:
        return
    only_d = sorted(set(dv) - set(tv))[:5]
    only_t = sorted(set(tv) - set(dv))[:5]
    moved = sorted(t for t in set(dv) & set(tv) if dv[t] != tv[t])[:5]
    raise TokenizerMismatch(
        f"tokenizers of draft {draft_name!r} ({len(dv)} tokens) and target {target_name!r} ({len(tv)} tokens) "
        f"differ: only in draft {only_d}, only in target {only_t}, different ids {moved}"
    )
