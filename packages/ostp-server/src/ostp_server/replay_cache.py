"""The replay cache on disk, so a restart does not answer replayed first messages (spec §9.2).

Upstream keeps the cache in memory only: after a restart, a first message captured in the
last 300 s is answered again, which tells an observer that an OSTP server listens there. The
file holds the ``(timestamp, session id)`` of each accepted first message: a magic line, then
12 bytes per entry (u64 timestamp, u32 session id, big-endian). Each accepted handshake
appends its entry at once (a crash loses nothing the kernel already has); the file is
rewritten without expired entries, atomically (temporary file, fsync, rename), every
``REWRITE_INTERVAL`` seconds and at shutdown. A torn last entry is ignored on load.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger("ostp_server")

MAGIC = b"OSTP replay cache 1\n"
ENTRY = struct.Struct(">QI")
REWRITE_INTERVAL = 60.0
MAX_FILE_SIZE = 64 << 20  # far above what 50,000 entries and a minute of appends need


class ReplayCacheFile:
    """Load, append to and rewrite one replay cache file; I/O errors are logged, not raised."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._failed = False

    def load(self) -> list[tuple[int, int]] | None:
        """The entries of the file, or None if there is no usable file."""
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_FILE_SIZE + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read the replay cache %s: %s", self.path, e.strerror or e)
            return None
        if not data.startswith(MAGIC) or len(data) > MAX_FILE_SIZE:
            log.warning("%s is not a replay cache of this server; it will be replaced", self.path)
            return None
        body = memoryview(data)[len(MAGIC) :]
        usable = len(body) - len(body) % ENTRY.size
        return [(ts, sid) for ts, sid in ENTRY.iter_unpack(body[:usable])]

    def rewrite(self, entries: list[tuple[int, int]]) -> None:
        """Replace the file with exactly ``entries``, atomically; then append to it."""
        self._close_fd()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                payload = MAGIC + b"".join(ENTRY.pack(ts, sid) for ts, sid in entries)
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(self.path)
            with contextlib.suppress(OSError):  # make the rename itself durable
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._fail("write", e)
            return
        self._failed = False

    def append(self, ts: int, session_id: int) -> None:
        fd = self._fd
        if fd is None:
            return
        try:
            os.write(fd, ENTRY.pack(ts, session_id))
        except OSError as e:
            self._close_fd()
            self._fail("append to", e)

    def close(self) -> None:
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _fail(self, what: str, e: OSError) -> None:
        if not self._failed:  # once until it works again, not on every handshake
            self._failed = True
            log.warning(
                "cannot %s the replay cache %s: %s; a restart may answer replayed handshakes",
                what,
                self.path,
                e.strerror or e,
            )
