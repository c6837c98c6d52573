"""Where things live on disk by default (all overridable by flags or FLEXSPEC_HOME)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("FLEXSPEC_HOME", Path.home() / ".cache" / "flexspec-serve"))


def family_dir(profile: str, seed: int = 0) -> Path:
    return home() / "zoo" / f"{profile}-seed{seed}"
