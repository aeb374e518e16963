"""How a session reaches its server: the UDP socket of an attempt (connected, or talking to the
STUN/TURN servers too), the TCP transports, transport ``auto``'s UDP probe (a throwaway
handshake of its own), and what the path lets the core send. The session decides which and
when (:mod:`.auto`, :mod:`.natpath`); this module does the I/O."""

from __future__ import annotations

import errno
import logging
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import anyio

from ostp_client.nat import NatMux, TurnConfig
from ostp_client.outbounds.ostp.options import TURN_OVERHEAD, NatOptions
from ostp_client.transport import DatagramTransport
from ostp_client.transport.stream import StreamOptions, StreamTransport, open_stream
from ostp_client.transport.udp import NatSocket, UdpTransport, open_udp_socket
from ostp_proto import ClientConnection, ConnectionConfig, State
from ostp_proto.address import format_host_port
from ostp_proto.pmtud import BASE_PLPMTU
from ostp_sockets import BatchSocket, SocketBuffers, first_hop_payload, udp_overhead

__all__ = [
    "DialOptions",
    "NatServers",
    "check_buffers",
    "fit_path",
    "open_stream_to",
    "probe_udp",
    "resolve",
    "resolve_nat",
    "udp_transport",
]

logger = logging.getLogger("ostp_client.outbounds.ostp")  # one logger name for the whole outbound


class DialOptions(Protocol):
    """What dialing reads of the outbound (a part of `session.SessionOwner`)."""

    tag: str
    access_key: str
    batching: bool
    socket_buffer: int
    sni: str | None
    transport_port: int | None
    stream_options: StreamOptions
    probe_config: ConnectionConfig
    """``auto``'s UDP probe."""
    auto_udp_timeout: float


_buffer_warning_given = False  # one warning per process, however many sessions are capped


def check_buffers(tag: str, buffers: SocketBuffers) -> None:
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


async def resolve(host: str, port: int, family: int) -> tuple[str, int]:
    """The first address of ``host`` in ``family`` (literal IPs pass through)."""
    try:
        infos = await anyio.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise OSError(errno.EHOSTUNREACH, f"cannot resolve {host}: {exc.strerror}") from None
    if not infos:
        raise OSError(errno.EHOSTUNREACH, f"cannot resolve {host}")
    sockaddr = infos[0][4]
    return str(sockaddr[0]), int(sockaddr[1])


@dataclass(slots=True)
class NatServers:
    """The STUN and TURN servers of one attempt, resolved."""

    stun: list[tuple[str, int]] = field(default_factory=list)
    turn: TurnConfig | None = None
    """The TURN server, if the attempt relays."""
    warnings: list[str] = field(default_factory=list)
    """STUN servers that could not be resolved (the attempt goes on without them)."""
    failure: str | None = None
    """The TURN server could not be resolved: the relayed attempt cannot start."""


async def resolve_nat(nat: NatOptions | None, relay: bool, family: int) -> NatServers:
    """Resolve the NAT servers an attempt uses (the TURN server only if it ``relay``s)."""
    servers = NatServers()
    if nat is None:
        return servers
    # The server's address family decides the socket's; the NAT servers must match.
    for stun_host, stun_port in nat.stun:
        try:
            servers.stun.append(await resolve(stun_host, stun_port, family))
        except OSError as exc:
            where = format_host_port(stun_host, stun_port)
            servers.warnings.append(f"STUN server {where}: {exc.strerror or exc}")
    if relay:
        assert nat.turn is not None
        turn_host, turn_port = nat.turn.server
        try:
            servers.turn = replace(nat.turn, server=await resolve(turn_host, turn_port, family))
        except OSError as exc:
            where = format_host_port(turn_host, turn_port)
            servers.failure = f"TURN server {where}: {exc.strerror or exc}"
    return servers


def udp_transport(
    sock: socket.socket,
    buffers: SocketBuffers,
    sockaddr: Any,
    mux: NatMux | None,
    *,
    batching: bool,
) -> UdpTransport:
    """The transport of a fresh UDP socket towards the server at ``sockaddr``: connected, with
    GSO/GRO batching; with a ``mux`` unconnected, since it also talks to the STUN/TURN servers
    (the mux sorts what it reads; with a TURN server configured nothing leaves directly). The
    socket is closed if this fails."""
    try:
        if mux is None:
            transport = UdpTransport(BatchSocket(sock, gso=batching, gro=batching), buffers)
            sock.connect(sockaddr)
            return transport
        server = (str(sockaddr[0]), int(sockaddr[1]))
        relay_only = mux.config.turn is not None
        batch = NatSocket(sock, mux, server, relay_only=relay_only, gso=batching, gro=batching)
        transport = UdpTransport(batch, buffers)
        sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", 0))
        return transport
    except BaseException:
        sock.close()
        raise


async def open_stream_to(outbound: DialOptions, sockaddr: Any, name: str) -> StreamTransport:
    """A new TCP transport to the server (its address resolved for this attempt)."""
    host = str(sockaddr[0])
    options = replace(
        outbound.stream_options,
        host=outbound.sni or (f"[{host}]" if ":" in host else host),  # spec §10.6
    )
    port = outbound.transport_port or int(sockaddr[1])
    logger.debug("%s: connecting over %s to %s", name, options.kind, format_host_port(host, port))
    return await open_stream((host, port), outbound.access_key, options)


def fit_path(conn: ClientConnection, transport: DatagramTransport | None, now: float) -> None:
    """Tell the core what the transport's path allows: over UDP with DF, path MTU
    discovery up to what the first hop carries (towards the TURN server when relaying,
    less the ChannelData header); over UDP without DF the base size, which crosses every
    path; over TCP no discovery (spec §10.6 has no IP fragmentation to avoid)."""
    if not isinstance(transport, UdpTransport):
        conn.set_path_mtu(now, None)
        return
    batch = transport.batch
    family = transport.sock.family
    ceiling: int | None = BASE_PLPMTU
    if transport.dont_fragment:
        turn = batch.mux.turn if isinstance(batch, NatSocket) else None
        if turn is not None:
            ceiling = first_hop_payload(family, turn.server)
            if ceiling is not None:
                ceiling -= TURN_OVERHEAD
        else:
            server = batch.server if isinstance(batch, NatSocket) else None
            ceiling = first_hop_payload(family, server or transport.sock.getpeername())
    conn.set_path_mtu(now, ceiling or BASE_PLPMTU, udp_overhead(family))


async def probe_udp(outbound: DialOptions, family: int, sockaddr: Any) -> UdpTransport | None:
    """A UDP handshake of its own (a throwaway session, closed at once); its socket, as a
    transport, if it completed within ``auto_udp_timeout``."""
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
