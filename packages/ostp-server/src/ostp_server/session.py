"""One client session and its relays: TCP streams (Connect) and UDP associations (spec §9.5).

A :class:`Session` owns a :class:`~ostp_proto.ServerConnection` and the relays of its streams.
Relays run as tasks in the server's task group, each inside its own cancel scope so that the
session can end them all. Everything that touches the core runs in the event loop's thread
without awaiting in between, so no locking is needed.

Backpressure, both ways (docs/flow-control.md):

* remote → client: a relay reads its remote socket only while its stream is
  :meth:`~ostp_proto.Connection.stream_writable` (its queue in the core is short and the
  connection as a whole accepts data). With an ostp-py client that negotiated flow control
  the queue drains only within the client's credit for the stream, so a slow reader at the
  client stops only its own remote; the core paces the rest by its congestion window.
* client → remote: bytes for a remote wait in a per-stream queue; what a remote accepted is
  reported to the core (``stream_consumed``), which gives the client credit for more. An
  upstream client (no flow control) is braked session-wide instead: while the session's queued
  total is above ``remote_buffer`` the core drops incoming Data frames unacknowledged
  (``receive_paused``; the client's ARQ sends them again) while ACKs keep flowing. A stream
  whose remote accepts nothing for ``stall_timeout`` while data waits is reset (Close to the
  client), so one stuck remote cannot hold its data for long.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ostp_proto import (
    Close,
    Connect,
    ConnectionTerminated,
    ConnectOk,
    Data,
    DataLost,
    Error,
    HandshakeCompleted,
    LocalProtocolError,
    RelayMessage,
    RelayMessageReceived,
    ServerConnection,
    UdpAssociate,
    UdpData,
)
from ostp_proto.address import format_sockaddr, parse_host_port

if TYPE_CHECKING:
    from .server import KeyStats, Listener, OstpServer

log = logging.getLogger("ostp_server")

GATEWAY_HOST = "10.1.0.1"  # spec §9.5: the client's TUN gateway means the server itself
REMOTE_READ_SIZE = 65536
FLOW_CONTROLLED_BACKSTOP = 8
"""With flow control the client keeps each stream within its window, so ``remote_buffer`` does
not apply; only a total this many times larger (a client ignoring its credit, or very many
large windows at once) brakes the session as for an upstream client."""
WRITE_BATCH = 256 * 1024
UDP_QUEUE_LIMIT = 512  # datagrams from the client waiting to be sent by one association
UDP_RECV_BATCH = 64


def rewrite_gateway(host: str) -> str:
    return "127.0.0.1" if host == GATEWAY_HOST else host


def connect_failure_reason(exc: BaseException) -> str:
    """The text after ``connect failed: `` (spec §9.5), worded as upstream's server words it.

    anyio's ``connect_tcp`` raises "All connection attempts failed" from the attempts' own
    errors; the first of those says what happened. An OS error becomes its standard text and
    number ("Connection refused (os error 111)", Rust's ``io::Error`` display), so that a
    client maps it to the right SOCKS5 reply; a name that did not resolve says so.
    """
    cause: BaseException = exc
    if isinstance(exc.__cause__, BaseExceptionGroup):
        cause = next((e for e in exc.__cause__.exceptions if isinstance(e, OSError)), exc)
    elif isinstance(exc.__cause__, OSError):
        cause = exc.__cause__
    if isinstance(cause, socket.gaierror):
        return f"failed to lookup address information: {cause.strerror or cause}"
    if isinstance(cause, OSError) and isinstance(cause.errno, int) and cause.errno > 0:
        return f"{os.strerror(cause.errno)} (os error {cause.errno})"
    return str(exc) or type(exc).__name__


def stream_failure_reason(exc: BaseException) -> str:
    """A broken remote connection's error as Rust's ``io::Error`` displays it."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and isinstance(cause.errno, int) and cause.errno > 0:
        return f"{os.strerror(cause.errno)} (os error {cause.errno})"
    return str(exc) or "connection broken"


@dataclass(slots=True)
class SessionStats:
    remote_data_drop: int = 0
    """Data for a stream that is not connected (spec §8: dropped)."""
    udp_drop: int = 0
    """UDP datagrams dropped: no association, a full queue, or the client not keeping up."""
    backpressure_drop: int = 0
    """Datagrams dropped before the core because remotes were not draining."""
    streams_opened: int = 0
    streams_reset: int = 0


class Session:
    """A client session: the protocol core, its current address and its relays."""

    def __init__(
        self,
        server: OstpServer,
        conn: ServerConnection,
        addr: tuple[object, ...],
        listener: Listener,
        label: str,
        key_stats: KeyStats,
        now: float,
    ) -> None:
        self.server = server
        self.conn = conn
        self.addr = addr
        self.listener = listener
        self.label = label
        self.key_stats = key_stats
        self.started = now
        self.relays: dict[int, TcpRelay | UdpRelay] = {}
        self.remote_pending = 0
        self.timer: float | None = None
        self.closed = False
        self.stats = SessionStats()
        self._send_waiters: dict[int, anyio.Event] = {}

    @property
    def name(self) -> str:
        return f"{self.conn.session_id:08x}"

    # -- called by relays ----------------------------------------------------------------

    def send(self, stream_id: int, message: RelayMessage) -> None:
        if not self.closed:
            self.conn.send(stream_id, message)

    def send_data(self, stream_id: int, data: bytes) -> None:
        if not self.closed:
            self.conn.send_data(stream_id, data)

    def consumed(self, stream_id: int, n: int) -> None:
        """``n`` bytes of ``stream_id`` were written to its remote (or dropped): credit."""
        if not self.closed and self.conn.stream_consumed(stream_id, n):
            self.flush()  # the WindowUpdate leaves now

    @property
    def receive_backlogged(self) -> bool:
        """True while remotes hold so much unwritten client data that Data must be refused."""
        limit = self.server.config.remote_buffer
        if self.conn.flow_control:
            limit *= FLOW_CONTROLLED_BACKSTOP
        return self.remote_pending > limit

    def flush(self) -> None:
        if not self.closed:
            self.server.flush(self)

    async def wait_stream_writable(self, stream_id: int) -> None:
        """Return once the core takes more data for ``stream_id`` (or the session is gone)."""
        while not self.closed and not self.conn.stream_writable(stream_id):
            event = self._send_waiters.get(stream_id)
            if event is None:
                event = self._send_waiters[stream_id] = anyio.Event()
            await event.wait()

    def after_flush(self) -> None:
        waiters = self._send_waiters
        if not waiters:
            return
        conn = self.conn
        if self.closed:
            for event in waiters.values():
                event.set()
            waiters.clear()
        elif conn.writable:
            for stream_id in list(waiters):
                if conn.stream_writable(stream_id):
                    waiters.pop(stream_id).set()

    def relay_done(self, relay: TcpRelay | UdpRelay) -> None:
        if self.relays.get(relay.stream_id) is relay:
            del self.relays[relay.stream_id]

    # -- events from the core --------------------------------------------------------------

    def handle_events(self) -> str | None:
        """Act on the core's events; the termination reason if the connection ended."""
        conn = self.conn
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, RelayMessageReceived):
                self._on_relay(ev.stream_id, ev.message)
            elif isinstance(ev, ConnectionTerminated):
                return ev.reason
            elif isinstance(ev, DataLost):
                self._data_lost(ev)
            elif isinstance(ev, HandshakeCompleted):
                pass
        return None

    def _data_lost(self, ev: DataLost) -> None:
        """Reset the TCP relays that may have lost client data in the hole, and only those (a
        stream opened after the hole has all its data; a UDP association only lost datagrams,
        which UDP may do)."""
        relays = self.relays
        affected = [
            relay
            for stream_id in sorted(ev.stream_ids)
            if isinstance(relay := relays.get(stream_id), TcpRelay)
        ]
        log.warning(
            "session %s: the client gave up on %d datagrams (nonces %d-%d); "
            "resetting the %d stream(s) open before them",
            self.name,
            ev.count,
            ev.first_nonce,
            ev.last_nonce,
            len(affected),
        )
        for relay in affected:
            relay.reset()

    def _on_relay(self, stream_id: int, message: RelayMessage) -> None:
        relay = self.relays.get(stream_id)
        if isinstance(message, Data):
            if isinstance(relay, TcpRelay) and relay.connected:
                relay.on_data(message.data)
            else:
                self.stats.remote_data_drop += 1
                self.consumed(stream_id, len(message.data))
        elif isinstance(message, UdpData):
            if isinstance(relay, UdpRelay):
                relay.on_datagram(message.address, message.data)
            else:
                self.stats.udp_drop += 1
        elif isinstance(message, Connect):
            self._open(stream_id, TcpRelay(self, stream_id, message.address))
        elif isinstance(message, UdpAssociate):
            self._open(stream_id, UdpRelay(self, stream_id))
        elif isinstance(message, Close):
            if relay is not None:
                relay.on_client_close()
        elif isinstance(message, Error):
            log.debug("session %s stream %d: client error %r", self.name, stream_id, message)
        # ConnectOk, Pong: ignored (spec §8)

    def _open(self, stream_id: int, relay: TcpRelay | UdpRelay) -> None:
        old = self.relays.pop(stream_id, None)
        if old is not None:
            old.cancel()
        if len(self.relays) >= self.server.config.max_streams:
            self.send(stream_id, Error("connect failed: too many streams in this session"))
            return
        self.relays[stream_id] = relay
        self.stats.streams_opened += 1
        self.server.spawn(relay.run)

    def housekeeping(self, now: float) -> None:
        cfg = self.server.config
        for relay in list(self.relays.values()):
            if isinstance(relay, TcpRelay):
                if relay.pending_bytes and now - relay.last_progress > cfg.stall_timeout:
                    log.info(
                        "session %s stream %d: remote accepted nothing for %.0f s; reset",
                        self.name,
                        relay.stream_id,
                        cfg.stall_timeout,
                    )
                    relay.reset()
            elif now - relay.last_activity > cfg.udp_idle_timeout:
                relay.reset()

    def end(self) -> None:
        """Forget every relay (their tasks are cancelled)."""
        self.closed = True
        for relay in list(self.relays.values()):
            relay.cancel()
        self.relays.clear()
        self.after_flush()


class TcpRelay:
    """Stream ``stream_id``: a TCP connection to the Connect target (spec §9.5)."""

    def __init__(self, session: Session, stream_id: int, address: str) -> None:
        self.session = session
        self.stream_id = stream_id
        self.address = address
        self.scope = anyio.CancelScope()
        self.connected = False
        self.pending: deque[bytes] = deque()
        self.pending_bytes = 0
        self.client_closed = False
        self.last_progress = 0.0
        self.remote: anyio.abc.SocketStream | None = None
        self._data_ready: anyio.Event | None = None

    def on_data(self, data: bytes) -> None:
        if not data or self.client_closed:
            self.session.consumed(self.stream_id, len(data))
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes == len(data):
            self.last_progress = self.session.server.clock()
        self.session.remote_pending += len(data)
        self._wake()

    def on_client_close(self) -> None:
        self.client_closed = True
        self._wake()

    def _wake(self) -> None:
        ev = self._data_ready
        if ev is not None:
            self._data_ready = None
            ev.set()

    def reset(self) -> None:
        """Tell the client the stream is closed and drop it."""
        self.session.stats.streams_reset += 1
        if not self.client_closed:
            # An abort: data still waiting for the client's credit is dropped, so the Close
            # cannot be stuck behind it (the client may not be reading this stream at all).
            self.session.conn.forget_stream(self.stream_id)
            self.session.send(self.stream_id, Close())
            self.session.flush()
        self.cancel()

    def cancel(self) -> None:
        self.scope.cancel()
        self._release()
        self.session.relay_done(self)

    def _release(self) -> None:
        self.session.remote_pending -= self.pending_bytes
        self.pending_bytes = 0
        self.pending.clear()

    async def run(self) -> None:
        session = self.session
        try:
            with self.scope:
                remote = await self._connect()
                self.remote = remote
                if remote is None:
                    return
                async with remote, anyio.create_task_group() as tg:
                    tg.start_soon(self._write_loop, remote, tg.cancel_scope)
                    await self._read_loop(remote)
                    tg.cancel_scope.cancel()
        finally:
            self._release()
            session.relay_done(self)

    async def _connect(self) -> anyio.abc.SocketStream | None:
        session = self.session
        try:
            host, port = parse_host_port(self.address, allow_port_zero=True)  # as upstream
            with anyio.fail_after(session.server.config.connect_timeout):
                remote = await anyio.connect_tcp(rewrite_gateway(host), port)
        except TimeoutError:
            reason = "timed out"
        except (OSError, ValueError) as e:
            reason = connect_failure_reason(e)
        else:
            self.connected = True
            self.last_progress = session.server.clock()
            session.send(self.stream_id, ConnectOk())
            session.flush()
            return remote
        log.debug("session %s stream %d: connect failed: %s", session.name, self.stream_id, reason)
        session.send(self.stream_id, Error(f"connect failed: {reason}"))
        session.flush()
        return None

    async def _read_loop(self, remote: anyio.abc.SocketStream) -> None:
        session = self.session
        stream_id = self.stream_id
        while True:
            await session.wait_stream_writable(stream_id)
            if session.closed:
                return
            try:
                data = await remote.receive(REMOTE_READ_SIZE)
            except anyio.EndOfStream:
                break
            except (anyio.BrokenResourceError, OSError) as exc:
                self._broken("read", exc)
                return
            try:
                session.send_data(stream_id, data)
            except LocalProtocolError:
                return
            session.flush()
        if not self.client_closed:  # remote EOF: spec §9.5, Close to the client
            self.client_closed = True
            session.send(stream_id, Close())
            session.flush()

    def _broken(self, what: str, exc: BaseException) -> None:
        """The remote connection failed (reset, timed out): relay Error, not Close, so the
        client resets its side instead of ending the stream as if complete. Upstream sends
        Close here too (spec §9.5); docs/protocol-deviations.md."""
        if self.client_closed:
            return
        self.client_closed = True
        session = self.session
        reason = stream_failure_reason(exc)
        log.debug("session %s stream %d: %s failed: %s", session.name, self.stream_id, what, reason)
        session.send(self.stream_id, Error(f"{what} failed: {reason}"))
        session.flush()

    async def _write_loop(self, remote: anyio.abc.SocketStream, scope: anyio.CancelScope) -> None:
        session = self.session
        pending = self.pending
        try:
            while True:
                if not pending:
                    if self.client_closed:
                        break
                    self._data_ready = anyio.Event()
                    await self._data_ready.wait()
                    continue
                parts = [pending.popleft()]
                size = len(parts[0])
                while pending and size < WRITE_BATCH:
                    parts.append(pending.popleft())
                    size += len(parts[-1])
                await remote.send(b"".join(parts) if len(parts) > 1 else parts[0])
                self.pending_bytes -= size
                session.remote_pending -= size
                self.last_progress = session.server.clock()
                session.consumed(self.stream_id, size)
            # the client closed: everything it sent is written; close the remote
        except anyio.ClosedResourceError:
            if not self.client_closed:
                self.client_closed = True
                session.send(self.stream_id, Close())
                session.flush()
        except (anyio.BrokenResourceError, OSError) as exc:
            self._broken("write", exc)
        scope.cancel()


class UdpRelay:
    """Stream ``stream_id``: a UDP association (spec §9.5) with idle expiry."""

    def __init__(self, session: Session, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.scope = anyio.CancelScope()
        self.queue: deque[tuple[str, bytes]] = deque()
        self.last_activity = session.server.clock()
        self._ready: anyio.Event | None = None
        self._resolved: dict[str, tuple[object, ...]] = {}

    def on_datagram(self, address: str, data: bytes) -> None:
        if len(self.queue) >= UDP_QUEUE_LIMIT:
            self.session.stats.udp_drop += 1
            return
        self.queue.append((address, data))
        self.last_activity = self.session.server.clock()
        ev = self._ready
        if ev is not None:
            self._ready = None
            ev.set()

    def on_client_close(self) -> None:
        self.cancel()

    def reset(self) -> None:
        self.session.send(self.stream_id, Close())
        self.session.flush()
        self.cancel()

    def cancel(self) -> None:
        self.scope.cancel()
        self.queue.clear()
        self.session.relay_done(self)

    async def run(self) -> None:
        session = self.session
        sock: socket.socket | None = None
        try:
            with self.scope:
                try:
                    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    sock.bind(("::", 0))
                except OSError:  # no IPv6: fall back as upstream does
                    if sock is not None:
                        sock.close()
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sock.bind(("0.0.0.0", 0))
                sock.setblocking(False)
                session.send(self.stream_id, ConnectOk())
                session.flush()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._send_loop, sock)
                    await self._receive_loop(sock)
        finally:
            if sock is not None:
                sock.close()
            session.relay_done(self)

    async def _receive_loop(self, sock: socket.socket) -> None:
        session = self.session
        while True:
            await anyio.wait_readable(sock)
            got = False
            for _ in range(UDP_RECV_BATCH):
                try:
                    data, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                self.last_activity = session.server.clock()
                if not session.conn.writable:
                    session.stats.udp_drop += 1
                    continue
                session.send(self.stream_id, UdpData(format_sockaddr(addr), data))
                got = True
            if got:
                session.flush()

    async def _send_loop(self, sock: socket.socket) -> None:
        while True:
            if not self.queue:
                self._ready = anyio.Event()
                await self._ready.wait()
                continue
            address, data = self.queue.popleft()
            target = await self._resolve(address, sock.family)
            if target is None:
                self.session.stats.udp_drop += 1
                continue
            try:
                sock.sendto(data, target)
            except OSError:
                self.session.stats.udp_drop += 1

    async def _resolve(self, address: str, family: int) -> tuple[object, ...] | None:
        cached = self._resolved.get(address)
        if cached is not None:
            return cached
        try:
            host, port = parse_host_port(address, allow_port_zero=True)
            host = rewrite_gateway(host)
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (OSError, ValueError):
            return None
        if not infos:
            return None
        fam, _, _, _, sockaddr = infos[0]  # spec §15: the first resolved address
        ip = str(sockaddr[0])
        if family == socket.AF_INET6 and fam == socket.AF_INET:
            target: tuple[object, ...] = (f"::ffff:{ip}", port, 0, 0)
        elif family == socket.AF_INET and fam == socket.AF_INET6:
            mapped = ipaddress.IPv6Address(ip.split("%", maxsplit=1)[0]).ipv4_mapped
            if mapped is None:
                return None
            target = (str(mapped), port)
        else:
            target = tuple(sockaddr)
        if len(self._resolved) > 256:
            self._resolved.clear()
        self._resolved[address] = target
        return target
