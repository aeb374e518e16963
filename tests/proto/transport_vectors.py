"""Loads ``vectors/upstream-transport-vectors.json`` (copied unchanged from the shared spec;
produced by running upstream's code at commit 5e4fd2b with every random input fixed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"

TRANSPORT: dict[str, Any] = json.loads(
    (VECTORS_DIR / "upstream-transport-vectors.json").read_text()
)


def h(value: str) -> bytes:
    return bytes.fromhex(value)
