"""A draft step beside a busy Python thread, at the interpreter's default switch interval and at the fleet
actor's (`python -m benchmarks.gil_convoy [--profile default]`; printed table).

Why: a fleet actor runs its devices' draft steps on a worker thread (`fleet.drafter.StepDrafter`) beside an
event loop that runs Python for hundreds of devices. Every torch op releases the GIL and takes it back;
while the other thread runs Python, taking it back waits up to the switch interval (5 ms by default). The
"busy" thread here runs pure Python in bursts of the given length with a 1 ms pause between (a loop
working through a backlog); the table shows the draft step time (B = 1, K = 4, 256-token context, one
torch thread) and how much Python work the busy thread got done meanwhile.

Ray-free. The fleet actors run at `fleet.drafter.SWITCH_INTERVAL_S` since this measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from flexspec_serve import paths
from flexspec_serve.engine.costs import benchmark_contexts, draft_step_times_ms
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.fleet.drafter import SWITCH_INTERVAL_S
from flexspec_serve.reports import machine, md_table
from flexspec_serve.zoo.loading import load_causal_lm, load_tokenizer


class BusyThread:
    """Pure-Python work in bursts of `burst_ms` (0: no thread), 1 ms apart; counts the work done."""

    def __init__(self, burst_ms: float):
        self.burst_s, self.work, self._stop = burst_ms / 1e3, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if burst_ms else None

    def __enter__(self) -> BusyThread:
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            end = time.perf_counter() + self.burst_s
            while time.perf_counter() < end:
                sum(i * i for i in range(200))
                self.work += 1
            time.sleep(0.001)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--family", help="family directory (default: the profile's)")
    ap.add_argument("--bursts-ms", type=float, nargs="+", default=[0.0, 2.0, 20.0, 200.0])
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    family = paths.family_dir(args.profile) if args.family is None else Path(args.family)
    proposer = DraftProposer(load_causal_lm(family / "draft"))
    context = benchmark_contexts(load_tokenizer(family / "v1"), 1, 256)[0]
    default, rows = sys.getswitchinterval(), []
    try:
        for burst in args.bursts_ms:
            for interval in (0.005, SWITCH_INTERVAL_S):
                sys.setswitchinterval(interval)
                with BusyThread(burst) as busy:
                    started = time.perf_counter()
                    times = sorted(draft_step_times_ms(proposer, [context], 4, args.rounds))
                    elapsed = time.perf_counter() - started
                rows.append({"busy bursts ms": burst or "none", "switch interval ms": interval * 1e3,
                             "draft step median ms": round(statistics.median(times), 2),
                             "draft step p90 ms": round(times[int(0.9 * (len(times) - 1))], 2),
                             "busy work / s": round(busy.work / elapsed) if burst else ""})
    finally:
        sys.setswitchinterval(default)
    print(f"machine: {machine()}; family {family.name}; draft B = 1, K = 4, 256-token context\n")
    print(md_table(rows))


if __name__ == "__main__":
    main()
