"""The daemon's log output: where (stderr or a file with rotation) and how (text or JSON lines).

Under systemd (stderr connected to the journal, see `under_journald`) the text format has no
timestamp, since journald adds its own, and each line starts with its syslog priority as
`<N>` (sd-daemon(3)), so `journalctl -p warning` works.

Secrets never reach a log line in the first place (the config keeps them as `SecretStr`); the
formatters here add nothing but the record's own fields.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ostp_client.config import LogConfig

__all__ = [
    "JOURNAL_FORMAT",
    "TEXT_FORMAT",
    "JournalFormatter",
    "JsonFormatter",
    "configure_logging",
    "under_journald",
]

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(name)s: %(message)s"

# syslog(3) priorities, as sd-daemon(3) prefixes them
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def _priority(levelno: int) -> int:
    for level, priority in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return priority
    return 7


class JournalFormatter(logging.Formatter):
    """`<N>logger: message` with no timestamp (journald stamps each line itself)."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{_priority(record.levelno)}>"
        # every line of a multi-line record (a traceback) keeps the record's priority
        return "\n".join(prefix + line for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, message[, exc]."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def under_journald(env: Mapping[str, str] | None = None, stream: object = None) -> bool:
    """Whether `stream` (stderr) goes to the journal.

    systemd sets `JOURNAL_STREAM=<dev>:<inode>` for a service whose output goes to the
    journal; it is only trusted when stderr is that very file (a child whose stderr was
    redirected inherits the variable, systemd.exec(5)).
    """
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    dev, _, inode = value.partition(":")
    if not (dev.isdigit() and inode.isdigit()):
        return False
    target: Any = sys.stderr if stream is None else stream
    try:
        info = os.fstat(target.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (info.st_dev, info.st_ino) == (int(dev), int(inode))


def _handler(config: LogConfig) -> logging.Handler:
    if config.output == "stderr":
        return logging.StreamHandler(sys.stderr)
    path = Path(config.output).expanduser()
    if config.max_bytes > 0:
        return logging.handlers.RotatingFileHandler(
            path, maxBytes=config.max_bytes, backupCount=config.backups, encoding="utf-8"
        )
    # no rotation of our own: reopen when logrotate moves the file away
    return logging.handlers.WatchedFileHandler(path, encoding="utf-8")


def configure_logging(config: LogConfig, level: str | None = None) -> logging.Handler:
    """Install the root handler for `config` (`level` overrides `config.level`).

    Raises OSError when a log file cannot be opened (the caller says so and exits).
    """
    handler = _handler(config)
    formatter: logging.Formatter
    if config.format == "json":
        formatter = JsonFormatter()
    elif config.output == "stderr" and under_journald():
        formatter = JournalFormatter()
    else:
        formatter = logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, (level or config.level).upper(), logging.INFO))
    return handler
