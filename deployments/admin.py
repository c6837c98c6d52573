"""The router's admin API, as plain code: request bodies (pydantic, `extra="forbid"`), the token check, and
each operation mapped onto the `VersionManager` with errors as JSON bodies. The Router's FastAPI methods
are one-line delegations to `AdminAPI`, so this is testable without Serve.

The admin token comes from a secrets file or `FLEXSPEC_ADMIN_TOKEN`, is compared in constant time and is
never logged; without one the admin API is disabled (403).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from pathlib import Path

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from deployments.config import CanaryRuleFields, VersionSpec
from deployments.versions import VersionError, VersionManager, canary_rules
from flexspec_serve import protocol as P
from flexspec_serve.versions import compatibility_gate
from flexspec_serve.zoo.loading import TokenizerMismatch


def error_response(status: int, body: P.ErrorBody) -> JSONResponse:
    """An error body as the HTTP answer; a `retry_after_s` also becomes a Retry-After header."""
    headers = {}
    if body.error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(body.error.retry_after_s)))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def error(status: int, code: str, message: str, field: str | None = None, value=None, **kw) -> JSONResponse:
    return error_response(status, P.ErrorBody.of(code, message, field, value, **kw))


def read_admin_token(token_file: str | None) -> str | None:
    if token_file:
        return Path(token_file).expanduser().read_text().strip() or None
    return os.environ.get("FLEXSPEC_ADMIN_TOKEN") or None


def _json(body: bytes) -> dict:
    try:
        return json.loads(body or b"{}")
    except json.JSONDecodeError as err:
        raise P.ProtocolError(f"body is not JSON: {err.msg}", "body") from None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AliasUpdate(_Body):
    target: str | dict[str, float] = Field(description="a version, or {version: weight} for a split")


class CheckRequest(_Body):
    baseline: str | None = Field(None, description="version to compare with (default: what `stable` points at)")
    min_fraction: float = Field(0.8, gt=0, le=2, description="refuse below this fraction of the baseline's tau")
    prompts: int = Field(8, ge=1, le=164, description="HumanEval probe prompts")
    max_new: int = Field(32, ge=4, le=256)


class CanaryRequest(CanaryRuleFields):
    weight: float = Field(0.1, gt=0, lt=1, description="share of the alias's new sessions")
    alias: str = "stable"
    force: bool = Field(False, description="skip the compatibility gate")


class PromoteRequest(_Body):
    alias: str = "stable"


class RollbackRequest(_Body):
    reason: str = Field("rolled back by operator", max_length=200)


class RetireRequest(_Body):
    mode: str = Field("finish", pattern=r"^(finish|migrate)$")
    to: str = Field("stable", description="alias or version that takes over")


class AdminAPI:
    def __init__(self, manager: VersionManager, token: str | None, stats, model_root: str | None = None):
        self.manager, self._token, self.stats, self.model_root = manager, token, stats, model_root

    def denied(self, authorization: str) -> JSONResponse | None:
        if self._token is None:
            return error(403, "admin_disabled", "admin API disabled: set FLEXSPEC_ADMIN_TOKEN or admin_token_file")
        given = authorization.removeprefix("Bearer ").encode()
        if not hmac.compare_digest(given, self._token.encode()):
            return error(401, "unauthorized", "missing or wrong admin token", "authorization")
        return None

    async def call(self, authorization: str, body_model: type[BaseModel] | None, body: bytes, op):
        """Token check, body validation, then `op(parsed)` on a worker thread; errors become JSON bodies."""
        denied = self.denied(authorization)
        if denied:
            return denied
        try:
            parsed = P.validate(body_model, _json(body)) if body_model else None
            result = await op(parsed)
        except P.ProtocolError as err:
            return error(422, "invalid_request", str(err), err.field, err.value)
        except VersionError as err:
            return error(err.status, "version_error", str(err))
        except TokenizerMismatch as err:
            return error(422, "tokenizer_mismatch", str(err), "path")
        return JSONResponse(result)

    # ------------------------------------------------------------------ operations (return JSON-able dicts)
    async def add(self, spec: VersionSpec) -> dict:
        self.check_path(spec.path)
        state = self.manager.state()
        from flexspec_serve.zoo.loading import check_tokenizers_match, load_tokenizer

        check_tokenizers_match(state.draft_path, load_tokenizer(state.draft_path), spec.path, load_tokenizer(spec.path))
        state = await asyncio.to_thread(self.manager.add, spec)
        return {"added": spec.name, "generation": state.generation}

    async def check(self, version: str, req: CheckRequest) -> dict:
        from flexspec_serve.zoo.corpus import humaneval_problems

        state = self.manager.state()
        baseline = req.baseline or state.aliases.get("stable")
        if not isinstance(baseline, str) or baseline not in state.versions or version not in state.versions:
            raise VersionError(f"check needs a deployed candidate and baseline, got {version!r} vs {baseline!r}", 404)
        texts = [p.prompt for p in humaneval_problems(req.prompts)]
        gate = await asyncio.to_thread(compatibility_gate, state.draft_path, version, state.versions[version].path,
                                       baseline, state.versions[baseline].path, texts, req.max_new, req.min_fraction)
        self.manager.record_gate(version, gate.as_dict())
        return gate.as_dict()

    async def canary(self, version: str, req: CanaryRequest) -> dict:
        state = self.manager.canary(version, req.weight, canary_rules(req), req.alias, req.force, await self.stats())
        return {"canary": state.canary.model_dump(), "generation": state.generation}

    def check_path(self, path: str) -> None:
        """Model paths only under the allow-listed model root: no traversal, no URLs."""
        if "://" in path:
            raise VersionError(f"path {path!r}: URLs are not allowed; use a directory under the model root", 422)
        if self.model_root is None:
            return
        root, resolved = Path(self.model_root).expanduser().resolve(), Path(path).expanduser().resolve()
        if not resolved.is_relative_to(root):
            raise VersionError(f"path {path!r} is outside the model root {str(root)!r}", 422)
