"""A client and a server core joined by a faulty in-memory link with a virtual clock.

Modelled on aioquic's client_and_server()/transfer() and smoltcp's fault injector: every
datagram may be dropped, duplicated, delayed out of order or corrupted, on purpose and
reproducibly (seeded).
"""

from __future__ import annotations

import heapq
import random
from collections import defaultdict
from dataclasses import dataclass, field

from ostp_proto import (
    ClientConnection,
    Connection,
    ConnectionConfig,
    ConnectionTerminated,
    Data,
    DataLost,
    HandshakeCompleted,
    PaddingPolicy,
    RelayMessageReceived,
    ServerAcceptor,
    ServerConnection,
)
from ostp_proto.connection import SERVER_DEFAULTS

KEY = "0123456789abcdef0123456789abcdef"
UNIX_EPOCH = 1_700_000_000.0


@dataclass
class Faults:
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    corrupt: float = 0.0
    drop_first: int = 0
    """Drop this many datagrams at the start of the direction (handshake loss)."""


@dataclass
class Link:
    faults: Faults
    rng: random.Random
    latency: float = 0.01
    queue: list[tuple[float, int, bytes]] = field(default_factory=list)
    sent: int = 0
    blackhole: bool = False
    mtu: int | None = None
    """Largest datagram the path carries (UDP payload bytes); larger ones vanish, as behind a
    link that drops IP fragments."""
    too_big: int = 0
    _seq: int = 0

    def push(self, data: bytes, now: float) -> None:
        self.sent += 1
        f = self.faults
        if self.blackhole:
            return
        if self.mtu is not None and len(data) > self.mtu:
            self.too_big += 1
            return
        if self.sent <= f.drop_first or self.rng.random() < f.loss:
            return
        copies = 2 if self.rng.random() < f.duplicate else 1
        for _ in range(copies):
            delay = self.latency
            if self.rng.random() < f.reorder:
                delay += self.rng.uniform(0.001, 0.03)
            payload = data
            if self.rng.random() < f.corrupt:
                buf = bytearray(data)
                buf[self.rng.randrange(len(buf))] ^= 1 << self.rng.randrange(8)
                payload = bytes(buf)
            self._seq += 1
            heapq.heappush(self.queue, (now + delay, self._seq, payload))

    def next_time(self) -> float | None:
        return self.queue[0][0] if self.queue else None

    def pop_due(self, now: float) -> list[bytes]:
        out = []
        while self.queue and self.queue[0][0] <= now:
            out.append(heapq.heappop(self.queue)[2])
        return out


@dataclass
class Peer:
    received: dict[int, bytearray] = field(default_factory=lambda: defaultdict(bytearray))
    events: list[object] = field(default_factory=list)
    terminated: str | None = None
    lost: int = 0


class Pair:
    """Client, acceptor/server and two links, driven by a virtual clock."""

    def __init__(
        self,
        *,
        c2s: Faults | None = None,
        s2c: Faults | None = None,
        seed: int = 1,
        client_config: ConnectionConfig | None = None,
        server_config: ConnectionConfig | None = None,
        latency: float = 0.01,
        consume: bool = True,
        start: float = 0.0,
    ) -> None:
        rng = random.Random(seed)
        self.consume = consume
        """Report every delivered Data as consumed at once (a reader that keeps up)."""
        self.now = start
        """The virtual clock (``start``: e.g. ``time.monotonic()`` for a core a client
        session drives, which reads that clock)."""
        self.client = ClientConnection(
            access_key=KEY,
            config=client_config or ConnectionConfig(padding=PaddingPolicy.none()),
            random_bytes=rng.randbytes,
        )
        self.acceptor = ServerAcceptor(
            [KEY], config=server_config or SERVER_DEFAULTS, random_bytes=rng.randbytes
        )
        self.server: ServerConnection | None = None
        self.c2s = Link(c2s or Faults(), random.Random(seed + 1), latency)
        self.s2c = Link(s2c or Faults(), random.Random(seed + 2), latency)
        self.cpeer = Peer()
        self.speer = Peer()
        self.client.connect(self.now, UNIX_EPOCH + self.now)

    def _drain(self, conn: Connection, peer: Peer) -> None:
        while (ev := conn.next_event()) is not None:
            peer.events.append(ev)
            if isinstance(ev, RelayMessageReceived) and isinstance(ev.message, Data):
                peer.received[ev.stream_id] += ev.message.data
                if self.consume:
                    conn.stream_consumed(ev.stream_id, len(ev.message.data))
            elif isinstance(ev, ConnectionTerminated):
                peer.terminated = ev.reason
            elif isinstance(ev, DataLost):
                peer.lost += ev.count

    def _flush(self) -> None:
        for d in self.client.datagrams_to_send(self.now):
            self.c2s.push(d, self.now)
        if self.server is not None:
            for d in self.server.datagrams_to_send(self.now):
                self.s2c.push(d, self.now)

    def step(self) -> bool:
        """Advance to the next thing that happens; False when nothing is left to do."""
        self._flush()
        times = [
            t
            for t in (
                self.c2s.next_time(),
                self.s2c.next_time(),
                self.client.get_timer(),
                self.server.get_timer() if self.server else None,
            )
            if t is not None
        ]
        if not times:
            return False
        self.now = max(self.now, min(times))
        for d in self.c2s.pop_due(self.now):
            # as a server shell does: a session's own datagram first, else a new handshake
            if self.server is not None and self.server.matches(d):
                self.server.receive_datagram(d, self.now)
                continue
            fresh = self.acceptor.accept(d, self.now, UNIX_EPOCH + self.now)
            if fresh is not None:
                self.server = fresh
                self.speer = Peer()
        for d in self.s2c.pop_due(self.now):
            self.client.receive_datagram(d, self.now)
        t = self.client.get_timer()
        if t is not None and t <= self.now:
            self.client.handle_timer(self.now)
        if self.server is not None:
            t = self.server.get_timer()
            if t is not None and t <= self.now:
                self.server.handle_timer(self.now)
        self._drain(self.client, self.cpeer)
        if self.server is not None:
            self._drain(self.server, self.speer)
        return True

    def run_until(self, condition: object, limit: float) -> None:
        assert callable(condition)
        while not condition() and self.now < limit:
            if not self.step():
                break

    def handshake(self, limit: float = 10.0) -> None:
        self.run_until(
            lambda: any(isinstance(e, HandshakeCompleted) for e in self.cpeer.events), limit
        )
        assert self.client.established, self.client.stats

    def transfer(self, up: bytes, down: bytes, *, limit: float = 600.0, chunk: int = 65536) -> None:
        """Send ``up`` client→server and ``down`` server→client on stream 1, with backpressure."""
        self.handshake()
        assert self.server is not None
        server = self.server
        offsets = {"up": 0, "down": 0}

        def feed() -> None:
            while offsets["up"] < len(up) and self.client.writable:
                self.client.send_data(1, up[offsets["up"] : offsets["up"] + chunk])
                offsets["up"] += chunk
            while offsets["down"] < len(down) and server.writable:
                server.send_data(1, down[offsets["down"] : offsets["down"] + chunk])
                offsets["down"] += chunk

        def done() -> bool:
            feed()
            return (
                len(self.speer.received[1]) >= len(up) and len(self.cpeer.received[1]) >= len(down)
            ) or bool(self.cpeer.terminated or self.speer.terminated)

        self.run_until(done, limit)
