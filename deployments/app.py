"""Ray Serve deployments: one verifier deployment per target version, and the router ingress.

Two builders: `build_app(args)` makes the router application and `build_version_app(args)` one target
version's application (each version is its own application, so versions come and go without touching the
others). `deploy(cfg)` runs them all; `flexspec serve up` uses it, and `serve deploy deployments/serve.yaml`
lists the same applications with these builders as `import_path`.

- `VerifierDeployment` (`verifier.py`) wraps the plain `VerifierServer`; its batcher gathers concurrent
  rounds from many sessions into one ragged verification; replicas are chosen by consistent hashing on the
  session id, so a session keeps hitting the replica that holds its KV cache.
- `Router` (FastAPI through Serve's HTTP proxy, or a DeploymentHandle for in-cluster clients) resolves a
  round's version from the registry: explicit version, alias or weighted split on the first round; after
  that the client names the version it was served by, so pinning survives router restarts. The routing
  itself is `routing.route_round`, which in-cluster clients may also run themselves (`routing.DirectRouter`
  on the router's `registry_snapshot`): one handle hop per round instead of two.
"""

# No `from __future__ import annotations` here: FastAPI must see real types (Request) on the Serve ingress.
import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import RayError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import RayServeException

from deployments import api_schema
from deployments.admin import (AdminAPI, AliasUpdate, CanaryRequest, CheckRequest, PromoteRequest, RetireRequest,
                               RollbackRequest, error, error_response, read_admin_token)
from deployments.config import (AppConfig, FileRegistry, RegistryState, RegistryView, UnknownTarget, VersionSpec,
                                deployment_name, version_app_name)
from deployments.routing import VersionHandles, route_round, unavailable
from deployments.openai_api import CompletionRequest, completion_response, models_response
from deployments.security import ApiKeys, RateLimiter
from deployments.server import merge_replica_stats
from deployments.verifier import VerifierDeployment
from deployments.versions import VersionError, VersionManager
from flexspec_serve import protocol as P
from flexspec_serve.config import parse_model

log = logging.getLogger("flexspec.router")

MAX_BODY_BYTES = 1 << 20
CONSISTENT_HASH = RequestRouterConfig(
    request_router_class="ray.serve.experimental.consistent_hash_router.ConsistentHashRouter",
    request_router_kwargs={"num_virtual_nodes": 100, "num_fallback_replicas": 2},
)


fastapi_app = FastAPI(title="flexspec-serve", description="edge-cloud speculative decoding router")
WATCH_PERIOD_S = 1.0
STATS_PROBES = 16  # stats calls per version, on distinct consistent-hash keys, to reach each of its replicas


def _async(fn):
    """Run a registry operation (file I/O, small) off the event loop."""
    async def run(req):
        return await asyncio.to_thread(fn, req)

    return run


class ServeDeployer:
    """Adds and deletes versions as Serve applications (from the router replica, on a worker thread)."""

    def __init__(self, ready_timeout_s: float = 300.0):
        self.ready_timeout_s = ready_timeout_s

    def deploy(self, spec: VersionSpec, draft_path: str) -> None:
        name = version_app_name(spec.name)
        # serve.run would wait without a bound for a replica that cannot be scheduled; _run(_blocking=False)
        # returns at once and the loop below gives up after ready_timeout_s with Serve's own message.
        serve._run(build_version_app({"spec": spec.model_dump(), "draft_path": draft_path}), name=name,
                   route_prefix=None, _blocking=False)
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            app = serve.status().applications.get(name)
            status = getattr(app, "status", None)
            if status == "RUNNING":
                return
            if status in ("DEPLOY_FAILED", "UNHEALTHY") or time.monotonic() > deadline:
                message = getattr(app, "message", "") if app else "not found"
                serve.delete(name)
                raise VersionError(f"{spec.name} did not become ready ({status}): {message[:300]}", 503)
            time.sleep(0.5)

    def delete(self, version: str) -> None:
        serve.delete(version_app_name(version))


@serve.ingress(fastapi_app)
class Router:
    def __init__(self, registry_path: str, seed_state: dict, draft_path: str, admin_token_file: str | None = None,
                 model_root: str | None = None, drain_idle_s: float = 10.0, api_keys_file: str | None = None,
                 session_rounds_per_s: float = 50.0, session_burst: float = 20.0):
        self.registry = FileRegistry(registry_path)
        self.view = RegistryView(self.registry, self.registry.load_or_seed(RegistryState.model_validate(seed_state)))
        self.handles = VersionHandles()
        self.draft_path = draft_path
        self._tokenizer = None
        self.manager = VersionManager(self.registry, ServeDeployer(), idle_s=drain_idle_s)
        self.admin = AdminAPI(self.manager, read_admin_token(admin_token_file), self._all_stats, model_root)
        self._watcher: asyncio.Task | None = None
        self.api_keys = ApiKeys.load(api_keys_file)
        self.limiter = RateLimiter(session_rounds_per_s, session_burst)

    # ------------------------------------------------------------------ registry
    def current(self) -> RegistryState:
        return self.view.current()

    async def _all_stats(self, since: float | None = None) -> dict[str, dict]:
        """Every version's stats merged over its replicas, reached by consistent hashing on probe keys
        (`STATS_PROBES` keys reach every one of up to 4 replicas with probability > 0.95)."""
        versions = sorted(self.current().versions)
        merged = await asyncio.gather(*(self._version_stats(v, since) for v in versions), return_exceptions=True)
        return {v: m for v, m in zip(versions, merged) if isinstance(m, dict)}

    async def _version_stats(self, version: str, since: float | None) -> dict | None:
        handle, replies = self.handles.get(version), []
        for i in range(STATS_PROBES):  # one at a time: concurrent calls from one request stall (`complete`)
            try:
                replies.append(await handle.options(session_id=f"stats-probe-{i}").stats.remote(since))
            except (RayError, RayServeException):
                continue
        return merge_replica_stats(replies) if replies else None

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Judges a running canary and finishes drains, once a second, while there is something to watch."""
        while True:
            await asyncio.sleep(WATCH_PERIOD_S)
            state = self.current()
            if not (state.draining or (state.canary and state.canary.status == "running")):
                continue
            stats = await self._all_stats(state.canary.started_at if state.canary else None)
            try:
                for d in await asyncio.to_thread(self.manager.tick, stats):
                    if d.action != "continue":
                        log.info("version watcher: %s: %s", d.action, d.reason)
            except VersionError as err:  # another router replica acted first
                log.info("version watcher: %s", err)
            self.handles.keep_only(self.current().versions)
            self.view.invalidate()

    # ------------------------------------------------------------------ rounds
    async def route(self, rnd: P.DraftRound):
        """A RoundResult or (status, ErrorBody): the in-cluster entry point (DeploymentHandle)."""
        self._ensure_watcher()
        return await route_round(self.current(), self.handles, rnd)

    async def registry_snapshot(self, known_generation: int | None = None) -> dict | None:
        """The registry snapshot for clients that route for themselves (`routing.DirectRouter`); None when
        the caller already holds this generation. Their periodic calls keep the version watcher running."""
        self._ensure_watcher()
        state = self.current()
        return None if known_generation == state.generation else state.model_dump()

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

    def _client_denied(self, request: Request) -> JSONResponse | None:
        """API key (when keys are configured) and the per-session rate limit, for HTTP clients."""
        if self.api_keys.enabled:
            auth = request.headers.get("authorization", "")
            if not auth:
                return error(401, "unauthorized", "an API key is required: Authorization: Bearer <key>",
                             "authorization")
            if self.api_keys.client(auth) is None:
                return error(403, "forbidden", "API key not recognised", "authorization")
        allowed, wait_s = self.limiter.allow(request.headers.get("x-session-id") or request.client.host)
        if not allowed:
            return error_response(429, P.ErrorBody.of("rate_limited", "too many rounds for this session; slow down",
                                                       retry_after_s=round(wait_s, 3)))
        return None

    @fastapi_app.post("/v1/round", openapi_extra=api_schema.ROUND)
    async def http_round(self, request: Request) -> Response:
        denied = self._client_denied(request)
        if denied:
            return denied
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return error(413, "payload_too_large", f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
        if request.headers.get("content-type", "").startswith(P.COMPACT_CONTENT_TYPE):
            status, out = await self.round_compact(body)
            if status == 200:
                return Response(out, status_code=200, media_type=P.COMPACT_CONTENT_TYPE)
            return error_response(status, P.ErrorBody.model_validate_json(out))
        try:
            rnd = P.validate(P.DraftRound, json.loads(body))
        except json.JSONDecodeError as err:
            return error(422, "invalid_json", f"body is not JSON: {err.msg}", "body")
        except UnicodeDecodeError as err:  # json.loads on bytes that are not UTF-8/16/32
            return error(422, "invalid_json", f"body is not JSON text: {err.reason} at byte {err.start}", "body")
        except P.ProtocolError as err:
            return error(422, "invalid_request", str(err), err.field, err.value)
        res = await self.route(rnd)
        if isinstance(res, P.RoundResult):
            return JSONResponse(res.model_dump())
        return error_response(*res)

    # ------------------------------------------------------------------ versions, stats
    @fastapi_app.get("/v1/versions")
    def versions(self) -> dict:
        state = self.current()
        return {"versions": sorted(state.versions), "aliases": state.aliases, "generation": state.generation,
                "draining": sorted(state.draining), "canary": state.canary.model_dump() if state.canary else None}

    @fastapi_app.get("/v1/stats")
    async def stats(self) -> dict:
        return await self._all_stats()

    @fastapi_app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "versions": sorted(self.current().versions)}

    # ------------------------------------------------------------------ admin API (writes the registry)
    async def _admin(self, request: Request, body_model, op) -> Response:
        self._ensure_watcher()
        resp = await self.admin.call(request.headers.get("authorization", ""), body_model, await request.body(), op)
        self.view.invalidate()  # re-read the registry on the next round
        return resp

    @fastapi_app.get("/admin/registry", openapi_extra=api_schema.errors(*api_schema.ADMIN))
    async def admin_registry(self, request: Request) -> Response:
        return await self._admin(request, None, _async(lambda _: self.manager.state().model_dump()))

    @fastapi_app.post("/admin/versions", openapi_extra=api_schema.body(VersionSpec, *api_schema.ADMIN))
    async def admin_add(self, request: Request) -> Response:
        return await self._admin(request, VersionSpec, self.admin.add)

    @fastapi_app.post("/admin/versions/{version}/check", openapi_extra=api_schema.body(CheckRequest, *api_schema.ADMIN))
    async def admin_check(self, version: str, request: Request) -> Response:
        return await self._admin(request, CheckRequest, lambda req: self.admin.check(version, req))

    @fastapi_app.post("/admin/versions/{version}/canary", openapi_extra=api_schema.body(CanaryRequest, *api_schema.ADMIN))
    async def admin_canary(self, version: str, request: Request) -> Response:
        return await self._admin(request, CanaryRequest, lambda req: self.admin.canary(version, req))

    @fastapi_app.post("/admin/versions/{version}/promote", openapi_extra=api_schema.body(PromoteRequest, *api_schema.ADMIN))
    async def admin_promote(self, version: str, request: Request) -> Response:
        return await self._admin(request, PromoteRequest, _async(
            lambda req: self.manager.promote(version, req.alias, "promoted by operator").model_dump()))

    @fastapi_app.post("/admin/versions/{version}/retire", openapi_extra=api_schema.body(RetireRequest, *api_schema.ADMIN))
    async def admin_retire(self, version: str, request: Request) -> Response:
        return await self._admin(request, RetireRequest, _async(
            lambda req: self.manager.retire(version, req.mode, req.to).model_dump()))

    @fastapi_app.post("/admin/rollback", openapi_extra=api_schema.body(RollbackRequest, *api_schema.ADMIN))
    async def admin_rollback(self, request: Request) -> Response:
        return await self._admin(request, RollbackRequest, _async(lambda req: self.manager.rollback(req.reason).model_dump()))

    @fastapi_app.put("/admin/aliases/{alias}", openapi_extra=api_schema.body(AliasUpdate, *api_schema.ADMIN))
    async def admin_set_alias(self, alias: str, request: Request) -> Response:
        return await self._admin(request, AliasUpdate, _async(
            lambda req: {"alias": alias, "target": req.target,
                         "generation": self.manager.set_weights(alias, req.target).generation}))

    @fastapi_app.delete("/admin/aliases/{alias}", openapi_extra=api_schema.errors(*api_schema.ADMIN))
    async def admin_delete_alias(self, alias: str, request: Request) -> Response:
        def drop(_):
            state = self.manager.state()
            if alias not in state.aliases:
                raise VersionError(f"no alias {alias!r}; aliases: {sorted(state.aliases)}", 404)
            saved = self.manager.registry.save(state.edited(
                {"t": time.time(), "action": "delete-alias", "version": None, "detail": alias},
                aliases={k: v for k, v in state.aliases.items() if k != alias}))
            return {"deleted": alias, "generation": saved.generation}

        return await self._admin(request, None, _async(drop))

    # ------------------------------------------------------------------ OpenAI-compatible, cloud-only
    @fastapi_app.get("/v1/models")
    def models(self) -> dict:
        state = self.current()
        return models_response(sorted(state.versions) + sorted(state.aliases))

    @fastapi_app.post("/v1/completions", openapi_extra=api_schema.body(CompletionRequest, 401, 403, 404, 413, 422, 503))
    async def completions(self, request: Request) -> Response:
        denied = self._client_denied(request)
        if denied:
            return denied
        try:
            req = parse_model(CompletionRequest, await request.json(), "request body")
        except (ValueError, json.JSONDecodeError) as err:
            return error(422, "invalid_request", str(err), "body")
        state = self.current()
        try:
            version = state.resolve(req.model, req.user or "openai")
        except UnknownTarget as err:
            return error(404, "unknown_model", str(err), "model", req.model)
        tok = self.tokenizer()
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        sampling = {"temperature": req.temperature, "top_p": req.top_p, "seed": req.seed or 0}
        encoded = []
        for i, prompt in enumerate(prompts):
            try:
                encoded.append(tok(prompt, add_special_tokens=False)["input_ids"] or [tok.eos_token_id])
            except (TypeError, ValueError) as err:  # e.g. a lone UTF-16 surrogate: not text the tokenizer takes
                return error(422, "invalid_request", f"prompt {i} is not valid text: {err}", "prompt",
                             prompt[:40].encode("utf-8", "backslashreplace").decode())
        rid = f"oai-{time.monotonic_ns()}"
        try:
            answers = await self.handles.get(version).options(session_id=rid).complete.remote(
                rid, encoded, req.max_tokens, sampling, tok.eos_token_id)
        except (RayError, RayServeException) as err:
            return error_response(503, unavailable(version, err))
        outputs = []
        for ids, (tokens, reason, failed) in zip(encoded, answers):
            if failed:
                status, body = failed
                return error_response(status, body)
            outputs.append((len(ids), tok.decode(tokens), len(tokens), reason))
        return JSONResponse(completion_response(version, outputs))

    def tokenizer(self):
        if self._tokenizer is None:
            from flexspec_serve.zoo.loading import load_tokenizer

            self._tokenizer = load_tokenizer(self.draft_path)
        return self._tokenizer


def build_version_app(args: dict):
    """Builder of one version's application: `args` = {"spec": VersionSpec as a dict, "draft_path": ...}."""
    v = VersionSpec.model_validate(args["spec"])
    return version_deployment(v).bind(v.model_dump(), args["draft_path"])


def version_deployment(v: VersionSpec) -> serve.Deployment:
    """The verifier deployment of one version, with its Serve options."""
    scaling = {"autoscaling_config": v.autoscaling.serve_config()} if v.autoscaling else {"num_replicas": v.num_replicas}
    return serve.deployment(VerifierDeployment).options(
        name=deployment_name(v.name), **scaling,
        ray_actor_options={"num_cpus": v.num_cpus, "num_gpus": v.num_gpus,
                           # read when libgomp loads (torch import), so it must be in the worker's environment
                           "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": v.omp_wait_policy}}},
        max_ongoing_requests=v.max_ongoing_requests, max_queued_requests=v.max_queued_requests,
        request_router_config=CONSISTENT_HASH, health_check_period_s=10,
        logging_config={"enable_access_log": v.access_log},
    )


def build_app(args: dict):
    """Builder of the router application: `args` is an AppConfig as a dict, or {"config": path to its YAML}.
    The versions it lists seed the registry; each is deployed as its own application (`deploy`, or the
    other entries of serve.yaml)."""
    from flexspec_serve.config import load_yaml

    cfg = load_yaml(AppConfig, args["config"]) if set(args) == {"config"} else parse_model(AppConfig, args, "app args")
    return router_deployment(cfg).bind(cfg.registry_path, cfg.seed_state().model_dump(), cfg.draft_path,
                                       cfg.admin_token_file, cfg.model_root, cfg.drain_idle_s, cfg.api_keys_file,
                                       cfg.session_rounds_per_s, cfg.session_burst)


def router_deployment(cfg: AppConfig) -> serve.Deployment:
    """The router deployment, with its Serve options."""
    return serve.deployment(Router).options(
        name="router", num_replicas=cfg.router_replicas, ray_actor_options={"num_cpus": cfg.router_num_cpus},
        max_ongoing_requests=1000, logging_config={"enable_access_log": cfg.router_access_log},
    )


def deploy(cfg: AppConfig, name: str = "flexspec", route_prefix: str = "/"):
    """Deploy every version's application, then the router's; returns the router's handle."""
    for v in cfg.versions:
        serve.run(build_version_app({"spec": v.model_dump(), "draft_path": cfg.draft_path}),
                  name=version_app_name(v.name), route_prefix=None)
    return serve.run(build_app(cfg.model_dump()), name=name, route_prefix=route_prefix)
