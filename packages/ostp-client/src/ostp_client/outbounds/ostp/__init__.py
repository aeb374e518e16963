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

from ostp_client.outbounds import register_outbound
from ostp_client.outbounds.ostp.health import UNANSWERED_CONNECTS as UNANSWERED_CONNECTS
from ostp_client.outbounds.ostp.options import NatMode, NatOptions, SessionState, TransportMode
from ostp_client.outbounds.ostp.pool import OstpOutbound, make_outbound
from ostp_client.outbounds.ostp.session import _Session as _Session
from ostp_client.outbounds.ostp.status import OstpReport, SessionStatus
from ostp_client.outbounds.ostp.stream import OstpStream, OstpUdpSession

__all__ = [
    "NatMode",
    "NatOptions",
    "OstpOutbound",
    "OstpReport",
    "OstpStream",
    "OstpUdpSession",
    "SessionState",
    "SessionStatus",
    "TransportMode",
]

register_outbound("ostp", make_outbound)
