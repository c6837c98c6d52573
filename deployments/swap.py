"""A scripted hot swap against a running app, through the router's admin API (exactly what an operator's
`flexspec versions ...` calls do): add -> check (compatibility gate) -> canary -> the router's watcher
promotes or rolls back -> retire the old stable version (drain, delete).

`SwapScript` runs in a thread next to a load test and records each step with its time since the run's
start, so reports can mark it; `SwapTrigger` starts it at a given time from the load test's tick hook.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import httpx

log = logging.getLogger("flexspec.swap")


@dataclass(frozen=True)
class SwapPlan:
    version: str
    path: str
    weight: float = 0.3  # canary share of new `stable` sessions
    window_s: float = 15.0  # healthy this long -> promoted
    min_rounds: int = 30
    max_acceptance_drop: float = 0.2
    min_fraction: float = 0.8  # compatibility gate: candidate tau >= 80 % of stable
    retire_mode: str = "finish"
    force: bool = False  # canary even if the gate refuses
    timeout_s: float = 240.0


class SwapScript(threading.Thread):
    def __init__(self, url: str, token: str, plan: SwapPlan, epoch_s: float):
        super().__init__(name=f"swap-{plan.version}", daemon=True)
        self.plan, self.epoch = plan, epoch_s
        self.client = httpx.Client(base_url=url, headers={"authorization": f"Bearer {token}"}, timeout=600)
        self.events: list[dict] = []
        self.outcome = "running"
        self.gate: dict | None = None

    def mark(self, label: str) -> None:
        self.events.append({"t_s": round(time.time() - self.epoch, 2), "label": label})
        log.info("swap: %s", label)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        resp = self.client.request(method, path, json=body)
        if resp.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {resp.status_code} {resp.text[:300]}")
        return resp.json()

    def run(self) -> None:
        try:
            self.outcome = self._run()
        except (RuntimeError, httpx.HTTPError) as err:
            self.outcome = f"failed: {err}"
            self.mark(f"swap failed: {err}")

    def _run(self) -> str:
        p = self.plan
        old = self.call("GET", "/v1/versions")["aliases"]["stable"]
        self.call("POST", "/admin/versions", {"name": p.version, "path": p.path})
        self.mark(f"add {p.version}")
        self.gate = self.call("POST", f"/admin/versions/{p.version}/check", {"min_fraction": p.min_fraction})
        self.mark(f"gate {'passed' if self.gate['passed'] else 'refused'} {p.version} ({self.gate['ratio']:.1%})")
        if not self.gate["passed"] and not p.force:
            return "refused by the gate"
        self.call("POST", f"/admin/versions/{p.version}/canary", {
            "weight": p.weight, "window_s": p.window_s, "min_rounds": p.min_rounds,
            "max_acceptance_drop": p.max_acceptance_drop, "force": p.force})
        self.mark(f"canary {p.version} {p.weight:.0%}")
        canary = self._wait(lambda v: v["canary"] and v["canary"]["version"] == p.version
                            and v["canary"]["status"] != "running")["canary"]
        if canary["status"] != "promoted":
            self.mark(f"rolled back {p.version}")
            return f"rolled back: {canary['reason']}"
        self.mark(f"promoted {p.version}")
        self.call("POST", f"/admin/versions/{old}/retire", {"mode": p.retire_mode})
        self.mark(f"retire {old} ({p.retire_mode})")
        self._wait(lambda v: old not in v["versions"])
        self.mark(f"deleted {old}")
        return "promoted"

    def _wait(self, done) -> dict:
        deadline = time.monotonic() + self.plan.timeout_s
        while time.monotonic() < deadline:
            view = self.call("GET", "/v1/versions")
            if done(view):
                return view
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {self.plan.timeout_s:.0f} s")


class SwapTrigger:
    """A load test's `on_tick`: starts the script at `start_at_s` and hands its new events to the report."""

    def __init__(self, url: str, token: str, plan: SwapPlan, start_at_s: float):
        self.url, self.token, self.plan, self.start_at_s = url, token, plan, start_at_s
        self.script: SwapScript | None = None
        self._reported = 0

    def __call__(self, t_s: float) -> list[dict]:
        if self.script is None and t_s >= self.start_at_s:
            self.script = SwapScript(self.url, self.token, self.plan, time.time() - t_s)
            self.script.start()
        if self.script is None:
            return []
        new = self.script.events[self._reported :]
        self._reported += len(new)
        return new

    def finish(self, timeout_s: float = 300.0) -> list[dict]:
        """Wait for the script to end; returns events not yet handed over."""
        if self.script is not None:
            self.script.join(timeout_s)
        return self(float("inf")) if self.script else []
