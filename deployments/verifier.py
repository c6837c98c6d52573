"""The Serve deployment of one target version: wraps the plain `VerifierServer`, gathers concurrent rounds
from many sessions into one ragged verification (an engine loop that batches whatever arrived while the
last batch ran, or Serve's timer-based `@serve.batch`; `VersionSpec.batcher`), exports metrics tagged by version,
reports verified tokens/s for the autoscaling policy, and generates cloud-only for the OpenAI endpoints.
Replicas are chosen by consistent hashing on the session id (see `build_version_app` in `app.py`)."""

import asyncio
import time

from ray import serve
from ray.util import metrics

from deployments.config import VersionSpec
from flexspec_serve import protocol as P
from flexspec_serve.batching import MicroBatcher
from flexspec_serve.engine.errors import ContextTooLong


class VerifierDeployment:
    def __init__(self, spec: dict, draft_path: str):
        from deployments.server import VerifierServer

        self.spec = VersionSpec.model_validate(spec)
        self.server = VerifierServer(self.spec, draft_path)
        self._batched.set_max_batch_size(self.spec.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.spec.batch_wait_timeout_s)
        self._loop = None
        if self.spec.batcher == "engine-loop":
            self._loop = MicroBatcher(self._verify_items, self.spec.batch_wait_timeout_s * 1e3,
                                      self.spec.max_batch_size, f"verify-{self.spec.name}", self._record)
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
        self._hit_tags = {"version": self.spec.name, "result": "hit"}
        self._miss_tags = {"version": self.spec.name, "result": "miss"}
        self._verified_tokens = 0  # positions verified (K + 1 per round), for the autoscaler
        self._last_report = (time.monotonic(), 0)

    def _verify_items(self, items: list[tuple[P.DraftRound, float]]) -> list:
        return self.server.verify_rounds([r for r, _ in items], [t for _, t in items])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batched(self, items: list[tuple[P.DraftRound, float]]) -> list:
        started = time.perf_counter()
        results = await asyncio.to_thread(self._verify_items, items)
        self._record(items, results, (time.perf_counter() - started) * 1e3)
        return results

    def _record(self, items: list[tuple[P.DraftRound, float]], results: list, verify_ms: float) -> None:
        """Metrics of one verified batch (on the event loop): counters once per batch, not per round."""
        done = [(rnd, res) for (rnd, _), res in zip(items, results) if isinstance(res, P.RoundResult)]
        self.m_verify.observe(verify_ms)
        self.m_batch.observe(len(items))
        drafted = sum(len(rnd.draft_tokens) for rnd, _ in done)
        accepted = sum(res.accepted for _, res in done)
        hits = sum(res.cache_hit for _, res in done)
        self._verified_tokens += drafted + len(done)  # K + 1 positions per round
        for n, metric, tags in ((len(done), self.m_rounds, None), (drafted, self.m_draft, None),
                                (accepted, self.m_accepted, None), (hits, self.m_cache, self._hit_tags),
                                (len(done) - hits, self.m_cache, self._miss_tags)):
            if n:  # ray.util.metrics counters refuse inc(0)
                metric.inc(n, tags=tags)
        for _, res in done:
            self.m_tau.observe(res.accepted + 1)

    async def verify(self, rnd: P.DraftRound):
        """A RoundResult, or (http_status, ErrorBody)."""
        if self._loop is not None:
            return await self._loop.submit((rnd, time.perf_counter()))
        return await self._batched((rnd, time.perf_counter()))

    async def _generate(self, session_id: str, prompt: list[int], max_tokens: int, sampling: dict,
                        stop_token: int | None) -> tuple[list[int], str, tuple | None]:
        """Cloud-only generation: K = 0 rounds, batched with everyone else's rounds. Returns (tokens,
        finish reason, None), or ([], "", (http_status, ErrorBody)) when the prompt itself is refused.
        Reaching the model's positions ends the completion with reason "length", as OpenAI servers do."""
        tokens: list[int] = []
        reason = "length"
        try:
            for seq in range(max_tokens):
                rnd = P.DraftRound(session_id=session_id, seq=seq, full_context=prompt if seq == 0 else None,
                                   sampling=P.Sampling(**sampling) if seq == 0 else None)
                res = await self.verify(rnd)
                if not isinstance(res, P.RoundResult):
                    if seq == 0 or res[1].error.code != ContextTooLong.code:
                        return [], "", res
                    break  # the next token would not fit the model's positions
                tokens.append(res.token)
                if stop_token is not None and res.token == stop_token:
                    reason = "stop"
                    break
        finally:
            self.server.verifier.drop_session(session_id)
        return tokens, reason, None

    async def complete(self, request_id: str, prompts: list[list[int]], max_tokens: int, sampling: dict,
                       stop_token: int | None) -> list[tuple[list[int], str, tuple | None]]:
        """A completion request's prompts, generated together (their rounds share batches): `_generate`'s
        answer per prompt. One handle call per request, not one per prompt: in Ray 2.60 the child calls of a
        request share its internal request id, and under the consistent-hash request router concurrent child
        calls to one deployment do not return (in a scratch repro, 4 calls through `asyncio.gather` had not
        answered after 10 s; one at a time, or behind Serve's default router, they answer at once). A refused
        prompt fails the request, so the others stop then; a stopped prompt's answer is ([], "", None)."""
        tasks = [asyncio.ensure_future(self._generate(f"{request_id}-{i}", ids, max_tokens, sampling, stop_token))
                 for i, ids in enumerate(prompts)]
        try:
            for answer in asyncio.as_completed(tasks):
                if (await answer)[2] is not None:
                    break  # a refused prompt fails the request: the others stop (and drop their sessions)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # let the cancelled ones end
        return [([], "", None) if t.cancelled() else t.result() for t in tasks]

    def stats(self, since: float | None = None) -> dict:
        """This replica's counters (`VerifierServer.stats`) and its Serve replica id."""
        return {**self.server.stats(since), "replica": serve.get_replica_context().replica_id.unique_id}

    async def record_autoscaling_stats(self) -> dict:
        """Custom autoscaling metric (Serve calls this periodically): verified tokens/s since the last call."""
        now, tokens = time.monotonic(), self._verified_tokens
        then, before = self._last_report
        self._last_report = (now, tokens)
        return {"verified_tokens_per_s": (tokens - before) / max(now - then, 1e-6)}

    def check_health(self) -> None:
        self.server.check_health()
