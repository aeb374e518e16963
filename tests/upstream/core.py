"""How the upstream Rust peers behave, as a sans-IO core for tests (spec §7, §8, §9, §10.2, §16).

Written from the spec alone, on ``ostp_proto``'s codecs (keys, Noise, header masking, frames,
relay messages) but not on its ``Connection``/``Sender``/``Receiver``: the point is to meet our
client with the ARQ the servers people already run actually have, not with our own.

What follows upstream exactly:

* ARQ (§7.1-§7.3): one nonce per built datagram, ACK/NACK frames stored in the history too;
  a fixed 100 ms RTO walked on a 10 ms tick, back-off only past 8 retries
  (``rto * 2**min(retries - 8, 6)``), at most ``clamp(cwnd_packets // 4, 2, 64)`` re-sends per
  tick with retries counted even when the budget suppressed the send, eviction once
  ``retries > 10`` (so a frame is re-sent at +100 ... +800, +900, +1100, +1500 ms and gone at
  the tick after); a NACK re-sends the nonce at once if it is still in the history (counting a
  retry and a loss) and is otherwise ignored apart from a loss; ACK ranges remove entries; the
  receiver ACKs duplicates at once, NACKs ``exp`` at most every 30 ms on out-of-order arrival,
  buffers at most 8,192 frames within 16,384 of ``exp``, and skips a gap on the tick once
  ``exp`` has not advanced for 500 ms (the hole is delivered over, silently).
* Congestion (§7.4): the Reno-like window (x0.7 per loss once out of slow start) that only sizes
  the retransmit budget. New data is never held back: every remote read is sent at once (§16).
* Server (§9): handshake acceptance with the key, session id, timestamp (+-300 s) and replay
  checks, replay cache of 50,000 and at most 1,024 sessions, a session with an existing id
  replaced, known-address lookup then a rate-limited roaming scan, re-binding before
  decryption; Pong for Ping on the same stream, ConnectOk/Error("connect failed: ...") for
  Connect, Data written only to connected remotes, remote reads of at most 4,096 bytes each sent
  as one Data frame at once, Close for a remote EOF, never a Close frame, sessions dropped after
  600 s without a datagram (their remotes closed, nothing sent).
* Client role (§10.1, §10.2): the same handshake datagram up to 4 times 1.2 s apart, a Ping on
  stream 0 right after the handshake and Ping + KeepAlive every 5 s.

Simplifications (none of them visible in what goes on the wire):

* The retransmission walk keeps a heap of due times instead of visiting the whole history every
  tick; the same entries are re-sent in the same (nonce) order with the same budget and retry
  counting. ACK ranges are applied to the history instead of a retain() over it: same result.
* One tick per ``handle_timer`` call: after a stall the next tick is 10 ms later (tokio's
  interval would fire the missed ticks in a burst). The replay cache is purged once a second,
  not every tick.
* The congestion controller keeps only what has an effect (``cwnd``, ``ssthresh``, the phase);
  upstream's ``min_rtt``, pacing and ProbeRTT state change nothing on the wire.
* UdpAssociate/UdpData, UoT/Reality, outbound rules, per-user accounting and limits, config
  reload and the 45 s "client disconnected" log are not modelled (ignored messages). The client
  role exposes ``Machine.in_flight`` but does not itself stop taking work at upstream's
  backpressure threshold (spec §7.4); its handshake has no NAT64 retry.
* Error texts carry the shell's reason, not Rust's ``io::Error`` text. Randomness (ephemeral
  keys, padding, reserved bytes, session ids) comes from :class:`Randomness`.

Fault injection (:class:`Faults`) lets tests make the peer do what real ones do under load:
never deliver one frame (every transmission of a nonce dropped), go silent after a burst, or
answer keepalives but never a Connect.
"""

from __future__ import annotations

import heapq
import os
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ostp_proto.errors import RemoteProtocolError
from ostp_proto.frames import FrameKind, PaddingPolicy, decode_frame, encode_frame
from ostp_proto.keys import Secrets, derive_secrets, split_transport_keys
from ostp_proto.noise import NoiseHandshake
from ostp_proto.obfuscation import (
    DataOpener,
    DataSealer,
    build_handshake_datagram,
    parse_handshake_datagram,
)
from ostp_proto.relay import (
    Close,
    Connect,
    ConnectOk,
    Data,
    Error,
    KeepAlive,
    Ping,
    Pong,
    RelayMessage,
    decode_relay,
    encode_data_header,
    encode_relay,
)

# spec §7.1 (client and server use the same values)
MAX_REORDER = 16384
MAX_REORDER_BUFFER = 8192
ACK_DELAY = 0.005
RTO = 0.100
MAX_RETRIES = 8
EVICT_RETRIES = MAX_RETRIES + 2  # spec §7.2: evicted once retries > 10
MAX_SENT_HISTORY = 32768
TICK = 0.010
NACK_RATE_LIMIT = 0.030
GAP_SKIP = 0.500
MAX_ACK_RANGES = 8  # spec §7.3: the cumulative range plus the last 7
LOSS_WITHOUT_ENTRY = 1200  # spec §7.2: on_loss(1200) for a NACK of an unknown nonce
# spec §9
SERVER_MTU_HINT = 1350
CLIENT_MTU_HINT = 1302  # spec §6.1: bridge_mtu with the CLI default mtu 1350
SESSION_IDLE = 600.0
TIMESTAMP_WINDOW = 300.0
REPLAY_CACHE_CAP = 50_000
MAX_SESSIONS = 1024
REMOTE_READ = 4096
ROAM_TOKENS = 50.0  # spec §9.2: token bucket, capacity 50, refill 50/s
# spec §10
KEEPALIVE_INTERVAL = 5.0
HANDSHAKE_WAIT = 1.2
HANDSHAKE_SENDS = 4

_EPS = 1e-9  # float slack when comparing a due time with the tick's clock
_U64 = struct.Struct(">Q")
_RANGE = struct.Struct(">QQ")
_ELICITING = frozenset((FrameKind.DATA, FrameKind.CLOSE, FrameKind.KEEPALIVE))
_DELIVERED = frozenset((FrameKind.DATA, FrameKind.RESUME))


# ------------------------------------------------------------------------------ ARQ payloads


def ack_ranges(expected: int, buffered: list[int]) -> list[tuple[int, int]]:
    """ACK ranges as upstream builds them (spec §7.3): ``(0, exp-1)``, then one per run."""
    ranges: list[tuple[int, int]] = [(0, expected - 1)] if expected > 0 else []
    start = prev = -2
    for n in buffered:
        if n != prev + 1:
            if prev >= 0:
                ranges.append((start, prev))
            start = n
        prev = n
    if prev >= 0:
        ranges.append((start, prev))
    if len(ranges) > MAX_ACK_RANGES:
        ranges = [ranges[0], *ranges[-(MAX_ACK_RANGES - 1) :]]
    return ranges


def encode_ack(ranges: list[tuple[int, int]]) -> bytes:
    return bytes((len(ranges),)) + b"".join(_RANGE.pack(s, e) for s, e in ranges)


def decode_ack(payload: bytes) -> list[tuple[int, int]]:
    if not payload or len(payload) < 1 + 16 * payload[0]:
        raise RemoteProtocolError("truncated ACK")  # spec §7.3: a decode error
    return [_RANGE.unpack_from(payload, 1 + 16 * i) for i in range(payload[0])]


# -------------------------------------------------------------------------------- randomness


class Randomness:
    """Every random choice the peer makes; tests subclass it to script the choices."""

    def __init__(self, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.bytes = random_bytes

    def randint(self, n: int) -> int:
        """Uniform in [0, n]."""
        return int.from_bytes(self.bytes(4), "big") % (n + 1) if n > 0 else 0

    def ephemeral(self) -> bytes:
        return self.bytes(32)

    def session_id(self) -> int:
        return int.from_bytes(self.bytes(4), "big")

    def handshake_padding(self, secrets: Secrets) -> bytes:
        lo, hi = secrets.handshake_pad_min, secrets.handshake_pad_max
        return self.bytes(lo + self.randint(hi - lo))

    def frame_padding(self, policy: PaddingPolicy, payload_len: int) -> bytes:
        n = policy.pad_len(payload_len, self.randint)
        return self.bytes(n) if n else b""

    def reserved(self) -> int:
        return int.from_bytes(self.bytes(2), "big")


# ------------------------------------------------------------------------------------ faults


@dataclass
class Faults:
    """Misbehaviour to inject (all off by default)."""

    drop_nonces: set[int] = field(default_factory=set)
    """Every transmission of these nonces (first, timer and NACK re-sends) is lost."""
    mute_after: int | None = None
    """After this many datagrams a machine sends nothing more (it still takes input)."""
    ignore_connect: bool = False
    """Connect is ignored (no ConnectOk, no Error); Ping is still answered."""
    sessions: int | None = None
    """A server's faults apply to its first this many sessions only (None: to all): a client
    that replaces a faulty session then meets a healthy one."""


# -------------------------------------------------------------------------------- congestion


class Congestion:
    """Spec §7.4: slow start until the first loss, then +mtu per window and x0.7 per loss."""

    def __init__(self, mtu: int) -> None:
        self.mtu = mtu
        self.cwnd = 10 * mtu
        self.ssthresh: int | None = None
        self.slow_start = True

    def on_ack(self, nbytes: int) -> None:
        if self.slow_start:
            self.cwnd += nbytes
        else:
            self.cwnd += nbytes * self.mtu // self.cwnd

    def on_loss(self) -> None:
        if self.slow_start:
            self.ssthresh = self.cwnd // 2
            self.cwnd = max(self.ssthresh, 2 * self.mtu)
            self.slow_start = False
        else:
            self.cwnd = max(self.cwnd * 7 // 10, 2 * self.mtu)

    @property
    def cwnd_packets(self) -> int:
        return max(self.cwnd // self.mtu, 2)

    @property
    def budget(self) -> int:
        """Timer re-sends allowed per tick (spec §7.2)."""
        return min(max(self.cwnd_packets // 4, 2), 64)


# ---------------------------------------------------------------------------------------- ARQ


class _Entry:
    __slots__ = ("datagram", "last_sent", "retransmittable", "retries", "version")

    def __init__(self, datagram: bytes, now: float, retransmittable: bool) -> None:
        self.datagram = datagram
        self.last_sent = now
        self.retries = 0
        self.retransmittable = retransmittable
        self.version = 0


def rto_after(retries: int) -> float:
    """Spec §7.2: ``rto * 2**min(max(retries - max_retries, 0), 6)``."""
    return RTO * (1 << min(max(retries - MAX_RETRIES, 0), 6))


@dataclass
class MachineStats:
    datagrams_built: int = 0
    timer_resends: int = 0
    budget_suppressed: int = 0
    nack_resends: int = 0
    nacks_ignored: int = 0
    evicted: int = 0
    acks_received: int = 0
    duplicates: int = 0
    window_drops: int = 0
    buffer_full_drops: int = 0
    auth_drops: int = 0
    decode_drops: int = 0
    gap_skips: int = 0
    skipped_nonces: int = 0
    fault_drops: int = 0
    muted: int = 0
    nacks_received: list[tuple[float, int]] = field(default_factory=list)
    """(time, nonce) of every NACK that arrived: what the other side asked for, and when."""
    evicted_nonces: list[int] = field(default_factory=list)


class Machine:
    """One session's protocol machine in state Established (spec §7).

    Feed it with :meth:`receive` (datagrams already matched to the session), :meth:`tick`
    every 10 ms; send relay payloads with :meth:`send`. ``out`` holds datagrams to put on the
    wire, ``inbox`` the ``(stream_id, payload)`` of Data/Resume frames delivered in order.
    """

    def __init__(
        self,
        *,
        secrets: Secrets,
        session_id: int,
        send_key: bytes,
        recv_key: bytes,
        padding: PaddingPolicy,
        mtu_hint: int,
        randomness: Randomness,
        faults: Faults,
        now: float,
    ) -> None:
        self.session_id = session_id
        self.sealer = DataSealer(secrets.obfuscation_key, send_key, session_id)
        self.opener = DataOpener(secrets.obfuscation_key, recv_key, session_id)
        self.padding = padding
        self.randomness = randomness
        self.faults = faults
        self.closed = False
        self.cc = Congestion(mtu_hint)
        # sender (spec §7.2)
        self.next_nonce = 0
        self.history: OrderedDict[int, _Entry] = OrderedDict()
        self._due: list[tuple[float, int, int]] = []  # (due time, nonce, entry version)
        self._over: set[int] = set()  # nonces whose retries passed EVICT_RETRIES
        # receiver (spec §7.3)
        self.expected = 0
        self.buffer: dict[int, tuple[int, bytes] | None] = {}
        self.ack_pending = False
        self.last_ack = -1e9
        self.last_nack = -1e9
        self.last_advance = now
        self.out: list[bytes] = []
        self.inbox: list[tuple[int, bytes]] = []
        self.emitted = 0
        self.streams_sent: dict[int, int] = {}
        """Stream id of every Data frame built, by nonce (what a loss really cost)."""
        self.stats = MachineStats()

    # -- sending ---------------------------------------------------------------------------

    def send(self, kind: int, stream_id: int, payload: bytes, now: float) -> int | None:
        """Build, record and emit one datagram at once (no pacing, no window: spec §16)."""
        if self.closed:
            return None  # spec §7.2: only accepted in Established
        retransmittable = kind not in (FrameKind.ACK, FrameKind.NACK)
        r = self.randomness
        pad = r.frame_padding(self.padding, len(payload))
        frame = encode_frame(kind, stream_id, payload, len(pad), r.reserved())
        if pad:
            frame = frame[: len(frame) - len(pad)] + pad
        nonce = self.next_nonce
        self.next_nonce = nonce + 1
        datagram = self.sealer.seal(nonce, frame)
        entry = _Entry(datagram, now, retransmittable)
        history = self.history
        history[nonce] = entry
        if len(history) > MAX_SENT_HISTORY:
            history.popitem(last=False)  # the oldest, whatever its state
        if retransmittable:
            heapq.heappush(self._due, (now + RTO, nonce, 0))
            if kind == FrameKind.DATA:
                self.streams_sent[nonce] = stream_id
        self.stats.datagrams_built += 1
        self._emit(nonce, datagram)
        return nonce

    def send_relay(self, stream_id: int, message: RelayMessage, now: float) -> int | None:
        return self.send(FrameKind.DATA, stream_id, encode_relay(message), now)

    def send_stream_data(self, stream_id: int, chunk: bytes, now: float) -> int | None:
        return self.send(FrameKind.DATA, stream_id, encode_data_header(len(chunk)) + chunk, now)

    def _emit(self, nonce: int, datagram: bytes) -> None:
        faults = self.faults
        if nonce in faults.drop_nonces:
            self.stats.fault_drops += 1
            return
        if faults.mute_after is not None and self.emitted >= faults.mute_after:
            self.stats.muted += 1
            return
        self.emitted += 1
        self.out.append(datagram)

    def _send_ack(self, now: float) -> None:
        ranges = ack_ranges(self.expected, sorted(self.buffer))
        if not ranges:
            return
        self.send(FrameKind.ACK, 0, encode_ack(ranges), now)
        self.ack_pending = False
        self.last_ack = now

    def _send_nack(self, nonce: int, now: float) -> None:
        self.send(FrameKind.NACK, 0, _U64.pack(nonce), now)
        self.last_nack = now

    @property
    def in_flight(self) -> int:
        """Retransmittable entries in the history (the client's backpressure, spec §7.4)."""
        return sum(1 for e in self.history.values() if e.retransmittable)

    # -- feedback --------------------------------------------------------------------------

    def _on_ack(self, ranges: list[tuple[int, int]], now: float) -> None:
        self.stats.acks_received += 1
        history = self.history
        removed_bytes = 0
        rtt: float | None = None
        for start, end in ranges:
            if end < start or not history:
                continue
            first = next(iter(history))
            if start <= first:
                doomed: list[int] = []
                for n in history:
                    if n > end:
                        break
                    doomed.append(n)
            elif end - start < len(history):
                doomed = [n for n in range(start, end + 1) if n in history]
            else:
                doomed = [n for n in history if start <= n <= end]
            for n in doomed:
                entry = history.pop(n)
                removed_bytes += len(entry.datagram)
                sample = now - entry.last_sent
                rtt = sample if rtt is None else min(rtt, sample)
        if rtt is not None:
            self.cc.on_ack(removed_bytes)

    def _on_nack(self, nonce: int, now: float) -> None:
        self.stats.nacks_received.append((now, nonce))
        entry = self.history.get(nonce)
        if entry is None:
            self.stats.nacks_ignored += 1
            self.cc.on_loss()  # on_loss(1200): the byte count changes nothing (§7.4)
            return
        entry.last_sent = now
        entry.retries += 1
        self.stats.nack_resends += 1
        self._emit(nonce, entry.datagram)
        self.cc.on_loss()
        if entry.retransmittable:
            entry.version += 1
            heapq.heappush(self._due, (now + rto_after(entry.retries), nonce, entry.version))
            if entry.retries > EVICT_RETRIES:
                self._over.add(nonce)

    # -- receiving -------------------------------------------------------------------------

    def receive(self, data: bytes, nonce: int, now: float) -> None:
        """One data datagram of this session (header already unmasked): spec §7.3."""
        if self.closed:
            return
        expected = self.expected
        if nonce < expected:
            self.stats.duplicates += 1
            self._send_ack(now)  # at once, no delay, no rate limit
            return
        if nonce > expected + MAX_REORDER:
            self.stats.window_drops += 1
            self._send_nack(expected, now)
            return
        plaintext = self.opener.decrypt(nonce, data)
        if plaintext is None:
            self.stats.auth_drops += 1
            return
        try:
            kind, stream_id, payload = decode_frame(plaintext)
            ranges = decode_ack(payload) if kind == FrameKind.ACK else None
        except RemoteProtocolError:
            self.stats.decode_drops += 1
            return
        if kind == FrameKind.NACK:
            if len(payload) >= 8:
                self._on_nack(_U64.unpack_from(payload)[0], now)
        elif ranges is not None:
            self._on_ack(ranges, now)
        elif kind == FrameKind.CLOSE:
            self.closed = True
            return
        if kind in _ELICITING:
            self.ack_pending = True
        action = (stream_id, payload) if kind in _DELIVERED else None
        if nonce == expected:
            if action is not None:
                self.inbox.append(action)
            self.expected = nonce + 1
            self._drain()
            self.last_advance = now
        else:
            if len(self.buffer) < MAX_REORDER_BUFFER:
                self.buffer[nonce] = action
            else:
                self.stats.buffer_full_drops += 1
            if now - self.last_nack >= NACK_RATE_LIMIT:
                self._send_nack(self.expected, now)
        if self.ack_pending and now - self.last_ack >= ACK_DELAY:
            self._send_ack(now)

    def _drain(self) -> None:
        buffer = self.buffer
        expected = self.expected
        while expected in buffer:
            action = buffer.pop(expected)
            if action is not None:
                self.inbox.append(action)
            expected += 1
        self.expected = expected

    # -- the 10 ms tick --------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Spec §7.2 tick: gap skip, ACK flush, eviction, retransmission walk."""
        if self.closed:
            return
        if self.buffer and now - self.last_advance > GAP_SKIP:
            first = min(self.buffer)
            self.stats.gap_skips += 1
            self.stats.skipped_nonces += first - self.expected
            self.expected = first
            self._drain()
            self.last_advance = now
            self.ack_pending = True
        if self.ack_pending and now - self.last_ack >= ACK_DELAY:
            self._send_ack(now)
        history = self.history
        if self._over:
            for n in self._over:
                entry = history.get(n)
                if entry is not None and entry.retries > EVICT_RETRIES:
                    del history[n]
                    self.stats.evicted += 1
                    self.stats.evicted_nonces.append(n)
            self._over.clear()
        heap = self._due
        due: list[int] = []
        while heap and heap[0][0] <= now + _EPS:
            _, n, version = heapq.heappop(heap)
            entry = history.get(n)
            if entry is not None and entry.version == version:
                due.append(n)
        if not due:
            return
        budget = self.cc.budget
        due.sort()  # the walk goes oldest to newest
        for n in due:
            entry = history[n]
            entry.last_sent = now
            entry.retries += 1  # counted even when the budget suppresses the send
            if budget > 0:
                budget -= 1
                self.stats.timer_resends += 1
                self._emit(n, entry.datagram)
            else:
                self.stats.budget_suppressed += 1
            if entry.retries > EVICT_RETRIES:
                self._over.add(n)
            entry.version += 1
            heapq.heappush(heap, (now + rto_after(entry.retries), n, entry.version))

    def take_inbox(self) -> list[tuple[int, bytes]]:
        inbox = self.inbox
        self.inbox = []
        return inbox

    def take_output(self) -> list[bytes]:
        out = self.out
        self.out = []
        return out


# ------------------------------------------------------------------------------------- server


@dataclass(frozen=True, slots=True)
class OpenTcp:
    """Connect to ``address`` for (session ``token``, ``stream_id``); 10.1.0.1 is rewritten."""

    token: int
    stream_id: int
    address: str


@dataclass(frozen=True, slots=True)
class WriteTcp:
    token: int
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CloseTcp:
    token: int
    stream_id: int


Effect = OpenTcp | WriteTcp | CloseTcp
Address = tuple[str, int]


@dataclass
class Session:
    token: int
    session_id: int
    key_index: int
    address: Address
    machine: Machine
    last_seen: float
    streams: dict[int, bool] = field(default_factory=dict)
    """Streams with a remote: False while connecting, True once connected."""


@dataclass
class _Key:
    key: bytes
    secrets: Secrets


@dataclass
class ServerStats:
    handshakes: int = 0
    unauthorized: int = 0
    replays: int = 0
    sessions_evicted: int = 0
    roaming_scans: int = 0
    relay_decode_drops: int = 0
    data_without_remote: int = 0
    connects_ignored: int = 0


class UpstreamServer:
    """The upstream server's dispatcher, sessions and relay (spec §9), without sockets.

    Feed datagrams with :meth:`receive_datagram`, call :meth:`handle_timer` at
    :meth:`get_timer`, send what :meth:`datagrams_to_send` returns, carry out the
    :meth:`take_effects` (TCP connects, writes, closes) and report back with
    :meth:`tcp_connected`, :meth:`tcp_failed`, :meth:`tcp_data` and :meth:`tcp_closed`.
    """

    def __init__(
        self,
        access_keys: list[str],
        *,
        unix_offset: float = 0.0,
        randomness: Randomness | None = None,
        faults: Faults | None = None,
    ) -> None:
        self._keys = [_Key(k.encode(), derive_secrets(k)) for k in access_keys]
        self.unix_offset = unix_offset
        self.randomness = randomness or Randomness()
        self.faults = faults or Faults()
        self.sessions: dict[int, Session] = {}  # by session id
        self._by_token: dict[int, Session] = {}
        self._by_address: dict[Address, int] = {}
        self._replay: dict[bytes, int] = {}
        self._next_token = 1
        self._tokens = ROAM_TOKENS
        self._tokens_at = 0.0
        self._next_tick: float | None = None
        self._next_purge = 0.0
        self._out: list[tuple[bytes, Address]] = []
        self._effects: list[Effect] = []
        self.stats = ServerStats()

    # -- datagrams -------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, address: Address, now: float) -> None:
        """Spec §9.2 dispatch."""
        if self._next_tick is None:
            self._next_tick = now + TICK
        if len(data) < 4:
            self.stats.unauthorized += 1
            return
        session: Session | None = None
        nonce: int | None = None
        sid = self._by_address.get(address)
        if sid is not None and len(data) >= 12:
            known = self.sessions.get(sid)
            if known is not None:
                nonce = known.machine.opener.unmask(data)
                if nonce is not None:
                    session = known
        if session is None:
            self._tokens = min(ROAM_TOKENS, self._tokens + (now - self._tokens_at) * ROAM_TOKENS)
            self._tokens_at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                self.stats.roaming_scans += 1
                for candidate in self.sessions.values():
                    nonce = candidate.machine.opener.unmask(data)
                    if nonce is not None:
                        session = candidate
                        break
        if session is not None and nonce is not None:
            if session.address != address:
                self._by_address.pop(session.address, None)
                session.address = address
            self._by_address[address] = session.session_id
            session.last_seen = now
            session.machine.receive(data, nonce, now)
            self._after_machine(session, now)
            return
        if not self._handshake(data, address, now):
            self.stats.unauthorized += 1

    def _handshake(self, data: bytes, address: Address, now: float) -> bool:
        if len(data) < 7:
            return False
        unix = now + self.unix_offset
        for index, k in enumerate(self._keys):
            try:
                sid, message = parse_handshake_datagram(k.secrets.obfuscation_key, data)
                noise = NoiseHandshake(initiator=False, ephemeral_private=None, psk=k.secrets.psk)
                payload = noise.read_message_1(message)
            except RemoteProtocolError:
                continue
            if len(payload) < 12 or int.from_bytes(payload[8:12], "big") != sid:
                continue
            if payload[12:] != k.key:
                continue
            ts = int.from_bytes(payload[:8], "big")
            if abs(unix - ts) > TIMESTAMP_WINDOW:
                continue
            if payload in self._replay:
                self.stats.replays += 1
                continue
            if len(self._replay) >= REPLAY_CACHE_CAP or len(self.sessions) >= MAX_SESSIONS:
                return False
            self._replay[payload] = ts
            r = self.randomness
            noise.set_ephemeral(r.ephemeral())
            try:
                reply = noise.write_message_2(b"")
            except RemoteProtocolError:
                return False
            recv_key, send_key = split_transport_keys(noise.handshake_hash)
            machine = Machine(
                secrets=k.secrets,
                session_id=sid,
                send_key=send_key,
                recv_key=recv_key,
                padding=PaddingPolicy.upstream_server(),
                mtu_hint=SERVER_MTU_HINT,
                randomness=r,
                faults=self._faults_for_new_session(),
                now=now,
            )
            old = self.sessions.get(sid)
            if old is not None:
                self._drop(old)
            session = Session(self._next_token, sid, index, address, machine, now)
            self._next_token += 1
            self.sessions[sid] = session
            self._by_token[session.token] = session
            self._by_address[address] = sid
            self.stats.handshakes += 1
            datagram = build_handshake_datagram(
                k.secrets.obfuscation_key, sid, reply, r.handshake_padding(k.secrets)
            )
            self._out.append((datagram, address))
            return True
        return False

    def _faults_for_new_session(self) -> Faults:
        faults = self.faults
        if faults.sessions is not None and self.stats.handshakes >= faults.sessions:
            return Faults()
        return faults

    def _after_machine(self, session: Session, now: float) -> None:
        machine = session.machine
        for stream_id, payload in machine.take_inbox():
            try:
                message = decode_relay(payload)
            except RemoteProtocolError:
                self.stats.relay_decode_drops += 1
                continue
            self._on_relay(session, stream_id, message, now)
        for datagram in machine.take_output():
            self._out.append((datagram, session.address))

    def _on_relay(
        self, session: Session, stream_id: int, message: RelayMessage, now: float
    ) -> None:
        """Spec §9.5."""
        machine = session.machine
        if isinstance(message, Ping):
            machine.send_relay(stream_id, Pong(message.timestamp), now)
        elif isinstance(message, Connect):
            if machine.faults.ignore_connect:
                self.stats.connects_ignored += 1
                return
            if stream_id in session.streams:
                self._effects.append(CloseTcp(session.token, stream_id))
            address = message.address
            if address.startswith("10.1.0.1:"):
                address = "127.0.0.1:" + address[len("10.1.0.1:") :]
            session.streams[stream_id] = False
            self._effects.append(OpenTcp(session.token, stream_id, address))
        elif isinstance(message, Data):
            if session.streams.get(stream_id):
                self._effects.append(WriteTcp(session.token, stream_id, message.data))
            else:
                self.stats.data_without_remote += 1
        elif isinstance(message, Close) and session.streams.pop(stream_id, None) is not None:
            self._effects.append(CloseTcp(session.token, stream_id))
        # KeepAlive, ConnectOk, Pong, Error: ignored; UdpAssociate/UdpData: not modelled

    def datagrams_to_send(self) -> list[tuple[bytes, Address]]:
        for session in self.sessions.values():
            if session.machine.out:
                for datagram in session.machine.take_output():
                    self._out.append((datagram, session.address))
        out = self._out
        self._out = []
        return out

    def take_effects(self) -> list[Effect]:
        effects = self._effects
        self._effects = []
        return effects

    # -- the remote side of the relay ------------------------------------------------------

    def _stream(self, token: int, stream_id: int) -> Session | None:
        session = self._by_token.get(token)
        if session is None or stream_id not in session.streams:
            return None
        return session

    def tcp_connected(self, token: int, stream_id: int, now: float) -> None:
        session = self._stream(token, stream_id)
        if session is not None:
            session.streams[stream_id] = True
            session.machine.send_relay(stream_id, ConnectOk(), now)

    def tcp_failed(self, token: int, stream_id: int, reason: str, now: float) -> None:
        session = self._stream(token, stream_id)
        if session is not None:
            del session.streams[stream_id]
            session.machine.send_relay(stream_id, Error(f"connect failed: {reason}"), now)

    def tcp_data(self, token: int, stream_id: int, data: bytes, now: float) -> None:
        """Remote bytes: every read of at most 4,096 bytes goes out at once as one Data."""
        session = self._stream(token, stream_id)
        if session is None or not session.streams[stream_id]:
            return
        machine = session.machine
        for i in range(0, len(data), REMOTE_READ):
            machine.send_stream_data(stream_id, data[i : i + REMOTE_READ], now)

    def tcp_closed(self, token: int, stream_id: int, now: float) -> None:
        session = self._stream(token, stream_id)
        if session is not None:
            del session.streams[stream_id]
            session.machine.send_relay(stream_id, Close(), now)

    # -- timers ----------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        return self._next_tick

    def handle_timer(self, now: float) -> None:
        """Spec §9.3: purge, idle eviction, then a protocol tick for every session."""
        if self._next_tick is None or now < self._next_tick - _EPS:
            return
        self._next_tick += TICK
        if self._next_tick <= now:
            self._next_tick = now + TICK
        unix = now + self.unix_offset
        if now >= self._next_purge:
            self._next_purge = now + 1.0
            self._replay = {p: ts for p, ts in self._replay.items() if abs(unix - ts) <= 300}
        for session in [s for s in self.sessions.values() if now - s.last_seen > SESSION_IDLE]:
            self.stats.sessions_evicted += 1
            self._drop(session)
        for session in self.sessions.values():
            session.machine.tick(now)
            self._after_machine(session, now)

    def _drop(self, session: Session) -> None:
        """Forget a session: its remotes are closed, nothing is sent to the client."""
        for stream_id in session.streams:
            self._effects.append(CloseTcp(session.token, stream_id))
        session.streams.clear()
        self.sessions.pop(session.session_id, None)
        self._by_token.pop(session.token, None)
        if self._by_address.get(session.address) == session.session_id:
            del self._by_address[session.address]


# ------------------------------------------------------------------------------------- client


class UpstreamClient:
    """The upstream client's session (spec §10.1, §10.2): handshake, keepalive, relay.

    ``inbox`` collects ``(stream_id, message)`` from the server (Pongs included); the owner
    decides what to do with them.
    """

    def __init__(
        self,
        access_key: str,
        *,
        unix_offset: float = 0.0,
        randomness: Randomness | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.key = access_key.encode()
        self.secrets = derive_secrets(access_key)
        self.unix_offset = unix_offset
        self.randomness = randomness or Randomness()
        self.faults = faults or Faults()
        self.session_id = 0
        self.machine: Machine | None = None
        self.failed = False
        self._noise: NoiseHandshake | None = None
        self._hello = b""
        self._hello_sends = 0
        self._hello_at = 0.0
        self._next_tick: float | None = None
        self._next_keepalive = 0.0
        self._out: list[bytes] = []
        self.inbox: list[tuple[int, RelayMessage]] = []

    def connect(self, now: float) -> None:
        r = self.randomness
        self.session_id = sid = r.session_id()
        self._noise = NoiseHandshake(
            initiator=True, ephemeral_private=r.ephemeral(), psk=self.secrets.psk
        )
        ts = int(now + self.unix_offset)
        message = self._noise.write_message_1(
            ts.to_bytes(8, "big") + sid.to_bytes(4, "big") + self.key
        )
        self._hello = build_handshake_datagram(
            self.secrets.obfuscation_key, sid, message, r.handshake_padding(self.secrets)
        )
        self._hello_sends = 1
        self._hello_at = now
        self._out.append(self._hello)

    @property
    def established(self) -> bool:
        return self.machine is not None

    def receive_datagram(self, data: bytes, now: float) -> None:
        machine = self.machine
        if machine is None:
            self._receive_hello(data, now)
            return
        nonce = machine.opener.unmask(data)
        if nonce is None:
            return
        machine.receive(data, nonce, now)
        self._after_machine(now)

    def _receive_hello(self, data: bytes, now: float) -> None:
        noise = self._noise
        if noise is None or self.failed:
            return
        try:
            sid, message = parse_handshake_datagram(self.secrets.obfuscation_key, data)
            if sid != self.session_id:
                raise RemoteProtocolError("another session")
            noise.read_message_2(message)
        except RemoteProtocolError:
            self.failed = True  # spec §10.1: the first datagram decides
            return
        send_key, recv_key = split_transport_keys(noise.handshake_hash)
        self.machine = Machine(
            secrets=self.secrets,
            session_id=sid,
            send_key=send_key,
            recv_key=recv_key,
            padding=PaddingPolicy.upstream_client(),
            mtu_hint=CLIENT_MTU_HINT,
            randomness=self.randomness,
            faults=self.faults,
            now=now,
        )
        self._next_tick = now + TICK
        self._ping(now)  # spec §10.1: one Ping right after the handshake
        self._next_keepalive = now + KEEPALIVE_INTERVAL

    def _ping(self, now: float) -> None:
        assert self.machine is not None
        self.machine.send_relay(0, Ping(round((now + self.unix_offset) * 1000)), now)

    def send(self, stream_id: int, message: RelayMessage, now: float) -> None:
        if self.machine is not None:
            self.machine.send_relay(stream_id, message, now)

    def _after_machine(self, now: float) -> None:
        assert self.machine is not None
        for stream_id, payload in self.machine.take_inbox():
            try:
                self.inbox.append((stream_id, decode_relay(payload)))
            except RemoteProtocolError:
                continue

    def datagrams_to_send(self) -> list[bytes]:
        out = self._out
        self._out = []
        if self.machine is not None:
            out += self.machine.take_output()
        return out

    def get_timer(self) -> float | None:
        if self.machine is None:
            if self.failed or not self._hello_sends:
                return None
            return self._hello_at + HANDSHAKE_WAIT
        return self._next_tick

    def handle_timer(self, now: float) -> None:
        machine = self.machine
        if machine is None:
            if self._hello_sends and not self.failed and now >= self._hello_at + HANDSHAKE_WAIT:
                if self._hello_sends >= HANDSHAKE_SENDS:
                    self.failed = True
                else:  # spec §10.1: the same datagram again
                    self._hello_sends += 1
                    self._hello_at = now
                    self._out.append(self._hello)
            return
        assert self._next_tick is not None
        if now < self._next_tick - _EPS:
            return
        self._next_tick += TICK
        if self._next_tick <= now:
            self._next_tick = now + TICK
        machine.tick(now)
        if now >= self._next_keepalive:
            self._next_keepalive = now + KEEPALIVE_INTERVAL
            self._ping(now)
            machine.send_relay(0, KeepAlive(), now)
        self._after_machine(now)
