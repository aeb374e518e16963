"""The daemon's log ring: the last lines, formatted once, for the control protocol's `logs`."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from ostp_client.control.protocol import (
    LogBatch,
    LogLine,
    level_at_least,
)

__all__ = ["LogRing", "installed"]


# --------------------------------------------------------------------------------------------
# logs


class LogRing(logging.Handler):
    """Keeps the last `capacity` log records as `LogLine`s (formatted once, when logged)."""

    def __init__(self, capacity: int = 2000) -> None:
        super().__init__(logging.DEBUG)
        self.lines: deque[LogLine] = deque(maxlen=capacity)
        self.seq = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message += f" ({record.exc_info[1]!r})"
        except Exception:  # a broken format string must not break logging
            message = str(record.msg)
        self.seq += 1
        self.lines.append(
            LogLine(
                seq=self.seq,
                time=record.created,
                level=record.levelname.lower(),
                logger=record.name,
                message=message,
            )
        )

    def since(self, after: int, level: str = "debug", limit: int | None = None) -> LogBatch:
        """Lines with `seq > after` at `level` or above (the newest `limit` of them)."""
        oldest = self.lines[0].seq if self.lines else self.seq + 1
        dropped = max(0, oldest - after - 1) if after < self.seq else 0
        lines = [
            line for line in self.lines if line.seq > after and level_at_least(line.level, level)
        ]
        if limit is not None:
            lines = lines[-limit:] if limit > 0 else []
        return LogBatch(lines=lines, dropped=dropped)


@contextmanager
def installed(handler: logging.Handler) -> Iterator[None]:
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
