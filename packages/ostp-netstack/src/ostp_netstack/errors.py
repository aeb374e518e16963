"""Errors raised to the caller of the stack (never for bad input from the network)."""

from __future__ import annotations

__all__ = ["LocalProtocolError"]


class LocalProtocolError(Exception):
    """The caller misused the API (unknown connection, send after close, ...)."""
