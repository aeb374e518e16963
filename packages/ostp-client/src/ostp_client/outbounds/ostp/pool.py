"""The `ostp` outbound: a pool of sessions to one server; streams go to the live session with
the fewest, and each session is re-established on its own (spec §10.2, §10.3)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from dataclasses import replace

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
    UdpOutboundSession,
)
from ostp_client.nat import (
    TurnConfig,
)
from ostp_client.outbounds import OutboundContext
from ostp_client.outbounds.ostp.options import (
    RECEIVE_BUFFER_CAP,
    RECONNECT_DELAY,
    STREAM_DATAGRAM_SIZE,
    STREAM_HANDSHAKE_TIMEOUT,
    STREAM_WINDOW,
    NatMode,
    NatOptions,
    SessionState,
    TransportMode,
)
from ostp_client.outbounds.ostp.session import _Session
from ostp_client.outbounds.ostp.status import OstpReport
from ostp_client.outbounds.ostp.stream import OstpStream, OstpUdpSession
from ostp_client.transport.stream import RealityOptions, StreamOptions
from ostp_client.transport.udp import SOCKET_BUFFER
from ostp_proto import (
    Connect,
    ConnectionConfig,
    PaddingPolicy,
    PmtudConfig,
    UdpAssociate,
)
from ostp_proto.address import format_host_port
from ostp_proto.transport import Framing

logger = logging.getLogger("ostp_client.outbounds.ostp")  # one logger name for the whole outbound


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
        self.transport = TransportMode(transport)
        self.transport_port = transport_port
        self.sni = sni
        self.auto_fallback = TransportMode(auto_fallback)
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

    def status(self) -> OstpReport:
        sessions = tuple(s.snapshot() for s in self.sessions)
        rtts = [s.rtt_ms for s in sessions if s.rtt_ms is not None]
        return OstpReport(
            tag=self.tag,
            type=self.type,
            state=self.state,
            server=format_host_port(*self.server),
            rtt_ms=min(rtts) if rtts else None,
            bytes_up=sum(s.bytes_up for s in sessions),
            bytes_down=sum(s.bytes_down for s in sessions),
            reconnects=sum(s.reconnects for s in sessions),
            connected_since=min(
                (s.connected_since for s in sessions if s.connected_since), default=None
            ),
            streams=len(self._active_ids),
            kernel_drops=_sum_known(s.kernel_drops for s in sessions),
            nat_mode=self.nat.mode if self.nat is not None else None,
            transport=self.transport,
            mapped_address=next((s.mapped_address for s in sessions if s.mapped_address), None),
            sessions=sessions,
        )


def make_outbound(cfg: OstpOutboundConfig, ctx: OutboundContext) -> Outbound:
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
        mode=NatMode(nat.mode),
        stun=tuple(nat.stun_addresses),
        turn=turn,
        retry_direct_after=nat.retry_direct_after,
    )
