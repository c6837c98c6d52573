"""The verifier for one target version as a plain class (no Serve): testable on its own, wrapped by
the Serve deployment in `app.py`. Rounds in and results out are wire models; engine exceptions become
`ErrorBody` values with the HTTP status to answer."""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import torch

from deployments.config import VersionSpec
from flexspec_serve import protocol as P
from flexspec_serve.edge.devices import CLOUD_PROFILES
from flexspec_serve.engine.errors import ConditionNotMet, EngineError, ResyncRequired
from flexspec_serve.engine.stats import SPREAD_KEYS
from flexspec_serve.engine.verifier import Verifier, VerifierLimits
from flexspec_serve.zoo.loading import check_tokenizers_match, load_causal_lm, load_tokenizer


class VerifierServer:
    def __init__(self, spec: VersionSpec, draft_path: str):
        torch.set_num_threads(spec.torch_threads)  # Ray sets OMP_NUM_THREADS=1 in workers; choose deliberately
        device = spec.device if spec.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.spec, self.version = spec, spec.name
        self.tokenizer = load_tokenizer(spec.path)
        check_tokenizers_match(draft_path, load_tokenizer(draft_path), spec.path, self.tokenizer)
        target = load_causal_lm(spec.path, device=device)
        draft = load_causal_lm(draft_path, device=device)
        limits = VerifierLimits(max_draft_tokens=spec.max_draft_tokens, max_sessions=spec.max_sessions,
                                max_cache_bytes=spec.max_cache_mb << 20, session_ttl_s=spec.session_ttl_s)
        self.verifier = Verifier(target, draft, name=spec.name, limits=limits)
        self.cloud = CLOUD_PROFILES[spec.emulate_cloud] if spec.emulate_cloud else None
        self.held_batches = 0  # emulated cloud: batches held to the profile's time (the others overran it)
        self.batches = 0
        # rolling windows for `stats()` (the Ray metrics histograms cannot be read back in the replica)
        self.batch_sizes: deque[int] = deque(maxlen=1000)
        self.errors = 0  # rounds answered with an error body
        self.last_round = time.monotonic()
        self.latencies_ms: deque[float] = deque(maxlen=2000)  # queue + verify of recent rounds

    def verify_rounds(self, rounds: list[P.DraftRound], enqueued: list[float] | None = None
                      ) -> list[P.RoundResult | tuple[int, P.ErrorBody]]:
        """One batch. Returns a result, or (http_status, ErrorBody), per round."""
        started = time.perf_counter()
        outcomes = self.verifier.verify([r.to_request() for r in rounds])
        held_ms = self._hold(rounds, started)
        self.batches += 1
        self.batch_sizes.append(len(rounds))
        out: list = []
        done = time.perf_counter()
        for i, o in enumerate(outcomes):
            if isinstance(o, EngineError):
                # a resync or a refused pipelined round is the protocol working, not a failure
                self.errors += not isinstance(o, (ResyncRequired, ConditionNotMet))
                out.append((o.http_status, P.ErrorBody.of(o.code, str(o), getattr(o, "field", None),
                                                         getattr(o, "value", None))))
            else:
                queue_ms = (started - enqueued[i]) * 1e3 if enqueued else 0.0
                self.latencies_ms.append((done - enqueued[i]) * 1e3 if enqueued else (done - started) * 1e3)
                out.append(P.RoundResult.from_outcome(o, self.version, queue_ms, held_ms))
        self.last_round = time.monotonic()
        return out

    def _hold(self, rounds: list[P.DraftRound], started: float) -> float:
        """An emulated cloud: sleep (on the engine's thread, which a busy GPU would hold too) until the profile's
        time for this batch's positions has passed since `started`; the ms held. A first round or a resync counts
        like any other (its prefill is not charged apart)."""
        if self.cloud is None:
            return 0.0
        due_ms = self.cloud.batch_verify_ms([len(r.draft_tokens) + 1 for r in rounds])
        left_ms = due_ms - (time.perf_counter() - started) * 1e3
        if left_ms <= 0:
            return 0.0
        self.held_batches += 1
        time.sleep(left_ms / 1e3)
        return left_ms

    def stats(self, since: float | None = None) -> dict:
        """Counters of this replica; with `since` (wall time), also `window`: acceptance over the sessions
        that started since then (a canary and its baseline compared on equally young sessions)."""
        v = self.verifier
        lookups = v.cache_hits + v.cache_misses
        out = {
            "version": self.version, "sessions": len(v.sessions), "cache_bytes": v.cache_bytes(),
            "cache_hits": v.cache_hits, "cache_misses": v.cache_misses, "evictions": v.evictions, "expired": v.expired,
            "cache_hit_rate": round(v.cache_hits / lookups, 4) if lookups else None,
            "batches": self.batches,
            "mean_batch_size": round(sum(self.batch_sizes) / len(self.batch_sizes), 3) if self.batch_sizes else None,
            "max_batch_size_seen": max(self.batch_sizes, default=0), "errors": self.errors,
            "idle_s": round(time.monotonic() - self.last_round, 3), "emulate_cloud": self.spec.emulate_cloud,
            "held_batches": self.held_batches,
            "overrun_batches": self.batches - self.held_batches if self.cloud is not None else 0,
            "latency_p99_ms": round(float(np.percentile(self.latencies_ms, 99)), 2) if self.latencies_ms else None,
            **v.stats.as_dict(),
        }
        if since is not None:
            stats, spread = v.stats_since(since)
            out["window"] = stats.as_dict() | spread.as_dict()
        return out

    def check_health(self) -> None:
        embed = self.verifier.target.get_input_embeddings().weight
        if not bool(embed.isfinite().all()):
            raise RuntimeError(f"{self.version}: embedding weights are not finite")


SUMMED = ("sessions", "cache_bytes", "cache_hits", "cache_misses", "evictions", "expired", "batches", "errors",
          "held_batches", "overrun_batches",
          "rounds", "draft_tokens", "accepted_tokens", "generated_tokens")
WINDOW = ("rounds", "draft_tokens", "accepted_tokens", "generated_tokens", *SPREAD_KEYS)


def merge_replica_stats(replies: list[dict]) -> dict:
    """One version's `stats()` over its replicas (each reply names its replica; repeats count once): counters
    summed, rates recomputed from the sums, `idle_s` the least idle replica's (a version is idle only when
    every replica is), latency p99 the worst replica's; `replicas` lists the ids merged."""
    by_replica = {r.get("replica"): r for r in replies}
    parts = list(by_replica.values())
    if len(parts) == 1:
        return {**parts[0], "replicas": [parts[0].get("replica")]}
    out = {"version": parts[0]["version"], "emulate_cloud": parts[0].get("emulate_cloud"),
           "replicas": sorted(str(k) for k in by_replica),
           **{k: sum(p.get(k, 0) for p in parts) for k in SUMMED}}
    lookups = out["cache_hits"] + out["cache_misses"]
    out["cache_hit_rate"] = round(out["cache_hits"] / lookups, 4) if lookups else None
    sized = [(p["mean_batch_size"], p["batches"]) for p in parts if p.get("mean_batch_size") is not None]
    out["mean_batch_size"] = round(sum(m * n for m, n in sized) / max(1, sum(n for _, n in sized)), 3) if sized else None
    out["max_batch_size_seen"] = max(p.get("max_batch_size_seen", 0) for p in parts)
    out["idle_s"] = min(p["idle_s"] for p in parts)
    p99 = [p["latency_p99_ms"] for p in parts if p.get("latency_p99_ms") is not None]
    out["latency_p99_ms"] = max(p99) if p99 else None
    out.update(_rates(out))
    if all("window" in p for p in parts):
        window = {k: sum(p["window"][k] for p in parts) for k in WINDOW}
        out["window"] = {**window, **_rates(window)}
    return out


def _rates(c: dict) -> dict:
    return {"acceptance_length": round(c["generated_tokens"] / c["rounds"], 4) if c["rounds"] else 0.0,
            "acceptance_rate": round(c["accepted_tokens"] / c["draft_tokens"], 4) if c["draft_tokens"] else 0.0}
