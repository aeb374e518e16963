"""The `tun` inbound: packets from a TUN device through the netstack to the daemon's router.

One task reads the device and feeds the sans-IO `NetStack`; one sleeps until the stack's next
timer. Every offered TCP connection gets a task that routes its destination with the same
`Dispatcher` as proxy traffic (the `ConnContext`'s inbound tag is this inbound's), connects
through the chosen outbound and only then accepts the handshake (a failed connect is answered
with RST). Every UDP flow gets a task with an outbound UDP session. Queries to port 53 are
answered through the tunnel (`dns_hijack`), optionally with fake IPs.

Backpressure: bytes from the application are reported consumed to the stack (which reopens its
receive window) only after the outbound's `send()` took them; bytes from the outbound are read
only while the stack's send buffer has room (`tcp_send` / `TcpSendReady`).

All stack calls happen on the event loop's thread and never await, so the stack needs no lock;
after each call `_service()` drains its events and writes its packets.
"""

from __future__ import annotations

import builtins
import dataclasses
import ipaddress
import logging
import socket
import sys
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
from anyio.abc import TaskStatus

from ostp_client.config import TunInboundConfig
from ostp_client.connections import (
    EXPECTED_STREAM_ERRORS,
    READ_SIZE,
    Dispatcher,
    is_connection_noise,
    reset_on_close,
)
from ostp_client.dns.codec import (
    CLASS_IN,
    TYPE_A,
    TYPE_AAAA,
    DnsFormatError,
    FakeIpPool,
    build_answer,
    build_error,
    parse_query,
)
from ostp_client.flow import Address, ConnContext, OutboundError, UdpOutboundSession
from ostp_client.inbounds import register_inbound
from ostp_client.inbounds.base import Inbound, InboundReport
from ostp_client.inbounds.tun.device import TunDevice
from ostp_client.net.bypass import (
    BypassError,
    apply_bypass,
    clear_routing_mark,
    clear_tunnel_networks,
    set_routing_mark,
    set_tunnel_networks,
)
from ostp_client.serving import run_contained
from ostp_netstack import (
    Endpoint,
    LocalProtocolError,
    NetStack,
    NetStackConfig,
    TcpConnectionClosed,
    TcpConnectionEstablished,
    TcpConnectionRequested,
    TcpConnectionReset,
    TcpDataReceived,
    TcpPeerClosed,
    TcpSendReady,
    UdpDatagramReceived,
    UdpFlowExpired,
)
from ostp_proto.address import parse_host_port

__all__ = ["TunInbound"]

logger = logging.getLogger(__name__)

DNS_PORT = 53
DNS_TIMEOUT = 5.0
MAX_DNS_QUERIES = 256
"""Hijacked queries in flight at once; more are dropped (the resolver retries)."""
UDP_QUEUE = 256
"""Datagrams queued per UDP flow towards its outbound; more are dropped (counted)."""
_MAX_UPLOAD_CHUNK = 1 << 20


class _Tcp:
    """The shell's side of one netstack TCP connection."""

    __slots__ = (
        "conn_id",
        "ctx",
        "gone",
        "peer_closed",
        "send_ready",
        "upload",
        "upload_ready",
    )

    def __init__(self, conn_id: int) -> None:
        self.conn_id = conn_id
        self.ctx: ConnContext | None = None
        self.upload: deque[bytes] = deque()
        self.upload_ready = anyio.Event()
        self.send_ready = anyio.Event()
        self.peer_closed = False
        self.gone = False
        """The stack forgot the connection (reset, closed, or aborted by us)."""

    def wake(self) -> None:
        self.upload_ready.set()
        self.send_ready.set()


class _Udp:
    __slots__ = ("dst", "flow_id", "receive", "send", "src")

    def __init__(self, flow_id: int, src: Endpoint, dst: Endpoint) -> None:
        self.flow_id = flow_id
        self.src = src
        self.dst = dst
        self.send, self.receive = anyio.create_memory_object_stream[bytes](UDP_QUEUE)


def _open_platform_device(config: TunInboundConfig) -> TunDevice:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        from ostp_client.inbounds.tun.wintun import WintunDevice  # noqa: PLC0415

        return WintunDevice.create(config.name, mtu=config.mtu)
    from ostp_client.inbounds.tun.linux import LinuxTun  # noqa: PLC0415

    return LinuxTun(config.name, offload=config.offload)


def _check_so_mark(mark: int) -> None:
    """Fail the start (rather than loop every outbound connection into the TUN) when this
    process may not mark its sockets."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            apply_bypass(probe, mark)
        except BypassError as exc:
            raise OSError(f"TUN auto_route needs SO_MARK for the daemon's sockets: {exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class TunReport(InboundReport):
    """A TUN inbound: its device and routing, and what flows through it now. `accepted` counts
    the TCP connections it took; `counters["udp_flows"]` the UDP flows it ever opened."""

    name: str
    mtu: int
    auto_route: bool
    route_table: int
    routing_mark: int
    tcp_connections: int
    """Live TCP connections."""
    udp_flows: int
    """Live UDP flows."""
    netstack: Mapping[str, int]
    """The netstack's counters that are not zero."""


class TunInbound(Inbound):
    """See the module docstring. ``open_device`` and ``system`` are seams for tests."""

    type = "tun"

    def __init__(
        self,
        config: TunInboundConfig,
        dispatcher: Dispatcher,
        *,
        open_device: Callable[[TunInboundConfig], TunDevice] = _open_platform_device,
        configure_system: bool = True,
    ) -> None:
        super().__init__(config.tag, dispatcher)
        self.config = config
        self._open_device = open_device
        self._configure_system = configure_system
        self.device: TunDevice | None = None
        self.stack: NetStack | None = None
        self._tcp: dict[int, _Tcp] = {}
        self._udp: dict[int, _Udp] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._timer_wake = anyio.Event()
        self._timer_deadline: float | None = None
        self._dns_slots = anyio.CapacityLimiter(MAX_DNS_QUERIES)
        self._own_networks = [ipaddress.ip_interface(a).network for a in config.address]
        self.fake_ips: FakeIpPool | None = None
        if config.fake_ip:
            self.fake_ips = FakeIpPool(
                config.fake_ip_range,
                config.fake_ip6_range,
                exclude=[str(n) for n in self._own_networks],
            )
        self.dns_upstream: Address | None = None
        if config.dns_upstream is not None:
            self.dns_upstream = Address(*parse_host_port(config.dns_upstream, DNS_PORT))
        self.excluded_routes: list[str] = []
        self.counters = {
            "tcp_accepted": 0,
            "tcp_refused": 0,
            "udp_flows": 0,
            "udp_dropped": 0,
            "dns_queries": 0,
            "dns_fake_answers": 0,
            "dns_dropped": 0,
        }

    # -- lifetime ---------------------------------------------------------------------------

    async def _route_excludes(self) -> list[str]:
        """The OSTP servers' addresses (resolved now) and the configured `exclude_routes`.

        The servers' entries are only a fallback: the sessions' sockets carry the routing mark
        (`ostp_client.net.bypass`) and reach the server whatever its address resolves to later.
        The exclusions keep an outbound that does not mark its sockets out of the tunnel, at
        the addresses known at start; a name that does not resolve now is logged, not fatal.
        """
        out: list[str] = []
        for outbound in self.dispatcher.outbounds.values():
            server = getattr(outbound, "server", None)
            if not isinstance(server, tuple):
                continue
            host, port = server
            try:
                infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            except OSError as exc:
                logger.warning("TUN auto_route: OSTP server %s not resolved now: %s", host, exc)
                continue
            for info in infos:
                address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
                out.append(f"{address}/{address.max_prefixlen}")
        out.extend(self.config.exclude_routes)
        return list(dict.fromkeys(out))

    def claim_routing_mark(self) -> bool:
        """Make the daemon's outbounds mark their new sockets with `routing_mark` (Linux with
        `auto_route`; idempotent). `run()` does it before installing the rules; a daemon may
        call it before starting its outbounds, so that sockets they open early (the ostp
        sessions') are marked too rather than relying on the servers' throw routes. Returns
        whether the mark is now set; it is cleared when `run()` ends."""
        config = self.config
        if not (self._configure_system and config.auto_route and sys.platform == "linux"):
            return False
        set_routing_mark(config.routing_mark)
        return True

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        device = self._open_device(config)
        self.device = device
        routes: Any = None
        try:
            if self._configure_system and sys.platform in ("linux", "win32"):
                if sys.platform == "win32":  # pragma: no cover - Windows only
                    from ostp_client.inbounds.tun.wintun import WintunDevice  # noqa: PLC0415

                    assert isinstance(device, WintunDevice)
                    routes = device.route_manager()  # IP Helper; see tun.windows_net
                else:
                    from ostp_client.inbounds.tun.linux import RouteManager  # noqa: PLC0415

                    routes = RouteManager(device.name)
                routes.configure(config.mtu, config.address)
                if config.auto_route:
                    routes.clean_stale(config.route_table)
                    self.excluded_routes = await self._route_excludes()
                    if sys.platform == "linux":
                        _check_so_mark(config.routing_mark)
                        self.claim_routing_mark()  # before any packet can be tunnelled
                    # on Windows, install_policy pins the daemon's sockets (IP_UNICAST_IF)
                    routes.install_policy(
                        config.route_table, config.routing_mark, self.excluded_routes
                    )
                if self.fake_ips is not None:
                    routes.add_device_routes(str(n) for n in self.fake_ips.networks)
            if self.fake_ips is not None:
                set_tunnel_networks(str(n) for n in self.fake_ips.networks)
            self.stack = NetStack(
                NetStackConfig(
                    mtu=config.mtu,
                    checksum_offload=device.offload,
                    udp_idle_timeout=config.udp_timeout,
                )
            )
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._timer_loop, name=f"{self.tag} timers")
                logger.info(
                    "inbound %s: TUN %s, MTU %d, %s%s",
                    self.tag,
                    device.name,
                    config.mtu,
                    ", ".join(config.address),
                    f", auto_route (table {config.route_table}, mark {config.routing_mark:#x})"
                    if config.auto_route and routes is not None
                    else "",
                )
                task_status.started()
                await self._read_loop(device)
        finally:
            for tcp in self._tcp.values():
                tcp.gone = True
            if routes is not None:
                routes.restore()  # synchronous: runs even when cancelled
            if config.auto_route:
                clear_routing_mark(config.routing_mark)  # after the rules are gone
            if self.fake_ips is not None:
                clear_tunnel_networks()
            device.close()

    def status(self) -> TunReport:
        counters = dict(self.counters)
        netstack = {}
        if self.stack is not None:
            stats = dataclasses.asdict(self.stack.stats)
            netstack = {k: v for k, v in stats.items() if isinstance(v, int) and v}
        return TunReport(
            tag=self.tag,
            type=self.type,
            accepted=counters.pop("tcp_accepted"),
            counters=counters,
            name=self.device.name if self.device else self.config.name,
            mtu=self.config.mtu,
            auto_route=self.config.auto_route,
            route_table=self.config.route_table,
            routing_mark=self.config.routing_mark,
            tcp_connections=len(self._tcp),
            udp_flows=len(self._udp),
            netstack=netstack,
        )

    # -- the loop ---------------------------------------------------------------------------

    async def _read_loop(self, device: TunDevice) -> None:
        stack = self.stack
        assert stack is not None
        while True:
            await device.wait_readable()
            packets = device.read_batch()
            if not packets:
                continue
            now = anyio.current_time()
            receive = stack.receive_packet
            for packet, verified in packets:
                receive(packet, now, verified)
            self._service(now)

    async def _timer_loop(self) -> None:
        stack = self.stack
        assert stack is not None
        while True:
            self._timer_wake = wake = anyio.Event()
            deadline = self._timer_deadline = stack.get_timer()
            if deadline is None:
                await wake.wait()
            else:
                delay = deadline - anyio.current_time()
                if delay > 0:
                    with anyio.move_on_after(delay):
                        await wake.wait()
            now = anyio.current_time()
            stack.handle_timer(now)
            self._service(now)

    def _service(self, now: float | None = None) -> None:
        """Act on the stack's events, write its packets, re-arm the timer if it moved closer."""
        stack = self.stack
        device = self.device
        assert stack is not None and device is not None
        if now is None:
            now = anyio.current_time()
        handlers = self._handlers
        while True:
            event = stack.next_event()
            while event is not None:
                handlers[type(event)](self, event)
                event = stack.next_event()
            packets = stack.packets_to_send(now)
            if not packets:
                break
            device.write_batch(packets)
        deadline = stack.get_timer()
        if deadline is not None and (
            self._timer_deadline is None or deadline < self._timer_deadline
        ):
            self._timer_deadline = deadline
            self._timer_wake.set()

    # -- events -----------------------------------------------------------------------------

    def _on_tcp_requested(self, event: TcpConnectionRequested) -> None:
        tcp = _Tcp(event.conn_id)
        self._tcp[event.conn_id] = tcp
        assert self._tg is not None
        self._tg.start_soon(
            run_contained, "TUN TCP flow", self._handle_tcp, tcp, event.src, event.dst
        )

    def _on_tcp_established(self, event: TcpConnectionEstablished) -> None:
        pass

    def _on_tcp_data(self, event: TcpDataReceived) -> None:
        tcp = self._tcp.get(event.conn_id)
        if tcp is None:
            assert self.stack is not None
            self.stack.tcp_consumed(event.conn_id, len(event.data))
            return
        tcp.upload.append(event.data)
        tcp.upload_ready.set()

    def _on_tcp_peer_closed(self, event: TcpPeerClosed) -> None:
        tcp = self._tcp.get(event.conn_id)
        if tcp is not None:
            tcp.peer_closed = True
            tcp.upload_ready.set()

    def _on_tcp_send_ready(self, event: TcpSendReady) -> None:
        tcp = self._tcp.get(event.conn_id)
        if tcp is not None:
            tcp.send_ready.set()

    def _on_tcp_gone(self, event: TcpConnectionReset | TcpConnectionClosed) -> None:
        tcp = self._tcp.get(event.conn_id)
        if tcp is not None:
            tcp.gone = True
            tcp.wake()

    def _on_udp(self, event: UdpDatagramReceived) -> None:
        flow = self._udp.get(event.flow_id)
        if flow is None:
            if self.config.dns_hijack and event.dst.port == DNS_PORT:
                self._on_dns(event)
                return
            flow = _Udp(event.flow_id, event.src, event.dst)
            self._udp[event.flow_id] = flow
            self.counters["udp_flows"] += 1
            assert self._tg is not None
            self._tg.start_soon(run_contained, "TUN UDP flow", self._handle_udp, flow)
        try:
            flow.send.send_nowait(event.data)
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self.counters["udp_dropped"] += 1

    def _on_udp_expired(self, event: UdpFlowExpired) -> None:
        flow = self._udp.pop(event.flow_id, None)
        if flow is not None:
            flow.send.close()

    _handlers: dict[builtins.type, Callable[[TunInbound, Any], None]] = {
        TcpConnectionRequested: _on_tcp_requested,
        TcpConnectionEstablished: _on_tcp_established,
        TcpDataReceived: _on_tcp_data,
        TcpPeerClosed: _on_tcp_peer_closed,
        TcpSendReady: _on_tcp_send_ready,
        TcpConnectionReset: _on_tcp_gone,
        TcpConnectionClosed: _on_tcp_gone,
        UdpDatagramReceived: _on_udp,
        UdpFlowExpired: _on_udp_expired,
    }

    # -- destinations -----------------------------------------------------------------------

    def _target(self, dst: Endpoint) -> Address | None:
        """The destination to route: the name behind a fake IP, else the address itself.

        None for a fake address that maps to no name (stale after a restart).
        """
        pool = self.fake_ips
        if pool is not None:
            ip = ipaddress.ip_address(dst.host)
            if pool.contains(ip) and not any(ip in n for n in self._own_networks):
                name = pool.lookup(ip)
                return None if name is None else Address(name, dst.port)
        return Address(dst.host, dst.port)

    # -- TCP --------------------------------------------------------------------------------

    async def _handle_tcp(self, tcp: _Tcp, src: Endpoint, dst: Endpoint) -> None:
        stack = self.stack
        assert stack is not None
        registry = self.dispatcher.registry
        clean = False
        try:
            with registry.track(self.tag, "tcp", Address(src.host, src.port)) as ctx:
                tcp.ctx = ctx
                target = self._target(dst)
                if target is None:
                    logger.debug("#%d %s: fake IP with no name", ctx.id, dst.host)
                    self._refuse(tcp)
                    return
                try:
                    remote = await self.dispatcher.connect_tcp(ctx, target)
                except OutboundError as exc:
                    logger.debug("#%d connect to %s failed: %s", ctx.id, target, exc)
                    self._refuse(tcp)
                    return
                async with remote:
                    if tcp.gone:
                        return
                    stack.tcp_accept(tcp.conn_id)
                    self.counters["tcp_accepted"] += 1
                    self._service()
                    try:
                        clean = await self._relay(tcp, remote, ctx)
                    finally:
                        if not clean:  # broke, or cancelled: as tcp_abort for the app
                            reset_on_close(remote)
        except Exception as exc:
            if is_connection_noise(exc):
                logger.debug("TUN TCP %s: connection noise: %r", dst, exc)
            else:
                logger.exception("TUN TCP handler for %s failed", dst)
        finally:
            self._tcp.pop(tcp.conn_id, None)
            if not clean and not tcp.gone:
                tcp.gone = True
                stack.tcp_abort(tcp.conn_id)
                self._service()

    def _refuse(self, tcp: _Tcp) -> None:
        assert self.stack is not None
        self.counters["tcp_refused"] += 1
        if not tcp.gone:
            tcp.gone = True
            self.stack.tcp_refuse(tcp.conn_id)
            self._service()

    async def _relay(self, tcp: _Tcp, remote: anyio.abc.ByteStream, ctx: ConnContext) -> bool:
        """Both directions until both ended; False when either side broke."""
        results: list[bool] = []
        async with anyio.create_task_group() as tg:

            async def download() -> None:
                ok = await self._download(tcp, remote, ctx)
                results.append(ok)
                if not ok:
                    tg.cancel_scope.cancel()

            tg.start_soon(download)
            ok = await self._upload(tcp, remote, ctx)
            results.append(ok)
            if not ok:
                tg.cancel_scope.cancel()
        return len(results) == 2 and all(results)

    async def _upload(self, tcp: _Tcp, remote: anyio.abc.ByteStream, ctx: ConnContext) -> bool:
        """Application → outbound; the stack's window reopens only once `send()` returned."""
        stack = self.stack
        assert stack is not None
        upload = tcp.upload
        try:
            while True:
                while not upload:
                    if tcp.gone:
                        return False
                    if tcp.peer_closed:
                        await remote.send_eof()
                        return True
                    tcp.upload_ready = anyio.Event()
                    await tcp.upload_ready.wait()
                if len(upload) == 1:
                    data = upload.popleft()
                else:
                    parts = []
                    size = 0
                    while upload and size < _MAX_UPLOAD_CHUNK:
                        part = upload.popleft()
                        parts.append(part)
                        size += len(part)
                    data = b"".join(parts)
                await remote.send(data)
                ctx.bytes_up += len(data)
                stack.tcp_consumed(tcp.conn_id, len(data))
                self._service()
        except EXPECTED_STREAM_ERRORS as exc:
            logger.debug("#%d upload: %r", ctx.id, exc)
            return False

    async def _download(self, tcp: _Tcp, remote: anyio.abc.ByteStream, ctx: ConnContext) -> bool:
        """Outbound → application; waits for room in the stack's send buffer."""
        stack = self.stack
        assert stack is not None
        conn_id = tcp.conn_id
        try:
            while True:
                try:
                    data = await remote.receive(READ_SIZE)
                except anyio.EndOfStream:
                    if tcp.gone:
                        return False
                    stack.tcp_close(conn_id)
                    self._service()
                    return True
                ctx.bytes_down += len(data)
                while data:
                    if tcp.gone:
                        return False
                    tcp.send_ready = anyio.Event()
                    accepted = stack.tcp_send(conn_id, data)
                    self._service()
                    if accepted < len(data):
                        data = data[accepted:]
                        await tcp.send_ready.wait()
                    else:
                        break
        except LocalProtocolError:
            return False  # the stack gave up on the connection meanwhile
        except EXPECTED_STREAM_ERRORS as exc:
            logger.debug("#%d download: %r", ctx.id, exc)
            return False

    # -- UDP --------------------------------------------------------------------------------

    def _reply_udp(self, flow: _Udp, data: bytes) -> None:
        """A datagram back to the application, always from the flow's destination: the
        outbound may answer from another address (an override, a resolved name, an IPv4-mapped
        form) that the application's connected socket would not accept."""
        stack = self.stack
        assert stack is not None
        if flow.flow_id not in self._udp:
            return
        if not stack.udp_send(flow.flow_id, data):
            self.counters["udp_dropped"] += 1
        self._service()

    async def _handle_udp(self, flow: _Udp) -> None:
        registry = self.dispatcher.registry
        try:
            with registry.track(self.tag, "udp", Address(flow.src.host, flow.src.port)) as ctx:
                target = self._target(flow.dst)
                if target is None:
                    return
                try:
                    outbound = self.dispatcher.route(ctx, target, "udp")
                    session = await outbound.open_udp(ctx)
                except OutboundError as exc:
                    logger.debug("#%d UDP to %s: %s", ctx.id, target, exc)
                    return
                async with session, anyio.create_task_group() as tg:
                    tg.start_soon(self._udp_replies, flow, session, ctx)
                    async with flow.receive:
                        async for data in flow.receive:
                            await session.send_to(target, data)
                            ctx.bytes_up += len(data)
                    tg.cancel_scope.cancel()
        except Exception as exc:
            if is_connection_noise(exc) or isinstance(exc, OutboundError):
                logger.debug("TUN UDP flow %s: %r", flow.dst, exc)
            else:
                logger.exception("TUN UDP handler for %s failed", flow.dst)
        finally:
            if self._udp.get(flow.flow_id) is flow:
                del self._udp[flow.flow_id]
                if self.stack is not None:
                    self.stack.udp_close(flow.flow_id)
            flow.send.close()

    async def _udp_replies(self, flow: _Udp, session: UdpOutboundSession, ctx: ConnContext) -> None:
        try:
            while True:
                _, data = await session.receive()
                ctx.bytes_down += len(data)
                self._reply_udp(flow, data)
        except anyio.EndOfStream:
            pass
        flow.send.close()

    # -- DNS --------------------------------------------------------------------------------

    def _on_dns(self, event: UdpDatagramReceived) -> None:
        """A query to port 53: answered here (fake IP) or forwarded in a task of its own."""
        stack = self.stack
        assert stack is not None
        stack.udp_close(event.flow_id)  # each query stands alone
        self.counters["dns_queries"] += 1
        try:
            query = parse_query(event.data)
        except DnsFormatError:
            self.counters["dns_dropped"] += 1
            return
        pool = self.fake_ips
        if (
            pool is not None
            and query.qdcount == 1
            and query.opcode == 0
            and query.qclass == CLASS_IN
            and query.qtype in (TYPE_A, TYPE_AAAA)
            and query.name
        ):
            address = pool.address_for(query.name, 4 if query.qtype == TYPE_A else 6)
            answer = build_answer(query, [address] if address is not None else [])
            self.counters["dns_fake_answers"] += 1
            stack.udp_send_from(event.dst, event.src, answer)
            return
        if self._dns_slots.borrowed_tokens >= self._dns_slots.total_tokens:
            self.counters["dns_dropped"] += 1
            return
        assert self._tg is not None
        self._tg.start_soon(run_contained, "TUN DNS query", self._forward_dns, event, query)

    async def _forward_dns(self, event: UdpDatagramReceived, query: Any) -> None:
        stack = self.stack
        assert stack is not None
        upstream = self.dns_upstream or self._target(event.dst)
        answer: bytes | None = None
        async with self._dns_slots:
            with self.dispatcher.registry.track(
                self.tag, "udp", Address(event.src.host, event.src.port)
            ) as ctx:
                try:
                    if upstream is None:
                        raise OutboundError("no DNS server behind a fake IP")
                    outbound = self.dispatcher.route(ctx, upstream, "udp")
                    with anyio.fail_after(DNS_TIMEOUT):
                        async with await outbound.open_udp(ctx) as session:
                            await session.send_to(upstream, event.data)
                            ctx.bytes_up += len(event.data)
                            while True:
                                _, reply = await session.receive()
                                if reply[:2] == event.data[:2]:  # same query id
                                    answer = reply
                                    ctx.bytes_down += len(reply)
                                    break
                except (OutboundError, TimeoutError, *EXPECTED_STREAM_ERRORS) as exc:
                    logger.debug("#%d DNS via %s failed: %r", ctx.id, upstream, exc)
                    answer = build_error(query)
        if answer is not None:
            stack.udp_send_from(event.dst, event.src, answer)
            self._service()


def _factory(config: TunInboundConfig, dispatcher: Dispatcher) -> Inbound:
    return TunInbound(config, dispatcher)


register_inbound("tun", _factory)
