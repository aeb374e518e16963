"""The sans-IO stack: raw IP packets and the time in, packets and events out.

The shell loop is the usual three steps: feed what the TUN device gave
(:meth:`NetStack.receive_packet`), drain :meth:`NetStack.next_event` and act on the events,
then write :meth:`NetStack.packets_to_send` to the TUN device; sleep until
:meth:`NetStack.get_timer` or the next packet, and call :meth:`NetStack.handle_timer`.
"""

from __future__ import annotations

import heapq
import ipaddress
import os
from collections import deque
from collections.abc import Callable

from ostp_netstack.config import NetStackConfig
from ostp_netstack.errors import LocalProtocolError
from ostp_netstack.events import (
    Endpoint,
    Event,
    TcpConnectionRequested,
    UdpDatagramReceived,
    UdpFlowExpired,
)
from ostp_netstack.packet import (
    ACK,
    RST,
    SYN,
    IcmpEcho,
    PacketBuilder,
    TcpSegment,
    UdpDatagram,
    parse_packet,
)
from ostp_netstack.stats import Drop, NetStackStats
from ostp_netstack.tcp import State, TcpConnection

__all__ = ["NetStack"]

_FlowKey = tuple[bytes, bytes, int, int]


def _host(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))


def _is_unicast(addr: bytes) -> bool:
    if len(addr) == 4:
        return addr[0] < 224 and addr != b"\0\0\0\0"
    return addr[0] != 0xFF and addr != bytes(16)


class _UdpFlow:
    __slots__ = ("builder", "dst", "flow_id", "key", "last_seen", "src")

    def __init__(
        self, flow_id: int, key: _FlowKey, src: Endpoint, dst: Endpoint, builder: PacketBuilder
    ) -> None:
        self.flow_id = flow_id
        self.key = key
        self.src = src
        self.dst = dst
        self.builder = builder
        self.last_seen = 0.0


class NetStack:
    """A user-space TCP/IP stack that answers for every address (see the module docstring).

    ``random`` supplies initial sequence numbers (RFC 9293 §3.4.1 wants them unpredictable).
    """

    def __init__(
        self,
        config: NetStackConfig | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config or NetStackConfig()
        self.stats = NetStackStats()
        self.out: list[bytes] = []
        self.events: deque[Event] = deque()
        self._random = random
        self._next_id = 1
        self._conns: dict[int, TcpConnection] = {}
        self._conn_by_key: dict[_FlowKey, TcpConnection] = {}
        self._pending = 0
        self._dirty: dict[int, TcpConnection] = {}
        self._timers: list[tuple[float, int]] = []
        self._flows: dict[int, _UdpFlow] = {}
        self._flow_by_key: dict[_FlowKey, _UdpFlow] = {}
        self._flow_timers: list[tuple[float, int]] = []
        self._now = 0.0

    # -- input ------------------------------------------------------------------------------

    def receive_packet(
        self, packet: bytes | bytearray | memoryview, now: float, checksum_verified: bool = False
    ) -> None:
        """Feed one IP packet written by the kernel into the TUN device.

        Never raises on bad input: unusable packets are dropped and counted in :attr:`stats`.
        ``checksum_verified`` skips transport checksum checks (kernel offload said so).
        """
        self.stats.packets_received += 1
        self._now = now
        if type(packet) is not bytes:
            packet = bytes(packet)  # a reused receive buffer must not change under us
        parsed = parse_packet(packet, checksum_verified)
        if type(parsed) is TcpSegment:
            self._on_tcp(parsed, now)
        elif type(parsed) is UdpDatagram:
            self._on_udp(parsed, now)
        elif type(parsed) is IcmpEcho:
            self._on_icmp_echo(parsed)
        elif isinstance(parsed, Drop):
            self.stats.count(parsed)

    def _on_tcp(self, seg: TcpSegment, now: float) -> None:
        conn = self._conn_by_key.get((seg.src, seg.dst, seg.sport, seg.dport))
        flags = seg.flags
        if conn is not None:
            if flags & SYN and not flags & ACK and conn.state is State.TIME_WAIT:
                conn.on_timer(float("inf"))  # a new incarnation ends TIME-WAIT (RFC 9293 §3.6.1)
            else:
                conn.on_segment(seg, now)
                self.schedule(conn)
                return
        if flags & (SYN | ACK | RST) != SYN:
            self.stats.count(Drop.TCP_NO_CONNECTION)
            if not flags & RST:
                self._reset_unknown(seg)
            return
        if not _is_unicast(seg.dst) or not _is_unicast(seg.src):
            self.stats.count(Drop.IP_ADDRESS)
            return
        if len(self._conns) >= self.config.tcp_max_connections or (
            self._pending >= self.config.tcp_max_pending
        ):
            self.stats.count(Drop.TCP_CONNECTION_LIMIT)
            self._reset_unknown(seg)
            return
        conn_id = self._new_id()
        src = Endpoint(_host(seg.src), seg.sport)
        dst = Endpoint(_host(seg.dst), seg.dport)
        conn = TcpConnection(self, conn_id, seg, src, dst, now)
        self._conns[conn_id] = conn
        self._conn_by_key[conn.key] = conn
        self._pending += 1
        self.stats.tcp_connections_requested += 1
        self.stats.tcp_connections_active += 1
        self.schedule(conn)
        self.events.append(TcpConnectionRequested(conn_id, src, dst))

    def _reset_unknown(self, seg: TcpSegment) -> None:
        # RFC 9293 §3.10.7.1: answer a segment for no connection with a RST.
        builder = PacketBuilder(seg.dst, seg.src, self.config.ttl, self.config.checksum_offload)
        if seg.flags & ACK:
            packet = builder.tcp(seg.dport, seg.sport, seg.ack, 0, RST, 0)
        else:
            seg_len = len(seg.payload) + (seg.flags & SYN and 1) + (seg.flags & 1)
            ack = (seg.seq + seg_len) & 0xFFFFFFFF
            packet = builder.tcp(seg.dport, seg.sport, 0, ack, RST | ACK, 0)
        self.out.append(packet)
        self.stats.tcp_resets_sent += 1

    def _on_udp(self, dgram: UdpDatagram, now: float) -> None:
        key = (dgram.src, dgram.dst, dgram.sport, dgram.dport)
        flow = self._flow_by_key.get(key)
        if flow is None:
            if len(self._flows) >= self.config.udp_max_flows:
                self.stats.count(Drop.UDP_FLOW_LIMIT)
                return
            if not _is_unicast(dgram.src):
                self.stats.count(Drop.IP_ADDRESS)
                return
            flow_id = self._new_id()
            src = Endpoint(_host(dgram.src), dgram.sport)
            dst = Endpoint(_host(dgram.dst), dgram.dport)
            cfg = self.config
            builder = PacketBuilder(dgram.dst, dgram.src, cfg.ttl, cfg.checksum_offload)
            flow = _UdpFlow(flow_id, key, src, dst, builder)
            self._flows[flow_id] = flow
            self._flow_by_key[key] = flow
            self.stats.udp_flows_active += 1
            heapq.heappush(self._flow_timers, (now + cfg.udp_idle_timeout, flow_id))
        flow.last_seen = now
        self.events.append(UdpDatagramReceived(flow.flow_id, flow.src, flow.dst, dgram.payload))

    def _on_icmp_echo(self, echo: IcmpEcho) -> None:
        if not self.config.icmp_echo_reply:
            self.stats.count(Drop.ICMP_UNHANDLED)
            return
        builder = PacketBuilder(echo.dst, echo.src, self.config.ttl, False)
        kind = 0 if echo.version == 4 else 129  # echo reply: RFC 792, RFC 4443 §4.2
        rest = echo.ident.to_bytes(2, "big") + echo.sequence.to_bytes(2, "big")
        self.out.append(builder.icmp(kind, 0, rest, echo.payload))
        self.stats.icmp_echo_replies += 1

    def _new_id(self) -> int:
        conn_id = self._next_id
        self._next_id += 1
        return conn_id

    # -- output and events ------------------------------------------------------------------

    def packets_to_send(self, now: float) -> list[bytes]:
        """IP packets to write to the TUN device, in order; empties the queue."""
        self._now = now
        while self._dirty:
            dirty = self._dirty
            self._dirty = {}
            for conn in dirty.values():
                conn.flush(now)
        out = self.out
        self.out = []
        self.stats.packets_sent += len(out)
        return out

    def next_event(self) -> Event | None:
        """The oldest event not yet taken, or None."""
        return self.events.popleft() if self.events else None

    # -- timers -----------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """The absolute time at which :meth:`handle_timer` must be called, or None."""
        timers = self._timers
        conns = self._conns
        while timers:
            deadline, conn_id = timers[0]
            conn = conns.get(conn_id)
            if conn is not None and conn.deadline == deadline:
                break
            heapq.heappop(timers)
            if conn is not None and conn.scheduled == deadline:
                conn.scheduled = None
                self.schedule(conn)  # its deadline moved: file the new one
        best = timers[0][0] if timers else None
        flow_timers = self._flow_timers
        while flow_timers and flow_timers[0][1] not in self._flows:
            heapq.heappop(flow_timers)
        if flow_timers and (best is None or flow_timers[0][0] < best):
            best = flow_timers[0][0]
        return best

    def handle_timer(self, now: float) -> None:
        """Run every timer due at ``now`` (retransmissions, probes, TIME-WAIT, expiries)."""
        self._now = now
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, conn_id = heapq.heappop(timers)
            conn = self._conns.get(conn_id)
            if conn is None:
                continue
            if conn.scheduled == deadline:
                conn.scheduled = None
            if conn.deadline == deadline:
                conn.on_timer(now)
            self.schedule(conn)
        flow_timers = self._flow_timers
        idle = self.config.udp_idle_timeout
        while flow_timers and flow_timers[0][0] <= now:
            _, flow_id = heapq.heappop(flow_timers)
            flow = self._flows.get(flow_id)
            if flow is None:
                continue
            expiry = flow.last_seen + idle
            if expiry > now:
                heapq.heappush(flow_timers, (expiry, flow_id))
                continue
            self._remove_flow(flow)
            self.stats.udp_flows_expired += 1
            self.events.append(UdpFlowExpired(flow_id))

    # -- TcpHost ----------------------------------------------------------------------------

    def schedule(self, conn: TcpConnection) -> None:
        deadline = conn.deadline
        if deadline is not None and deadline != conn.scheduled and conn.conn_id in self._conns:
            conn.scheduled = deadline
            heapq.heappush(self._timers, (deadline, conn.conn_id))

    def mark_dirty(self, conn: TcpConnection) -> None:
        self._dirty[conn.conn_id] = conn

    def forget(self, conn: TcpConnection) -> None:
        if self._conns.pop(conn.conn_id, None) is None:
            return
        if self._conn_by_key.get(conn.key) is conn:
            del self._conn_by_key[conn.key]
        self._dirty.pop(conn.conn_id, None)
        if not conn.accepted:
            self._pending -= 1
        self.stats.tcp_connections_active -= 1

    # -- TCP calls --------------------------------------------------------------------------

    def _conn(self, conn_id: int) -> TcpConnection:
        conn = self._conns.get(conn_id)
        if conn is None or conn.reported:
            raise LocalProtocolError(f"no TCP connection {conn_id}")
        return conn

    def tcp_accept(self, conn_id: int) -> None:
        """Accept an offered connection: the SYN-ACK goes out at the next flush."""
        conn = self._conn(conn_id)
        if conn.state is not State.PENDING:
            raise LocalProtocolError(f"TCP connection {conn_id} is not waiting to be accepted")
        self._pending -= 1
        conn.accepted = True
        iss = int.from_bytes(self._random(4), "big")
        conn.accept(iss)
        self.mark_dirty(conn)

    def tcp_refuse(self, conn_id: int, icmp: bool = False) -> None:
        """Refuse an offered connection with a RST, or an ICMP unreachable if ``icmp``."""
        conn = self._conn(conn_id)
        if conn.state is not State.PENDING:
            raise LocalProtocolError(f"TCP connection {conn_id} is not waiting to be accepted")
        conn.refuse(icmp)

    def tcp_send(self, conn_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue bytes for the application; returns how many fit in the send buffer.

        When fewer than offered fit, :class:`~ostp_netstack.events.TcpSendReady` follows once
        room opens. ``data`` is kept without copying if it is ``bytes``.
        """
        conn = self._conn(conn_id)
        if conn.fin_queued or conn.state in (State.PENDING, State.CLOSED):
            raise LocalProtocolError(f"TCP connection {conn_id} cannot send now")
        if not isinstance(data, bytes):
            data = bytes(data)
        return conn.send(data)

    def tcp_send_capacity(self, conn_id: int) -> int:
        """Bytes ``tcp_send`` would accept now."""
        return self._conn(conn_id).send_capacity()

    def tcp_consumed(self, conn_id: int, n: int) -> None:
        """Report that ``n`` received bytes were passed on; this reopens the receive window."""
        conn = self._conns.get(conn_id)
        if conn is not None:
            conn.consumed(n)

    def tcp_close(self, conn_id: int) -> None:
        """Send FIN after the queued data (half-close: receiving goes on)."""
        conn = self._conn(conn_id)
        if conn.state is State.PENDING:
            self.tcp_refuse(conn_id)
        elif not conn.fin_queued:
            conn.close()

    def tcp_abort(self, conn_id: int) -> None:
        """Reset the connection (RST); no further events for it."""
        conn = self._conns.get(conn_id)
        if conn is not None:
            conn.reported = True
            if conn.state is State.PENDING:
                conn.refuse(icmp=False)
            else:
                conn.abort()

    def tcp_state(self, conn_id: int) -> str | None:
        """RFC 9293 name of the connection's state, or None when it is gone."""
        conn = self._conns.get(conn_id)
        return conn.state.value if conn is not None else None

    # -- UDP calls --------------------------------------------------------------------------

    def udp_send(self, flow_id: int, data: bytes) -> bool:
        """Send a reply datagram in a flow (from its destination to its source).

        Returns False (and counts ``udp_too_big_drop``) when it does not fit the MTU, and
        raises :class:`LocalProtocolError` for an unknown or expired flow.
        """
        flow = self._flows.get(flow_id)
        if flow is None:
            raise LocalProtocolError(f"no UDP flow {flow_id}")
        if flow.builder.header_len + 8 + len(data) > self.config.mtu:
            self.stats.count(Drop.UDP_TOO_BIG)
            return False
        flow.last_seen = self._now
        self.out.append(flow.builder.udp(flow.dst.port, flow.src.port, data))
        return True

    def udp_send_from(self, src: Endpoint, dst: Endpoint, data: bytes) -> bool:
        """Send a datagram from any ``src`` to the application at ``dst`` (no flow needed)."""
        src_ip = ipaddress.ip_address(src.host)
        dst_ip = ipaddress.ip_address(dst.host)
        if src_ip.version != dst_ip.version:
            raise LocalProtocolError("source and destination address families differ")
        builder = PacketBuilder(
            src_ip.packed, dst_ip.packed, self.config.ttl, self.config.checksum_offload
        )
        if builder.header_len + 8 + len(data) > self.config.mtu:
            self.stats.count(Drop.UDP_TOO_BIG)
            return False
        self.out.append(builder.udp(src.port, dst.port, data))
        return True

    def udp_close(self, flow_id: int) -> None:
        """Forget a flow now (no ``UdpFlowExpired`` follows)."""
        flow = self._flows.get(flow_id)
        if flow is not None:
            self._remove_flow(flow)

    def _remove_flow(self, flow: _UdpFlow) -> None:
        del self._flows[flow.flow_id]
        del self._flow_by_key[flow.key]
        self.stats.udp_flows_active -= 1
