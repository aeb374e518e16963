"""The server's first step (spec §3, §9.2): a datagram from an unknown address is a handshake
message 1 or nothing. :class:`ServerAcceptor` checks it against the access keys, the timestamp
window and the replay cache, and answers with a new :class:`ServerConnection`, sans-IO like it."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .connection import SERVER_DEFAULTS, ConnectionConfig, RandomBytes, ServerConnection
from .errors import LocalProtocolError, RemoteProtocolError
from .keys import Secrets, derive_secrets
from .noise import NoiseHandshake
from .obfuscation import (
    parse_handshake_datagram,
)

__all__ = ["AcceptorStats", "ServerAcceptor"]

MIN_CLIENT_PAYLOAD = 12  # spec §3: ts:8 | sid:4 | key
TIMESTAMP_WINDOW = 300.0  # spec §9.2: |now - ts| <= 300 s
REPLAY_CACHE_SIZE = 50_000  # spec §9.2


@dataclass(slots=True)
class AcceptorStats:
    """Why first datagrams were dropped."""

    accepted: int = 0
    short_drop: int = 0
    no_key_drop: int = 0
    timestamp_drop: int = 0
    replay_drop: int = 0
    restart_drop: int = 0
    """Timestamps older than :attr:`ServerAcceptor.not_before` (possible replays after a
    restart that lost the replay cache)."""
    replay_cache_full_drop: int = 0
    bad_key_drop: int = 0


@dataclass(slots=True)
class _Key:
    key: bytes
    secrets: Secrets
    min_len: int
    max_len: int


class ServerAcceptor:
    """Turns an authenticated first datagram into a :class:`ServerConnection` (spec §9.2).

    Anything else (garbage, a wrong key, a stale timestamp, a replay) returns None silently
    and bumps a counter; the work per datagram is bounded by the number of keys.
    """

    def __init__(
        self,
        access_keys: Sequence[str | bytes],
        *,
        config: ConnectionConfig = SERVER_DEFAULTS,
        timestamp_window: float = TIMESTAMP_WINDOW,
        replay_cache_size: int = REPLAY_CACHE_SIZE,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        self._keys: list[_Key] = []
        for k in access_keys:
            key = k.encode() if isinstance(k, str) else bytes(k)
            if not key:
                raise LocalProtocolError("access keys must not be empty")
            s = derive_secrets(key)
            noise_len = 32 + MIN_CLIENT_PAYLOAD + len(key) + 16
            self._keys.append(
                _Key(
                    key, s, 6 + noise_len + s.handshake_pad_min, 6 + noise_len + s.handshake_pad_max
                )
            )
        self.config = config
        self.timestamp_window = timestamp_window
        self.replay_cache_size = replay_cache_size
        self._replay: dict[tuple[int, int, int], int] = {}
        self._restored: dict[tuple[int, int], int] = {}
        self._random = random_bytes
        self.stats = AcceptorStats()
        self.not_before = 0.0
        """Unix time: first messages with an older timestamp are refused (``restart_drop``).
        An owner that restarted without its replay cache sets its start time here, minus a
        clock-skew allowance, so messages captured before the restart are not answered."""
        self.last_accepted: tuple[int, int] | None = None
        """``(timestamp, session id)`` of the last accepted first message, for an owner
        that keeps the replay cache across restarts (:meth:`restore_replay`)."""

    def accept(self, data: bytes, now: float, unix_time: float) -> ServerConnection | None:
        """Try ``data`` as message 1 under every key; a new connection or None."""
        if len(data) < 7:
            self.stats.short_drop += 1
            return None
        for index, k in enumerate(self._keys):
            if not k.min_len <= len(data) <= k.max_len:
                continue  # cheap filter: exact Noise length plus the key's padding range
            try:
                sid, message = parse_handshake_datagram(k.secrets.obfuscation_key, data)
            except RemoteProtocolError:
                continue
            noise = NoiseHandshake(initiator=False, ephemeral_private=None, psk=k.secrets.psk)
            try:
                payload = noise.read_message_1(message)
            except RemoteProtocolError:
                continue
            if len(payload) < MIN_CLIENT_PAYLOAD:
                continue
            ts = int.from_bytes(payload[:8], "big")
            if int.from_bytes(payload[8:12], "big") != sid or payload[12:] != k.key:
                continue
            if abs(unix_time - ts) > self.timestamp_window:
                self.stats.timestamp_drop += 1
                return None
            replay_id = (ts, sid, index)
            if replay_id in self._replay or (self._restored and (ts, sid) in self._restored):
                self.stats.replay_drop += 1
                return None
            if ts < self.not_before:
                self.stats.restart_drop += 1
                return None
            if len(self._replay) + len(self._restored) >= self.replay_cache_size:
                self._purge(unix_time)
                if len(self._replay) + len(self._restored) >= self.replay_cache_size:
                    self.stats.replay_cache_full_drop += 1
                    return None
            self._replay[replay_id] = ts
            self.last_accepted = (ts, sid)
            try:
                connection = ServerConnection(
                    k.secrets,
                    self.config,
                    self._random,
                    session_id=sid,
                    key_index=index,
                    noise=noise,
                    now=now,
                )
            except RemoteProtocolError:  # e.g. a low-order ephemeral key: no shared secret
                self.stats.bad_key_drop += 1
                return None
            self.stats.accepted += 1
            return connection
        self.stats.no_key_drop += 1
        return None

    def _purge(self, unix_time: float) -> None:
        window = self.timestamp_window
        self._replay = {k: ts for k, ts in self._replay.items() if abs(unix_time - ts) <= window}
        if self._restored:
            self._restored = {
                k: ts for k, ts in self._restored.items() if abs(unix_time - ts) <= window
            }

    def replay_entries(self, unix_time: float) -> list[tuple[int, int]]:
        """``(timestamp, session id)`` of every first message still inside the window."""
        self._purge(unix_time)
        entries = {(ts, sid) for ts, sid, _index in self._replay}
        entries.update(self._restored)
        return sorted(entries)

    def restore_replay(self, entries: Iterable[tuple[int, int]], unix_time: float) -> None:
        """Refuse these ``(timestamp, session id)`` pairs under every key, e.g. the replay
        cache of a previous run; entries outside the window are skipped."""
        window = self.timestamp_window
        for ts, sid in entries:
            if abs(unix_time - ts) <= window:
                self._restored[(ts, sid)] = ts

    def purge(self, unix_time: float) -> None:
        """Forget replay entries older than the timestamp window (call now and then)."""
        self._purge(unix_time)
