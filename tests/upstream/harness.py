"""Our ``ClientConnection`` against the upstream-behaviour server core, on a virtual clock.

The world: the client core, two links with a fixed latency and optional drop rules, an optional
model of the client's socket (a kernel buffer of ``capacity`` datagrams that the client drains
at ``rate`` datagrams per second; what does not fit is dropped, as the kernel does), the
upstream server core and fake remotes behind it. A remote answers ``GET <n>\\n`` with ``n``
bytes of a fixed pattern, read in 4,096-byte pieces at ``origin_rate`` bytes per second, so the
upstream core sends them unpaced as it does on loopback (spec §16). The client side acts like
the daemon: it resets the streams a ``DataLost`` names and checks every byte it gets.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from ostp_proto import (
    ClientConnection,
    Close,
    Connect,
    ConnectionConfig,
    ConnectionTerminated,
    ConnectOk,
    Data,
    DataLost,
    Error,
    HandshakeCompleted,
    RelayMessageReceived,
    derive_secrets,
)
from ostp_proto.obfuscation import unmask_data_header

from .core import (
    REMOTE_READ,
    CloseTcp,
    Faults,
    Machine,
    OpenTcp,
    Randomness,
    UpstreamServer,
    WriteTcp,
)

KEY = "0123456789abcdef0123456789abcdef"
UNIX_EPOCH = 1_700_000_000.0
CLIENT_ADDRESS = ("192.0.2.1", 40000)
OBFUSCATION_KEY = derive_secrets(KEY).obfuscation_key
REFUSED = "192.0.2.99:1"  # a target whose connect fails

# A prime period: a missing 4,096-byte piece can never line the pattern up again.
PATTERN_PERIOD = 1_000_003
_BLOCK = random.Random(7).randbytes(PATTERN_PERIOD)
_PATTERN = memoryview(_BLOCK + _BLOCK[: 4 * REMOTE_READ])


def pattern(stream_id: int, offset: int, n: int) -> memoryview:
    """The bytes a remote sends on ``stream_id`` at ``offset`` (n <= 16 KiB)."""
    start = (stream_id * 7919 + offset) % PATTERN_PERIOD
    return _PATTERN[start : start + n]


@dataclass
class StreamRecord:
    opened_at: float
    ok_at: float | None = None
    error: str | None = None
    closed_at: float | None = None
    reset_at: float | None = None
    received: int = 0
    corrupt: bool = False
    after_reset: int = 0
    """Messages that arrived after the stream was reset (dropped, as the daemon does)."""


@dataclass
class SocketModel:
    capacity: int | None = None
    """Datagrams the client's receive buffer holds; more are dropped (None: unbounded)."""
    rate: float | None = None
    """Datagrams the client reads per second (None: as fast as they come)."""


@dataclass
class _Remote:
    token: int
    stream_id: int
    pending: int = 0
    offset: int = 0
    producing: bool = False
    closed: bool = False


DropRule = Callable[[int, bytes], bool]
"""(index of the datagram in its direction, datagram) -> drop it?"""


def drop_first_transmission(nonces: set[int]) -> DropRule:
    """Lose the first copy of each server datagram in ``nonces`` (re-sends get through)."""
    seen: set[int] = set()

    def rule(_index: int, datagram: bytes) -> bool:
        if len(datagram) < 40:
            return False
        nonce = unmask_data_header(OBFUSCATION_KEY, datagram)[1]
        if nonce in nonces and nonce not in seen:
            seen.add(nonce)
            return True
        return False

    return rule


@dataclass
class World:
    latency: float = 0.001
    s2c_drop: DropRule | None = None
    c2s_drop: DropRule | None = None
    socket: SocketModel = field(default_factory=SocketModel)
    faults: Faults = field(default_factory=Faults)
    origin_rate: float = 140e6
    client_config: ConnectionConfig = field(default_factory=ConnectionConfig)
    seed: int = 1

    def __post_init__(self) -> None:
        self.now = 0.0
        self.server = UpstreamServer(
            [KEY],
            unix_offset=UNIX_EPOCH,
            randomness=Randomness(random.Random(self.seed).randbytes),
            faults=self.faults,
        )
        self.client = ClientConnection(
            access_key=KEY,
            config=self.client_config,
            random_bytes=random.Random(self.seed + 1).randbytes,
        )
        self.streams: dict[int, StreamRecord] = {}
        self.lost: list[tuple[float, DataLost, float]] = []
        """(time, event, the client's smoothed RTT then) of every DataLost."""
        self.feed_log: list[tuple[float, int]] = []
        """(time, nonce) of every server datagram the client read once established."""
        self.c2s_log: list[tuple[float, bytes]] = []
        self.terminated: str | None = None
        self.established_at: float | None = None
        self.kernel_drops = 0
        self.s2c_sent = 0
        self.c2s_sent = 0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._remotes: dict[tuple[int, int], _Remote] = {}
        self._socket: deque[bytes] = deque()
        self._reading = False
        self._next_read = 0.0
        self.client.connect(self.now, UNIX_EPOCH)

    # -- plumbing --------------------------------------------------------------------------

    def _at(self, when: float, action: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, action))

    def _flush(self) -> None:
        now = self.now
        for datagram in self.client.datagrams_to_send(now):
            index = self.c2s_sent
            self.c2s_sent += 1
            self.c2s_log.append((now, datagram))
            if self.c2s_drop is not None and self.c2s_drop(index, datagram):
                continue
            self._at(now + self.latency, partial(self._to_server, datagram))
        for datagram, _address in self.server.datagrams_to_send():
            index = self.s2c_sent
            self.s2c_sent += 1
            if self.s2c_drop is not None and self.s2c_drop(index, datagram):
                continue
            self._at(now + self.latency, partial(self._to_client_socket, datagram))
        for effect in self.server.take_effects():
            self._on_effect(effect)

    def _to_server(self, datagram: bytes) -> None:
        self.server.receive_datagram(datagram, CLIENT_ADDRESS, self.now)

    def _to_client_socket(self, datagram: bytes) -> None:
        model = self.socket
        if model.rate is None:
            self._feed_client(datagram)
            return
        if model.capacity is not None and len(self._socket) >= model.capacity:
            self.kernel_drops += 1
            return
        self._socket.append(datagram)
        if not self._reading:
            self._reading = True
            self._at(max(self.now, self._next_read), self._read_one)

    def _read_one(self) -> None:
        assert self.socket.rate is not None
        self._feed_client(self._socket.popleft())
        self._next_read = self.now + 1.0 / self.socket.rate
        if self._socket:
            self._at(self._next_read, self._read_one)
        else:
            self._reading = False

    def _feed_client(self, datagram: bytes) -> None:
        if self.client.established:
            self.feed_log.append((self.now, unmask_data_header(OBFUSCATION_KEY, datagram)[1]))
        self.client.receive_datagram(datagram, self.now)

    def _on_effect(self, effect: OpenTcp | WriteTcp | CloseTcp) -> None:
        if isinstance(effect, OpenTcp):
            self._open_remote(effect)
        elif isinstance(effect, WriteTcp):
            self._write_remote(effect)
        else:
            gone = self._remotes.pop((effect.token, effect.stream_id), None)
            if gone is not None:
                gone.closed = True

    def _open_remote(self, effect: OpenTcp) -> None:
        key = (effect.token, effect.stream_id)
        remote = self._remotes[key] = _Remote(effect.token, effect.stream_id)
        refused = effect.address == REFUSED
        server = self.server

        def opened() -> None:
            if refused:
                server.tcp_failed(remote.token, remote.stream_id, "refused", self.now)
                self._remotes.pop(key, None)
            elif not remote.closed:
                server.tcp_connected(remote.token, remote.stream_id, self.now)

        self._at(self.now + 0.0005, opened)

    def _write_remote(self, effect: WriteTcp) -> None:
        remote = self._remotes.get((effect.token, effect.stream_id))
        if remote is None:
            return
        for line in effect.data.decode().splitlines():
            verb, _, count = line.partition(" ")
            if verb == "GET":
                remote.pending += int(count)
        if remote.pending and not remote.producing:
            remote.producing = True
            self._at(self.now, partial(self._produce, remote))

    def _produce(self, remote: _Remote, burst: int = 8) -> None:
        """Remote reads: ``burst`` pieces of 4,096 bytes, then the time they take at the rate."""
        if remote.closed:
            return
        sent = 0
        while remote.pending and sent < burst * REMOTE_READ:
            n = min(REMOTE_READ, remote.pending)
            piece = bytes(pattern(remote.stream_id, remote.offset, n))
            self.server.tcp_data(remote.token, remote.stream_id, piece, self.now)
            remote.offset += n
            remote.pending -= n
            sent += n
        if remote.pending:
            self._at(self.now + sent / self.origin_rate, partial(self._produce, remote))
        else:
            remote.producing = False

    def _drain_client(self) -> None:
        client = self.client
        while (event := client.next_event()) is not None:
            if isinstance(event, RelayMessageReceived):
                self._on_message(event.stream_id, event.message)
            elif isinstance(event, DataLost):
                self.lost.append((self.now, event, client.smoothed_rtt))
                ids = getattr(event, "stream_ids", None)  # older cores named no streams
                for stream_id in list(self.streams) if ids is None else ids:
                    record = self.streams.get(stream_id)
                    if record is not None and record.reset_at is None:
                        record.reset_at = self.now
                        client.send(stream_id, Close())
            elif isinstance(event, HandshakeCompleted):
                self.established_at = self.now
            elif isinstance(event, ConnectionTerminated):
                self.terminated = event.reason

    def _on_message(self, stream_id: int, message: object) -> None:
        record = self.streams.get(stream_id)
        if record is None:
            return
        if record.reset_at is not None:
            record.after_reset += 1
        elif isinstance(message, Data):
            data = message.data
            if pattern(stream_id, record.received, len(data)) != data:
                record.corrupt = True
            record.received += len(data)
        elif isinstance(message, ConnectOk):
            record.ok_at = self.now
        elif isinstance(message, Error):
            record.error = message.message
        elif isinstance(message, Close):
            record.closed_at = self.now

    # -- driving ---------------------------------------------------------------------------

    def step(self) -> bool:
        """Advance to the next thing that happens; False when nothing is left."""
        self._flush()
        times = [
            t
            for t in (
                self._heap[0][0] if self._heap else None,
                self.client.get_timer(),
                self.server.get_timer(),
            )
            if t is not None
        ]
        if not times:
            return False
        self.now = max(self.now, min(times))
        heap = self._heap
        while heap and heap[0][0] <= self.now:
            heapq.heappop(heap)[2]()
            self._drain_client()
        t = self.client.get_timer()
        if t is not None and t <= self.now:
            self.client.handle_timer(self.now)
        t = self.server.get_timer()
        if t is not None and t <= self.now:
            self.server.handle_timer(self.now)
        self._drain_client()
        return True

    def run_until(self, condition: Callable[[], bool], limit: float) -> bool:
        """Run until ``condition()`` or the virtual clock reaches ``limit``; the condition."""
        still = 0
        while not condition() and self.now < limit:
            before = self.now
            if not self.step():
                break
            still = still + 1 if self.now == before else 0
            assert still < 200_000, "the cores keep asking for the same instant"
        self._flush()
        return condition()

    def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        self.run_until(lambda: False, end)

    def handshake(self) -> None:
        assert self.run_until(lambda: self.client.established, 10.0), self.client.stats

    def open(self, stream_id: int, address: str = "192.0.2.10:80") -> StreamRecord:
        """Send Connect on ``stream_id`` now (the daemon's SOCKS CONNECT)."""
        record = self.streams[stream_id] = StreamRecord(opened_at=self.now)
        self.client.send(stream_id, Connect(address))
        return record

    def get(self, stream_id: int, n: int) -> None:
        """Ask the remote of ``stream_id`` for ``n`` bytes."""
        self.client.send(stream_id, Data(b"GET %d\n" % n))

    def connect(self, stream_id: int, limit: float = 5.0) -> StreamRecord:
        """Open ``stream_id`` and wait for its ConnectOk (``limit`` seconds of virtual time)."""
        record = self.open(stream_id)
        deadline = self.now + limit
        self.run_until(lambda: record.ok_at is not None or record.reset_at is not None, deadline)
        return record

    # -- what the tests look at ------------------------------------------------------------

    def born(self, last_nonce: int) -> float:
        """When ``last_nonce`` or a datagram after it first reached the client (whether it
        kept it or not): the peer had sent every nonce up to ``last_nonce`` by then."""
        return min(t for t, n in self.feed_log if n >= last_nonce)

    @property
    def machine(self) -> Machine:
        """The upstream machine of the (only) session."""
        [session] = self.server.sessions.values()
        return session.machine

    def remote_open(self, token: int, stream_id: int) -> bool:
        """True while the fake remote of (session ``token``, ``stream_id``) is connected."""
        return (token, stream_id) in self._remotes

    def nacks(self) -> list[tuple[float, int]]:
        """(time, nonce) of every NACK the upstream core received, over all sessions."""
        out: list[tuple[float, int]] = []
        for session in self.server.sessions.values():
            out += session.machine.stats.nacks_received
        return sorted(out)
