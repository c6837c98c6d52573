"""The request and response shapes of the OpenAI Completions API (non-streaming), for clients without a
draft: `model` names a version or alias; generation is cloud-only on the same version deployments."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import Field

from flexspec_serve.config import StrictModel

MAX_PROMPTS = 16  # a batch at the default VersionSpec.max_batch_size: one request's prompts step together


class CompletionRequest(StrictModel):
    model: str | None = Field(None, description="version or alias; default: stable")
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
        description=f"one prompt, or a list of 1 to {MAX_PROMPTS}: one replica generates a list's prompts together")
    max_tokens: int = Field(16, ge=1, le=1024)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=1 << 63, description="seeds the sampling (a 64-bit signed range)")
    n: int = Field(1, ge=1, le=1, description="only n = 1")
    stream: Literal[False] = Field(False, description="streaming is not offered; must be false")
    user: str | None = Field(None, max_length=64)
    stop: str | list[str] | None = Field(None, description="accepted; generation stops at end-of-text")


def completion_response(version: str, outputs: list[tuple[int, str, int, str]]) -> dict:
    """outputs: (prompt tokens, text, completion tokens, finish reason) per prompt."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
        "model": version,
        "choices": [{"text": text, "index": i, "logprobs": None, "finish_reason": reason}
                    for i, (_, text, _, reason) in enumerate(outputs)],
        "usage": {"prompt_tokens": sum(o[0] for o in outputs), "completion_tokens": sum(o[2] for o in outputs),
                  "total_tokens": sum(o[0] + o[2] for o in outputs)},
    }


def models_response(names: list[str]) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "flexspec-serve"}
                                       for n in names]}
