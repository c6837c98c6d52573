"""OpenAPI declarations for the router's raw-body endpoints.

The router reads request bodies itself (size limit first, then a pydantic model, errors as values), so
FastAPI cannot infer their schemas; `body(Model)` declares them, so `/openapi.json` documents every
request and schema-driven clients and fuzzers (schemathesis) can generate them. `ERRORS` documents the
error body every 4xx/5xx carries.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from flexspec_serve import protocol as P


def inline_schema(model: type[BaseModel]) -> dict:
    """The model's JSON schema with every `$ref` into `$defs` replaced by the definition itself."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node and node["$ref"].startswith("#/$defs/"):
                return resolve(defs[node["$ref"].removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def errors(*statuses: int) -> dict:
    """`openapi_extra` documenting the error body for these statuses."""
    error = {"content": {"application/json": {"schema": inline_schema(P.ErrorBody)}}}
    return {"responses": {str(s): {"description": d, **error} for s, d in (
        (401, "missing credentials"), (403, "credentials not recognised"), (404, "unknown version or alias"),
        (409, "resync required / version state conflict"), (413, "body too large"),
        (422, "invalid request: the field and the value are named"), (429, "rate limited (Retry-After)"),
        (503, "overloaded or unavailable (Retry-After)")) if s in statuses}}


def body(model: type[BaseModel], *statuses: int, extra_content: dict | None = None) -> dict:
    """`openapi_extra` for a route whose JSON body is `model`."""
    content = {"application/json": {"schema": inline_schema(model)}, **(extra_content or {})}
    return {"requestBody": {"required": True, "content": content}, **errors(*statuses)}


ROUND = body(P.DraftRound, 401, 403, 404, 409, 413, 422, 429, 503,
             extra_content={P.COMPACT_CONTENT_TYPE: {"schema": {"type": "string", "format": "binary"}}})
ADMIN = (401, 403, 404, 409, 422)
