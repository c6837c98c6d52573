"""Which draft and which target versions to load: the family config, for the zoo or real checkpoints.

A `FamilyConfig` names a draft and any number of targets, each a local directory or a Hugging Face
model id read from the local cache only (e.g. Qwen2.5-0.5B drafting for Qwen2.5-7B / -7B-Instruct /
-Coder-7B). Loading checks that every target's tokenizer maps tokens exactly like the draft's, and
fails naming both models otherwise. `trust_remote_code` stays off unless a spec turns it on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator

from flexspec_serve.config import ModelSpec, StrictModel
from flexspec_serve.zoo.loading import check_tokenizers_match, load_causal_lm, load_tokenizer
from flexspec_serve.zoo.manifest import Manifest


class FamilyConfig(StrictModel):
    draft: ModelSpec = Field(description="the frozen draft every device runs")
    targets: list[ModelSpec] = Field(min_length=1, description="target versions the cloud serves")

    @model_validator(mode="after")
    def _unique_names(self) -> FamilyConfig:
        names = [t.name for t in self.targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"target names must be unique; repeated: {dupes}")
        return self

    @classmethod
    def from_zoo(cls, family_dir: str | Path, include_unconstrained: bool = True) -> FamilyConfig:
        """The family built by `flexspec zoo build`: its draft and every target version."""
        family_dir = Path(family_dir)
        manifest = Manifest.load(family_dir)
        targets = [ModelSpec(name=m.name, path=str(family_dir / m.name)) for m in manifest.targets()
                   if include_unconstrained or m.role == "target"]
        return cls(draft=ModelSpec(name="draft", path=str(family_dir / "draft")), targets=targets)

    def target(self, name: str) -> ModelSpec:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(f"unknown target version {name!r}; available: {[t.name for t in self.targets]}")


@dataclass
class LoadedPair:
    draft: object
    target: object
    tokenizer: object


def load_pair(cfg: FamilyConfig, target_name: str, device: str | None = None) -> LoadedPair:
    """Load the draft and one target, refusing a tokenizer mismatch before any weights are loaded."""
    spec = cfg.target(target_name)
    d_tok = load_tokenizer(cfg.draft.path, cfg.draft.trust_remote_code)
    t_tok = load_tokenizer(spec.path, spec.trust_remote_code)
    check_tokenizers_match(cfg.draft.path, d_tok, spec.path, t_tok)
    draft = load_causal_lm(cfg.draft.path, cfg.draft.dtype, cfg.draft.trust_remote_code, device)
    target = load_causal_lm(spec.path, spec.dtype, spec.trust_remote_code, device)
    return LoadedPair(draft, target, t_tok)
