"""Configuration at the edges: pydantic models loaded from YAML, with errors that name field and value.

Inside the core, code passes plain dataclasses or these models' fields; nothing here runs anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message is meant for the user, not a traceback."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def describe_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {where}: unknown field (value {shown}); remove it or check its spelling")
        else:
            lines.append(f"  - {where}: {e['msg']} (got {shown})")
    return "\n".join(lines)


def parse_model(cls: type[M], data: Any, source: str) -> M:
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, source)) from None


def load_yaml_dict(path: str | Path) -> dict:
    """A YAML (or JSON) file's top-level mapping; errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data or {}


def load_yaml(cls: type[M], path: str | Path) -> M:
    return parse_model(cls, load_yaml_dict(path), str(path))


# --------------------------------------------------------------------------- model family (zoo)


class StageSpec(StrictModel):
    steps: int = Field(ge=1, description="optimizer steps")
    lr: float = Field(gt=0, lt=1, description="peak learning rate")
    max_seconds: float | None = Field(default=None, gt=0, description="wall-clock cap for this stage")


class EvolveSpec(StageSpec):
    rank: int = Field(default=8, ge=1, le=256, description="LoRA rank on the upper layers")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scale numerator (scale = alpha / rank)")
    kl_weight: float = Field(default=0.5, ge=0, description="weight of KL(parent || version) on rehearsal data")


class ZooProfile(StrictModel):
    """Sizes and training budgets of one model-family profile."""

    name: str = Field(description="profile name, recorded in the manifest")
    vocab_size: int = Field(ge=260, le=65536, description="BPE vocabulary size (bytes + merges + specials)")
    hidden_size: int = Field(ge=16, description="model width")
    intermediate_size: int = Field(ge=16, description="MLP width")
    num_layers: int = Field(ge=2, description="target depth")
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    max_positions: int = Field(default=1024, ge=64, description="longest context the models accept")
    frozen_layers: int = Field(ge=1, description="lower layers in the shared backbone (frozen in every version)")
    draft_shared_layers: int = Field(ge=1, description="backbone layers the draft reuses, frozen")
    draft_own_layers: int = Field(ge=1, description="layers of the draft's own trained head")
    seq_len: int = Field(ge=16, description="training window")
    batch_size: int = Field(ge=1)
    tokenizer_chars: int = Field(ge=10_000, description="characters of source used to train the tokenizer")
    corpus_chars: int = Field(ge=10_000, description="characters per slice used for training")
    corpus: Literal["stdlib", "snapshot"] = Field(
        "stdlib", description="stdlib: this Python's standard library source (Python builds differ, and so do their "
        "families); snapshot: the texts the build reads, carried in flexspec_serve/data/corpus/<name>.json.gz "
        "(`flexspec zoo snapshot`): the same texts on any machine")
    pretrain: StageSpec
    distill: StageSpec
    evolve: EvolveSpec
    unconstrained: StageSpec

    @model_validator(mode="after")
    def _check_shapes(self) -> ZooProfile:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}, "
                f"which must divide by num_kv_heads {self.num_kv_heads}"
            )
        if self.frozen_layers >= self.num_layers:
            raise ValueError(f"frozen_layers {self.frozen_layers} must be below num_layers {self.num_layers}")
        if self.draft_shared_layers > self.frozen_layers:
            raise ValueError(
                f"draft_shared_layers {self.draft_shared_layers} must be within the frozen backbone "
                f"({self.frozen_layers} layers)"
            )
        return self


PROFILES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        name="tiny", vocab_size=512, hidden_size=64, intermediate_size=176, num_layers=6, num_heads=4,
        num_kv_heads=2, max_positions=512, frozen_layers=3, draft_shared_layers=1, draft_own_layers=1,
        seq_len=96, batch_size=8, tokenizer_chars=400_000, corpus_chars=600_000, corpus="snapshot",
        pretrain=dict(steps=300, lr=4e-3), distill=dict(steps=80, lr=3e-3),
        evolve=dict(steps=40, lr=3e-3, rank=4, alpha=8.0, kl_weight=0.5), unconstrained=dict(steps=40, lr=3e-3),
    ),
    "default": dict(
        name="default", vocab_size=2048, hidden_size=256, intermediate_size=688, num_layers=6, num_heads=8,
        num_kv_heads=4, max_positions=1024, frozen_layers=3, draft_shared_layers=1, draft_own_layers=1,
        seq_len=256, batch_size=8, tokenizer_chars=8_000_000, corpus_chars=12_000_000,
        pretrain=dict(steps=1500, lr=3e-3), distill=dict(steps=400, lr=2e-3),
        evolve=dict(steps=150, lr=2e-3, rank=8, alpha=16.0, kl_weight=0.5),
        unconstrained=dict(steps=150, lr=1e-3),
    ),
}


def zoo_profile(name: str) -> ZooProfile:
    if name not in PROFILES:
        raise ConfigError(f"unknown zoo profile {name!r}; choose one of {sorted(PROFILES)}")
    return parse_model(ZooProfile, PROFILES[name], f"profile {name!r}")


# --------------------------------------------------------------------------- models to serve


class ModelSpec(StrictModel):
    """A draft or target checkpoint: a local path or a Hugging Face model id (read from the local cache)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$",
                      description="version name used on the wire")
    path: str = Field(min_length=1, description="local directory or Hugging Face model id")
    trust_remote_code: bool = Field(default=False, description="allow custom modelling code (off by default)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32")
