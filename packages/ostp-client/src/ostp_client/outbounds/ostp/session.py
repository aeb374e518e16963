"""One OSTP session: its transport, its :class:`ostp_proto.ClientConnection` and the task that
drives it (read, feed the core, dispatch events, send, sleep until the next deadline) and its
re-establishment. What transport ``auto`` (:mod:`.auto`), the NAT path (:mod:`.natpath`) and
session health (:mod:`.health`) decide, the session carries out; :mod:`.dial` opens its
sockets."""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import anyio
import anyio.abc
from anyio.abc import TaskStatus

from ostp_client.nat import NatConfig, NatMux
from ostp_client.outbounds.ostp.auto import AutoStep, AutoTransport, udp_progress
from ostp_client.outbounds.ostp.dial import (
    DialOptions,
    check_buffers,
    fit_path,
    open_stream_to,
    probe_udp,
    resolve_nat,
    udp_transport,
)
from ostp_client.outbounds.ostp.health import SessionHealth
from ostp_client.outbounds.ostp.natpath import EndAttempt, NatPath, StartHandshake, WarnOnce
from ostp_client.outbounds.ostp.options import (
    RESUME_MIN_INTERVAL,
    RTT_SHOWN_GRACE,
    NatOptions,
    SessionState,
    TransportMode,
)
from ostp_client.outbounds.ostp.status import SessionStatus
from ostp_client.outbounds.ostp.stream import OstpStream, _Channel
from ostp_client.transport import DatagramTransport, TransportError
from ostp_client.transport.stream import StreamTransport
from ostp_client.transport.udp import NatSocket as _NatSocket
from ostp_client.transport.udp import UdpTransport, open_udp_socket
from ostp_proto import (
    ClientConnection,
    Close,
    ConnectionConfig,
    ConnectionTerminated,
    Data,
    DataLost,
    ExtensionsNegotiated,
    HandshakeCompleted,
    RelayMessageReceived,
    State,
    Termination,
)
from ostp_proto.address import format_sockaddr
from ostp_sockets import BatchSocket

logger = logging.getLogger("ostp_client.outbounds.ostp")  # one logger name for the whole outbound


class SessionOwner(DialOptions, Protocol):
    """What a session reads of the outbound that owns it (`pool.OstpOutbound`)."""

    server: tuple[str, int]
    transport: TransportMode
    auto_fallback: TransportMode
    auto_probe_interval: float
    connect_timeout: float
    keepalive_interval: float
    reconnect_delay: float
    receive_buffer_cap: int
    nat: NatOptions | None
    connection_config: ConnectionConfig
    """Over UDP."""
    stream_config: ConnectionConfig
    """Over the TCP transports."""

    def release_stream_id(self, stream_id: int) -> None: ...

    def session_connected(self) -> None: ...

    def state_changed(self) -> None: ...


class _Session:
    """One OSTP session: one datagram transport at a time, one ClientConnection, one driving
    task (and, on TCP, the transport's writer and ``auto``'s UDP probe beside it).

    Flushing (``datagrams_to_send`` and ``send_batch``) happens in :meth:`flush` only: once per
    turn of the driving task, and once per event-loop pass for the streams, which hand the
    core their data and schedule that flush (:meth:`_flush_soon`) rather than flush each. A
    stream that finds the core full flushes what is due before it waits; teardown and
    replacement flush at once (their Close must leave now)."""

    def __init__(self, outbound: SessionOwner, index: int) -> None:
        self.outbound = outbound
        self.index = index
        self.state = SessionState.IDLE
        self.conn: ClientConnection | None = None
        self.transport: DatagramTransport | None = None
        self.name = f"{outbound.tag} session {index}"
        self.mux: NatMux | None = None
        self.nat_path = NatPath(outbound.nat, self.name)
        self._retry_now = False
        self._replacing: str | None = None
        """Why the current connection is being replaced by a fresh handshake (session health)."""
        self.replacements = 0
        self.health = SessionHealth()
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
        self._call_soon: Callable[[Callable[[], None]], object] | None = None
        """The event loop's ``call_soon`` (asyncio); None: writers flush at once."""
        self._flush_due = False
        """A writer gave the core something since the last flush (one is scheduled)."""
        self._flush_error: Exception | None = None
        """What a scheduled flush raised: the driving task raises it (ends the attempt)."""
        self.connected_event = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        """The current attempt's task group (the TCP writer, the UDP probe)."""
        self.transport_switches = 0
        """Times the session moved to another transport (or a new TCP connection) while live."""
        self._resumed_at = -math.inf
        self.auto = AutoTransport(
            fallback=outbound.auto_fallback,
            udp_timeout=outbound.auto_udp_timeout,
            keepalive_interval=outbound.keepalive_interval,
            probe_interval=outbound.auto_probe_interval,
        )
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
        try:
            self._call_soon = asyncio.get_running_loop().call_soon
        except RuntimeError:  # another event loop than asyncio's: writers flush at once
            self._call_soon = None
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
            except Exception as caught:  # a bug must cost this session, not the daemon
                # What the attempt's task group raises comes wrapped in an ExceptionGroup
                # (anyio 4 groups even one failure): judge the failure by what it holds.
                match _single(caught):
                    case TransportError() as exc:
                        kind = self.outbound.stream_options.kind
                        self.last_error = f"{kind}: {exc.strerror or exc}"
                        logger.warning("%s: %s", self.name, self.last_error)
                    case OSError() as exc:
                        self.last_error = f"socket error: {exc.strerror or exc}"
                        logger.warning("%s: %s", self.name, self.last_error)
                    case exc:
                        self.last_error = f"internal error: {exc!r}"
                        logger.exception("%s failed", self.name)
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
        host, port = self.outbound.server
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(errno.EHOSTUNREACH, f"cannot resolve {host}")
        family, _, _, _, sockaddr = infos[0]
        handshake_now = True
        mode = self.outbound.transport
        if mode == TransportMode.AUTO:
            mode = self.auto.first_transport()
        if mode == TransportMode.UDP:
            opened = await self._open_udp(family, sockaddr)
            if opened is None:
                return
            handshake_now = opened
        else:
            try:
                self._use(await open_stream_to(self.outbound, sockaddr, self.name))
            except OSError:
                self.auto.tcp_ended()  # ``auto``: TCP fails too, try UDP first next time
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
        fit_path(conn, transport, time.monotonic())
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
        relay = self.nat_path.choose(time.monotonic())
        servers = await resolve_nat(self.outbound.nat, relay, family)
        for warning in servers.warnings:
            self._warn_once(warning)
        if servers.failure is not None:
            self._fail_attempt(servers.failure)
            return None
        stun, turn = servers.stun, servers.turn
        sock, buffers = open_udp_socket(family, self.outbound.socket_buffer)
        check_buffers(self.outbound.tag, buffers)
        self.nat_path.begin(relay)
        # Not connected if it also talks to the STUN/TURN servers.
        mux = self.mux = NatMux(NatConfig(turn=turn)) if stun or turn is not None else None
        batching = self.outbound.batching
        self._use(udp_transport(sock, buffers, sockaddr, mux, batching=batching))
        if mux is None:
            return True
        now = time.monotonic()
        for address in stun:
            mux.start_binding(address, now)
        if turn is None:
            return True
        # The handshake starts once the relay is ready (RelayReady).
        mux.start_turn((str(sockaddr[0]), int(sockaddr[1])), now)
        logger.info(
            "%s: allocating a relay on TURN server %s", self.name, format_sockaddr(turn.server)
        )
        return False

    async def _drive(
        self, conn: ClientConnection, family: int, sockaddr: Any, handshake_now: bool
    ) -> None:
        now = time.monotonic()
        self.auto.new_attempt(now)
        self.health.new_attempt(now)
        if handshake_now:
            conn.connect(now, time.time())
        self.flush()
        auto = self.outbound.transport == TransportMode.AUTO
        while True:
            if (error := self._flush_error) is not None:
                self._flush_error = None
                raise error  # a scheduled flush failed: end this attempt
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
                silent = now - self.health.rtt_sampled_at(conn)
                self.replace(f"no answer to keepalive Pings for {silent:.0f} s")
                continue  # the core is closed now: its event ends the attempt
            if auto and not await self._drive_auto(conn, family, sockaddr, now):
                return
            self.flush()
            await self._wait(conn)

    # -- transports ----------------------------------------------------------------------------

    def _use(self, transport: DatagramTransport) -> None:
        self.transport = transport
        if isinstance(transport, StreamTransport):
            transport.on_drained = self._wake
            if self._tg is not None:
                self._tg.start_soon(transport.run)

    def _switch(self, conn: ClientConnection, new: DatagramTransport, reason: str) -> None:
        """Continue the session on ``new`` (roaming, spec §9.2): what was in flight is sent
        again on it, the ARQ runs as the new path needs (no timers over TCP)."""
        old = self.transport
        self._use(new)
        if old is not None and old is not new:
            if isinstance(old, UdpTransport) and isinstance(old.batch, _NatSocket):
                self.mux = None  # STUN answers on the old socket mean nothing now
                self.nat_path.mapped_address = None
            self._retire(old)
        conn.reliable_transport = new.reliable
        now = time.monotonic()
        self.health.switched_at = now
        conn.path_changed(now)
        fit_path(conn, new, now)
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
            new = await open_stream_to(self.outbound, sockaddr, self.name)
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
        transport = self.transport
        assert transport is not None
        switch = self._switch_to
        progress = udp_progress(conn, now)
        match self.auto.step(
            now,
            reliable=transport.reliable,
            established=conn.established,
            progress=progress,
            probe_ready=switch is not None,
        ):
            case AutoStep.MOVE_TO_UDP:
                assert switch is not None
                self._switch_to = None
                self._switch(conn, *switch)
            case AutoStep.DROP_PROBE:
                assert switch is not None
                self._switch_to = None
                switch[0].close()
            case AutoStep.PROBE:
                assert self._tg is not None
                self._tg.start_soon(self._probe_udp, family, sockaddr)
            case AutoStep.END_ATTEMPT:
                self.last_error = (
                    f"no handshake over UDP in {self.outbound.auto_udp_timeout:g} s;"
                    f" using {self.outbound.stream_options.kind}"
                )
                logger.info("%s: %s", self.name, self.last_error)
                self._retry_now = True  # no back-off: the UDP attempt already took its time
                return False
            case AutoStep.FALL_BACK:
                reason = f"UDP stopped passing: no answer for {now - progress:.0f} s"
                try:
                    new = await open_stream_to(self.outbound, sockaddr, self.name)
                except OSError as exc:
                    self.auto.fallback_failed(time.monotonic())
                    kind = self.outbound.stream_options.kind
                    self._warn_once(f"{reason}, and {kind} fails too: {exc}")
                    return True
                self.auto.fell_back()
                self._switch(conn, new, reason)
        return True

    async def _probe_udp(self, family: int, sockaddr: Any) -> None:
        """``auto`` on TCP: a UDP handshake every ``auto_probe_interval`` (doubling while it
        fails); the first that completes hands its socket over to the session."""
        auto = self.auto
        try:
            while True:
                await anyio.sleep(auto.probe_interval)
                transport = await probe_udp(self.outbound, family, sockaddr)
                if transport is not None:
                    auto.probe_succeeded()
                    self._switch_to = (transport, "a UDP handshake completed")
                    self._wake()
                    return
                wait = auto.probe_failed()
                logger.debug("%s: UDP still does not pass; next probe in %.0f s", self.name, wait)
        finally:
            auto.probe_ended()

    def _drive_nat(self, mux: NatMux, conn: ClientConnection, now: float) -> bool:
        """Timers, events and requests of the NAT machinery; False ends the attempt."""
        timer = mux.get_timer()
        if timer is not None and timer <= now:
            mux.handle_timer(now)
        ok = True
        while (event := mux.next_event()) is not None:
            match self.nat_path.on_event(event):
                case StartHandshake():
                    if conn.state is State.IDLE:
                        conn.connect(now, time.time())
                case WarnOnce(message):
                    self._warn_once(message)
                case EndAttempt(message):
                    self._fail_attempt(message)
                    ok = False
        batch = self.batch
        if isinstance(batch, _NatSocket):
            batch.send_nat(now)
        return ok

    def _fail_attempt(self, message: str) -> None:
        """The relay failed: say so once, and (``auto``) try direct next time."""
        self.last_error = message
        self._warn_once(message)
        self.nat_path.relay_failed()

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
            self.health.paused_at = now
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
            self.auto.deadline,
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
        """Dispatch the core's events by type; False once the connection ended."""
        while (event := conn.next_event()) is not None:
            match event:
                case RelayMessageReceived():
                    channel = self.channels.get(event.stream_id)
                    if channel is not None:
                        channel.on_message(event.message)
                    elif isinstance(event.message, Data) and event.stream_id:
                        # a stream we no longer know: tell the server to stop sending
                        conn.send(event.stream_id, Close())
                case HandshakeCompleted():
                    self._handshake_completed(event)
                case ExtensionsNegotiated():
                    logger.debug(
                        "%s session %d: flow control %s (server window %d)",
                        self.outbound.tag,
                        self.index,
                        "on" if conn.flow_control else "off",
                        event.peer_stream_window,
                    )
                case DataLost():
                    self._data_lost(event)
                case ConnectionTerminated():
                    self.last_error = self._replacing or event.reason
                    logger.info("%s session %d: %s", self.outbound.tag, self.index, event.reason)
                    timed_out = event.cause is Termination.HANDSHAKE_TIMED_OUT
                    if timed_out and self.nat_path.handshake_timed_out(time.monotonic()):
                        self._retry_now = True  # to TURN at once: the direct try took its time
                    return False
        self._wake_senders()
        return True

    def _handshake_completed(self, event: HandshakeCompleted) -> None:
        self.session_id = event.session_id
        self.connected_at = time.time()
        self.last_error = None
        self._warned.clear()
        self._set_state(SessionState.CONNECTED)
        self.connected_event.set()
        self.outbound.session_connected()

    # -- session health (issue 13 item 4) --------------------------------------------------------

    def _health_deadline(self, conn: ClientConnection) -> float | None:
        """When the keepalive Pings will have gone unanswered for too long (None: not now)."""
        transport = self.transport
        if self.outbound.transport == TransportMode.AUTO and (
            transport is None or not transport.reliable
        ):
            # transport auto over UDP: its own check (nothing acknowledged for two keepalive
            # intervals) moves the session to TCP first, keeping its streams; replacing it
            # here would race that move and reset them. Over TCP this check applies.
            return None
        return self.health.ping_deadline(conn, self.outbound.keepalive_interval)

    def connect_answered(self) -> None:
        """A Connect got its ConnectOk or Error: the server answers relay requests."""
        self.health.connect_answered()

    def connect_unanswered(self, sent_at: float) -> None:
        """A Connect sent at ``sent_at`` got no answer within ``connect_timeout``: after
        :data:`~.health.UNANSWERED_CONNECTS` in a row on a live session, it is replaced."""
        if self.health.connect_unanswered(self.conn, sent_at):
            self.replace(
                f"{self.health.unanswered} Connects in a row got no answer in "
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

    def flush(self) -> None:
        """Send what the core has now. The driving task calls it once per turn; writers
        (streams) call :meth:`_flush_soon` instead, and the flush it schedules calls this;
        closing paths that must send at once call it directly."""
        self._flush_due = False
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

    def _flush_soon(self) -> None:
        """A writer gave the core data or a message: flush once in the event loop's next
        pass, with whatever every other writer of this pass gave it (one ``send_batch``
        instead of one each, and no task hop: a loop callback, not a turn of the driving
        task). The driving task's own flush in between does the job and makes it a no-op."""
        if self._flush_due:
            return
        call_soon = self._call_soon
        if call_soon is None:
            self.flush()
            self._wake_if_needed()
            return
        call_soon(self._scheduled_flush)
        self._flush_due = True

    def _scheduled_flush(self) -> None:
        """The flush :meth:`_flush_soon` scheduled (a loop callback: harmless after the
        connection ended or was replaced, as :meth:`flush` then finds nothing or the new one).
        What it raises goes to the driving task, which ends the attempt as if its own flush
        had failed: the streams are reset, never left waiting."""
        if not self._flush_due:
            return  # the driving task flushed since
        try:
            self.flush()
            self._wake_if_needed()  # the data in flight may make the core's timer earlier
        except Exception as exc:
            self._flush_error = exc
            self._wake()

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
            if transport.reliable:
                self.auto.tcp_ended()  # ``auto``: after a session on TCP, try UDP first again
            self._retire(transport)
        if self._switch_to is not None:
            self._switch_to[0].close()
            self._switch_to = None
        self.transport = None
        self.conn = None
        self.mux = None
        self.buffered = 0
        self._flush_error = None  # the connection it was about has gone
        self._wake_senders()

    def _reset_channels(self, reason: str) -> None:
        for channel in list(self.channels.values()):
            channel.reset(reason)
        self.channels.clear()

    def _set_state(self, state: SessionState) -> None:
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
            self._flush_soon()

    def send_message(self, stream_id: int, message: Any) -> None:
        conn = self.conn
        if conn is None or not conn.established:
            return
        conn.send(stream_id, message)
        self._flush_soon()

    async def send_data(self, stream_id: int, data: bytes) -> None:
        while True:
            conn = self.conn
            if conn is None or not conn.established or stream_id not in self.channels:
                raise anyio.BrokenResourceError("tunnel session ended")
            if conn.stream_writable(stream_id):
                break
            if self._flush_due:
                # What this pass's writers gave the core may be what fills it: send that now
                # (one flush for all of them still) rather than wait for the scheduled one.
                self.flush()
                self._wake_if_needed()
                continue
            event = self._send_waiters.get(stream_id)
            if event is None:
                event = self._send_waiters[stream_id] = anyio.Event()
            await event.wait()
        conn.send_data(stream_id, data)
        self._flush_soon()

    def snapshot(self) -> SessionStatus:
        conn, nat_path = self.conn, self.nat_path
        rtt = None
        if conn is not None and conn.established:
            age = time.monotonic() - self.health.rtt_sampled_at(conn)
            if age <= self.outbound.keepalive_interval + RTT_SHOWN_GRACE:
                rtt = conn.ping_rtt if conn.ping_rtt is not None else conn.handshake_rtt
        return SessionStatus(
            index=self.index,
            state=self.state,
            session_id=self.session_id if self.state == SessionState.CONNECTED else None,
            rtt_ms=round(rtt * 1000, 2) if rtt is not None else None,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            connected_since=self.connected_at if self.state == SessionState.CONNECTED else None,
            reconnects=self.reconnects,
            replacements=self.replacements,
            streams=len(self.channels),
            flow_control=conn.flow_control if conn is not None else None,
            datagram_size=conn.datagram_size if conn is not None else None,
            pmtud=_pmtud_state(conn),
            receive_buffered=self.buffered,
            receive_paused=conn.receive_paused if conn is not None else False,
            kernel_drops=self.kernel_drops(),
            socket_buffer=self._socket_buffer(),
            last_error=self.last_error,
            path=nat_path.path,
            mapped_address=_text(nat_path.mapped_address),
            relayed_address=_text(nat_path.relayed_address) if nat_path.path == "turn" else None,
            turn_refreshes=nat_path.turn_refreshes,
            nat_drops=self._nat_drops(),
            transport=self.transport.kind if self.transport is not None else None,
            transport_switches=self.transport_switches,
            sender=replace(conn.sender.stats) if conn is not None else None,
            counters=replace(conn.stats) if conn is not None else None,
        )

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


def _text(address: tuple[str, int] | None) -> str | None:
    return format_sockaddr(address) if address is not None else None


def _single(exc: BaseException) -> BaseException:
    """The one exception inside (nested) groups of one, else ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _pmtud_state(conn: ClientConnection | None) -> str | None:
    """Path MTU discovery's state for the status (None: off or no session)."""
    pmtud = conn.pmtud if conn is not None else None
    return pmtud.state.value if pmtud is not None else None
