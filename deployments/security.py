"""Who may send rounds, and how fast: API keys for edge clients and a per-session rate limit.

- `ApiKeys`: named keys (one per fleet or client), from a secrets file (YAML/JSON `{name: key}`) or
  `FLEXSPEC_API_KEYS` (`name:key,name:key`), never from code; compared in constant time; never logged.
  When none are configured, HTTP rounds are open (a local deployment). In-cluster DeploymentHandle callers
  are trusted: Ray's own authentication guards the cluster.
- `RateLimiter`: a token bucket per key (the session id: one device runs one session at a time), bounded
  in memory (least recently seen keys are forgotten first); it answers how long to wait when empty.
"""

from __future__ import annotations

import hmac
import os
import time
from collections import OrderedDict
from pathlib import Path


class ApiKeys:
    def __init__(self, keys: dict[str, str]):
        self.keys = {name: key.encode() for name, key in keys.items() if key}

    @classmethod
    def load(cls, path: str | None) -> ApiKeys:
        if path:
            from flexspec_serve.config import load_yaml_dict

            return cls({str(k): str(v) for k, v in load_yaml_dict(Path(path).expanduser()).items()})
        pairs = [p.partition(":") for p in os.environ.get("FLEXSPEC_API_KEYS", "").split(",") if p.strip()]
        return cls({name.strip(): key.strip() for name, _, key in pairs})

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def client(self, authorization: str) -> str | None:
        """The client's name for a valid `Bearer <key>`, else None (every key is compared, in constant time)."""
        given = authorization.removeprefix("Bearer ").strip().encode()
        found = None
        for name, key in self.keys.items():
            if hmac.compare_digest(given, key):
                found = name
        return found


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: float, max_keys: int = 100_000, clock=time.monotonic):
        self.rate, self.burst, self.max_keys, self.clock = rate_per_s, burst, max_keys, clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, last time)

    def allow(self, key: str) -> tuple[bool, float]:
        """(allowed, seconds to wait before the next try)."""
        now = self.clock()
        tokens, last = self.buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self.buckets[key] = (tokens, now)
        while len(self.buckets) > self.max_keys:
            self.buckets.popitem(last=False)
        return allowed, 0.0 if allowed else (1.0 - tokens) / self.rate
