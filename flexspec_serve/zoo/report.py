"""How well the frozen draft fits each target version, on held-out real code.

For every (draft, version) pair:
- teacher-forced agreement alpha on real text: greedy (argmax q == argmax p) and sampling (sum min(p, q)),
  and the acceptance length it implies at K = 4, tau = (1 - alpha^5) / (1 - alpha);
- acceptance length from actual speculative decoding (greedy, and sampling at temperature 0.8), with the
  share of distinct tokens in the output beside it, so a target collapsing into repetition shows.

It measures; it does not train or change any model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flexspec_serve.engine.generate import speculative_generate
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.engine.sampling import SamplingParams
from flexspec_serve.engine.stats import expected_acceptance_length
from flexspec_serve.engine.verifier import Verifier
from flexspec_serve.zoo import corpus as corpus_mod
from flexspec_serve.zoo.loading import load_causal_lm, load_tokenizer
from flexspec_serve.zoo.manifest import Manifest

SAMPLING_TEMPERATURE = 0.8


@dataclass
class PairRow:
    draft: str
    version: str
    alpha_greedy: float
    alpha_sampling: float
    tau_implied_k4: float
    tau_greedy: float
    tau_sampling: float
    distinct_share: float  # distinct tokens / tokens in the greedy output


@torch.inference_mode()
def teacher_forced_alpha(draft, target, windows: list[list[int]], temperature: float) -> tuple[float, float]:
    """(greedy alpha, sampling alpha) averaged over every next-token position of every window."""
    agree = overlap = count = 0.0
    for w in windows:
        ids = torch.tensor([w])
        p_logits, q_logits = target(input_ids=ids).logits[0], draft(input_ids=ids).logits[0]  # [T, V]
        agree += (p_logits.argmax(-1) == q_logits.argmax(-1)).sum().item()
        p = torch.softmax(p_logits / temperature, -1)
        q = torch.softmax(q_logits / temperature, -1)
        overlap += torch.minimum(p, q).sum(-1).sum().item()
        count += len(w)
    return agree / count, overlap / count


def evaluation_windows(tokenizer, n_humaneval: int, n_files: int, window: int) -> list[list[int]]:
    """HumanEval prompt + canonical solution, and held-out stdlib files, cut into windows."""
    texts = [p.prompt + p.canonical_solution for p in corpus_mod.humaneval_problems(n_humaneval)]
    held_out = [f.text for f in corpus_mod.iter_source_files() if f.split == "validation"]
    texts += held_out[:: max(1, len(held_out) // max(1, n_files))][:n_files]
    windows = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        windows += [ids[i : i + window] for i in range(0, len(ids) - 1, window) if len(ids[i : i + window]) > 1]
    return windows


def measured_tau(draft, target, prompts: list[list[int]], max_new: int, sampling: SamplingParams):
    results = speculative_generate(DraftProposer(draft), Verifier(target, draft), prompts, max_new, 4, sampling)
    rounds = sum(r.stats.rounds for r in results)
    generated = sum(r.stats.generated_tokens for r in results)
    distinct = sum(len(set(r.tokens)) / max(1, len(r.tokens)) for r in results) / len(results)
    return generated / rounds, distinct


def acceptance_table(family_dir: Path, n_prompts: int = 20, max_new: int = 64, n_files: int = 8,
                     window: int = 256) -> list[PairRow]:
    family_dir = Path(family_dir)
    manifest = Manifest.load(family_dir)
    tok = load_tokenizer(family_dir / "v1")
    models = {m.name: load_causal_lm(family_dir / m.name) for m in manifest.members}
    windows = evaluation_windows(tok, n_prompts, n_files, window)
    prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in corpus_mod.humaneval_problems(n_prompts)]
    rows = []
    for target in manifest.targets():
        drafts = ["draft"] + [f"coupled/draft-{target.name}"] * (f"coupled/draft-{target.name}" in models)
        for dname in drafts:
            d, t = models[dname], models[target.name]
            a_g, a_s = teacher_forced_alpha(d, t, windows, SAMPLING_TEMPERATURE)
            tau_g, distinct = measured_tau(d, t, prompts, max_new, SamplingParams())
            tau_s, _ = measured_tau(d, t, prompts, max_new, SamplingParams(SAMPLING_TEMPERATURE, 1.0, 7))
            rows.append(PairRow(dname, target.name, round(a_g, 4), round(a_s, 4), round(expected_acceptance_length(a_g, 4), 3),
                                round(tau_g, 3), round(tau_s, 3), round(distinct, 3)))
    return rows


def rows_as_dicts(rows: list[PairRow]) -> list[dict]:
    return [asdict(r) for r in rows]
