"""Loads the shared test vectors (../shared/spec beside the repository)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SPEC = Path(os.environ.get("OSTP_SPEC_DIR", REPO.parent / "shared" / "spec"))


def load(name: str) -> Any:
    return json.loads((SPEC / name).read_text())


UPSTREAM: dict[str, Any] = load("upstream-vectors.json")
NOISE: dict[str, Any] = load("noise-vectors.json")


def h(value: str) -> bytes:
    return bytes.fromhex(value)
