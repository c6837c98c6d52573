"""Shared fixtures: the tiny model family, built once per test run (about 30 s) and reused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_family() -> Path:
    from flexspec_serve.config import zoo_profile
    from flexspec_serve.zoo.family import build_family

    out = Path(os.environ.get("FLEXSPEC_TEST_ZOO", REPO / ".pytest_zoo" / "tiny-seed0"))
    build_family(zoo_profile("tiny"), out, seed=0, coupled=True)
    return out


@pytest.fixture(scope="session")
def family_models(tiny_family):
    """name -> loaded model, for every member of the tiny family, on FLEXSPEC_TEST_DEVICE (default: the CPU;
    `FLEXSPEC_TEST_DEVICE=cuda pytest tests/test_engine.py ...` runs the engine's tests on a GPU)."""
    from flexspec_serve.zoo.loading import load_causal_lm
    from flexspec_serve.zoo.manifest import Manifest

    manifest = Manifest.load(tiny_family)
    device = os.environ.get("FLEXSPEC_TEST_DEVICE")
    return {m.name: load_causal_lm(tiny_family / m.name, device=device) for m in manifest.members}


@pytest.fixture(scope="session")
def tokenizer(tiny_family):
    from flexspec_serve.zoo.loading import load_tokenizer

    return load_tokenizer(tiny_family / "v1")


@pytest.fixture(scope="session")
def humaneval_prompts(tokenizer):
    from flexspec_serve.zoo.corpus import humaneval_problems

    return [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in humaneval_problems(24)]
