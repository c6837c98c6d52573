"""Adaptive K vs every fixed K vs cloud-only, per device class and channel (the measurement behind
`flexspec report adaptation`, which writes it up).

Every (device class, channel setting, policy) runs the same prompts on the real family (frozen draft,
one target version) with the real wire encoding, in emulated time; each device of a cell gets its own
trace offset / fading seed. Goodput = generated tokens / emulated seconds; energy = J / token.
It measures and analyses; it writes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from flexspec_serve.ahead import Ahead
from flexspec_serve.edge.channels import STATISTICAL_SETTINGS, make_link, trace_names
from flexspec_serve.edge.controller import make_policy
from flexspec_serve.edge.devices import DEVICE_CLASSES, CloudProfile
from flexspec_serve.edge.emulator import EmulatedDevice, run_devices
from flexspec_serve.engine.proposer import DraftProposer
from flexspec_serve.engine.sampling import SamplingParams
from flexspec_serve.engine.verifier import Verifier
from flexspec_serve.transport import LocalTransport
from flexspec_serve.tree import Tree
from flexspec_serve.zoo import corpus as corpus_mod
from flexspec_serve.zoo.loading import load_causal_lm, load_tokenizer


@dataclass
class BenchConfig:
    family: Path
    target: str = "v1"
    classes: tuple[str, ...] = ("flagship-phone", "midrange-phone", "wearable")
    settings: tuple[str, ...] = field(default_factory=lambda: tuple(trace_names()) + tuple(STATISTICAL_SETTINGS))
    fixed_ks: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    devices_per_cell: int = 4
    max_new_tokens: int = 48
    prompt_tokens: int = 192  # prompts are cut to their last N tokens
    seed: int = 0
    ahead: Ahead = Ahead.OFF  # what devices do while each round waits for its answer
    tree: Tree = Tree.CHAIN  # the shape of a round's draft (token trees: `flexspec_serve.tree`)
    temperature: float = 0.0  # 0: greedy; else sampling at this temperature (each session its own seed)
    cloud: CloudProfile = field(default_factory=CloudProfile)  # the emulated cloud's verify time

    def policies(self) -> list[str]:
        return ["adaptive", "cloud-only", "accept-adaptive"] + [f"fixed-{k}" for k in self.fixed_ks]


@dataclass
class Cell:
    device_class: str
    setting: str
    policy: str
    tokens: int
    seconds: float
    energy_j: float
    mean_k: float
    drafting_rounds: int = 0
    lookahead_hits: int = 0
    rounds: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def j_per_token(self) -> float:
        return self.energy_j / self.tokens if self.tokens else 0.0


def run_bench(cfg: BenchConfig) -> list[Cell]:
    tok = load_tokenizer(cfg.family / cfg.target)
    draft = load_causal_lm(cfg.family / "draft")
    target = load_causal_lm(cfg.family / cfg.target)
    problems = corpus_mod.humaneval_problems(cfg.devices_per_cell)
    prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"][-cfg.prompt_tokens :] for p in problems]
    cloud = cfg.cloud
    cells = []
    for policy in cfg.policies():
        devices, cell_of = [], []
        for ci, cls in enumerate(cfg.classes):
            for si, setting in enumerate(cfg.settings):
                for d in range(cfg.devices_per_cell):
                    seed = cfg.seed * 10_007 + (ci * 101 + si) * 1009 + d
                    link = make_link(setting, seed, offset_ms=d * 37_000.0 + si * 5_000.0)
                    profile = DEVICE_CLASSES[cls]
                    devices.append(EmulatedDevice(f"{cls}/{setting}/{d}", profile, link,
                                                  make_policy(policy, profile, cloud, ahead=cfg.ahead,
                                                              tree=cfg.tree),
                                                  cloud, ahead=cfg.ahead, tree=cfg.tree))
                    cell_of.append((cls, setting))
        run_devices(devices, [prompts[i % len(prompts)] for i in range(len(devices))], DraftProposer(draft),
                    LocalTransport(Verifier(target, draft, name=cfg.target)), cfg.max_new_tokens,
                    sampling=SamplingParams(cfg.temperature, 1.0, cfg.seed), session_prefix=f"{policy}-")
        cells += _aggregate(devices, cell_of, policy)
    return cells


def _aggregate(devices, cell_of, policy) -> list[Cell]:
    acc: dict[tuple[str, str], list] = {}
    for dev, key in zip(devices, cell_of):
        a = acc.setdefault(key, [0, 0.0, 0.0, 0, 0, 0, 0])
        a[0] += sum(r.tokens for r in dev.records)
        a[1] += sum(r.round_ms for r in dev.records) / 1e3
        a[2] += sum(r.energy_j for r in dev.records)
        a[3] += sum(r.k for r in dev.records)
        a[4] += len(dev.records)
        a[5] += sum(r.k > 0 for r in dev.records)
        a[6] += sum(r.lookahead_hit for r in dev.records)
    return [Cell(c, s, policy, a[0], a[1], a[2], a[3] / max(1, a[4]), a[5], a[6], a[4]) for (c, s), a in acc.items()]


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(max(x, 1e-12)) for x in xs) / len(xs))


def analyse(cells: list[Cell], cfg: BenchConfig) -> dict:
    """Headline comparisons: adaptive vs the best single fixed K, and vs the best fixed K per setting."""
    grid = {(c.device_class, c.setting, c.policy): c for c in cells}
    keys = sorted({(c.device_class, c.setting) for c in cells})
    fixed = [f"fixed-{k}" for k in cfg.fixed_ks]
    best_single = max(fixed, key=lambda p: _geomean([grid[(*k, p)].tokens_per_s for k in keys]))
    rows = []
    for key in keys:
        by_policy = {p: grid[(*key, p)] for p in cfg.policies()}
        budget = DEVICE_CLASSES[key[0]].energy_budget_j_per_token
        within = [p for p in fixed if by_policy[p].j_per_token <= budget]
        # the oracle is the best fixed K in hindsight among those that keep the device's energy budget
        oracle = max(within, key=lambda p: by_policy[p].tokens_per_s) if within else min(
            fixed, key=lambda p: by_policy[p].j_per_token)
        winner = max(by_policy, key=lambda p: by_policy[p].tokens_per_s)
        a = by_policy["adaptive"]
        rows.append({
            "device_class": key[0], "setting": key[1],
            **{f"{p} tok/s": round(by_policy[p].tokens_per_s, 2) for p in cfg.policies()},
            "adaptive J/tok": round(a.j_per_token, 4), f"{best_single} J/tok": round(by_policy[best_single].j_per_token, 4),
            "cloud-only J/tok": round(by_policy["cloud-only"].j_per_token, 4),
            "adaptive mean K": round(a.mean_k, 2), "oracle fixed K": oracle, "budget J/tok": budget,
            "adaptive / oracle": round(a.tokens_per_s / by_policy[oracle].tokens_per_s, 3), "winner": winner,
        })
    gain = _geomean([grid[(*k, "adaptive")].tokens_per_s for k in keys]) / _geomean(
        [grid[(*k, best_single)].tokens_per_s for k in keys])
    energy = _geomean([grid[(*k, "adaptive")].j_per_token for k in keys]) / _geomean(
        [grid[(*k, best_single)].j_per_token for k in keys])
    worst = min(rows, key=lambda r: r["adaptive / oracle"])
    return {"rows": rows, "best_single_fixed": best_single, "goodput_gain": gain - 1, "energy_ratio": energy,
            "worst_vs_oracle": worst["adaptive / oracle"], "worst_cell": f"{worst['device_class']}/{worst['setting']}"}
