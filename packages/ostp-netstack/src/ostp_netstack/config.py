"""Configuration of a :class:`~ostp_netstack.stack.NetStack`."""

from __future__ import annotations

import dataclasses

__all__ = ["NetStackConfig"]


@dataclasses.dataclass(frozen=True, slots=True)
class NetStackConfig:
    """Limits and behaviour of the stack; every limit bounds memory or work per flow or total."""

    mtu: int = 65520
    """MTU of the TUN device: the largest IP packet either side sends. The stack advertises an
    MSS of ``mtu - 40`` (IPv4) or ``mtu - 60`` (IPv6), and never sends a larger packet."""

    ttl: int = 64
    """TTL / hop limit of the packets the stack sends."""

    checksum_offload: bool = False
    """Leave the transport checksum of sent packets to the kernel (virtio-net ``NEEDS_CSUM``):
    the field holds only the folded pseudo-header sum. Only with ``IFF_VNET_HDR`` offload on."""

    tcp_send_buffer: int = 4 * 1024 * 1024
    """Bytes per connection the application may queue with ``tcp_send`` (unsent plus unacked)."""

    tcp_receive_buffer: int = 4 * 1024 * 1024
    """Bytes per connection delivered but not yet consumed, plus in-flight: the receive window."""

    tcp_max_out_of_order_segments: int = 64
    """Out-of-order segments kept per connection for reassembly; more are dropped."""

    tcp_max_connections: int = 4096
    """Connections (any state, TIME-WAIT included); SYNs beyond it are answered with RST."""

    tcp_max_pending: int = 1024
    """Connections offered to the application and not yet accepted or refused."""

    tcp_accept_timeout: float = 30.0
    """Seconds the application may take to accept or refuse an offered connection."""

    tcp_initial_window_segments: int = 10
    """Initial congestion window in segments (RFC 6928)."""

    tcp_rto_initial: float = 1.0
    """Retransmission timeout before the first RTT sample, in seconds (RFC 6298 §2.1)."""

    tcp_rto_min: float = 0.2
    """Lower bound of the retransmission timeout; lower than RFC 6298's 1 s, as Linux does,
    because the peer is the local kernel."""

    tcp_rto_max: float = 60.0
    """Upper bound of the retransmission timeout (RFC 6298 §2.5)."""

    tcp_max_retransmissions: int = 8
    """Consecutive timeouts after which a connection is reset (RFC 9293 §3.8.3, R2)."""

    tcp_time_wait: float = 2.0
    """Seconds in TIME-WAIT; short (not 2 MSL) because both ends live on this host."""

    tcp_fin_wait_timeout: float = 60.0
    """Seconds a connection may stay in FIN-WAIT-2 or CLOSING without hearing from the peer."""

    tcp_max_total_buffer: int = 256 * 1024 * 1024
    """Bytes held in all connections' buffers together; beyond it new data is refused."""

    udp_idle_timeout: float = 60.0
    """Seconds without traffic after which a UDP flow expires."""

    udp_max_flows: int = 4096
    """UDP flows tracked at once; datagrams of new flows beyond it are dropped."""

    icmp_echo_reply: bool = False
    """Answer ICMP/ICMPv6 echo requests locally (ping any address reaches the stack)."""

    def __post_init__(self) -> None:
        if not 1280 <= self.mtu <= 65535:
            raise ValueError(f"mtu must be within 1280..65535, not {self.mtu}")
        if self.tcp_send_buffer < 1 or self.tcp_receive_buffer < 1:
            raise ValueError("TCP buffers must be at least 1 byte")
        if self.tcp_receive_buffer > (0xFFFF << 14):
            raise ValueError("tcp_receive_buffer exceeds the largest scaled window (1 GiB)")
