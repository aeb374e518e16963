"""Frames inside the data-phase AEAD and their padding (spec §6)."""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .errors import RemoteProtocolError

FRAME_VERSION = 1  # spec §6: always 1 when sent, not checked on receipt
FRAME_HEADER_LEN = 12
DATAGRAM_OVERHEAD = 12 + FRAME_HEADER_LEN + 16  # masked header + frame header + AEAD tag
PADDING_CLAMP_OVERHEAD = 38  # spec §6.1: pad = min(raw, max(mtu_hint - L - 38, 0))

_HEADER = struct.Struct(">BBHHIH")
# A Data frame's header and its relay Data message's tag and u16 length (spec §6, §8)
_DATA_HEADER = struct.Struct(">BBHHIHBH")
DATA_FRAME_HEADER_LEN = FRAME_HEADER_LEN + 3


class FrameKind(enum.IntEnum):
    """Frame kinds (spec §6)."""

    HANDSHAKE = 1
    DATA = 2
    CLOSE = 3
    KEEPALIVE = 4
    NACK = 5
    ACK = 6
    RESUME = 7


_KINDS = frozenset(int(k) for k in FrameKind)
_KIND_DATA = int(FrameKind.DATA)
_RELAY_DATA = 2  # the relay tag of Data (spec §8, relay.RelayTag.DATA)


def encode_frame(
    kind: int, stream_id: int, payload: bytes, pad_len: int = 0, reserved: int = 0
) -> bytes:
    """Frame plaintext: header, payload, ``pad_len`` zero bytes of padding.

    Padding travels inside the AEAD, so its content is invisible on the wire; upstream sends
    random bytes, we send zeros (cheaper; any value is legal for a receiver, spec §6.1).
    """
    header = _HEADER.pack(FRAME_VERSION, kind, reserved, stream_id, len(payload), pad_len)
    if pad_len:
        return b"".join((header, payload, bytes(pad_len)))
    return header + payload


def encode_data_frame_header(stream_id: int, length: int, pad_len: int, reserved: int) -> bytes:
    """The 15 bytes in front of ``length`` stream bytes in a Data frame carrying one relay Data
    message: ``encode_frame(DATA, stream_id, encode_data_header(length) + data, pad_len,
    reserved)`` is this, the data and ``pad_len`` zeros (the send path joins them in one copy).
    """
    return _DATA_HEADER.pack(
        FRAME_VERSION, _KIND_DATA, reserved, stream_id, length + 3, pad_len, _RELAY_DATA, length
    )


def decode_frame(plaintext: bytes) -> tuple[int, int, bytes]:
    """Return ``(kind, stream_id, payload)``; RemoteProtocolError on a malformed frame."""
    kind, stream_id, end = decode_frame_header(plaintext)
    return kind, stream_id, plaintext[FRAME_HEADER_LEN:end]


def decode_frame_header(plaintext: bytes) -> tuple[int, int, int]:
    """:func:`decode_frame` without the slice: ``(kind, stream_id, end)``, the payload being
    ``plaintext[FRAME_HEADER_LEN:end]``; the same checks and errors."""
    if len(plaintext) < FRAME_HEADER_LEN:
        raise RemoteProtocolError("frame shorter than its header")
    _version, kind, _reserved, stream_id, payload_len, pad_len = _HEADER.unpack_from(plaintext)
    if kind not in _KINDS:
        raise RemoteProtocolError(f"unknown frame kind {kind}")
    end = FRAME_HEADER_LEN + payload_len
    if end + pad_len > len(plaintext):
        raise RemoteProtocolError("frame lengths exceed the datagram")
    return kind, stream_id, end


# ----------------------------------------------------------------------------- padding (§6.1)


def _align_up(value: int, alignment: int) -> int:
    return math.ceil(value / alignment) * alignment


class Profile(enum.Enum):
    """Traffic-shape profiles of upstream's padding (spec §6.1)."""

    JSON_RPC = "json_rpc"
    HTTPS_BURST = "https_burst"
    VIDEO_STREAM = "video_stream"

    def target(self, length: int) -> int:
        if self is Profile.JSON_RPC:
            return min(_align_up(max(length, 220), 64), 1280)
        if self is Profile.HTTPS_BURST:
            return min(_align_up(max(length, 1200), 128), 1280)
        return min(_align_up(max(length, 900), 188), 1280)


@dataclass(frozen=True, slots=True)
class PaddingPolicy:
    """How much padding each frame gets (spec §6.1).

    Exactly one of ``fixed``, ``profile`` or ``adaptive`` describes the strategy.
    """

    mtu_hint: int = 1302
    """Datagrams are not padded beyond this many bytes of payload plus overhead."""
    max_pad: int = 1254
    """Cap on padding for the profile and adaptive strategies."""
    profile: Profile | None = Profile.JSON_RPC
    """Profile strategy (the upstream client's default)."""
    fixed: int | None = None
    """Fixed(T) strategy: pad every payload up to T bytes."""
    adaptive: bool = False
    """Adaptive strategy (the upstream server's)."""

    @classmethod
    def none(cls) -> PaddingPolicy:
        """No padding at all (legal; useful for tests and benchmarks)."""
        return cls(mtu_hint=0, max_pad=0, profile=None)

    @classmethod
    def upstream_client(cls, mtu: int = 1350) -> PaddingPolicy:
        """The upstream client's policy for a configured MTU (spec §6.1 table)."""
        bridge_mtu = max(mtu - 48, 500)
        return cls(mtu_hint=bridge_mtu, max_pad=max(bridge_mtu - 48, 256), profile=Profile.JSON_RPC)

    @classmethod
    def upstream_server(cls) -> PaddingPolicy:
        return cls(mtu_hint=1350, max_pad=256, profile=None, adaptive=True)

    def pad_len(self, length: int, randint: Callable[[int], int] | None = None) -> int:
        """Padding for a payload of ``length`` bytes.

        ``randint(n)`` returns a uniform integer in [0, n]; only the adaptive strategy uses it.
        """
        room = self.mtu_hint - length - PADDING_CLAMP_OVERHEAD
        if room <= 0:
            return 0  # the final clamp of every strategy (spec §6.1): full datagrams get none
        if self.fixed is not None:
            raw = max(self.fixed - length, 0)
        elif self.profile is not None:
            raw = min(max(self.profile.target(length) - length, 0), self.max_pad)
        elif self.adaptive:
            target = max(min(max(_align_up(length, 64), 64), self.mtu_hint), length)
            base = target - length
            jitter_cap = max(self.max_pad - base, 0)
            jitter = randint(min(jitter_cap, 256)) if (jitter_cap and randint) else 0
            raw = min(base + jitter, self.max_pad)
        else:
            return 0
        return min(raw, room)
