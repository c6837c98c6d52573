"""The family manifest: what each member is, where it came from, and hashes that prove the contract."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from flexspec_serve.config import ZooProfile

FAMILY_FORMAT = 1
Role = Literal["target", "target-unconstrained", "draft", "coupled-draft"]


class MemberInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    role: Role
    parent: str | None = Field(description="the member this one was derived from")
    changes: str = Field(description="what changed relative to the parent")
    slice: str = Field(description="corpus slice it was trained or specialised on")
    params_total: int
    params_non_embedding: int
    sha256: str = Field(description="sha256 over every tensor")
    backbone_sha256: str | None = Field(description="embeddings + frozen lower layers (targets only)")
    draft_base_sha256: str = Field(description="embeddings + the layers the draft shares")
    val_loss: dict[str, float] = Field(description="validation cross-entropy (nats/token) per slice")
    train: dict[str, float] = Field(default_factory=dict, description="final loss, steps, seconds")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = FAMILY_FORMAT
    build_key: str
    profile: str
    seed: int
    coupled: bool
    members: list[MemberInfo]
    build_seconds: float
    python: str
    torch: str
    profile_config: dict
    corpus: str | None = Field(None, description="which corpus: a snapshot's hash (None: this `python`'s stdlib)")

    def member(self, name: str) -> MemberInfo:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(f"no member {name!r} in the family; members: {[m.name for m in self.members]}")

    def targets(self) -> list[MemberInfo]:
        return [m for m in self.members if m.role.startswith("target")]

    def save(self, out: Path) -> None:
        (out / "manifest.json").write_text(self.model_dump_json(indent=2))

    @classmethod
    def load(cls, out: Path) -> Manifest:
        return cls.model_validate_json((Path(out) / "manifest.json").read_text())

    @classmethod
    def load_if_valid(cls, out: Path, key: str) -> Manifest | None:
        """The manifest under `out` if it was built with `key` and every member's files are there."""
        try:
            manifest = cls.load(out)
        except (OSError, ValueError):
            return None
        if manifest.build_key != key:
            return None
        for m in manifest.members:
            if not ((out / m.name / "config.json").is_file() and (out / m.name / "model.safetensors").is_file()):
                return None
        return manifest


def _settings_key(settings: dict, seed: int, corpus_id: str | None) -> str:
    """`corpus_id`: the corpus's identity (`corpus.StdlibCorpus` / `SnapshotCorpus`); None: this Python's stdlib."""
    # the stdlib corpus leaves the key as it was before `corpus` existed: families built then stay valid
    settings = {k: v for k, v in settings.items() if not (k == "corpus" and v == "stdlib")}
    blob = json.dumps([FAMILY_FORMAT, settings, seed, corpus_id or platform.python_version()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_key(p: ZooProfile, seed: int, corpus_id: str | None = None) -> str:
    """Everything the trained weights depend on (coupled drafts are extra members, not a different family)."""
    return _settings_key(p.model_dump(mode="json"), seed, corpus_id)


# The profile fields the tokenizer and the v1 backbone depend on (with the seed); the other fields
# (distillation, evolution, draft shape) only shape the members trained on top of v1.
BACKBONE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                   "max_positions", "seq_len", "batch_size", "tokenizer_chars", "corpus_chars", "corpus", "pretrain")


def backbone_key(profile: dict, seed: int, corpus_id: str | None = None) -> str:
    """Equal for two builds that would train the same tokenizer and v1 (`profile` as a JSON-mode dict; one
    written before `corpus` existed read the stdlib)."""
    return _settings_key({k: profile[k] for k in BACKBONE_FIELDS if k != "corpus"}
                         | {"corpus": profile.get("corpus", "stdlib")}, seed, corpus_id)


def hash_tensors(model: torch.nn.Module, prefixes: tuple[str, ...] | None = None) -> str:
    """sha256 over (name, dtype, shape, bytes) of the named tensors, in name order."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        if prefixes is not None and not name.startswith(prefixes):
            continue
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def backbone_prefixes(n_layers: int) -> tuple[str, ...]:
    return ("model.embed_tokens.", *(f"model.layers.{i}." for i in range(n_layers)))


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters excluding the token embedding / tied LM head)."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    return total, total - embed


def describe_member(name, model, role, parent, changes, slice_name, stats, p: ZooProfile, streams) -> MemberInfo:
    from flexspec_serve.zoo.train import validation_loss

    total, non_embed = count_params(model)
    is_target = role.startswith("target")
    val = {s: round(validation_loss(model, streams.get(s, "validation"), p.seq_len, max_windows=48), 4)
           for s in ("general", "tests", "net")}
    return MemberInfo(
        name=name, role=role, parent=parent, changes=changes, slice=slice_name, params_total=total,
        params_non_embedding=non_embed, sha256=hash_tensors(model),
        backbone_sha256=hash_tensors(model, backbone_prefixes(p.frozen_layers)) if is_target else None,
        draft_base_sha256=hash_tensors(model, backbone_prefixes(p.draft_shared_layers)),
        val_loss=val, train={k: round(float(v), 4) for k, v in stats.items()},
    )
