"""Training steps for the model family: one generic loop, three objectives.

- `lm_loss`: next-token cross-entropy (pretraining the backbone, unconstrained fine-tuning);
- `evolve_loss`: cross-entropy on the new slice plus a KL term to the parent on rehearsal data (the
  backbone contract: versions specialise but stay close to where the frozen draft was trained);
- `distill_loss`: forward KL from a teacher target to the draft (training the draft head).

This module does not decide what is frozen or saved; `family.py` does.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def random_windows(
    stream: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless batches of random windows of `seq_len + 1` tokens: [B, T+1]."""
    if stream.numel() <= seq_len + 1:
        raise ValueError(f"token stream of {stream.numel()} tokens is too short for windows of {seq_len + 1}")
    high = stream.numel() - seq_len - 1
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, high, (batch_size,), generator=generator)
        yield stream[starts[:, None] + offsets[None, :]]


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def kl_to(teacher: torch.nn.Module, student: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student), averaged over positions."""
    with torch.no_grad():
        p_log = F.log_softmax(teacher(input_ids=batch).logits, dim=-1)  # [B, T, V]
    q_log = F.log_softmax(student(input_ids=batch).logits, dim=-1)  # [B, T, V]
    return F.kl_div(q_log.flatten(0, 1), p_log.flatten(0, 1), log_target=True, reduction="batchmean")


def make_evolve_loss(parent: torch.nn.Module, rehearsal: Iterator[torch.Tensor], kl_weight: float):
    def loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return lm_loss(model, batch) + kl_weight * kl_to(parent, model, next(rehearsal)[:, :-1])

    return loss


def make_distill_loss(teacher: torch.nn.Module):
    def loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return kl_to(teacher, model, batch[:, :-1])

    return loss


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    lr: float
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_seconds: float | None = None  # stop early when over this wall-clock budget


def train(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batches: Iterator[torch.Tensor],
    loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    spec: TrainSpec,
    desc: str,
) -> dict[str, float]:
    """AdamW with warm-up and cosine decay over `params`; returns the final smoothed loss and steps run."""
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.95))
    model.train()
    ema, started, step = None, time.monotonic(), 0
    log_every = max(1, spec.steps // 20)
    with _progress(desc, spec.steps) as bar:
        for step in range(1, spec.steps + 1):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, spec)
            loss = loss_fn(model, next(batches))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            opt.step()
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            bar(step, ema)
            if bar.quiet and (step % log_every == 0 or step == spec.steps):
                log.info("%s: step %d/%d loss %.3f (%.0fs)", desc, step, spec.steps, ema, time.monotonic() - started)
            if spec.max_seconds is not None and time.monotonic() - started > spec.max_seconds:
                log.warning("%s: stopped at step %d of %d (time budget %.0fs)", desc, step, spec.steps, spec.max_seconds)
                break
    model.eval()
    return {"final_loss": float(ema), "steps": step, "seconds": time.monotonic() - started}


class _progress:
    """A rich progress bar with the loss on a terminal; periodic log lines elsewhere (CI logs)."""

    def __init__(self, desc: str, total: int):
        self.quiet = not sys.stderr.isatty()
        self.desc, self.total = desc, total

    def __enter__(self):
        if not self.quiet:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn(f"[bold]{self.desc:<22}"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total}"), TextColumn("loss {task.fields[loss]:.3f}"),
                                 TimeElapsedColumn())
            self._bar.__enter__()
            self._task = self._bar.add_task(self.desc, total=self.total, loss=float("nan"))
        return self

    def __call__(self, step: int, loss: float) -> None:
        if not self.quiet:
            self._bar.update(self._task, completed=step, loss=loss)

    def __exit__(self, *exc):
        if not self.quiet:
            self._bar.__exit__(*exc)
        return False


def _lr_at(step: int, spec: TrainSpec) -> float:
    if step <= spec.warmup_steps:
        return spec.lr * step / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def validation_loss(model: torch.nn.Module, stream: torch.Tensor, seq_len: int, max_windows: int = 64) -> float:
    """Mean next-token cross-entropy over up to `max_windows` consecutive windows of a held-out stream."""
    model.eval()
    n = min(max_windows, (stream.numel() - 1) // seq_len)
    if n < 1:
        raise ValueError("validation stream is shorter than one window")
    windows = stream[: n * seq_len + 1]
    inputs = windows[:-1].view(n, seq_len)
    targets = windows[1:].view(n, seq_len)
    total = 0.0
    for i in range(0, n, 8):
        logits = model(input_ids=inputs[i : i + 8]).logits
        total += F.cross_entropy(logits.flatten(0, 1), targets[i : i + 8].flatten(), reduction="sum").item()
    return total / (n * seq_len)
