"""What the emulated A/Bs of one rule share (`opening_ab`, `second_guess_ab`): an arm that puts the rule before
back for the length of a run, and a row of adaptive-over-cloud-only ratios per arm, pooled and per device class.

Both arms run the in-process emulator (`flexspec_serve.edge.bench`: the real frozen draft and target, the real
wire encoding; device, link and cloud times from their models), so this host's speed does not enter them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from benchmarks.draft_ahead import CLASSES, pooled
from flexspec_serve.edge.bench import Cell


@contextmanager
def replaced(owner: type, name: str, stand_in) -> Iterator[None]:
    """`owner.name` is `stand_in` (a function, staticmethod or property, as stored on the class) for the block."""
    kept = vars(owner)[name]  # as stored: a staticmethod stays one
    setattr(owner, name, stand_in)
    try:
        yield
    finally:
        setattr(owner, name, kept)


def ratio_row(label: str, temperature: float, seed: int, runs: dict[str, list[Cell]],
              extra: Callable[[str, list[Cell]], dict] | None = None) -> dict:
    """Adaptive tokens/s over cloud-only for each arm (`runs`: arm -> cells), pooled and then per class;
    `extra(arm, adaptive cells)` adds columns of an arm's own."""
    out = {"mode": label, "T": temperature, "seed": seed}
    for arm, cells in runs.items():
        out[f"{arm}: vs cloud-only"] = round(pooled(cells, "adaptive") / pooled(cells, "cloud-only"), 3)
    for cls in CLASSES:
        for arm, cells in runs.items():
            mine = [c for c in cells if c.device_class == cls]
            out[f"{cls} {arm}"] = round(pooled(mine, "adaptive") / pooled(mine, "cloud-only"), 3)
    for arm, cells in runs.items():
        if extra is not None:
            out.update(extra(arm, [c for c in cells if c.policy == "adaptive"]))
    return out
