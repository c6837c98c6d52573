"""Build the offline model family: tokenizer, backbone v1, evolved versions, one frozen draft.

The backbone contract: the embeddings (tied to the LM head) and the lowest `frozen_layers` layers are
bitwise identical in every constrained version; versions evolve only through low-rank adapters on the
upper layers, trained with a KL term to v1 on rehearsal data. `<slice>-unconstrained` breaks the
contract on purpose (every weight free), as the contrast. The draft reuses the embeddings and the lowest
`draft_shared_layers` layers and trains only its own head, once, against v1.

This module trains and saves; it does not serve or measure acceptance (see `report.py`).
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import shutil
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from flexspec_serve.config import ZooProfile
from flexspec_serve.zoo import corpus as corpus_mod
from flexspec_serve.zoo import lora, train
from flexspec_serve.zoo.loading import load_causal_lm, load_tokenizer
from flexspec_serve.zoo.manifest import Manifest, MemberInfo, backbone_key, build_key, describe_member, hash_tensors
from flexspec_serve.zoo.tokenizer import encode_corpus, train_tokenizer

log = logging.getLogger(__name__)

# Evolved versions: name -> the corpus slice it specialises on.
EVOLVED = {"v2": "tests", "v3": "net"}
UNCONSTRAINED = ("v2-unconstrained", "tests")


def target_config(p: ZooProfile, num_layers: int | None = None) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=num_layers or p.num_layers, num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_kv_heads, max_position_embeddings=p.max_positions,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1, rope_theta=10000.0,
    )


class Streams:
    """Token streams per (slice, split), encoded once."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, corpus: corpus_mod.Corpus, budget_chars: int):
        self._tok, self._corpus, self._budget = tokenizer, corpus, budget_chars
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, slice_name: str, split: str) -> torch.Tensor:
        key = (slice_name, split)
        if key not in self._cache:
            texts = self._corpus.spread(slice_name, split, corpus_mod.stream_budget(self._budget, split))
            self._cache[key] = torch.tensor(encode_corpus(self._tok, texts), dtype=torch.long)
        return self._cache[key]

    def batches(self, slice_name: str, p: ZooProfile, seed: int):
        gen = torch.Generator().manual_seed(seed)
        return train.random_windows(self.get(slice_name, "train"), p.seq_len, p.batch_size, gen)


def _spec(stage) -> train.TrainSpec:
    return train.TrainSpec(steps=stage.steps, lr=stage.lr, max_seconds=stage.max_seconds,
                           warmup_steps=min(20, max(1, stage.steps // 10)))


def pretrain_backbone(p: ZooProfile, streams: Streams, seed: int) -> tuple[LlamaForCausalLM, dict]:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(target_config(p))
    stats = train.train(model, list(model.parameters()), streams.batches("general", p, seed), train.lm_loss,
                        _spec(p.pretrain), "v1 backbone")
    return model, stats


def evolve_version(parent: LlamaForCausalLM, slice_name: str, p: ZooProfile, streams: Streams, seed: int,
                   name: str) -> tuple[LlamaForCausalLM, dict]:
    """Adapters on the layers above the backbone, CE on the slice + KL to the parent on rehearsal data."""
    model = copy.deepcopy(parent)
    for param in model.parameters():
        param.requires_grad_(False)
    upper = list(range(p.frozen_layers, p.num_layers))
    params = lora.add_adapters(model, upper, p.evolve.rank, p.evolve.alpha, seed)
    loss = train.make_evolve_loss(parent.eval(), streams.batches("general", p, seed + 1), p.evolve.kl_weight)
    stats = train.train(model, params, streams.batches(slice_name, p, seed), loss, _spec(p.evolve), name)
    lora.merge_adapters(model)
    for param in model.parameters():
        param.requires_grad_(True)
    return model, stats


def finetune_unconstrained(parent: LlamaForCausalLM, slice_name: str, p: ZooProfile, streams: Streams,
                           seed: int, name: str) -> tuple[LlamaForCausalLM, dict]:
    model = copy.deepcopy(parent)
    stats = train.train(model, list(model.parameters()), streams.batches(slice_name, p, seed), train.lm_loss,
                        _spec(p.unconstrained), name)
    return model, stats


def init_draft(backbone: LlamaForCausalLM, p: ZooProfile) -> tuple[LlamaForCausalLM, list[torch.nn.Parameter]]:
    """Draft = shared embeddings + lowest backbone layer(s) (frozen) + own layer(s) started from the top ones."""
    n_shared, n_own = p.draft_shared_layers, p.draft_own_layers
    draft = LlamaForCausalLM(target_config(p, num_layers=n_shared + n_own))
    src, dst = backbone.model, draft.model
    with torch.no_grad():
        dst.embed_tokens.weight.copy_(src.embed_tokens.weight)
        dst.norm.weight.copy_(src.norm.weight)
        for i in range(n_shared):
            dst.layers[i].load_state_dict(src.layers[i].state_dict())
        for j in range(n_own):
            dst.layers[n_shared + j].load_state_dict(src.layers[p.num_layers - n_own + j].state_dict())
    for param in draft.parameters():
        param.requires_grad_(False)
    trainable = [*dst.norm.parameters()]
    for j in range(n_own):
        trainable += list(dst.layers[n_shared + j].parameters())
    for param in trainable:
        param.requires_grad_(True)
    return draft, trainable


def distill_draft(teacher: LlamaForCausalLM, backbone: LlamaForCausalLM, slice_name: str | None, p: ZooProfile,
                  streams: Streams, seed: int, name: str) -> tuple[LlamaForCausalLM, dict]:
    """Train the draft head against `teacher` on general data (plus the teacher's slice, for coupled drafts)."""
    draft, params = init_draft(backbone, p)
    general = streams.batches("general", p, seed)
    batches = general if slice_name is None else _alternate(general, streams.batches(slice_name, p, seed + 7))
    stats = train.train(draft, params, batches, train.make_distill_loss(teacher.eval()), _spec(p.distill), name)
    for param in draft.parameters():
        param.requires_grad_(True)
    return draft, stats


def _alternate(a, b):
    while True:
        yield next(a)
        yield next(b)


def save_member(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_family(p: ZooProfile, out: Path, seed: int = 0, coupled: bool = False, force: bool = False) -> Manifest:
    """Build (or reuse) the family under `out`; returns its manifest. A valid family without coupled drafts
    gets them added when asked for; a rebuild keeps the tokenizer and v1 of the family already under `out`
    when they were trained from the same backbone settings (`manifest.backbone_key`)."""
    corpus = corpus_mod.load_corpus(p.corpus, p.name)
    key = build_key(p, seed, corpus.identity)
    existing = Manifest.load_if_valid(out, key)
    if existing is not None and not force:
        if coupled and not existing.coupled:
            return add_coupled_drafts(existing, p, out)
        log.info("reusing the model family in %s (build key %s)", out, key[:12])
        return existing
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.monotonic()
    reused = None if force else _reusable_backbone(out, p, seed, corpus.identity)
    shutil.rmtree(out / "coupled", ignore_errors=True)  # coupled drafts of an older build
    if reused is not None:
        tokenizer, v1, v1_info = reused
        log.info("reusing the tokenizer and v1 in %s: same backbone settings and seed", out)
    else:
        tok_texts = corpus.spread("general", "train", p.tokenizer_chars)
        tokenizer = train_tokenizer(tok_texts, p.vocab_size, out / "tokenizer")
    streams = Streams(tokenizer, corpus, p.corpus_chars)
    members: list[MemberInfo] = []

    def record(*member):
        members.append(_save_and_describe(out, tokenizer, p, streams, *member))

    if reused is not None:
        members.append(v1_info)
    else:
        v1, stats = pretrain_backbone(p, streams, seed)
        record("v1", v1, "target", None, "backbone pretrained on the general stdlib slice", "general", stats)
    draft, stats = distill_draft(v1, v1, None, p, streams, seed + 100, "draft (frozen)")
    record("draft", draft, "draft", "v1", "embeddings + lowest backbone layer(s) + own head, distilled from v1",
           "general", stats)
    for i, (name, slice_name) in enumerate(EVOLVED.items()):
        model, stats = evolve_version(v1, slice_name, p, streams, seed + 10 + i, name)
        record(name, model, "target", "v1",
               f"LoRA r={p.evolve.rank} on layers >= {p.frozen_layers}, KL to v1 (w={p.evolve.kl_weight})",
               slice_name, stats)
    uname, uslice = UNCONSTRAINED
    model, stats = finetune_unconstrained(v1, uslice, p, streams, seed + 20, uname)
    record(uname, model, "target-unconstrained", "v1", "every weight fine-tuned (backbone contract broken)",
           uslice, stats)
    manifest = Manifest(build_key=key, profile=p.name, seed=seed, coupled=False, members=members,
                        build_seconds=round(time.monotonic() - started, 1), python=platform.python_version(),
                        torch=torch.__version__, profile_config=json.loads(p.model_dump_json()),
                        corpus=None if p.corpus == "stdlib" else corpus.identity)
    manifest.save(out)
    return add_coupled_drafts(manifest, p, out, streams) if coupled else manifest


def _save_and_describe(out: Path, tokenizer, p: ZooProfile, streams: Streams, name: str, model, role: str,
                       parent: str | None, changes: str, slice_name: str, stats: dict) -> MemberInfo:
    """Save one member under `out / name` and describe it for the manifest (sizes, hashes, validation loss)."""
    save_member(model, tokenizer, out / name)
    return describe_member(name, model, role, parent, changes, slice_name, stats, p, streams)


def _reusable_backbone(out: Path, p: ZooProfile, seed: int, corpus_id: str):
    """(tokenizer, v1, v1's MemberInfo) of the family under `out` if it has the same backbone key, else None."""
    try:
        old = Manifest.load(out)
    except (OSError, ValueError):
        return None
    v1_info = next((m for m in old.members if m.name == "v1"), None)
    same = (backbone_key(old.profile_config, old.seed, old.corpus or old.python)
            == backbone_key(p.model_dump(mode="json"), seed, corpus_id))
    if not same or v1_info is None or not (out / "v1" / "model.safetensors").is_file():
        return None
    v1 = load_causal_lm(out / "v1")
    if hash_tensors(v1) != v1_info.sha256:
        return None
    return load_tokenizer(out / "v1"), v1, v1_info


def add_coupled_drafts(manifest: Manifest, p: ZooProfile, out: Path, streams: Streams | None = None) -> Manifest:
    """Re-distil a draft against every constrained version (the coupled design the compat report compares
    against), from the saved members; the same seeds as a one-shot `coupled=True` build."""
    started = time.monotonic()
    tokenizer = load_tokenizer(out / "v1")
    streams = streams or Streams(tokenizer, corpus_mod.load_corpus(p.corpus, p.name), p.corpus_chars)
    v1 = load_causal_lm(out / "v1")
    members = list(manifest.members)
    for i, name in enumerate(["v1", *EVOLVED]):
        slice_name = None if name == "v1" else EVOLVED[name]
        teacher = v1 if name == "v1" else load_causal_lm(out / name)
        cd, stats = distill_draft(teacher, v1, slice_name, p, streams, manifest.seed + 200 + i, f"coupled draft {name}")
        members.append(_save_and_describe(out, tokenizer, p, streams, f"coupled/draft-{name}", cd, "coupled-draft",
                                          name, f"draft re-distilled against {name}", slice_name or "general", stats))
    coupled = manifest.model_copy(update={"coupled": True, "members": members, "build_seconds": round(
        manifest.build_seconds + time.monotonic() - started, 1)})
    coupled.save(out)
    return coupled
