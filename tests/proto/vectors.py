"""Loads the test vectors kept in ``tests/proto/vectors/`` (provenance in its README)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTORS = Path(__file__).with_name("vectors")


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


UPSTREAM: dict[str, Any] = load("upstream-vectors.json")
NOISE: dict[str, Any] = load("noise-vectors.json")


def h(value: str) -> bytes:
    return bytes.fromhex(value)
