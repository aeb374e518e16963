"""The TCP side of the server: xHTTP ``/stream`` and ``/wss``, Reality, and the real site behind
them (spec §10.6).

Every listen address gets a TCP listener on the same port as its UDP socket. Each accepted
connection is one task: the per-IP admission limit (10 per 10 s, as upstream), then the opening
(:class:`~ostp_proto.transport.StreamAcceptor`, bounded in bytes and time), then either

* an OSTP client: its datagrams go through the same dispatch as UDP datagrams, keyed by the TCP
  peer (``(host, port, "tcp")``), and the session's replies are written to this connection
  (its :class:`~ostp_server.server.Listener` has ``tcp`` set); the session's ARQ runs with
  ``reliable_transport`` so it never retransmits into TCP; or
* anything else (a probe, a browser, a bad token, a Reality hello that does not authenticate,
  a replay): relayed byte for byte, the bytes already read included, to ``reality.dest`` so the
  prober talks to the real site; without ``dest`` upstream's ``404`` (HTTP) or a plain close
  (TLS).

A slow or silent peer only ever holds its own task: reads and writes are per connection,
buffers are bounded, and the opening has a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ostp_proto import LocalProtocolError, RemoteProtocolError
from ostp_proto.address import format_host_port, format_sockaddr
from ostp_proto.transport import (
    DatagramStream,
    RealityAcceptor,
    StreamAccepted,
    StreamAcceptor,
    StreamRefused,
)

from .config import ServerConfig

if TYPE_CHECKING:
    from .server import Listener, OstpServer
    from .session import Session

log = logging.getLogger("ostp_server")

READ_SIZE = 65536
OUT_BUFFER_LIMIT = 64 << 20  # a peer that reads nothing while this much waits is dropped
BACKLOG = 512
FORWARD_CONNECT_TIMEOUT = 10.0


# ------------------------------------------------------------------------------ admission


class ConnectionRateLimiter:
    """Upstream's per-IP admission limit: at most ``limit`` connections in a fixed window that
    opens with an address's first connection; refused attempts count too."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._windows: dict[str, tuple[int, float]] = {}
        self._last_prune = 0.0

    @staticmethod
    def canonical(host: str) -> str:
        host = host.split("%", 1)[0]
        if host.startswith("::ffff:") and "." in host:
            return host[7:]
        return host

    def allow(self, host: str, now: float) -> bool:
        if self.limit <= 0:
            return True
        if now - self._last_prune >= 6 * self.window:
            # a scan from many addresses cannot grow the table without bound
            self._windows = {ip: w for ip, w in self._windows.items() if now - w[1] < self.window}
            self._last_prune = now
        ip = self.canonical(host)
        count, start = self._windows.get(ip, (0, now))
        if now - start >= self.window:
            count, start = 0, now
        count += 1
        self._windows[ip] = (count, start)
        return count <= self.limit


@dataclass(slots=True)
class TcpStats:
    connections: int = 0
    rate_limited: int = 0
    accepted_stream: int = 0
    accepted_wss: int = 0
    accepted_reality: int = 0
    forwarded: int = 0
    """Connections relayed to ``dest`` (not OSTP, or not ours)."""
    not_found: int = 0
    """Connections answered with upstream's 404 (no ``dest``)."""
    closed_unanswered: int = 0
    handshake_timeouts: int = 0
    protocol_errors: int = 0
    """Framing, record or WebSocket errors after the opening (the connection is closed)."""
    out_overflow: int = 0
    send_drop: int = 0
    """Datagrams for a session whose TCP connection had already ended."""
    refusals: dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------ listeners


def open_tcp_listener(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def build_reality(config: ServerConfig) -> RealityAcceptor | None:
    reality = config.reality_enabled
    if reality is None:
        return None
    assert reality.short_id is not None
    return RealityAcceptor(
        private_key=reality.private_key_bytes,
        short_ids=[bytes.fromhex(reality.short_id)],
        server_names=reality.server_names,
    )


class TcpFront:
    """The TCP listeners of one server and the connections they accepted."""

    def __init__(self, server: OstpServer) -> None:
        self.server = server
        cfg = server.config
        self.limiter = ConnectionRateLimiter(cfg.tcp_rate_limit, cfg.tcp_rate_window)
        self.reality = build_reality(cfg)
        reality = cfg.reality_enabled
        self.dest = reality.dest_address if reality is not None else None
        self.keys = [k.encode() for k in cfg.key_strings()]
        self.sockets: list[socket.socket] = []
        self.addresses: list[tuple[str, int]] = []
        self.stats = TcpStats()

    def bind(self, host: str, port: int) -> None:
        sock = open_tcp_listener(host, port)
        self.sockets.append(sock)
        bound = sock.getsockname()
        self.addresses.append((str(bound[0]), int(bound[1])))

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()

    def purge(self, unix_now: float) -> None:
        if self.reality is not None:
            self.reality.replay.purge(unix_now)

    async def accept_loop(self, sock: socket.socket) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                await anyio.wait_readable(sock)
                for _ in range(64):
                    try:
                        conn, addr = sock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                            log.warning("tcp accept: %s; pausing", e.strerror)
                            await anyio.sleep(0.1)
                        break
                    self.stats.connections += 1
                    if not self.limiter.allow(str(addr[0]), self.server.clock()):
                        self.stats.rate_limited += 1
                        log.debug("tcp %s: over the connection limit", format_sockaddr(addr))
                        conn.close()
                        continue
                    tg.start_soon(TcpConnection(self, conn, addr).run)

    def refused(self, reason: str) -> None:
        key = reason.split(":", 1)[0]
        if len(self.stats.refusals) < 64 or key in self.stats.refusals:
            self.stats.refusals[key] = self.stats.refusals.get(key, 0) + 1


# ---------------------------------------------------------------------------- connections


class TcpConnection:
    """One accepted TCP connection, from the opening to its end."""

    def __init__(self, front: TcpFront, sock: socket.socket, addr: tuple[object, ...]) -> None:
        self.front = front
        self.server = front.server
        self.sock = sock
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = addr
        self.address = (str(addr[0]), int(str(addr[1])))
        self.key: tuple[object, ...] = (*self.address, "tcp")
        self.codec: DatagramStream | None = None
        self.listener: Listener | None = None
        self.closed = False
        self._out = bytearray()
        self._out_ready: anyio.Event | None = None
        self._scope = anyio.CancelScope()

    @property
    def name(self) -> str:
        return format_sockaddr(self.peer)

    # -- called by the server (no await) -------------------------------------------------

    def send_datagrams(self, datagrams: list[bytes]) -> int:
        """Queue a session's datagrams for this connection; bytes queued (0 once closed)."""
        codec = self.codec
        if self.closed or codec is None:
            self.front.stats.send_drop += len(datagrams)
            return 0
        try:
            wire = codec.encode(datagrams)
        except LocalProtocolError:  # a datagram over 65,535 bytes cannot be framed
            self.front.stats.send_drop += len(datagrams)
            return 0
        self._queue(wire)
        self.server.stats.datagrams_sent += len(datagrams)
        return sum(len(d) for d in datagrams)

    def _queue(self, wire: bytes) -> None:
        if not wire:
            return
        self._out += wire
        if len(self._out) > OUT_BUFFER_LIMIT:
            # The peer has read nothing for a long time: never grow without bound.
            self.front.stats.out_overflow += 1
            log.info("tcp %s: the peer reads nothing; closing", self.name)
            self.closed = True
            self._scope.cancel()
            return
        ev = self._out_ready
        if ev is not None:
            self._out_ready = None
            ev.set()

    # -- the task --------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            with self._scope:
                accepted = await self._open()
                if accepted is not None:
                    await self._serve(accepted)
        except Exception:  # one connection's failure never ends the server
            log.exception("tcp %s: unexpected error", self.name)
        finally:
            self.closed = True
            self.sock.close()
        await self._after_close()

    async def _recv(self) -> bytes:
        while True:
            await anyio.wait_readable(self.sock)
            try:
                return self.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                continue

    async def _send_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                await anyio.wait_writable(self.sock)
                continue
            view = view[n:]

    async def _open(self) -> StreamAccepted | None:
        front = self.front
        acceptor = StreamAcceptor(front.keys, front.reality)
        verdict: StreamAccepted | StreamRefused | None = None
        with anyio.move_on_after(self.server.config.tcp_handshake_timeout):
            while verdict is None:
                try:
                    data = await self._recv()
                except OSError:
                    return None
                if not data:
                    if acceptor.received:
                        verdict = acceptor.timed_out()  # EOF mid-request: as if it stalled
                        break
                    front.stats.closed_unanswered += 1
                    return None
                verdict = acceptor.receive(data, self.server.unix_clock())
                out = acceptor.data_to_send()
                if out:
                    await self._send_all(out)
        if verdict is None:
            front.stats.handshake_timeouts += 1
            verdict = acceptor.timed_out()
        if isinstance(verdict, StreamAccepted):
            out = acceptor.data_to_send()
            if out:
                await self._send_all(out)
            return verdict
        await self._refuse(verdict)
        return None

    async def _refuse(self, verdict: StreamRefused) -> None:
        front = self.front
        front.refused(verdict.reason)
        log.debug("tcp %s: %s", self.name, verdict.reason)
        if verdict.forwardable and front.dest is not None:
            front.stats.forwarded += 1
            await self._forward(verdict.received, front.dest)
            return
        answer = verdict.answer
        if answer:
            front.stats.not_found += 1
            with contextlib.suppress(OSError):
                await self._send_all(answer)
        else:
            front.stats.closed_unanswered += 1

    async def _forward(self, received: bytes, dest: tuple[str, int]) -> None:
        """Relay this connection to the real site, the bytes already read first."""
        try:
            with anyio.fail_after(FORWARD_CONNECT_TIMEOUT):
                remote = await anyio.connect_tcp(dest[0], dest[1])
        except (OSError, TimeoutError) as e:
            log.info("tcp %s: cannot reach dest %s: %s", self.name, format_host_port(*dest), e)
            return
        async with remote, anyio.create_task_group() as tg:
            if received:
                await remote.send(received)

            async def down() -> None:
                try:
                    while True:
                        chunk = await remote.receive(READ_SIZE)
                        await self._send_all(chunk)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    pass
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_WR)

            async def down_then_close() -> None:
                await down()
                tg.cancel_scope.cancel()  # the site closed: so do we, as a proxy would

            tg.start_soon(down_then_close)
            try:
                while True:
                    chunk = await self._recv()
                    if not chunk:
                        break
                    await remote.send(chunk)
                with contextlib.suppress(OSError, anyio.BrokenResourceError):
                    await remote.send_eof()
            except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
                tg.cancel_scope.cancel()

    async def _serve(self, accepted: StreamAccepted) -> None:
        front = self.front
        server = self.server
        if accepted.reality is not None:
            front.stats.accepted_reality += 1
        elif accepted.framing.value == "wss":
            front.stats.accepted_wss += 1
        else:
            front.stats.accepted_stream += 1
        log.debug("tcp %s: %s client", self.name, accepted.framing.value)
        self.codec = DatagramStream(accepted.framing, client=False, records=accepted.reality)
        self.listener = server.tcp_listener(self)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._writer)
            try:
                going = True
                if accepted.leftover:
                    going = self._deliver(accepted.leftover, plaintext=True)
                while going and not self.closed:
                    data = await self._recv()
                    if not data:
                        break
                    going = self._deliver(data)
            except RemoteProtocolError as e:
                front.stats.protocol_errors += 1
                log.debug("tcp %s: %s; closing", self.name, e)
            except OSError:
                pass
            if self._out and not self.closed:
                with anyio.move_on_after(1.0), contextlib.suppress(OSError):
                    await self._send_all(bytes(self._out))  # e.g. the answer to a close
            tg.cancel_scope.cancel()

    def _deliver(self, data: bytes, *, plaintext: bool = False) -> bool:
        """Feed what the peer sent to the sessions; False once the peer said goodbye."""
        codec = self.codec
        assert codec is not None and self.listener is not None
        datagrams = codec.receive_plaintext(data) if plaintext else codec.receive(data)
        reply = codec.data_to_send()
        if reply:
            self._queue(reply)
        if not datagrams:
            return not codec.closed  # a WebSocket close: answered above, then we are done
        server = self.server
        now = server.clock()
        unix = server.unix_clock()
        touched: dict[Session, None] = {}
        # As over UDP: while the session's remotes hold too much, its core refuses Data
        # (unacknowledged) but keeps taking ACKs, so its own sending never stalls behind the
        # pause; on resume a NACK makes the client send everything refused again at once.
        for d in datagrams:
            server._dispatch(d, self.key, self.listener, now, unix, touched)
        for s in touched:
            server._process(s)
        return not codec.closed

    async def _writer(self) -> None:
        try:
            while True:
                if not self._out:
                    self._out_ready = ev = anyio.Event()
                    await ev.wait()
                    continue
                data = bytes(self._out)
                self._out.clear()
                await self._send_all(data)
        except OSError:
            self.closed = True
            self._scope.cancel()

    async def _after_close(self) -> None:
        """The session that was on this connection waits for the client to come back (it may
        continue the session on a new connection, as upstream allows) and then ends."""
        listener = self.listener
        if listener is None:
            return
        server = self.server
        session = server.session_at(self.key)
        if session is None or session.closed or session.listener is not listener:
            return
        grace = server.config.tcp_resume_grace
        if grace > 0:
            log.debug(
                "tcp %s: connection ended; session %s waits %.0f s", self.name, session.name, grace
            )
            await anyio.sleep(grace)
        if not session.closed and session.listener is listener:
            server._end_session(session, "its TCP connection ended")
