"""The compatibility gate for target versions while the edge draft stays frozen (Ray-free; the serving package
acts on its result; the canary judge that follows it is `flexspec_serve.canary`).

`compatibility_gate`: before a candidate takes traffic, the frozen draft's acceptance length against it on a
probe prompt set, next to the current stable version; below `min_fraction` of stable the gate refuses. A
candidate with another tokenizer is refused before any model runs.

It does not deploy, route or write the registry.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flexspec_serve.engine.generate import speculative_generate
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.engine.verifier import Verifier
from flexspec_serve.zoo.loading import check_tokenizers_match, load_causal_lm, load_tokenizer


@dataclass(frozen=True)
class GateResult:
    candidate: str
    baseline: str
    tau_candidate: float
    tau_baseline: float
    ratio: float
    min_fraction: float
    passed: bool
    prompts: int
    message: str

    def as_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def probe_acceptance_length(draft, target, prompts: list[list[int]], max_new: int, k: int = 4) -> float:
    """Greedy speculative decoding of every probe prompt: generated tokens per round (tau)."""
    results = speculative_generate(DraftProposer(draft), Verifier(target, draft), prompts, max_new, k)
    rounds = sum(r.stats.rounds for r in results)
    return sum(r.stats.generated_tokens for r in results) / max(1, rounds)


def compatibility_gate(draft_path: str | Path, candidate: str, candidate_path: str | Path, baseline: str,
                       baseline_path: str | Path, prompt_texts: list[str], max_new: int = 32,
                       min_fraction: float = 0.8, max_prompt_tokens: int = 128) -> GateResult:
    """Raises `TokenizerMismatch` for a candidate whose tokenizer differs from the draft's."""
    draft_tok = load_tokenizer(draft_path)
    check_tokenizers_match(str(draft_path), draft_tok, str(candidate_path), load_tokenizer(candidate_path))
    prompts = [draft_tok(t, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] or [draft_tok.eos_token_id]
               for t in prompt_texts]
    draft = load_causal_lm(draft_path)
    tau_c = probe_acceptance_length(draft, load_causal_lm(candidate_path), prompts, max_new)
    tau_b = probe_acceptance_length(draft, load_causal_lm(baseline_path), prompts, max_new)
    ratio = tau_c / tau_b if tau_b else 0.0
    passed = ratio >= min_fraction
    verdict = "passes" if passed else "refused"
    message = (f"{candidate}: frozen-draft acceptance length {tau_c:.2f} vs {baseline} {tau_b:.2f} "
               f"({ratio:.1%} of stable; gate {min_fraction:.0%}) -> {verdict}")
    return GateResult(candidate, baseline, round(tau_c, 3), round(tau_b, 3), round(ratio, 3), min_fraction, passed,
                      len(prompts), message)
