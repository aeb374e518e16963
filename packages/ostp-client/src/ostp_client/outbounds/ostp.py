"""The `ostp` outbound: a pool of OSTP sessions to one server, each on its own UDP socket.

Each session is an :class:`ostp_proto.ClientConnection` driven by one task: read every datagram
the socket has, feed the core, dispatch its events to streams, send what it produced, sleep
until its timer or the socket is readable. Streams write straight into the core and flush at
once, so no task or queue hop sits on the data path. A session that stops for any reason is
re-established after a fixed back-off, forever, until the daemon stops (spec §10.2); the streams
it carried are reset cleanly.

Flow control (docs/flow-control.md): every stream buffers what arrives for it and tells the core
what its local reader took (``stream_consumed``); with an ostp-py server the server sends a
stream no more than its window, so a slow or stopped reader holds only its own data. Towards an
upstream server (no extension) the session keeps reading its socket and only when all its
streams together buffer ``receive_buffer_cap`` does it refuse Data (``receive_paused``).
A stream that sends waits for its own writability (its queue in the core, the server's credit).

NAT traversal (the outbound's ``nat`` block) puts STUN Binding and TURN relaying on the same
socket: a session that talks to a STUN or TURN server keeps its socket unconnected and sorts what
it reads with a :class:`~ostp_client.nat.NatMux` (:class:`_NatSocket`); every other session keeps
the connected socket with GSO/GRO batching. Mode ``auto`` starts direct and relays the next
attempt when a handshake gets no answer; it tries direct again when the relay fails, when a
relayed handshake gets no answer, or at the first new session ``retry_direct_after`` seconds after
it fell back (a working relayed session is never interrupted to probe).
"""

from __future__ import annotations

import errno
import logging
import math
import random
import socket
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import anyio
import anyio.abc
from anyio.abc import TaskStatus

from ostp_client.config import REALITY_DEFAULT_SNI, OstpOutboundConfig
from ostp_client.flow import (
    Address,
    ConnContext,
    ConnectTimeout,
    GeneralFailure,
    Outbound,
    OutboundError,
    UdpOutboundSession,
)
from ostp_client.nat import (
    AllocationSucceeded,
    BindingFailed,
    BindingSucceeded,
    NatConfig,
    NatMux,
    RelayReady,
    TurnClosed,
    TurnConfig,
    TurnFailed,
    TurnRefreshed,
)
from ostp_client.nat.stun import CHANNEL_DATA_HEADER
from ostp_client.net.batch import BatchSocket, SocketBuffers, first_hop_payload, udp_overhead
from ostp_client.outbounds import OutboundContext, register_outbound
from ostp_client.outbounds.connect_errors import error_from_reason
from ostp_client.transport import DatagramTransport, TransportError
from ostp_client.transport.stream import RealityOptions, StreamOptions, StreamTransport, open_stream
from ostp_client.transport.udp import SOCKET_BUFFER, UdpTransport, open_udp_socket
from ostp_client.transport.udp import NatSocket as _NatSocket
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
    ExtensionsNegotiated,
    HandshakeCompleted,
    PaddingPolicy,
    PmtudConfig,
    RelayMessageReceived,
    State,
    UdpAssociate,
    UdpData,
)
from ostp_proto.pmtud import BASE_PLPMTU
from ostp_proto.transport import Framing

__all__ = ["NatOptions", "OstpOutbound", "SessionState", "TransportMode"]

logger = logging.getLogger(__name__)

RECONNECT_DELAY = 5.0  # spec §10.2: fixed back-off, no cap on attempts
RECEIVE_BUFFER_CAP = 64 * 1024 * 1024
"""Bytes buffered for all streams of one session (slow local readers) above which the session
takes no more Data: dropped unacknowledged, asked for again once the readers have caught up
(``ClientConnection.receive_paused``); ACKs keep flowing both ways. With an ostp-py server
each stream's window bounds its buffer long before; an upstream server has no flow control and
gives up on frames refused for about 1.5 s (spec §7.2, §16), so the cap is generous."""
STREAM_WINDOW = 256 * 1024
"""Initial receive window per stream offered to an ostp-py server; it grows for fast readers."""
STREAM_DATAGRAM_SIZE = 32 * 1024
"""Data datagrams over the TCP transports, where there is no IP fragmentation to avoid: the
per-datagram work, not the bytes, bounds a Python tunnel. Uploads over /stream on loopback
(bench/transports_bench.py): 77 MB/s with UDP-sized datagrams, 142 with 4 KB, 209-226 with
16 KB, 251 with 32 KB, 248 with 60,000 bytes. ``auto`` keeps the UDP size on TCP too, since its
session may move back to UDP at any time (docs/protocol-deviations.md)."""
STREAM_HANDSHAKE_TIMEOUT = 4.0  # spec §10.1: over TCP a single attempt with a 4,000 ms limit
RESUME_MIN_INTERVAL = 2.0
"""A TCP connection that dies within this many seconds of the previous one ends the session
instead of being replaced again (a server refusing us must not cause a connection storm)."""


TURN_OVERHEAD = CHANNEL_DATA_HEADER + 3  # RFC 8656 §12.4 header, §12.5 padding to 4 bytes
HANDSHAKE_TIMED_OUT = "handshake timed out"  # ostp_proto's ConnectionTerminated reason prefix
RTT_SHOWN_GRACE = 1.0
"""The RTT shown is the latest sample if it is at most ``keepalive_interval`` plus this old
(a Pong answers each keepalive Ping within a round trip); older, none is shown."""
SILENT_PING_INTERVALS = 3
"""A session whose keepalive Pings got no answer for this many intervals is replaced."""
UNANSWERED_CONNECTS = 2
"""A session on which this many Connects in a row (none answered in between) got no ConnectOk
within ``connect_timeout`` while datagrams kept arriving is replaced. One is not enough: a
target that swallows SYNs keeps our own server from answering for its 10 s connect timeout."""

_buffer_warning_given = False  # one warning per process, however many sessions are capped


def _check_buffers(tag: str, buffers: SocketBuffers) -> None:
    """Warn once if the kernel capped the socket buffers below what was asked for."""
    global _buffer_warning_given
    if not buffers.capped:
        return
    if _buffer_warning_given:
        logger.debug("%s: socket receive buffer capped at %d bytes", tag, buffers.receive)
        return
    _buffer_warning_given = True
    size = buffers.requested
    logger.warning(
        "%s: the kernel capped the UDP socket buffers at %.1f MiB (asked for %.1f MiB); a server "
        "that sends unpaced (upstream's) overruns them and the kernel drops datagrams "
        "(kernel_drops in `ostp-client ctl status`). Raise the limit as root: "
        "sysctl -w net.core.rmem_max=%d net.core.wmem_max=%d (or give the daemon CAP_NET_ADMIN)",
        tag,
        buffers.receive / 2**20,
        size / 2**20,
        size,
        size,
    )


class SessionState:
    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"


class TransportMode:
    UDP = "udp"
    TCP = "tcp"
    WSS = "wss"
    AUTO = "auto"


PROBE_BACKOFF = 8
"""``auto``: the interval between UDP probes doubles while they fail, up to this many times
``auto_probe_interval``."""


class NatMode:
    DIRECT = "direct"
    TURN = "turn"
    AUTO = "auto"


@dataclass(frozen=True, slots=True)
class NatOptions:
    """The NAT traversal of one outbound, host names still unresolved."""

    mode: str = NatMode.DIRECT
    """``direct``, ``turn`` or ``auto``."""
    stun: tuple[tuple[str, int], ...] = ()
    """STUN servers asked for the mapped address at the start of every session."""
    turn: TurnConfig | None = None
    """The TURN server (``server`` may be a host name; it is resolved for every session)."""
    retry_direct_after: float = 600.0
    """``auto``: seconds after a fallback to TURN before a new session tries direct again."""


def _fmt(address: tuple[Any, ...] | None) -> str | None:
    if address is None:
        return None
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _error_from_text(text: str) -> OutboundError:
    """Map the server's ``connect failed: <reason>`` text to an OutboundError (spec §9.5)."""
    return error_from_reason(text)


async def _resolve(host: str, port: int, family: int) -> tuple[str, int]:
    """The first address of ``host`` in ``family`` (literal IPs pass through)."""
    try:
        infos = await anyio.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise OSError(errno.EHOSTUNREACH, f"cannot resolve {host}: {exc.strerror}") from None
    if not infos:
        raise OSError(errno.EHOSTUNREACH, f"cannot resolve {host}")
    sockaddr = infos[0][4]
    return str(sockaddr[0]), int(sockaddr[1])


class _Channel:
    """What a stream id is bound to inside a session: a TCP stream or a UDP association."""

    def __init__(self, session: _Session, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.connected = anyio.Event()
        self.error: OutboundError | None = None
        self.closed = False
        self.readable = anyio.Event()

    def on_message(self, message: object) -> None:
        raise NotImplementedError

    def reset(self, reason: str) -> None:
        raise NotImplementedError


class OstpStream(_Channel, anyio.abc.ByteStream):
    """A TCP connection through the tunnel (relay Connect/Data/Close on one stream id)."""

    def __init__(self, session: _Session, stream_id: int, ctx: ConnContext) -> None:
        super().__init__(session, stream_id)
        self._chunks: deque[bytes] = deque()
        self.buffered = 0
        """Bytes received for the local reader and not yet taken by it."""
        self._eof = False
        self._reset: str | None = None
        self.ctx = ctx

    # -- from the session --------------------------------------------------------------------

    def on_message(self, message: object) -> None:
        if isinstance(message, Data):
            if self._eof:
                return
            self._chunks.append(message.data)
            self.buffered += len(message.data)
            self.session.buffered += len(message.data)
            self.connected.set()  # the first Data may race ahead of ConnectOk (spec §9.5)
            self.readable.set()
        elif isinstance(message, ConnectOk):
            self.connected.set()
            self.session.connect_answered()
        elif isinstance(message, Error):
            if not self.connected.is_set():
                self.session.connect_answered()
                self.error = _error_from_text(message.message)
                self.connected.set()
            elif self._reset is None:
                # not an orderly end (that is Close): the local side must see a reset
                self._reset = f"the server reported an error: {message.message}"
            self._finish()
        elif isinstance(message, Close):
            self._finish()

    def _finish(self) -> None:
        self._eof = True
        self.readable.set()
        self.session.unbind(self.stream_id)

    def reset(self, reason: str) -> None:
        self._reset = reason
        if not self.connected.is_set():
            self.error = GeneralFailure(reason)
            self.connected.set()
        self._finish()

    # -- ByteStream ------------------------------------------------------------------------

    async def receive(self, max_bytes: int = 65536) -> bytes:
        while not self._chunks:
            if self._eof:
                if self._reset is not None:
                    raise anyio.BrokenResourceError(self._reset)
                raise anyio.EndOfStream
            if self.closed:
                raise anyio.ClosedResourceError
            self.readable = anyio.Event()
            await self.readable.wait()
        # Hand over everything queued at once (up to max_bytes): one local write per batch of
        # datagrams instead of one per relay message.
        chunks = self._chunks
        chunk = chunks.popleft()
        if chunks and len(chunk) < max_bytes:
            parts = [chunk]
            size = len(chunk)
            while chunks and size + len(chunks[0]) <= max_bytes:
                nxt = chunks.popleft()
                parts.append(nxt)
                size += len(nxt)
            chunk = b"".join(parts)
        if len(chunk) > max_bytes:
            chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self.buffered -= len(chunk)
        self.session.consumed(self.stream_id, len(chunk))
        return chunk

    async def send(self, item: bytes) -> None:
        if self.closed or self._eof:
            raise anyio.ClosedResourceError if self.closed else anyio.BrokenResourceError
        await self.session.send_data(self.stream_id, item)

    async def send_eof(self) -> None:
        # OSTP has no half-close: Close ends the remote connection both ways (spec §8).
        self._close_remote()

    def _close_remote(self) -> None:
        if not self._eof:
            self._eof = True
            self.session.send_message(self.stream_id, Close())
            self.session.unbind(self.stream_id)
            self.readable.set()  # nothing comes after Close: a waiting receive() ends now

    async def aclose(self) -> None:
        if self.closed:
            return
        self._close_remote()
        self.closed = True
        self.session.buffered -= self.buffered
        self.buffered = 0
        self._chunks.clear()
        self.readable.set()


class OstpUdpSession(_Channel, UdpOutboundSession):
    """A UDP association through the tunnel (relay UdpAssociate/UdpData on one stream id)."""

    QUEUE_LIMIT = 256

    def __init__(self, session: _Session, stream_id: int) -> None:
        super().__init__(session, stream_id)
        self._queue: deque[tuple[Address, bytes]] = deque()
        self._ended = False

    def on_message(self, message: object) -> None:
        if isinstance(message, UdpData):
            if len(self._queue) >= self.QUEUE_LIMIT:
                return  # UDP: drop rather than grow
            try:
                source = Address.parse(message.address)
            except ValueError:
                return
            self._queue.append((source, message.data))
            self.readable.set()
        elif isinstance(message, ConnectOk):
            self.connected.set()
        elif isinstance(message, (Close, Error)):
            self.reset("association closed by the server")

    def reset(self, reason: str) -> None:
        self._ended = True
        self.connected.set()
        self.readable.set()
        self.session.unbind(self.stream_id)

    async def send_to(self, target: Address, data: bytes) -> None:
        if self._ended or self.closed:
            raise GeneralFailure("UDP association is closed")
        self.session.send_message(self.stream_id, UdpData(str(target), data))

    async def receive(self) -> tuple[Address, bytes]:
        while not self._queue:
            if self._ended or self.closed:
                raise anyio.EndOfStream
            self.readable = anyio.Event()
            await self.readable.wait()
        return self._queue.popleft()

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self._ended:
            self.session.send_message(self.stream_id, Close())
        self.reset("closed")


class _Session:
    """One OSTP session: one datagram transport at a time, one ClientConnection, one driving
    task (and, on TCP, the transport's writer and ``auto``'s UDP probe beside it)."""

    def __init__(self, outbound: OstpOutbound, index: int) -> None:
        self.outbound = outbound
        self.index = index
        self.state = SessionState.IDLE
        self.conn: ClientConnection | None = None
        self.transport: DatagramTransport | None = None
        self.mux: NatMux | None = None
        self.path: str | None = None
        """How the current attempt reaches the server: ``direct`` or ``turn``."""
        self.mapped_address: tuple[str, int] | None = None
        self.relayed_address: tuple[str, int] | None = None
        self.turn_refreshes = 0
        self._relay = False
        """``auto``: the next attempt goes through TURN."""
        self._relay_since = 0.0
        self._retry_now = False
        self._replacing: str | None = None
        """Why the current connection is being replaced by a fresh handshake (session health)."""
        self._unanswered = 0
        """Connects in a row that timed out while datagrams arrived (no answer in between)."""
        self.replacements = 0
        self._paused_at = -math.inf
        """The last time the session refused Data (its Pongs were refused too)."""
        self._warned: set[str] = set()
        self.channels: dict[int, _Channel] = {}
        self.buffered = 0
        self.connected_at: float | None = None
        self.reconnects = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.earlier_drops = 0
        """Kernel drops of this session's earlier sockets (the counter is per socket)."""
        self.last_error: str | None = None
        self.session_id: int | None = None
        self._sleep: anyio.CancelScope | None = None
        self._sleep_until = math.inf
        self._send_waiters: dict[int, anyio.Event] = {}
        """Streams waiting for the core to take more of their data, by stream id."""
        self.connected_event = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        """The current attempt's task group (the TCP writer, the UDP probe)."""
        self.transport_switches = 0
        """Times the session moved to another transport (or a new TCP connection) while live."""
        self._resumed_at = -math.inf
        self._switched_at = -math.inf
        """When the session last moved to another transport: health judges the new path from
        then on (its Pings were answered, or not, on the old one)."""
        # transport "auto" (docs: README, "Transports"; protocol-deviations.md)
        self._udp_blocked = False
        """``auto``: UDP did not pass lately; attempts start on TCP and a probe looks for UDP."""
        self._attempt_started = 0.0
        self._auto_deadline: float | None = None
        self._next_fallback = 0.0
        self._probing = False
        self._probe_interval = outbound.auto_probe_interval
        self._switch_to: tuple[DatagramTransport, str] | None = None
        """A transport ready to take over (a completed UDP probe), and why."""

    @property
    def sock(self) -> socket.socket | None:
        """The socket of the current transport."""
        return self.transport.sock if self.transport is not None else None

    @property
    def batch(self) -> BatchSocket | None:
        """The UDP socket wrapper while the session is on UDP."""
        transport = self.transport
        return transport.batch if isinstance(transport, UdpTransport) else None

    # -- the driving loop ----------------------------------------------------------------------

    async def supervise(self, task_status: TaskStatus[None]) -> None:
        task_status.started()
        try:
            await self._supervise()
        finally:
            # Shutdown: tell the server and release the TURN allocation (no await needed).
            if self.transport is not None:
                self._teardown("shutting down")

    async def _supervise(self) -> None:
        while True:
            try:
                await self._run_once()
            except TransportError as exc:
                self.last_error = f"{self.outbound.stream_options.kind}: {exc.strerror or exc}"
                logger.warning("%s session %d: %s", self.outbound.tag, self.index, self.last_error)
            except OSError as exc:
                self.last_error = f"socket error: {exc.strerror or exc}"
                logger.warning("%s session %d: %s", self.outbound.tag, self.index, self.last_error)
            except Exception as exc:  # a bug must cost this session, not the daemon
                self.last_error = f"internal error: {exc!r}"
                logger.exception("%s session %d failed", self.outbound.tag, self.index)
            self._teardown(self.last_error or "session ended")
            if self._retry_now:
                self._retry_now = False
                self.reconnects += 1
                continue
            logger.info(
                "%s session %d: reconnecting in %.0f s",
                self.outbound.tag,
                self.index,
                self.outbound.reconnect_delay,
            )
            await anyio.sleep(self.outbound.reconnect_delay)
            self.reconnects += 1

    async def _run_once(self) -> None:
        self._set_state(SessionState.CONNECTING)
        self._replacing = None
        self._unanswered = 0
        host, port = self.outbound.server
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(errno.EHOSTUNREACH, f"cannot resolve {host}")
        family, _, _, _, sockaddr = infos[0]
        handshake_now = True
        if self._choose_transport() == TransportMode.UDP:
            opened = await self._open_udp(family, sockaddr)
            if opened is None:
                return
            handshake_now = opened
        else:
            try:
                self._use(await self._open_stream(sockaddr))
            except OSError:
                if self.outbound.transport == TransportMode.AUTO:
                    self._udp_blocked = False  # TCP fails too: try UDP first next time
                raise
        transport = self.transport
        assert transport is not None
        conn = ClientConnection(
            access_key=self.outbound.access_key,
            config=self.outbound.stream_config
            if transport.reliable
            else self.outbound.connection_config,
        )
        self.conn = conn
        self._fit_path(conn, time.monotonic())
        async with anyio.create_task_group() as tg:
            self._tg = tg
            if isinstance(transport, StreamTransport):
                tg.start_soon(transport.run)
            try:
                await self._drive(conn, family, sockaddr, handshake_now)
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    async def _open_udp(self, family: int, sockaddr: Any) -> bool | None:
        """The UDP transport of this attempt (NAT traversal included): True if the handshake
        starts at once, False if it waits for the TURN relay, None if the attempt failed."""
        nat = self.outbound.nat
        relay = self._choose_path(nat)
        stun: list[tuple[str, int]] = []
        turn: TurnConfig | None = None
        if nat is not None:
            # The server's address family decides the socket's; the NAT servers must match.
            for stun_host, stun_port in nat.stun:
                try:
                    stun.append(await _resolve(stun_host, stun_port, family))
                except OSError as exc:
                    self._warn_once(f"STUN server {stun_host}:{stun_port}: {exc.strerror or exc}")
            if relay:
                assert nat.turn is not None
                turn_host, turn_port = nat.turn.server
                try:
                    turn = replace(nat.turn, server=await _resolve(turn_host, turn_port, family))
                except OSError as exc:
                    self._fail_attempt(
                        f"TURN server {turn_host}:{turn_port}: {exc.strerror or exc}"
                    )
                    return None
        sock, buffers = open_udp_socket(family, self.outbound.socket_buffer)
        _check_buffers(self.outbound.tag, buffers)
        batching = self.outbound.batching
        self.path = "turn" if relay else "direct"
        self.mapped_address = self.relayed_address = None
        if not stun and turn is None:
            self._use(UdpTransport(BatchSocket(sock, gso=batching, gro=batching), buffers))
            sock.connect(sockaddr)
            return True
        # Not connected: the socket also talks to the STUN/TURN servers.
        mux = NatMux(NatConfig(turn=turn))
        self.mux = mux
        server = (str(sockaddr[0]), int(sockaddr[1]))
        self._use(
            UdpTransport(
                _NatSocket(
                    sock, mux, server, relay_only=turn is not None, gso=batching, gro=batching
                ),
                buffers,
            )
        )
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        now = time.monotonic()
        for address in stun:
            mux.start_binding(address, now)
        if turn is None:
            return True
        # The handshake starts once the relay is ready (RelayReady).
        mux.start_turn(server, now)
        logger.info(
            "%s session %d: allocating a relay on TURN server %s",
            self.outbound.tag,
            self.index,
            _fmt(turn.server),
        )
        return False

    async def _drive(
        self, conn: ClientConnection, family: int, sockaddr: Any, handshake_now: bool
    ) -> None:
        now = time.monotonic()
        self._attempt_started = now
        if handshake_now:
            conn.connect(now, time.time())
        self.flush()
        auto = self.outbound.transport == TransportMode.AUTO
        while True:
            now = time.monotonic()
            self._read_all(conn, now)
            transport = self.transport
            assert transport is not None
            if transport.failure is not None and not await self._transport_failed(
                conn, sockaddr, transport.failure
            ):
                return
            timer = conn.get_timer()
            if timer is not None and timer <= now:
                conn.handle_timer(now)
            mux = self.mux
            if mux is not None and not self._drive_nat(mux, conn, now):
                return
            if not self._handle_events(conn):
                return
            health = self._health_deadline(conn)
            if health is not None and now >= health:
                self.replace(
                    f"no answer to keepalive Pings for {now - self._rtt_sampled_at(conn):.0f} s"
                )
                continue  # the core is closed now: its event ends the attempt
            if auto and not await self._drive_auto(conn, family, sockaddr, now):
                return
            self.flush()
            await self._wait(conn)

    # -- transports ----------------------------------------------------------------------------

    def _choose_transport(self) -> str:
        mode = self.outbound.transport
        if mode != TransportMode.AUTO:
            return mode
        return self.outbound.auto_fallback if self._udp_blocked else TransportMode.UDP

    def _use(self, transport: DatagramTransport) -> None:
        self.transport = transport
        if isinstance(transport, StreamTransport):
            transport.on_drained = self._wake
            if self._tg is not None:
                self._tg.start_soon(transport.run)

    def _fit_path(self, conn: ClientConnection, now: float) -> None:
        """Tell the core what the transport's path allows: over UDP with DF, path MTU
        discovery up to what the first hop carries (towards the TURN server when relaying,
        less the ChannelData header); over UDP without DF the base size, which crosses every
        path; over TCP no discovery (spec §10.6 has no IP fragmentation to avoid)."""
        transport = self.transport
        if not isinstance(transport, UdpTransport):
            conn.set_path_mtu(now, None)
            return
        batch = transport.batch
        family = transport.sock.family
        ceiling: int | None = BASE_PLPMTU
        if transport.dont_fragment:
            turn = batch.mux.turn if isinstance(batch, _NatSocket) else None
            if turn is not None:
                ceiling = first_hop_payload(family, turn.server)
                if ceiling is not None:
                    ceiling -= TURN_OVERHEAD
            else:
                server = batch.server if isinstance(batch, _NatSocket) else None
                ceiling = first_hop_payload(family, server or transport.sock.getpeername())
        conn.set_path_mtu(now, ceiling or BASE_PLPMTU, udp_overhead(family))

    async def _open_stream(self, sockaddr: Any) -> StreamTransport:
        """A new TCP transport to the server (its address resolved for this attempt)."""
        outbound = self.outbound
        host = str(sockaddr[0])
        options = replace(
            outbound.stream_options,
            host=outbound.sni or (f"[{host}]" if ":" in host else host),  # spec §10.6
        )
        port = outbound.transport_port or int(sockaddr[1])
        logger.debug(
            "%s session %d: connecting over %s to %s",
            outbound.tag,
            self.index,
            options.kind,
            _fmt((host, port)),
        )
        return await open_stream((host, port), outbound.access_key, options)

    def _switch(self, conn: ClientConnection, new: DatagramTransport, reason: str) -> None:
        """Continue the session on ``new`` (roaming, spec §9.2): what was in flight is sent
        again on it, the ARQ runs as the new path needs (no timers over TCP)."""
        old = self.transport
        self._use(new)
        if old is not None and old is not new:
            if isinstance(old, UdpTransport) and isinstance(old.batch, _NatSocket):
                self.mux = None  # STUN answers on the old socket mean nothing now
                self.mapped_address = None
            self._retire(old)
        conn.reliable_transport = new.reliable
        now = time.monotonic()
        self._switched_at = now
        conn.path_changed(now)
        self._fit_path(conn, now)
        self.transport_switches += 1
        logger.info(
            "%s session %d: transport %s -> %s (%s)",
            self.outbound.tag,
            self.index,
            old.kind if old is not None else "none",
            new.kind,
            reason,
        )
        self.flush()

    async def _transport_failed(self, conn: ClientConnection, sockaddr: Any, reason: str) -> bool:
        """The TCP connection ended: continue the session on a new one (the server keeps it
        for ``tcp_resume_grace``); False ends the attempt."""
        tag, index = self.outbound.tag, self.index
        now = time.monotonic()
        if not conn.established or now - self._resumed_at < RESUME_MIN_INTERVAL:
            self.last_error = reason
            logger.info("%s session %d: %s", tag, index, reason)
            return False
        self._resumed_at = now
        try:
            new = await self._open_stream(sockaddr)
        except OSError as exc:
            self.last_error = f"{reason}; a new TCP connection failed: {exc.strerror or exc}"
            logger.info("%s session %d: %s", tag, index, self.last_error)
            return False
        self._switch(conn, new, reason)
        return True

    async def _drive_auto(
        self, conn: ClientConnection, family: int, sockaddr: Any, now: float
    ) -> bool:
        """Transport ``auto``: TCP while UDP does not pass, back to UDP once it does."""
        outbound = self.outbound
        transport = self.transport
        assert transport is not None
        tag, index = outbound.tag, self.index
        self._auto_deadline = None
        if transport.reliable:
            switch = self._switch_to
            if switch is not None:
                self._switch_to = None
                if conn.established:
                    self._udp_blocked = False
                    self._switch(conn, switch[0], switch[1])
                else:
                    switch[0].close()
            elif conn.established and not self._probing and self._tg is not None:
                self._probing = True
                self._tg.start_soon(self._probe_udp, family, sockaddr)
            return True
        if not conn.established:
            deadline = self._attempt_started + outbound.auto_udp_timeout
            if now < deadline:
                self._auto_deadline = deadline
                return True
            self.last_error = (
                f"no handshake over UDP in {outbound.auto_udp_timeout:g} s;"
                f" using {outbound.stream_options.kind}"
            )
            logger.info("%s session %d: %s", tag, index, self.last_error)
            self._udp_blocked = True
            self._retry_now = True  # no back-off: the UDP attempt already took its time
            return False
        # UDP stopped passing: nothing arrived, or nothing we sent was acknowledged (the
        # keepalive Ping is always outstanding at least once per interval), for two keepalive
        # intervals. The second catches a path that drops only our direction, where the
        # server's retransmissions keep arriving.
        sender = conn.sender
        progress = min(conn.last_receive, sender.delivered_time if sender.outstanding else now)
        deadline = max(progress + 2 * outbound.keepalive_interval, self._next_fallback)
        if now < deadline:
            self._auto_deadline = deadline
            return True
        reason = f"UDP stopped passing: no answer for {now - progress:.0f} s"
        try:
            new = await self._open_stream(sockaddr)
        except OSError as exc:
            self._next_fallback = time.monotonic() + outbound.keepalive_interval
            self._warn_once(f"{reason}, and {outbound.stream_options.kind} fails too: {exc}")
            return True
        self._udp_blocked = True
        self._switch(conn, new, reason)
        return True

    async def _probe_udp(self, family: int, sockaddr: Any) -> None:
        """``auto`` on TCP: a UDP handshake every ``auto_probe_interval`` (doubling while it
        fails); the first that completes hands its socket over to the session."""
        base = self.outbound.auto_probe_interval
        try:
            while True:
                await anyio.sleep(self._probe_interval)
                transport = await self._probe_once(family, sockaddr)
                if transport is not None:
                    self._probe_interval = base
                    self._switch_to = (transport, "a UDP handshake completed")
                    self._wake()
                    return
                self._probe_interval = min(self._probe_interval * 2, PROBE_BACKOFF * base)
                logger.debug(
                    "%s session %d: UDP still does not pass; next probe in %.0f s",
                    self.outbound.tag,
                    self.index,
                    self._probe_interval,
                )
        finally:
            self._probing = False

    async def _probe_once(self, family: int, sockaddr: Any) -> UdpTransport | None:
        """A UDP handshake of its own (a throwaway session, closed at once); its socket, as a
        transport, if it completed within ``auto_udp_timeout``."""
        outbound = self.outbound
        try:
            sock, buffers = open_udp_socket(family, outbound.socket_buffer)
        except OSError:
            return None
        found: UdpTransport | None = None
        try:
            sock.connect(sockaddr)
            batch = BatchSocket(sock, gso=outbound.batching, gro=outbound.batching)
            probe = ClientConnection(access_key=outbound.access_key, config=outbound.probe_config)
            probe.connect(time.monotonic(), time.time())
            with anyio.move_on_after(outbound.auto_udp_timeout):
                while probe.state is not State.CLOSED:
                    now = time.monotonic()
                    for datagram in batch.recv_batch(64):
                        probe.receive_datagram(datagram, now)
                    timer = probe.get_timer()
                    if timer is not None and timer <= now:
                        probe.handle_timer(now)
                    if probe.established:
                        probe.close(now)  # the server ends the throwaway session at once
                        batch.send_batch(probe.datagrams_to_send(now))
                        found = UdpTransport(batch, buffers)
                        break
                    batch.send_batch(probe.datagrams_to_send(now))
                    timer = probe.get_timer()
                    with anyio.move_on_after(1.0 if timer is None else max(timer - now, 0.0)):
                        await anyio.wait_readable(sock)
        except OSError:
            pass
        finally:
            if found is None:
                sock.close()
        return found

    def _choose_path(self, nat: NatOptions | None) -> bool:
        """True if this attempt goes through TURN (see the module docstring for ``auto``)."""
        if nat is None or nat.turn is None or nat.mode == NatMode.DIRECT:
            return False
        if nat.mode == NatMode.TURN:
            return True
        if self._relay and time.monotonic() - self._relay_since >= nat.retry_direct_after:
            self._relay = False
            logger.info(
                "%s session %d: %.0f s on TURN; trying direct UDP again",
                self.outbound.tag,
                self.index,
                nat.retry_direct_after,
            )
        return self._relay

    def _drive_nat(self, mux: NatMux, conn: ClientConnection, now: float) -> bool:
        """Timers, events and requests of the NAT machinery; False ends the attempt."""
        timer = mux.get_timer()
        if timer is not None and timer <= now:
            mux.handle_timer(now)
        ok = True
        tag, index = self.outbound.tag, self.index
        while (event := mux.next_event()) is not None:
            if isinstance(event, BindingSucceeded):
                if self.mapped_address is None:  # the first answer wins
                    self.mapped_address = event.mapped_address
                logger.info(
                    "%s session %d: STUN server %s maps this socket to %s",
                    tag,
                    index,
                    _fmt(event.server),
                    _fmt(event.mapped_address),
                )
            elif isinstance(event, BindingFailed):
                self._warn_once(event.message)
            elif isinstance(event, AllocationSucceeded):
                self.relayed_address = event.relayed_address
                if self.mapped_address is None and event.mapped_address is not None:
                    self.mapped_address = event.mapped_address
                logger.info(
                    "%s session %d: TURN relayed address %s (lifetime %d s)",
                    tag,
                    index,
                    _fmt(event.relayed_address),
                    event.lifetime,
                )
            elif isinstance(event, RelayReady):
                logger.info(
                    "%s session %d: relaying to %s through TURN channel 0x%04x",
                    tag,
                    index,
                    _fmt(event.peer),
                    event.channel,
                )
                if conn.state is State.IDLE:
                    conn.connect(now, time.time())
            elif isinstance(event, TurnRefreshed):
                self.turn_refreshes += 1
                logger.debug("%s session %d: TURN %s refreshed", tag, index, event.what)
            elif isinstance(event, TurnFailed):
                self._fail_attempt(event.message)
                ok = False
            elif isinstance(event, TurnClosed):
                pass
        batch = self.batch
        if isinstance(batch, _NatSocket):
            batch.send_nat(now)
        return ok

    def _fail_attempt(self, message: str) -> None:
        """The relay failed: say so once, and (``auto``) try direct next time."""
        self.last_error = message
        self._warn_once(message)
        nat = self.outbound.nat
        if nat is not None and nat.mode == NatMode.AUTO and self._relay:
            self._relay = False

    def _warn_once(self, message: str) -> None:
        # A failing server fails every attempt the same way: warn once, then log quietly.
        if message in self._warned:
            logger.debug("%s session %d: %s", self.outbound.tag, self.index, message)
            return
        self._warned.add(message)
        logger.warning("%s session %d: %s", self.outbound.tag, self.index, message)

    def _read_all(self, conn: ClientConnection, now: float) -> None:
        """Read what the transport has (bounded per round).

        ICMP errors (the server's port closed) are ignored: the server may come back; the
        timers decide.
        """
        receive = conn.receive_datagram
        transport = self.transport
        assert transport is not None
        paused = conn.receive_paused = self.buffered >= self.outbound.receive_buffer_cap
        if paused:
            self._paused_at = now
        for data in transport.recv_batch(256):
            self.bytes_down += len(data)
            receive(data, now)

    async def _wait(self, conn: ClientConnection) -> None:
        transport = self.transport
        assert transport is not None
        if transport.failure is not None:
            await anyio.lowlevel.checkpoint()
            return
        # A blocked TCP transport takes nothing until its writer wakes us (``_wake``): the
        # core's timers would only make us spin meanwhile.
        timer = None if transport.blocked else conn.get_timer()
        for other in (
            self.mux.get_timer() if self.mux is not None else None,
            self._auto_deadline,
            self._health_deadline(conn),
        ):
            if other is not None and (timer is None or other < timer):
                timer = other
        now = time.monotonic()
        delay = 1.0 if timer is None else max(timer - now, 0.0)
        if delay <= 0:
            await anyio.lowlevel.checkpoint()
            return
        self._sleep_until = now + delay
        with anyio.CancelScope(deadline=anyio.current_time() + delay) as scope:
            self._sleep = scope
            await anyio.wait_readable(transport.sock)
        self._sleep = None
        self._sleep_until = math.inf

    def _wake(self) -> None:
        """End the driving task's sleep now (the TCP writer drained, a probe completed)."""
        if self._sleep is not None:
            self._sleep.cancel()

    def _wake_if_needed(self) -> None:
        conn = self.conn
        if self._sleep is None or conn is None:
            return
        timer = conn.get_timer()
        if timer is not None and timer < self._sleep_until:
            self._sleep.cancel()

    def _handle_events(self, conn: ClientConnection) -> bool:
        while (event := conn.next_event()) is not None:
            if isinstance(event, RelayMessageReceived):
                channel = self.channels.get(event.stream_id)
                if channel is not None:
                    channel.on_message(event.message)
                elif isinstance(event.message, Data) and event.stream_id:
                    # a stream we no longer know: tell the server to stop sending
                    conn.send(event.stream_id, Close())
            elif isinstance(event, HandshakeCompleted):
                self.session_id = event.session_id
                self.connected_at = time.time()
                self.last_error = None
                self._warned.clear()
                self._set_state(SessionState.CONNECTED)
                self.connected_event.set()
                self.outbound.session_connected()
            elif isinstance(event, ExtensionsNegotiated):
                logger.debug(
                    "%s session %d: flow control %s (server window %d)",
                    self.outbound.tag,
                    self.index,
                    "on" if conn.flow_control else "off",
                    event.peer_stream_window,
                )
            elif isinstance(event, DataLost):
                self._data_lost(event)
            elif isinstance(event, ConnectionTerminated):
                self.last_error = self._replacing or event.reason
                logger.info("%s session %d: %s", self.outbound.tag, self.index, event.reason)
                if event.reason.startswith(HANDSHAKE_TIMED_OUT):
                    self._handshake_timed_out()
                return False
        self._wake_senders()
        return True

    # -- session health (issue 13 item 4) --------------------------------------------------------

    def _rtt_sampled_at(self, conn: ClientConnection) -> float:
        at = conn.rtt_sampled_at
        return at if at is not None else self._attempt_started

    def _health_deadline(self, conn: ClientConnection) -> float | None:
        """When the keepalive Pings will have gone unanswered for too long; None while the
        session is not established or itself refuses Data (``receive_paused``: the Pongs wait
        for our readers, not for the server)."""
        if not conn.established or conn.receive_paused:
            return None
        transport = self.transport
        if self.outbound.transport == TransportMode.AUTO and (
            transport is None or not transport.reliable
        ):
            # transport auto over UDP: its own check (nothing acknowledged for two keepalive
            # intervals) moves the session to TCP first, keeping its streams; replacing it
            # here would race that move and reset them. Over TCP this check applies.
            return None
        interval = self.outbound.keepalive_interval
        since = max(self._rtt_sampled_at(conn), self._paused_at, self._switched_at)
        return since + SILENT_PING_INTERVALS * interval

    def connect_answered(self) -> None:
        """A Connect got its ConnectOk or Error: the server answers relay requests."""
        self._unanswered = 0

    def connect_unanswered(self, sent_at: float) -> None:
        """A Connect sent at ``sent_at`` got no answer within ``connect_timeout``. If datagrams
        arrived after it (the session is alive) and no Connect was answered meanwhile, the
        session may be wedged (an answer stuck behind a hole, a server that ignores Connect):
        after :data:`UNANSWERED_CONNECTS` in a row it is replaced by a fresh handshake."""
        conn = self.conn
        if conn is None or not conn.established or conn.last_receive <= sent_at:
            return  # nothing arrived since: the idle and keepalive checks decide
        self._unanswered += 1
        if self._unanswered >= UNANSWERED_CONNECTS:
            self.replace(
                f"{self._unanswered} Connects in a row got no answer in "
                f"{self.outbound.connect_timeout:g} s while the server kept sending"
            )

    def replace(self, reason: str) -> None:
        """Give up this connection for a fresh handshake at once (no back-off): its streams
        are reset (the local side sees a reset, never a short success); new streams wait for
        the new session. One warning says why."""
        conn = self.conn
        if conn is None or self._replacing is not None or conn.state is State.CLOSED:
            return
        self._replacing = f"session replaced: {reason}"
        self.replacements += 1
        logger.warning(
            "%s session %d: replacing the session with a fresh handshake: %s",
            self.outbound.tag,
            self.index,
            reason,
        )
        self._retry_now = True
        conn.close(time.monotonic())
        self.flush()
        self._wake()

    def _data_lost(self, event: DataLost) -> None:
        """Reset the TCP streams that may have lost data in the hole, and only those: a stream
        opened after the hole appeared has all its data (spec §7.2; DataLost). A UDP
        association only lost datagrams, which UDP may do."""
        channels = self.channels
        affected = [
            channel
            for stream_id in sorted(event.stream_ids)
            if isinstance(channel := channels.get(stream_id), OstpStream)
        ]
        logger.warning(
            "%s session %d: the server gave up on %d datagrams (nonces %d-%d); "
            "resetting the %d stream(s) open before them",
            self.outbound.tag,
            self.index,
            event.count,
            event.first_nonce,
            event.last_nonce,
            len(affected),
        )
        conn = self.conn
        for channel in affected:
            channel.reset("data lost in the tunnel; stream reset")
            if conn is not None and conn.established:
                conn.send(channel.stream_id, Close())  # the server closes its remote

    def _handshake_timed_out(self) -> None:
        nat = self.outbound.nat
        if nat is None or nat.mode != NatMode.AUTO or nat.turn is None:
            return
        if self.path == "direct":
            logger.warning(
                "%s session %d: no answer over direct UDP; falling back to TURN server %s",
                self.outbound.tag,
                self.index,
                _fmt(nat.turn.server),
            )
            self._relay = True
            self._relay_since = time.monotonic()
            self._retry_now = True  # no back-off: the direct attempt already took its time
        else:
            self._relay = False  # no answer through the relay either: direct next time

    def flush(self) -> None:
        conn, transport = self.conn, self.transport
        if conn is None or transport is None:
            return
        if transport.blocked or transport.failure is not None:
            return  # the datagrams wait in the core (its `writable` holds the streams back)
        now = time.monotonic()
        datagrams = conn.datagrams_to_send(now)
        if datagrams:
            # UDP: kernel drops count as loss on the wire; the ARQ re-sends what matters.
            self.bytes_up += transport.send_batch(datagrams)
            if isinstance(transport, UdpTransport) and transport.batch.refused:
                # EMSGSIZE: larger than the first hop (a path MTU probe, normally)
                refused = transport.batch.refused
                for size in refused:
                    conn.datagram_refused(size, now)
                refused.clear()
        if self._send_waiters:
            self._wake_senders()

    def _wake_senders(self) -> None:
        """Wake every stream whose data the core takes again (each has its own event, so no
        waiter can miss a wake-up meant for another); all of them once the session is gone."""
        waiters = self._send_waiters
        if not waiters:
            return
        conn = self.conn
        if conn is None or not conn.established:
            for event in waiters.values():
                event.set()
            waiters.clear()
            return
        if not conn.writable:
            return
        for stream_id in list(waiters):
            if conn.stream_writable(stream_id) or stream_id not in self.channels:
                waiters.pop(stream_id).set()

    def _teardown(self, reason: str) -> None:
        # Still trying: the supervisor starts again after its back-off (never Idle again).
        self._set_state(SessionState.CONNECTING)
        self.connected_event = anyio.Event()
        self._reset_channels(f"tunnel session ended: {reason}")
        if self.conn is not None and self.conn.established:
            self.conn.close(time.monotonic())
            self.flush()
        batch = self.batch
        if self.mux is not None and isinstance(batch, _NatSocket):
            # Refresh with LIFETIME 0 (RFC 8656 §7), sent once: the socket closes now, and a
            # lost one only leaves the allocation to expire on its own.
            now = time.monotonic()
            self.mux.close(now)
            batch.send_nat(now)
        transport = self.transport
        if transport is not None:
            if transport.reliable and self.outbound.transport == TransportMode.AUTO:
                self._udp_blocked = False  # after a session on TCP ends, try UDP first again
            self._retire(transport)
        if self._switch_to is not None:
            self._switch_to[0].close()
            self._switch_to = None
        self.transport = None
        self.conn = None
        self.mux = None
        self.buffered = 0
        self._wake_senders()

    def _reset_channels(self, reason: str) -> None:
        for channel in list(self.channels.values()):
            channel.reset(reason)
        self.channels.clear()

    def _set_state(self, state: str) -> None:
        if state != self.state:
            logger.info("%s session %d: %s -> %s", self.outbound.tag, self.index, self.state, state)
            self.state = state
            self.outbound.state_changed()

    # -- used by streams -------------------------------------------------------------------

    def bind(self, stream_id: int, channel: _Channel) -> None:
        self.channels[stream_id] = channel

    def unbind(self, stream_id: int) -> None:
        self.channels.pop(stream_id, None)
        self.outbound.release_stream_id(stream_id)
        waiter = self._send_waiters.pop(stream_id, None)
        if waiter is not None:
            waiter.set()  # its send() sees the stream gone

    def consumed(self, stream_id: int, n: int) -> None:
        """The local reader of ``stream_id`` took ``n`` bytes: credit for the server."""
        self.buffered -= n
        conn = self.conn
        if conn is None:
            return
        flush = conn.stream_consumed(stream_id, n)  # True: a WindowUpdate is due
        if conn.receive_paused and self.buffered < self.outbound.receive_buffer_cap:
            conn.receive_paused = False  # asks the server for what was dropped, at once
            flush = True
        if flush:
            self.flush()

    def send_message(self, stream_id: int, message: Any) -> None:
        conn = self.conn
        if conn is None or not conn.established:
            return
        conn.send(stream_id, message)
        self.flush()
        self._wake_if_needed()

    async def send_data(self, stream_id: int, data: bytes) -> None:
        while True:
            conn = self.conn
            if conn is None or not conn.established or stream_id not in self.channels:
                raise anyio.BrokenResourceError("tunnel session ended")
            if conn.stream_writable(stream_id):
                break
            event = self._send_waiters.get(stream_id)
            if event is None:
                event = self._send_waiters[stream_id] = anyio.Event()
            await event.wait()
        conn.send_data(stream_id, data)
        self.flush()
        self._wake_if_needed()

    def status(self) -> dict[str, Any]:
        conn = self.conn
        rtt = None
        if conn is not None and conn.established:
            age = time.monotonic() - self._rtt_sampled_at(conn)
            if age <= self.outbound.keepalive_interval + RTT_SHOWN_GRACE:
                rtt = conn.ping_rtt if conn.ping_rtt is not None else conn.handshake_rtt
        return {
            "index": self.index,
            "state": self.state,
            "session_id": self.session_id if self.state == SessionState.CONNECTED else None,
            "rtt_ms": round(rtt * 1000, 2) if rtt is not None else None,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "connected_since": self.connected_at if self.state == SessionState.CONNECTED else None,
            "reconnects": self.reconnects,
            "replacements": self.replacements,
            "streams": len(self.channels),
            "flow_control": conn.flow_control if conn is not None else None,
            "datagram_size": conn.datagram_size if conn is not None else None,
            "pmtud": _pmtud_state(conn),
            "receive_buffered": self.buffered,
            "receive_paused": conn.receive_paused if conn is not None else False,
            "kernel_drops": self.kernel_drops(),
            "socket_buffer": self._socket_buffer(),
            "last_error": self.last_error,
            "path": self.path,
            "mapped_address": _fmt(self.mapped_address),
            "relayed_address": _fmt(self.relayed_address) if self.path == "turn" else None,
            "turn_refreshes": self.turn_refreshes,
            "nat_drops": self._nat_drops(),
            "transport": self.transport.kind if self.transport is not None else None,
            "transport_switches": self.transport_switches,
        }

    def kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped on this session's UDP sockets (a full receive buffer):
        the current one's and its predecessors'; None if the system does not say."""
        transport = self.transport
        current = transport.kernel_drops() if isinstance(transport, UdpTransport) else None
        if current is None:
            return self.earlier_drops if self.earlier_drops or transport is None else None
        return self.earlier_drops + current

    def _socket_buffer(self) -> int | None:
        transport = self.transport
        if isinstance(transport, UdpTransport) and transport.buffers is not None:
            return transport.buffers.receive
        return None

    def _retire(self, transport: DatagramTransport) -> None:
        """Close a transport the session no longer uses, keeping its kernel drop count."""
        if isinstance(transport, UdpTransport):
            self.earlier_drops += transport.kernel_drops() or 0
        transport.close()

    def _nat_drops(self) -> dict[str, int] | None:
        mux, batch = self.mux, self.batch
        if mux is None or not isinstance(batch, _NatSocket):
            return None
        drops = {k: v for k, v in mux.counters.as_dict().items() if v}
        if batch.source_drop:
            drops["ostp_source_drop"] = batch.source_drop
        if batch.unrelayed_drop:
            drops["ostp_unrelayed_drop"] = batch.unrelayed_drop
        return drops


def _pmtud_state(conn: ClientConnection | None) -> str | None:
    """Path MTU discovery's state for the status (None: off or no session)."""
    pmtud = conn.pmtud if conn is not None else None
    return pmtud.state.value if pmtud is not None else None


class OstpOutbound(Outbound):
    """A pool of `mux.sessions` OSTP sessions to one server; streams spread over live ones."""

    type = "ostp"

    def __init__(
        self,
        tag: str,
        *,
        server: tuple[str, int],
        access_key: str,
        sessions: int = 1,
        mtu: int = 1350,
        keepalive_interval: float = 5.0,
        connect_timeout: float = 5.0,
        idle_timeout: float = 25.0,
        reconnect_delay: float = RECONNECT_DELAY,
        batching: bool = True,
        nat: NatOptions | None = None,
        extensions: bool = True,
        stream_window: int = STREAM_WINDOW,
        receive_buffer_cap: int = RECEIVE_BUFFER_CAP,
        transport: str = TransportMode.UDP,
        transport_port: int | None = None,
        sni: str | None = None,
        reality: RealityOptions | None = None,
        auto_fallback: str = TransportMode.TCP,
        auto_udp_timeout: float = 3.0,
        auto_probe_interval: float = 30.0,
        socket_buffer: int = SOCKET_BUFFER,
    ) -> None:
        super().__init__(tag)
        self.socket_buffer = socket_buffer
        self.keepalive_interval = keepalive_interval
        self.transport = transport
        self.transport_port = transport_port
        self.sni = sni
        self.auto_fallback = auto_fallback
        self.auto_udp_timeout = auto_udp_timeout
        self.auto_probe_interval = auto_probe_interval
        stream_kind = auto_fallback if transport == TransportMode.AUTO else transport
        self.stream_options = StreamOptions(
            framing=Framing.WSS if stream_kind == TransportMode.WSS else Framing.STREAM,
            host="",  # per attempt: `sni`, else the server's address
            reality=reality,
            connect_timeout=connect_timeout,
        )
        self.receive_buffer_cap = receive_buffer_cap
        self.batching = batching
        self.nat = nat
        self.server = server
        self.access_key = access_key
        self.connect_timeout = connect_timeout
        self.reconnect_delay = reconnect_delay
        # Data datagrams up to the configured MTU minus IP/UDP headers; upstream's client
        # padding profile (spec §6.1), keepalives every `keepalive_interval` (spec §10.2).
        base = ConnectionConfig()
        self.connection_config = replace(
            base,
            max_datagram_size=max(mtu - 48, 500),
            pmtud=PmtudConfig(),
            padding=PaddingPolicy.upstream_client(mtu),
            keepalive_interval=keepalive_interval,
            idle_timeout=idle_timeout,
            extensions=extensions,
            stream_window=stream_window,
            max_stream_window=max(stream_window, base.max_stream_window),
        )
        # Over TCP: no retransmission into the stream, a single handshake attempt (spec §10.1),
        # large datagrams unless the session may move back to UDP (`auto`).
        stream = replace(
            self.connection_config,
            reliable_transport=True,
            handshake_timeout=STREAM_HANDSHAKE_TIMEOUT,
            handshake_attempts=1,
        )
        if transport != TransportMode.AUTO:
            stream = replace(stream, max_datagram_size=STREAM_DATAGRAM_SIZE)
        self.stream_config = stream
        self.probe_config = replace(
            self.connection_config, extensions=False, keepalive_interval=None
        )
        """``auto``'s UDP probe: a handshake, then Close at once."""
        self.sessions = [_Session(self, i) for i in range(sessions)]
        self._next_stream = 1
        self._active_ids: set[int] = set()
        self._any_connected = anyio.Event()
        self.state = SessionState.IDLE

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            for session in self.sessions:
                await tg.start(session.supervise)
            task_status.started()

    async def reconnect(self) -> None:
        """Drop every session; each is re-established at once (control socket action)."""
        for session in self.sessions:
            if session.conn is not None:
                session.conn.close(time.monotonic())
                session.flush()
                if session._sleep is not None:
                    session._sleep.cancel()

    def state_changed(self) -> None:
        states = {s.state for s in self.sessions}
        if SessionState.CONNECTED in states:
            new = SessionState.CONNECTED
        elif SessionState.CONNECTING in states:
            new = SessionState.CONNECTING
        else:
            new = SessionState.IDLE
        changed = new != self.state
        if changed:
            logger.info("outbound %s: %s", self.tag, new)
            self.state = new
        if new != SessionState.CONNECTED and self._any_connected.is_set():
            self._any_connected = anyio.Event()
        if changed:
            self.notify_state()

    def last_heard(self) -> float | None:
        heard = [
            s.conn.last_receive
            for s in self.sessions
            if s.state == SessionState.CONNECTED and s.conn is not None
        ]
        return max(heard) if heard else None

    def round_trip(self) -> float | None:
        rtts = [
            s.conn.smoothed_rtt
            for s in self.sessions
            if s.state == SessionState.CONNECTED and s.conn is not None
        ]
        return min(rtts) if rtts else None

    def session_connected(self) -> None:
        self._any_connected.set()

    # -- streams -----------------------------------------------------------------------------

    def _allocate_stream_id(self) -> int:
        # spec §10.3: a u16 counter skipping 0 and ids still in use
        for _ in range(65536):
            sid = self._next_stream
            self._next_stream = sid % 0xFFFF + 1
            if sid not in self._active_ids:
                self._active_ids.add(sid)
                return sid
        raise GeneralFailure("no free stream id (65535 streams open)")

    def release_stream_id(self, stream_id: int) -> None:
        self._active_ids.discard(stream_id)

    async def _pick_session(self) -> _Session:
        live = [s for s in self.sessions if s.state == SessionState.CONNECTED]
        if not live:
            with anyio.move_on_after(self.connect_timeout):
                await self._any_connected.wait()
            live = [s for s in self.sessions if s.state == SessionState.CONNECTED]
            if not live:
                raise GeneralFailure(f"tunnel {self.tag} is not connected")
        return min(live, key=lambda s: (len(s.channels), random.random()))

    async def connect_tcp(self, target: Address, ctx: ConnContext) -> anyio.abc.ByteStream:
        session = await self._pick_session()
        stream = OstpStream(session, self._allocate_stream_id(), ctx)
        session.bind(stream.stream_id, stream)
        sent_at = time.monotonic()
        session.send_message(stream.stream_id, Connect(str(target)))
        with anyio.move_on_after(self.connect_timeout):
            await stream.connected.wait()
        if not stream.connected.is_set():
            session.connect_unanswered(sent_at)
            # Not Close: upstream's client sends nothing for a failed connect (spec §10.4),
            # but the stream id must not receive late data into a new connection.
            await stream.aclose()
            raise ConnectTimeout(f"{target}: no answer from the server in {self.connect_timeout} s")
        if stream.error is not None:
            session.unbind(stream.stream_id)
            raise stream.error
        return stream

    async def open_udp(self, ctx: ConnContext) -> UdpOutboundSession:
        session = await self._pick_session()
        udp = OstpUdpSession(session, self._allocate_stream_id())
        session.bind(udp.stream_id, udp)
        session.send_message(udp.stream_id, UdpAssociate())
        with anyio.move_on_after(self.connect_timeout):
            await udp.connected.wait()  # upstream's client does not wait (spec §10.4)
        return udp

    def status(self) -> dict[str, Any]:
        sessions = [s.status() for s in self.sessions]
        rtts = [s["rtt_ms"] for s in sessions if s["rtt_ms"] is not None]
        return {
            "tag": self.tag,
            "type": self.type,
            "state": self.state,
            "server": f"{self.server[0]}:{self.server[1]}",
            "rtt_ms": min(rtts) if rtts else None,
            "bytes_up": sum(s["bytes_up"] for s in sessions),
            "bytes_down": sum(s["bytes_down"] for s in sessions),
            "reconnects": sum(s["reconnects"] for s in sessions),
            "connected_since": min(
                (s["connected_since"] for s in sessions if s["connected_since"]), default=None
            ),
            "streams": len(self._active_ids),
            "kernel_drops": _sum_known(s["kernel_drops"] for s in sessions),
            "nat_mode": self.nat.mode if self.nat is not None else None,
            "transport": self.transport,
            "mapped_address": next(
                (s["mapped_address"] for s in sessions if s["mapped_address"]), None
            ),
            "sessions": sessions,
        }


def _factory(cfg: OstpOutboundConfig, ctx: OutboundContext) -> Outbound:
    mux = ctx.config.mux_for(cfg)
    return OstpOutbound(
        cfg.tag,
        server=cfg.server_address,
        access_key=cfg.access_key.get_secret_value(),
        sessions=mux.sessions if mux.enabled else 1,
        mtu=cfg.mtu,
        keepalive_interval=cfg.keepalive_interval,
        connect_timeout=cfg.connect_timeout,
        idle_timeout=cfg.idle_timeout,
        reconnect_delay=cfg.reconnect_delay,
        nat=_nat_options(cfg),
        extensions=cfg.extensions,
        stream_window=cfg.stream_window,
        receive_buffer_cap=cfg.receive_buffer_cap,
        socket_buffer=cfg.socket_buffer,
        transport=cfg.transport,
        transport_port=cfg.transport_port,
        sni=cfg.sni,
        reality=_reality_options(cfg),
        auto_fallback=cfg.auto_fallback,
        auto_udp_timeout=cfg.auto_udp_timeout,
        auto_probe_interval=cfg.auto_probe_interval,
    )


def _reality_options(cfg: OstpOutboundConfig) -> RealityOptions | None:
    reality = cfg.reality
    if reality is None:
        return None
    return RealityOptions(
        public_key=reality.public_key_bytes,
        short_id=bytes.fromhex(reality.short_id),
        server_name=reality.server_name or cfg.sni or REALITY_DEFAULT_SNI,
    )


def _sum_known(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _nat_options(cfg: OstpOutboundConfig) -> NatOptions | None:
    """The pydantic `nat` block as the session's options (host names resolved per session)."""
    nat = cfg.nat
    if nat is None:
        return None
    turn = None
    if nat.turn is not None:
        turn = TurnConfig(
            server=nat.turn.server_address,
            username=nat.turn.username,
            password=nat.turn.password.get_secret_value(),
            lifetime=nat.turn.lifetime,
            refresh_fraction=nat.turn.refresh_fraction,
            permission_refresh=nat.turn.permission_refresh,
            channel_refresh=nat.turn.channel_refresh,
        )
    return NatOptions(
        mode=nat.mode,
        stun=tuple(nat.stun_addresses),
        turn=turn,
        retry_direct_after=nat.retry_direct_after,
    )


register_outbound("ostp", _factory)
