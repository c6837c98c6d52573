"""Wireless links in emulated time: each direction answers "sent N bytes at t (ms), delivered when?".

- `StatisticalChannel`: distance path loss, block Rayleigh or Rician fading correlated in time
  (Gauss-Markov), Shannon rate R = B * log2(1 + SNR * |h|^2) scaled by an efficiency, base one-way
  delay, and Gilbert-Elliott outages;
- `TraceChannel`: Mahimahi traces (one line per 1500-byte delivery opportunity, ms timestamps, repeated
  lines = several packets that millisecond, looping at the end).

What the device can *observe* is kept apart (`LinkObserver`): it only sees its own past transfers.
Channels are deterministic for a seed; time never goes backwards for a channel's state. Each direction
carries one device's messages in order: a message never uses capacity an earlier one took (two rounds on
the air at once, when a device pipelines, queue behind each other).
"""

from __future__ import annotations

import functools
import math
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MTU_BYTES = 1500
TRACE_DIR = Path(__file__).resolve().parents[1] / "data" / "traces" / "mahimahi"
HISTORY_MS = 60_000.0  # a statistical channel keeps this much of its past block rates
SKIP_KEEP_MS = 1_000.0  # drawn before a query that jumped over a gap longer than HISTORY_MS


class TraceFormatError(ValueError):
    pass


@functools.lru_cache(maxsize=32)
def _parse_cached(path: Path, mtime_ns: int) -> np.ndarray:
    stamps = parse_mahimahi(path)
    stamps.flags.writeable = False  # shared by every device on this trace
    return stamps


def load_trace(path: str | Path) -> np.ndarray:
    """`parse_mahimahi`, parsed once per file (and per modification) per process."""
    path = Path(path).resolve()
    return _parse_cached(path, path.stat().st_mtime_ns)


def parse_mahimahi(path: str | Path) -> np.ndarray:
    """Sorted int64 ms timestamps, one per delivery opportunity; errors name the file and line."""
    path = Path(path)
    stamps: list[int] = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.strip()
            if not text:
                continue
            try:
                value = int(text)
            except ValueError:
                raise TraceFormatError(f"{path.name}:{lineno}: expected a millisecond timestamp, got {text!r}") from None
            if value < 0 or (stamps and value < stamps[-1]):
                raise TraceFormatError(f"{path.name}:{lineno}: timestamp {value} is negative or goes backwards")
            stamps.append(value)
    if not stamps or stamps[-1] <= 0:
        raise TraceFormatError(f"{path.name}: no delivery opportunities (empty trace or only time 0)")
    return np.asarray(stamps, dtype=np.int64)


class TraceChannel:
    """One direction of a Mahimahi link; `offset_ms` starts this device somewhere inside the trace."""

    def __init__(self, stamps_ms: np.ndarray, one_way_delay_ms: float = 20.0, offset_ms: float = 0.0, name: str = ""):
        self.stamps = stamps_ms
        self.period_ms = int(stamps_ms[-1])  # mahimahi loops the trace after its last timestamp
        self.delay_ms, self.offset_ms, self.name = one_way_delay_ms, offset_ms, name
        self._next_free = 0  # the first opportunity (counted over loops) no earlier message took

    @classmethod
    def from_file(cls, path: str | Path, **kw) -> TraceChannel:
        return cls(load_trace(path), name=Path(path).name, **kw)

    def delivery_ms(self, nbytes: int, t_ms: float) -> float:
        """Time the last byte arrives: the ceil(N/1500)-th free opportunity at or after t, plus the one-way
        delay."""
        packets, n = max(1, math.ceil(nbytes / MTU_BYTES)), len(self.stamps)
        loops, within = divmod(t_ms + self.offset_ms, self.period_ms)
        first = max(int(loops) * n + self._first_at(within), self._next_free)  # index into the looped trace
        last = first + packets - 1
        self._next_free = last + 1
        done_loops, idx = divmod(last, n)
        return float(done_loops * self.period_ms + self.stamps[idx] - self.offset_ms + self.delay_ms)

    def mean_rate_bps(self) -> float:
        return len(self.stamps) * MTU_BYTES * 8 / (self.period_ms / 1e3)

    def reported_rate_bps(self, t_ms: float, stale_ms: float = 200.0, window_ms: float = 1000.0) -> float:
        """What a modem would report: the capacity over the window before t - stale_ms (>= 1 packet)."""
        end = (t_ms + self.offset_ms - stale_ms) % self.period_ms
        start = end - window_ms
        n = self._first_at(end) - self._first_at(max(0.0, start))
        if start < 0:  # the window wraps into the end of the previous loop
            n += len(self.stamps) - self._first_at(self.period_ms + start)
        return max(1, n) * MTU_BYTES * 8 / (window_ms / 1e3)

    def _first_at(self, t_ms: float) -> int:
        """Index of the first opportunity at or after t_ms within one loop. The stamps are whole ms, so it
        searches for ceil(t): numpy would cast the whole trace to float for a float key (100x slower)."""
        return int(np.searchsorted(self.stamps, math.ceil(t_ms), side="left"))


@dataclass(frozen=True)
class RadioSetting:
    """A statistical link setting; see `STATISTICAL_SETTINGS` for named presets."""

    distance_m: float = 200.0
    bandwidth_hz: float = 5e6
    tx_power_dbm: float = 23.0
    path_loss_exponent: float = 3.5
    ref_loss_db: float = 40.0  # path loss at 1 m
    noise_figure_db: float = 7.0
    rician_k: float = 0.0  # 0 = Rayleigh
    coherence_ms: float = 50.0  # fading time correlation (Gauss-Markov)
    block_ms: float = 5.0  # fading block length
    efficiency: float = 0.6  # share of Shannon capacity a real modem reaches
    one_way_delay_ms: float = 20.0
    outage_enter_prob: float = 0.0  # per block, good -> outage
    outage_mean_ms: float = 200.0

    def mean_snr_db(self) -> float:
        loss = self.ref_loss_db + 10 * self.path_loss_exponent * math.log10(max(self.distance_m, 1.0))
        noise_dbm = -174 + 10 * math.log10(self.bandwidth_hz) + self.noise_figure_db
        return self.tx_power_dbm - loss - noise_dbm


STATISTICAL_SETTINGS: dict[str, RadioSetting] = {
    "good": RadioSetting(distance_m=80, rician_k=6.0, coherence_ms=200, one_way_delay_ms=10),
    "fading": RadioSetting(distance_m=300, rician_k=0.0, coherence_ms=20, one_way_delay_ms=25,
                           outage_enter_prob=0.002, outage_mean_ms=150),
    "poor": RadioSetting(distance_m=900, bandwidth_hz=1.4e6, rician_k=0.0, coherence_ms=40, one_way_delay_ms=60,
                         outage_enter_prob=0.01, outage_mean_ms=400),
}


class StatisticalChannel:
    """Block-fading link; the fading and outage process is generated lazily block by block from a seed."""

    def __init__(self, setting: RadioSetting, seed: int):
        self.s = setting
        self.rng = np.random.default_rng(seed)
        self._obs_rng = np.random.default_rng(seed + 7_777_777)  # observation noise never perturbs the channel
        self.rho = math.exp(-setting.block_ms / setting.coherence_ms)
        self.snr_linear = 10 ** (setting.mean_snr_db() / 10)
        self._rates = array("d")  # bits per ms of blocks _first, _first + 1, ...: a window, not the whole past
        self._first = 0
        self._window_blocks = int(HISTORY_MS // setting.block_ms)  # blocks kept behind the newest query
        self._h = self._draw_scatter()
        self._in_outage, self._outage_left = False, 0
        self._busy_until = 0.0  # the last message's transmission ends then

    def _draw_scatter(self) -> complex:
        return complex(self.rng.normal(), self.rng.normal()) / math.sqrt(2)

    def _next_block_rate(self) -> float:
        s = self.s
        self._h = self.rho * self._h + math.sqrt(1 - self.rho**2) * self._draw_scatter()  # Gauss-Markov
        los = math.sqrt(s.rician_k / (s.rician_k + 1))
        h = los + math.sqrt(1 / (s.rician_k + 1)) * self._h
        if self._in_outage:
            self._outage_left -= 1
            self._in_outage = self._outage_left > 0
        elif self.rng.random() < s.outage_enter_prob:
            self._in_outage = True
            self._outage_left = max(1, int(self.rng.exponential(s.outage_mean_ms / s.block_ms)))
        if self._in_outage:
            return 0.0
        rate_bps = s.efficiency * s.bandwidth_hz * math.log2(1 + self.snr_linear * abs(h) ** 2)
        return rate_bps / 1e3  # bits per ms

    def _skip(self, to_block: int) -> None:
        """Continue the process at `to_block` as if every block before it had been drawn, and forget them.
        The fading state moves exactly: n Gauss-Markov steps are one step with rho^n. The outage state is
        drawn from its stationary law: the gap is over HISTORY_MS, and the outage chain forgets its state
        within a few mean sojourns (seconds)."""
        s, n = self.s, to_block - self._drawn_to()
        rho_n = self.rho**n
        self._h = rho_n * self._h + math.sqrt(1 - rho_n**2) * self._draw_scatter()
        outage_blocks = max(1.0, s.outage_mean_ms / s.block_ms)
        p_outage = (outage_blocks / (outage_blocks + 1 / s.outage_enter_prob)) if s.outage_enter_prob > 0 else 0.0
        self._in_outage = bool(self.rng.random() < p_outage)
        # the next block drawn is `to_block`, and it is in the outage drawn here (the count includes it)
        self._outage_left = 1 + max(1, int(self.rng.exponential(outage_blocks))) if self._in_outage else 0
        self._rates, self._first = array("d"), to_block

    def _drawn_to(self) -> int:
        """The next block to draw."""
        return self._first + len(self._rates)

    def rate_bps_at(self, t_ms: float) -> float:
        return self._block_rate(int(max(0.0, t_ms) // self.s.block_ms)) * 1e3

    def reported_rate_bps(self, t_ms: float, stale_ms: float = 20.0, noise_db: float = 1.0) -> float:
        """A CSI-based rate estimate: the true rate stale_ms ago, with log-normal estimation noise."""
        noise = 10 ** (self._obs_rng.normal(0.0, noise_db) / 10)
        return max(1e3, self.rate_bps_at(t_ms - stale_ms) * noise)

    def _block_rate(self, block: int) -> float:
        """Blocks are drawn in order (one Gauss-Markov chain); only the last HISTORY_MS are kept, so a
        device running for hours holds a bounded window (lookbacks are tens of ms: stale reports). A query
        more than HISTORY_MS past the last block drawn jumps over the gap (`_skip`) instead of drawing it
        block by block: a device back from 400 s of think time once held its fleet actor's event loop for
        0.2 s per direction drawing 80,000 blocks nobody would read."""
        if block < self._first:
            raise ValueError(f"block {block} is older than the kept window (from block {self._first}); "
                             f"lookbacks must stay within {HISTORY_MS} ms ({SKIP_KEEP_MS} ms after a jump)")
        if block - self._drawn_to() > self._window_blocks:
            self._skip(block - int(SKIP_KEEP_MS // self.s.block_ms))
        while self._drawn_to() <= block:
            self._rates.append(self._next_block_rate())
        drop = block - self._first - self._window_blocks  # blocks more than HISTORY_MS before this one
        if drop > self._window_blocks:  # amortised: trim once that much has piled up
            del self._rates[:drop]
            self._first += drop
        return self._rates[block - self._first]

    def delivery_ms(self, nbytes: int, t_ms: float) -> float:
        bits_left, t = nbytes * 8.0, max(t_ms, self._busy_until)
        while True:
            block = int(t // self.s.block_ms)
            end = (block + 1) * self.s.block_ms
            rate = self._block_rate(block)
            if rate * (end - t) >= bits_left:
                self._busy_until = t + bits_left / rate
                return self._busy_until + self.s.one_way_delay_ms
            bits_left -= rate * (end - t)
            t = end


@dataclass
class Link:
    """Uplink and downlink of one device."""

    up: TraceChannel | StatisticalChannel
    down: TraceChannel | StatisticalChannel
    name: str = ""


def trace_names() -> list[str]:
    return sorted(p.stem for p in TRACE_DIR.glob("*.up") if (TRACE_DIR / f"{p.stem}.down").exists())


def make_link(setting: str, seed: int, offset_ms: float = 0.0, trace_delay_ms: float = 20.0) -> Link:
    """A named setting: a carried Mahimahi trace name, or one of STATISTICAL_SETTINGS."""
    if setting in STATISTICAL_SETTINGS:
        s = STATISTICAL_SETTINGS[setting]
        return Link(StatisticalChannel(s, seed), StatisticalChannel(s, seed + 1), setting)
    if setting in trace_names():
        up = TraceChannel.from_file(TRACE_DIR / f"{setting}.up", one_way_delay_ms=trace_delay_ms, offset_ms=offset_ms)
        down = TraceChannel.from_file(TRACE_DIR / f"{setting}.down", one_way_delay_ms=trace_delay_ms,
                                      offset_ms=offset_ms)
        return Link(up, down, setting)
    raise ValueError(f"unknown channel setting {setting!r}; traces: {trace_names()}, "
                     f"statistical: {sorted(STATISTICAL_SETTINGS)}")


class LinkObserver:
    """What a device knows of its link: its own transfers' delays (EMA) and the modem's rate reports.

    It never sees the true channel; predictions are latency + bytes / reported rate.
    """

    def __init__(self, prior_delay_ms: float = 50.0, prior_rate_bps: float = 1e6, smoothing: float = 0.3):
        self.delay_ms = {"up": prior_delay_ms, "down": prior_delay_ms}
        self.rate_bps = {"up": prior_rate_bps, "down": prior_rate_bps}
        self.a = smoothing

    def record(self, direction: str, nbytes: int, elapsed_ms: float) -> None:
        """A finished transfer: its delay beyond the serialisation time feeds the latency estimate."""
        latency = max(0.0, elapsed_ms - self.ms_per_byte(direction) * nbytes)
        self.delay_ms[direction] = (1 - self.a) * self.delay_ms[direction] + self.a * latency

    def report_rate(self, direction: str, rate_bps: float) -> None:
        self.rate_bps[direction] = max(1.0, rate_bps)

    def ms_per_byte(self, direction: str) -> float:
        return 8e3 / self.rate_bps[direction]

    def predict_ms(self, direction: str, nbytes: int) -> float:
        return self.delay_ms[direction] + self.ms_per_byte(direction) * nbytes
