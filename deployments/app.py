"""Ray Serve deployments: one verifier deployment per target version, and the router ingress.

`build_app(args)` is the one builder: `serve.run(build_app(...))`, `flexspec serve up`, and
`serve deploy deployments/serve.yaml` (whose `import_path` is `deployments.app:build_app`) all use it.

- `VerifierDeployment` wraps the plain `VerifierServer`; `@serve.batch` gathers concurrent rounds from many
  sessions into one ragged verification; replicas are chosen by consistent hashing on the session id, so
  a session keeps hitting the replica that holds its KV cache.
- `Router` (FastAPI through Serve's HTTP proxy, or a DeploymentHandle for in-cluster clients) resolves a
  round's version from the registry: explicit version, alias or weighted split on the first round; after
  that the client names the version it was served by, so pinning survives router restarts.
"""

# No `from __future__ import annotations` here: FastAPI must see real types (Request) on the Serve ingress.
import asyncio
import hmac
import json
import os
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.util import metrics

from deployments.config import AppConfig, FileRegistry, RegistryState, UnknownTarget, VersionSpec
from deployments.openai_api import CompletionRequest, completion_response, models_response
from flexspec_serve import protocol as P
from flexspec_serve.config import parse_model

MAX_BODY_BYTES = 1 << 20
CONSISTENT_HASH = RequestRouterConfig(
    request_router_class="ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
    request_router_kwargs={"num_virtual_nodes": 100, "num_fallback_replicas": 2},
)


def deployment_name(version: str) -> str:
    return f"verifier-{version}"


class VerifierDeployment:
    def __init__(self, spec: dict, draft_path: str):
        from deployments.server import VerifierServer

        self.spec = VersionSpec.model_validate(spec)
        self.server = VerifierServer(self.spec, draft_path)
        self._batched.set_max_batch_size(self.spec.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)
        tags = {"version": self.spec.name}
        self.m_rounds = metrics.Counter("flexspec_rounds", "rounds verified", tag_keys=("version",))
        self.m_draft = metrics.Counter("flexspec_draft_tokens", "draft tokens received", tag_keys=("version",))
        self.m_accepted = metrics.Counter("flexspec_accepted_tokens", "draft tokens accepted", tag_keys=("version",))
        self.m_tau = metrics.Histogram("flexspec_acceptance_length", "accepted + 1 per round",
                                       boundaries=[1, 2, 3, 4, 5, 6, 8, 12, 17], tag_keys=("version",))
        self.m_verify = metrics.Histogram("flexspec_verify_ms", "batch verify latency (ms)",
                                          boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500], tag_keys=("version",))
        self.m_batch = metrics.Histogram("flexspec_batch_size", "rounds per verify batch",
                                         boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("version",))
        self.m_cache = metrics.Counter("flexspec_kv_lookups", "KV-cache lookups", tag_keys=("version", "result"))
        for m in (self.m_rounds, self.m_draft, self.m_accepted, self.m_tau, self.m_verify, self.m_batch):
            m.set_default_tags(tags)
        self._verified_tokens = 0  # positions verified (K + 1 per round), for the autoscaler
        self._last_report = (time.monotonic(), 0)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.004)
    async def _batched(self, items: list[tuple[P.DraftRound, float]]) -> list:
        rounds, enqueued = [r for r, _ in items], [t for _, t in items]
        started = time.perf_counter()
        results = await asyncio.to_thread(self.server.verify_rounds, rounds, enqueued)
        self.m_verify.observe((time.perf_counter() - started) * 1e3)
        self.m_batch.observe(len(rounds))
        for rnd, res in zip(rounds, results):
            if isinstance(res, P.RoundResult):
                self._verified_tokens += len(rnd.draft_tokens) + 1
                self.m_rounds.inc()
                if rnd.draft_tokens:  # ray.util.metrics counters refuse inc(0)
                    self.m_draft.inc(len(rnd.draft_tokens))
                if res.accepted:
                    self.m_accepted.inc(res.accepted)
                self.m_tau.observe(res.accepted + 1)
                self.m_cache.inc(tags={"version": self.spec.name, "result": "hit" if res.cache_hit else "miss"})
        return results

    async def verify(self, rnd: P.DraftRound):
        """A RoundResult, or (http_status, ErrorBody)."""
        return await self._batched((rnd, time.perf_counter()))

    async def generate(self, session_id: str, prompt: list[int], max_tokens: int, sampling: dict,
                       stop_token: int | None) -> tuple[list[int], str]:
        """Cloud-only generation: K = 0 rounds, batched with everyone else's rounds."""
        tokens: list[int] = []
        for seq in range(max_tokens):
            rnd = P.DraftRound(session_id=session_id, seq=seq, full_context=prompt if seq == 0 else None,
                               sampling=P.Sampling(**sampling) if seq == 0 else None)
            res = await self.verify(rnd)
            if not isinstance(res, P.RoundResult):
                raise ValueError(res[1].error.message)
            tokens.append(res.token)
            if stop_token is not None and res.token == stop_token:
                self.server.verifier.drop_session(session_id)
                return tokens, "stop"
        self.server.verifier.drop_session(session_id)
        return tokens, "length"

    def stats(self) -> dict:
        return self.server.stats()

    async def record_autoscaling_stats(self) -> dict:
        """Custom autoscaling metric (Serve calls this periodically): verified tokens/s since the last call."""
        now, tokens = time.monotonic(), self._verified_tokens
        then, before = self._last_report
        self._last_report = (now, tokens)
        return {"verified_tokens_per_s": (tokens - before) / max(now - then, 1e-6)}

    def check_health(self) -> None:
        self.server.check_health()


fastapi_app = FastAPI(title="flexspec-serve", description="edge-cloud speculative decoding router")


def _error(status: int, code: str, message: str, field: str | None = None, value=None, **kw) -> JSONResponse:
    return JSONResponse(P.ErrorBody.of(code, message, field, value, **kw).model_dump(), status_code=status)


def read_admin_token(token_file: str | None) -> str | None:
    """The admin token from a secrets file or FLEXSPEC_ADMIN_TOKEN; never from code, never logged."""
    if token_file:
        return Path(token_file).expanduser().read_text().strip() or None
    return os.environ.get("FLEXSPEC_ADMIN_TOKEN") or None


class AliasUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target: str | dict[str, float] = Field(description="a version, or {version: weight} for a split")


@serve.ingress(fastapi_app)
class Router:
    def __init__(self, registry_path: str, seed_state: dict, draft_path: str, handles: dict,
                 admin_token_file: str | None = None):
        self._admin_token = read_admin_token(admin_token_file)
        self.registry = FileRegistry(registry_path)
        self.state = self.registry.load_or_seed(RegistryState.model_validate(seed_state))
        self._mtime = 0.0
        self._checked = 0.0
        self.handles = dict(handles)  # version -> DeploymentHandle
        self.draft_path = draft_path
        self._tokenizer = None

    # ------------------------------------------------------------------ registry
    def current(self) -> RegistryState:
        """The registry as last written: the file is checked at most every 0.5 s, re-read when it changed."""
        now = time.monotonic()
        if now - self._checked < 0.5:
            return self.state
        self._checked = now
        try:
            mtime = self.registry.path.stat().st_mtime
        except FileNotFoundError:
            return self.state
        if mtime != self._mtime:
            self.state, self._mtime = self.registry.load() or self.state, mtime
        return self.state

    def _handle(self, version: str):
        if version not in self.handles:
            self.handles[version] = serve.get_deployment_handle(deployment_name(version),
                                                                serve.get_replica_context().app_name)
        return self.handles[version]

    # ------------------------------------------------------------------ rounds
    async def route(self, rnd: P.DraftRound):
        """A RoundResult or (status, ErrorBody): the in-cluster entry point (DeploymentHandle)."""
        state = self.current()
        try:
            version = state.resolve(rnd.target, rnd.session_id)
        except UnknownTarget as err:
            return 404, P.ErrorBody.of("unknown_version", str(err), "target", rnd.target)
        handle = self._handle(version).options(session_id=rnd.session_id)
        return await handle.verify.remote(rnd)

    async def round_compact(self, payload: bytes) -> tuple[int, bytes]:
        """Compact bytes in, (status, compact result or JSON error) out: for handle clients."""
        try:
            rnd = P.decode_round(payload)
        except P.ProtocolError as err:
            return 422, P.ErrorBody.of("invalid_request", str(err), err.field, err.value).model_dump_json().encode()
        res = await self.route(rnd)
        if isinstance(res, P.RoundResult):
            return 200, P.encode_result(res)
        return res[0], res[1].model_dump_json().encode()

    @fastapi_app.post("/v1/round")
    async def http_round(self, request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(413, "payload_too_large", f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
        if request.headers.get("content-type", "").startswith(P.COMPACT_CONTENT_TYPE):
            status, out = await self.round_compact(body)
            media = P.COMPACT_CONTENT_TYPE if status == 200 else "application/json"
            return Response(out, status_code=status, media_type=media)
        try:
            rnd = P.validate(P.DraftRound, json.loads(body))
        except json.JSONDecodeError as err:
            return _error(422, "invalid_json", f"body is not JSON: {err.msg}", "body")
        except P.ProtocolError as err:
            return _error(422, "invalid_request", str(err), err.field, err.value)
        res = await self.route(rnd)
        if isinstance(res, P.RoundResult):
            return JSONResponse(res.model_dump())
        return JSONResponse(res[1].model_dump(), status_code=res[0])

    # ------------------------------------------------------------------ versions, stats
    @fastapi_app.get("/v1/versions")
    def versions(self) -> dict:
        state = self.current()
        return {"versions": sorted(state.versions), "aliases": state.aliases, "generation": state.generation}

    @fastapi_app.get("/v1/stats")
    async def stats(self) -> dict:
        state = self.current()
        out = {}
        for v in state.versions:
            out[v] = await self._handle(v).stats.remote()
        return out

    @fastapi_app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "versions": sorted(self.current().versions)}

    # ------------------------------------------------------------------ admin API (writes the registry)
    def _admin_denied(self, request: Request) -> JSONResponse | None:
        if self._admin_token is None:
            return _error(403, "admin_disabled", "admin API disabled: set FLEXSPEC_ADMIN_TOKEN or admin_token_file")
        given = request.headers.get("authorization", "").removeprefix("Bearer ").encode()
        if not hmac.compare_digest(given, self._admin_token.encode()):
            return _error(401, "unauthorized", "missing or wrong admin token", "authorization")
        return None

    @fastapi_app.get("/admin/registry")
    def admin_registry(self, request: Request) -> Response:
        return self._admin_denied(request) or JSONResponse(self.current().model_dump())

    @fastapi_app.put("/admin/aliases/{alias}")
    async def admin_set_alias(self, alias: str, request: Request) -> Response:
        denied = self._admin_denied(request)
        if denied:
            return denied
        try:
            update = P.validate(AliasUpdate, await request.json())
            state = self.current()
            edited = RegistryState.model_validate({**state.model_dump(), "aliases": {**state.aliases, alias: update.target}})
        except P.ProtocolError as err:
            return _error(422, "invalid_request", str(err), err.field, err.value)
        except (ValueError, json.JSONDecodeError) as err:
            return _error(422, "invalid_alias", str(err), "target")
        self.state, self._checked = self.registry.save(edited), 0.0
        return JSONResponse({"alias": alias, "target": update.target, "generation": self.state.generation})

    @fastapi_app.delete("/admin/aliases/{alias}")
    def admin_delete_alias(self, alias: str, request: Request) -> Response:
        denied = self._admin_denied(request)
        if denied:
            return denied
        state = self.current()
        if alias not in state.aliases:
            return _error(404, "unknown_alias", f"no alias {alias!r}; aliases: {sorted(state.aliases)}", "alias", alias)
        self.state, self._checked = self.registry.save(state.model_copy(
            update={"aliases": {k: v for k, v in state.aliases.items() if k != alias}})), 0.0
        return JSONResponse({"deleted": alias, "generation": self.state.generation})

    # ------------------------------------------------------------------ OpenAI-compatible, cloud-only
    @fastapi_app.get("/v1/models")
    def models(self) -> dict:
        state = self.current()
        return models_response(sorted(state.versions) + sorted(state.aliases))

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        try:
            req = parse_model(CompletionRequest, await request.json(), "request body")
        except (ValueError, json.JSONDecodeError) as err:
            return _error(422, "invalid_request", str(err), "body")
        state = self.current()
        try:
            version = state.resolve(req.model, req.user or "openai")
        except UnknownTarget as err:
            return _error(404, "unknown_model", str(err), "model", req.model)
        tok = self.tokenizer()
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        sampling = {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed or 0}
        outputs = []
        for i, prompt in enumerate(prompts):
            ids = tok(prompt, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
            sid = f"oai-{time.monotonic_ns()}-{i}"
            tokens, reason = await self._handle(version).options(session_id=sid).generate.remote(
                sid, ids, req.max_tokens, sampling, tok.eos_token_id)
            outputs.append((len(ids), tok.decode(tokens), len(tokens), reason))
        return JSONResponse(completion_response(version, outputs))

    def tokenizer(self):
        if self._tokenizer is None:
            from flexspec_serve.zoo.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.draft_path)
        return self._tokenizer


def build_app(args: dict):
    """The builder: `args` is an AppConfig as a dict, or {"config": path to its YAML}."""
    from flexspec_serve.config import load_yaml

    cfg = load_yaml(AppConfig, args["config"]) if set(args) == {"config"} else parse_model(AppConfig, args, "app args")
    handles = {}
    for v in cfg.versions:
        dep = serve.deployment(VerifierDeployment).options(
            name=deployment_name(v.name), num_replicas=v.num_replicas,
            ray_actor_options={"num_cpus": v.num_cpus, "num_gpus": v.num_gpus},
            max_ongoing_requests=v.max_ongoing_requests, max_queued_requests=v.max_queued_requests,
            request_router_config=CONSISTENT_HASH, health_check_period_s=10,
        )
        handles[v.name] = dep.bind(v.model_dump(), cfg.draft_path)
    router = serve.deployment(Router).options(
        name="router", num_replicas=cfg.router_replicas, ray_actor_options={"num_cpus": cfg.router_num_cpus},
        max_ongoing_requests=1000,
    )
    return router.bind(cfg.registry_path, cfg.seed_state().model_dump(), cfg.draft_path, handles,
                       cfg.admin_token_file)
