"""The UDP side of the server: listen sockets, the session table, timers (spec §9).

One task per listen socket reads every datagram that is ready (no task per datagram), feeds it
to its session or to the acceptor, then lets each touched session act on its events and flush.
One timer task sleeps until the earliest deadline of any session. Replies leave from the socket
the client's datagram came in on. Nothing unauthenticated ever gets an answer.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.lowlevel

from ostp_proto import SERVER_DEFAULTS, PmtudConfig, ServerAcceptor, ServerConnection
from ostp_proto.address import format_host_port, format_sockaddr
from ostp_proto.pmtud import BASE_PLPMTU
from ostp_sockets import (
    BatchSocket,
    first_hop_payload,
    set_buffers,
    set_dont_fragment,
    udp_overhead,
)

from .config import ServerConfig
from .replay_cache import REWRITE_INTERVAL, ReplayCacheFile
from .session import Session
from .tcp import TcpFront

if TYPE_CHECKING:
    from .tcp import TcpConnection

log = logging.getLogger("ostp_server")

ROAM_BUCKET_CAPACITY = 50.0  # spec §9.2 step 3: token bucket, capacity 50
ROAM_BUCKET_RATE = 50.0  # refilled 50 per second
RECV_BATCH = 512  # datagrams read per wake-up before others get a turn
HOUSEKEEPING_INTERVAL = 1.0
RESTART_SKEW_ALLOWANCE = 30.0
"""Without a replay cache from the previous run, first messages whose timestamp is older than
the start time minus this are refused (they may be replays from before the restart); clients
whose clocks are behind by more than this are refused until ~300 s after the start."""
TIMER_BATCH = 64  # sessions whose timers run before the loop yields and re-reads the clock
TIMER_FLOOR = 0.001  # a timer that stays in the past after running is retried this much later


@dataclass(slots=True)
class KeyStats:
    """Counters per access key (spec §9.4); the label never contains the key."""

    label: str
    bytes_up: int = 0
    """Bytes of datagrams routed to this key's sessions."""
    bytes_down: int = 0
    """Bytes of datagrams sent to this key's sessions (all of them, ACKs included)."""
    sessions: int = 0
    """Handshakes accepted."""
    active: int = 0
    limit: int | None = None
    """``limit_bytes`` of the user: up + down beyond it ends its sessions (spec §9.4)."""

    @property
    def over_limit(self) -> bool:
        return self.limit is not None and self.bytes_up + self.bytes_down > self.limit


@dataclass(slots=True)
class ServerStats:
    datagrams_received: int = 0
    datagrams_sent: int = 0
    send_drop: int = 0
    """Datagrams the kernel refused (full socket buffer); the ARQ resends them."""
    unauthenticated_drop: int = 0
    """Datagrams that matched no session and were no valid handshake: never answered."""
    session_cap_drop: int = 0
    """Handshakes dropped because the table was full (no half-open session to evict)."""
    half_open_evictions: int = 0
    """Sessions ended to make room because they sent nothing since their handshake."""
    limit_drop: int = 0
    backpressure_drop: int = 0
    roam_scan_skipped: int = 0
    """Roaming scans skipped because the token bucket was empty."""
    roam_rebinds: int = 0
    timer_stuck: int = 0
    """Times a session's timer stayed in the past after it ran (a core bug; see the log)."""
    sessions_started: int = 0
    sessions_ended: int = 0


@dataclass(slots=True)
class Listener:
    """Where a session's replies leave from: a UDP listen socket, or a TCP connection."""

    sock: socket.socket
    address: tuple[str, int]
    batch: BatchSocket | None = None
    """A UDP listen socket's batched I/O (GSO/GRO where the kernel offers them)."""
    tcp: TcpConnection | None = None
    """Set for a TCP connection (spec §10.6): replies are framed and written to it."""
    no_fragments: bool = False
    """Datagrams leave with DF set and never fragmented (``IP_PMTUDISC_PROBE``): path MTU
    discovery sizes them. False where the system does not offer it: the base size then."""


def open_listener(host: str, port: int, buffer_size: int, *, offload: bool) -> Listener:
    """A UDP listen socket on ``host:port``: large buffers, DF set, GSO/GRO if ``offload``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.setblocking(False)
        set_buffers(sock, buffer_size)  # capped at rmem_max/wmem_max unless root
        # many peers on one socket: no receive error may end its read loop
        batch = BatchSocket(sock, gso=offload, gro=offload, count_drops=False, skip_errors=True)
        no_fragments = set_dont_fragment(sock)
    except BaseException:
        sock.close()
        raise
    bound = sock.getsockname()
    return Listener(sock, (str(bound[0]), int(bound[1])), batch, no_fragments=no_fragments)


class OstpServer:
    """An OSTP server bound to its listen sockets; :meth:`run` serves until cancelled.

    Use :func:`serve` or :func:`running_server` rather than driving this directly.
    """

    def __init__(
        self,
        config: ServerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        unix_clock: Callable[[], float] = time.time,
        offload: bool = True,
    ) -> None:
        self.config = config
        self.clock = clock
        self.unix_clock = unix_clock
        self.offload = offload
        self.conn_config = dataclasses.replace(
            SERVER_DEFAULTS,
            idle_timeout=config.idle_timeout,
            max_datagram_size=config.max_datagram_size,
            extensions=config.extensions,
            pmtud=PmtudConfig(),
        )
        self.acceptor = ServerAcceptor(config.key_strings(), config=self.conn_config)
        self.key_stats = [
            KeyStats(label, limit=user.limit_bytes)
            for label, user in zip(config.key_labels(), config.access_keys, strict=True)
        ]
        self.stats = ServerStats()
        self.listeners: list[Listener] = []
        self.sessions: dict[int, Session] = {}
        self._by_addr: dict[tuple[object, ...], Session] = {}
        self._half_open: OrderedDict[Session, None] = OrderedDict()
        """Sessions in the order they started, until they send their first datagram."""
        self._heap: list[tuple[float, int, Session]] = []
        self._seq = 0
        self._sleep_until = float("inf")
        self._timer_wake: anyio.Event | None = None
        self._timer_stuck_logged = False
        self._tokens = ROAM_BUCKET_CAPACITY
        self._tokens_at = clock()
        self._tg: anyio.abc.TaskGroup | None = None
        path = config.replay_cache
        self._replay_file = ReplayCacheFile(Path(path)) if path else None
        self.tcp = TcpFront(self) if config.tcp else None

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) of every listen socket, in config order."""
        return [listener.address for listener in self.listeners]

    def spawn(self, fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        assert self._tg is not None
        self._tg.start_soon(fn)

    # -- lifecycle -------------------------------------------------------------------------

    def bind(self) -> None:
        for host, port in self.config.listen_addresses:
            for attempt in range(20):
                try:
                    listener = open_listener(
                        host, port, self.config.socket_buffer, offload=self.offload
                    )
                except OSError as e:
                    self.close_sockets()
                    where = format_host_port(host, port)
                    raise OSError(e.errno, f"cannot listen on udp {where}: {e.strerror}") from None
                if self.tcp is None:
                    break
                try:  # TCP on the same port as UDP (spec §9.1, §10.6)
                    self.tcp.bind(host, listener.address[1])
                except OSError as e:
                    if port == 0 and attempt < 19:
                        listener.sock.close()
                        continue  # a free UDP port whose TCP twin is taken: pick another
                    # A taken TCP port must not take the UDP service down with it.
                    where = format_host_port(host, listener.address[1])
                    log.warning("cannot listen on tcp %s: %s; udp only there", where, e.strerror)
                break
            self.listeners.append(listener)

    def close_sockets(self) -> None:
        for listener in self.listeners:
            listener.sock.close()
        if self.tcp is not None:
            self.tcp.close()

    def tcp_listener(self, connection: TcpConnection) -> Listener:
        """The reply path of a session on ``connection``."""
        return Listener(connection.sock, connection.address, tcp=connection)

    def session_at(self, addr: tuple[object, ...]) -> Session | None:
        """The session bound to ``addr`` (a UDP address or a TCP connection's key)."""
        return self._by_addr.get(addr)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[OstpServer] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report readiness with ``self``, and serve until cancelled."""
        if not self.listeners:
            self.bind()
        self._load_replay_cache()
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for listener in self.listeners:
                    tg.start_soon(self._read_loop, listener)
                tg.start_soon(self._timer_loop)
                tg.start_soon(self._housekeeping_loop)
                for listener in self.listeners:
                    log.info("listening on udp %s", format_host_port(*listener.address))
                if self.tcp is not None:
                    for sock, address in zip(self.tcp.sockets, self.tcp.addresses, strict=True):
                        tg.start_soon(self.tcp.accept_loop, sock)
                        log.info("listening on tcp %s", format_host_port(*address))
                task_status.started(self)
        finally:
            for session in list(self.sessions.values()):  # no await: cancellation-safe
                session.conn.close(self.clock())
                self.flush(session)
                self._end_session(session, "server shutting down")
            self.close_sockets()
            self._tg = None
            if self._replay_file is not None:
                self._replay_file.rewrite(self.acceptor.replay_entries(self.unix_clock()))
                self._replay_file.close()

    def _load_replay_cache(self) -> None:
        """Refuse replays of first messages the previous run accepted (spec §9.2)."""
        unix = self.unix_clock()
        file = self._replay_file
        entries = file.load() if file is not None else None
        if entries is None:
            # no memory of the previous run: refuse what predates this one
            self.acceptor.not_before = unix - RESTART_SKEW_ALLOWANCE
            log.log(
                logging.INFO if file is not None else logging.DEBUG,
                "no replay cache from a previous run: for %.0f s, handshakes with timestamps "
                "more than %.0f s before the start are refused",
                self.acceptor.timestamp_window,
                RESTART_SKEW_ALLOWANCE,
            )
        else:
            self.acceptor.restore_replay(entries, unix)
        if file is not None:
            file.rewrite(self.acceptor.replay_entries(unix))

    # -- receive path ----------------------------------------------------------------------

    async def _read_loop(self, listener: Listener) -> None:
        batch = listener.batch
        assert batch is not None
        while True:
            await anyio.wait_readable(listener.sock)
            now = self.clock()
            unix = self.unix_clock()
            touched: dict[Session, None] = {}
            for data, addr in batch.recv_from_batch(RECV_BATCH):
                self._dispatch(data, addr, listener, now, unix, touched)
            for session in touched:
                self._process(session)

    def _dispatch(
        self,
        data: bytes,
        addr: tuple[object, ...],
        listener: Listener,
        now: float,
        unix: float,
        touched: dict[Session, None],
    ) -> None:
        self.stats.datagrams_received += 1
        session = self._by_addr.get(addr)
        if session is not None:
            conn = session.conn
            stats = conn.stats
            conn.receive_paused = session.receive_backlogged
            before = stats.datagram_session_drop
            dropped = stats.paused_drop
            conn.receive_datagram(data, now)
            if stats.paused_drop != dropped:
                session.stats.backpressure_drop += 1
                self.stats.backpressure_drop += 1
            if stats.datagram_session_drop == before:  # the header was this session's
                session.listener = listener
                session.key_stats.bytes_up += len(data)
                touched[session] = None
                return
        if self.sessions and self._roam(data, addr, listener, now, touched):
            return
        fresh = self.acceptor.accept(data, now, unix)
        if fresh is None:
            self.stats.unauthenticated_drop += 1
            return
        entry = self.acceptor.last_accepted
        if self._replay_file is not None and entry is not None:
            self._replay_file.append(*entry)
        self._start_session(fresh, addr, listener, now, touched)

    def _take_token(self, now: float) -> bool:
        tokens = min(
            ROAM_BUCKET_CAPACITY, self._tokens + (now - self._tokens_at) * ROAM_BUCKET_RATE
        )
        self._tokens_at = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    def _roam(
        self,
        data: bytes,
        addr: tuple[object, ...],
        listener: Listener,
        now: float,
        touched: dict[Session, None],
    ) -> bool:
        """Spec §9.2 step 3, but re-binding only once the datagram authenticated, and only
        sessions that have sent a datagram since their handshake."""
        if len(data) < 12:
            return False
        if not self._take_token(now):
            self.stats.roam_scan_skipped += 1
            return False
        for session in self.sessions.values():
            # a session that never spoke has nothing to roam from, and the unmasking is the
            # scan's whole cost: half-open sessions cost nothing here
            if (
                session.addr == addr
                or not session.conn.stats.datagrams_received
                or not session.conn.matches(data)
            ):
                continue
            session.conn.receive_paused = session.receive_backlogged
            stats = session.conn.stats
            before = stats.datagrams_received
            session.conn.receive_datagram(data, now)
            if stats.datagrams_received > before:
                old = session.addr
                if self._by_addr.get(old) is session:
                    del self._by_addr[old]
                replaced = self._by_addr.get(addr)
                if replaced is not None and replaced is not session:
                    self._end_session(replaced, "its address was taken over by another session")
                session.addr = addr
                session.listener = listener
                session.conn.reliable_transport = listener.tcp is not None
                self._by_addr[addr] = session
                session.key_stats.bytes_up += len(data)
                session.conn.path_changed(now)
                self._set_path_mtu(session.conn, addr, listener, now)
                self.stats.roam_rebinds += 1
                log.info(
                    "session %s moved from %s to %s",
                    session.name,
                    format_sockaddr(old),
                    format_sockaddr(addr),
                )
                touched[session] = None
            return True
        return False

    def _start_session(
        self,
        conn: ServerConnection,
        addr: tuple[object, ...],
        listener: Listener,
        now: float,
        touched: dict[Session, None],
    ) -> None:
        old = self.sessions.get(conn.session_id)
        if old is not None:
            self._end_session(old, "replaced by a new handshake with the same session id")
        old = self._by_addr.get(addr)
        if old is not None:
            self._end_session(old, "replaced by a new handshake from the same address")
        if len(self.sessions) >= self.config.max_sessions and not self._evict_half_open(now):
            self.stats.session_cap_drop += 1
            log.debug(
                "handshake from %s dropped: %d sessions", format_sockaddr(addr), len(self.sessions)
            )
            return
        ks = self.key_stats[conn.key_index]
        if ks.over_limit:
            self.stats.limit_drop += 1
            log.info(
                "handshake from %s refused: %s is over its traffic limit",
                format_sockaddr(addr),
                ks.label,
            )
            return
        session = Session(self, conn, addr, listener, ks.label, ks, now)
        conn.reliable_transport = listener.tcp is not None  # spec §10.6: do not fight TCP
        self._set_path_mtu(conn, addr, listener, now)
        self.sessions[conn.session_id] = session
        self._by_addr[addr] = session
        self._half_open[session] = None
        ks.sessions += 1
        ks.active += 1
        self.stats.sessions_started += 1
        log.info("session %s started from %s (%s)", session.name, format_sockaddr(addr), ks.label)
        touched[session] = None

    def _set_path_mtu(
        self, conn: ServerConnection, addr: tuple[object, ...], listener: Listener, now: float
    ) -> None:
        """Path MTU discovery up to the first hop towards the client; off over TCP."""
        if listener.tcp is not None:
            conn.set_path_mtu(now, None)  # a stream: datagrams of max_datagram_size
            return
        family = listener.sock.family
        ceiling = first_hop_payload(family, addr) if listener.no_fragments else None
        conn.set_path_mtu(now, ceiling or BASE_PLPMTU, udp_overhead(family))

    def _evict_half_open(self, now: float) -> bool:
        """End the oldest session that never sent a datagram and is old enough; True if one.

        Someone holding a key can fill the table with valid first messages and never go on;
        upstream would keep those for ``idle_timeout`` (600 s) and refuse everyone else. A
        session that sent anything since its handshake is never evicted by this rule.
        """
        half_open = self._half_open
        oldest_allowed = now - self.config.half_open_timeout
        while half_open:
            session = next(iter(half_open))
            if session.conn.stats.datagrams_received:
                del half_open[session]  # it spoke: never a candidate again
                continue
            if session.started > oldest_allowed:
                return False  # the oldest candidate is too young, so are the rest
            self.stats.half_open_evictions += 1
            self._end_session(session, "half-open: no datagram since its handshake")
            return True
        return False

    def _end_session(self, session: Session, reason: str) -> None:
        if session.closed:
            return
        session.end()
        if self.sessions.get(session.conn.session_id) is session:
            del self.sessions[session.conn.session_id]
        if self._by_addr.get(session.addr) is session:
            del self._by_addr[session.addr]
        self._half_open.pop(session, None)
        session.key_stats.active -= 1
        self.stats.sessions_ended += 1
        s = session.conn.stats
        log.info(
            "session %s ended (%s) after %.1f s: %d bytes in, %d bytes out, %d streams",
            session.name,
            reason,
            self.clock() - session.started,
            s.bytes_received,
            s.bytes_sent,
            session.stats.streams_opened,
        )

    # -- events, output and timers ---------------------------------------------------------

    def _process(self, session: Session) -> None:
        if session.closed:
            return
        reason = session.handle_events()
        if reason is not None:
            self.flush(session)
            self._end_session(session, reason)
            return
        self.flush(session)

    def flush(self, session: Session) -> None:
        """Send what the session's core has ready, then re-arm its timer."""
        now = self.clock()
        out = session.conn.datagrams_to_send(now)
        if out:
            listener = session.listener
            if listener.tcp is not None:
                sent = listener.tcp.send_datagrams(out)
            else:
                batch = listener.batch
                assert batch is not None
                drops = batch.send_drop
                sent = batch.send_batch(out, session.addr)
                dropped = batch.send_drop - drops  # a full buffer: the ARQ resends them
                self.stats.send_drop += dropped
                self.stats.datagrams_sent += len(out) - dropped
                refused = batch.refused
                if refused:  # EMSGSIZE: above the first hop's MTU (a probe, normally)
                    for size in refused:
                        session.conn.datagram_refused(size, now)
                    refused.clear()
            session.key_stats.bytes_down += sent
            if session.key_stats.over_limit:
                self._end_session(session, "traffic limit reached")
                return
        session.after_flush()
        if not session.closed:
            self._schedule(session)

    def _schedule(self, session: Session) -> None:
        t = session.conn.get_timer()
        if t == session.timer:
            return
        session.timer = t
        if t is None:
            return
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, session))
        if t < self._sleep_until and self._timer_wake is not None:
            self._timer_wake.set()

    async def _timer_loop(self) -> None:
        heap = self._heap
        while True:
            now = self.clock()
            handled = 0
            while heap and heap[0][0] <= now and handled < TIMER_BATCH:
                t, _, session = heapq.heappop(heap)
                if session.closed or session.timer != t:
                    continue
                handled += 1
                session.timer = None
                session.conn.handle_timer(now)
                self._process(session)
                self._check_timer_moved(session, now)
            if heap and heap[0][0] <= now:
                # more is due: let the read loops and the signal handler have a turn first,
                # then look at the clock again
                await anyio.lowlevel.checkpoint()
                continue
            target = heap[0][0] if heap else now + 60.0
            self._sleep_until = target
            self._timer_wake = wake = anyio.Event()
            with anyio.move_on_after(max(0.0, target - now)):
                await wake.wait()
            self._sleep_until = float("inf")

    def _check_timer_moved(self, session: Session, now: float) -> None:
        """Catch a core that ran its timers at ``now`` and still wants to run them at ``now``.

        It would keep the timer loop busy on one deadline for ever; its timer is put
        ``TIMER_FLOOR`` ahead instead, so the server keeps serving everyone else.
        """
        if session.closed or session.timer is None or session.timer > now:
            return
        self.stats.timer_stuck += 1
        if not self._timer_stuck_logged:
            self._timer_stuck_logged = True
            log.warning(
                "session %s: its timer stays in the past after running it (a bug; "
                "counted as timer_stuck, logged once); retrying it every %.0f ms",
                session.name,
                TIMER_FLOOR * 1000,
            )
        t = now + TIMER_FLOOR
        session.timer = t
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, session))

    async def _housekeeping_loop(self) -> None:
        rewrite_at = self.clock() + REWRITE_INTERVAL
        while True:
            await anyio.sleep(HOUSEKEEPING_INTERVAL)
            unix = self.unix_clock()
            self.acceptor.purge(unix)
            if self._replay_file is not None and self.clock() >= rewrite_at:
                rewrite_at = self.clock() + REWRITE_INTERVAL
                self._replay_file.rewrite(self.acceptor.replay_entries(unix))
            now = self.clock()
            for session in list(self.sessions.values()):
                session.housekeeping(now)


async def serve(
    config: ServerConfig,
    *,
    task_status: anyio.abc.TaskStatus[OstpServer] = anyio.TASK_STATUS_IGNORED,
    offload: bool = True,
) -> None:
    """Run a server for ``config`` until cancelled; ``task_status.started(server)`` on bind.

    ``server = await tg.start(serve, config)`` gives the :class:`OstpServer`, whose
    :attr:`~OstpServer.addresses` hold the bound ports (listen on port 0 to get a free one).
    """
    server = OstpServer(config, offload=offload)
    await server.run(task_status=task_status)


@asynccontextmanager
async def running_server(
    config: ServerConfig, *, offload: bool = True
) -> AsyncIterator[OstpServer]:
    """``async with running_server(cfg) as server:`` serves inside the block."""
    async with anyio.create_task_group() as tg:
        server: OstpServer = await tg.start(functools.partial(serve, config, offload=offload))
        try:
            yield server
        finally:
            tg.cancel_scope.cancel()
