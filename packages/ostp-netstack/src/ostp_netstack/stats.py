"""Counters of a :class:`~ostp_netstack.stack.NetStack`.

Every packet the stack drops bumps exactly one ``<layer>_<reason>_drop`` counter (the smoltcp
and PyTCP habit), so that tests and the dashboard can tell why traffic vanished.
"""

from __future__ import annotations

import dataclasses
import enum

__all__ = ["Drop", "NetStackStats"]


class Drop(enum.Enum):
    """Why a packet was dropped; the value names the counter in :class:`NetStackStats`."""

    IP_TRUNCATED = "ip_truncated_drop"
    IP_MALFORMED = "ip_malformed_drop"
    IP_VERSION = "ip_version_drop"
    IP_CHECKSUM = "ip_checksum_drop"
    IP_FRAGMENT = "ip_fragment_drop"
    IP_PROTOCOL = "ip_protocol_drop"
    IP_ADDRESS = "ip_address_drop"
    TCP_TRUNCATED = "tcp_truncated_drop"
    TCP_MALFORMED = "tcp_malformed_drop"
    TCP_CHECKSUM = "tcp_checksum_drop"
    TCP_NO_CONNECTION = "tcp_no_connection_drop"
    TCP_CONNECTION_LIMIT = "tcp_connection_limit_drop"
    TCP_OUT_OF_WINDOW = "tcp_out_of_window_drop"
    TCP_BAD_ACK = "tcp_bad_ack_drop"
    TCP_REASSEMBLY_LIMIT = "tcp_reassembly_limit_drop"
    TCP_MEMORY_LIMIT = "tcp_memory_limit_drop"
    TCP_UNEXPECTED = "tcp_unexpected_drop"
    UDP_TRUNCATED = "udp_truncated_drop"
    UDP_CHECKSUM = "udp_checksum_drop"
    UDP_FLOW_LIMIT = "udp_flow_limit_drop"
    UDP_TOO_BIG = "udp_too_big_drop"
    ICMP_TRUNCATED = "icmp_truncated_drop"
    ICMP_CHECKSUM = "icmp_checksum_drop"
    ICMP_UNHANDLED = "icmp_unhandled_drop"


@dataclasses.dataclass(slots=True)
class NetStackStats:
    """Running totals; ``*_drop`` fields count dropped packets by reason (see :class:`Drop`)."""

    packets_received: int = 0
    packets_sent: int = 0
    tcp_connections_requested: int = 0
    tcp_connections_active: int = 0
    tcp_segments_retransmitted: int = 0
    tcp_fast_retransmits: int = 0
    tcp_timeouts: int = 0
    tcp_window_probes: int = 0
    tcp_resets_sent: int = 0
    tcp_bytes_received: int = 0
    tcp_bytes_sent: int = 0
    udp_flows_active: int = 0
    udp_flows_expired: int = 0
    icmp_echo_replies: int = 0
    buffered_bytes: int = 0
    """Bytes held in all TCP send, receive and reassembly buffers (bounded by the config)."""

    ip_truncated_drop: int = 0
    ip_malformed_drop: int = 0
    ip_version_drop: int = 0
    ip_checksum_drop: int = 0
    ip_fragment_drop: int = 0
    ip_protocol_drop: int = 0
    ip_address_drop: int = 0
    tcp_truncated_drop: int = 0
    tcp_malformed_drop: int = 0
    tcp_checksum_drop: int = 0
    tcp_no_connection_drop: int = 0
    tcp_connection_limit_drop: int = 0
    tcp_out_of_window_drop: int = 0
    tcp_bad_ack_drop: int = 0
    tcp_reassembly_limit_drop: int = 0
    tcp_memory_limit_drop: int = 0
    tcp_unexpected_drop: int = 0
    udp_truncated_drop: int = 0
    udp_checksum_drop: int = 0
    udp_flow_limit_drop: int = 0
    udp_too_big_drop: int = 0
    icmp_truncated_drop: int = 0
    icmp_checksum_drop: int = 0
    icmp_unhandled_drop: int = 0

    def count(self, reason: Drop) -> None:
        """Bump the counter named by ``reason``."""
        name = reason.value
        setattr(self, name, getattr(self, name) + 1)

    def drops(self) -> dict[str, int]:
        """All non-zero drop counters."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name.endswith("_drop") and getattr(self, f.name)
        }
