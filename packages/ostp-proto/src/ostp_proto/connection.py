"""OSTP connections as sans-IO state machines (spec §3-§9).

The I/O shell's loop is always: feed datagrams with :meth:`receive_datagram`, drain events with
:meth:`next_event`, send what :meth:`datagrams_to_send` returns, sleep until :meth:`get_timer`
(or until a datagram arrives) and call :meth:`handle_timer`. Nothing here reads a clock or
touches a socket; randomness comes from ``random_bytes`` (default ``os.urandom``).
"""

from __future__ import annotations

import enum
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .arq import (
    ACK_DELAY,
    GAP_SKIP_AFTER,
    NACK_REPEAT,
    PACKET_THRESHOLD,
    TIME_THRESHOLD,
    Frame,
    Receiver,
    Sender,
    decode_ack,
    decode_nack,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    ConnectionTerminated,
    DataLost,
    Event,
    ExtensionsNegotiated,
    HandshakeCompleted,
    RelayMessageReceived,
    Termination,
)
from .frames import (
    DATA_FRAME_HEADER_LEN,
    DATAGRAM_OVERHEAD,
    FRAME_HEADER_LEN,
    PADDING_CLAMP_OVERHEAD,
    FrameKind,
    PaddingPolicy,
    decode_frame_header,
    encode_data_frame_header,
    encode_frame,
)
from .keys import Secrets, derive_secrets, split_transport_keys
from .noise import NoiseHandshake
from .obfuscation import (
    MAX_NONCE,
    DataOpener,
    DataSealer,
    build_handshake_datagram,
    parse_handshake_datagram,
)
from .pmtud import PathMtuDiscovery, PmtudConfig
from .relay import (
    EXT_FLOW_CONTROL,
    EXT_PATH_PROBES,
    EXTENSION_VERSION,
    MIN_STREAM_WINDOW,
    SUPPORTED_EXTENSIONS,
    Abandoned,
    Close,
    Connect,
    Data,
    Error,
    ExtensionHello,
    KeepAlive,
    Ping,
    Pong,
    RelayMessage,
    RelayTag,
    UdpAssociate,
    WindowUpdate,
    decode_relay,
    encode_abandoned,
    encode_extension_hello,
    encode_relay,
    encode_window_update,
    parse_abandoned,
    parse_extension_hello,
)

RandomBytes = Callable[[int], bytes]

DATA_RELAY_HEADER = 3  # tag + u16 length (spec §8)
# the receive path writes these two as literals (12, 15)
assert FRAME_HEADER_LEN == 12 and DATA_FRAME_HEADER_LEN == FRAME_HEADER_LEN + DATA_RELAY_HEADER
_ELICITING = frozenset((FrameKind.DATA, FrameKind.CLOSE, FrameKind.KEEPALIVE, FrameKind.RESUME))
_OPENING_TAGS = frozenset((1, 9))  # relay Connect, UdpAssociate: a stream (id) starts anew
_TAG_DATA = RelayTag.DATA.value
_TAG_CLOSE = RelayTag.CLOSE.value
_TAG_ERROR = RelayTag.ERROR.value
_TAG_ABANDONED = RelayTag.ABANDONED.value
PERSISTENT_PTO = 3  # probe timeouts in a row that count as a black-hole signal for PMTUD

# Flow-control extension state of a connection (docs/flow-control.md)
_FC_OFF = 0  # upstream peer, extension disabled or refused: no per-stream credit
_FC_PENDING = 1  # client: hello sent, neither the answer nor the first Pong has arrived
_FC_ON = 2


class State(enum.Enum):
    IDLE = "idle"
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    """Tunables of one OSTP connection. Defaults suit a client on a real network."""

    max_datagram_size: int = 1400
    """Largest data datagram built for stream data (UDP payload bytes). With ``pmtud`` the
    ceiling of the search: datagrams start smaller and grow as probes show the path allows."""
    pmtud: PmtudConfig | None = None
    """Datagram packetization layer path MTU discovery of this side's datagrams (RFC 8899,
    :mod:`ostp_proto.pmtud`), or None: datagrams are always up to ``max_datagram_size``. The
    search never goes above ``max_datagram_size`` nor the shell's first hop
    (:meth:`Connection.set_path_mtu`)."""
    padding: PaddingPolicy = field(default_factory=PaddingPolicy.upstream_client)
    """Padding of frames (spec §6.1); any padding is legal for the peer."""
    ack_delay: float = ACK_DELAY
    """Delay before an ACK is sent for a lone ack-eliciting datagram (spec §7.1)."""
    ack_frequency: int = 32
    """Send an ACK at once after this many ack-eliciting datagrams."""
    initial_rtt: float = 0.1
    """RTT assumed before the first sample (the handshake provides one on the client)."""
    min_rto: float = 0.03
    """Floor of the retransmission timeout."""
    max_rto: float = 2.0
    """Ceiling of the backed-off retransmission timeout; frames are never given up."""
    max_in_flight: int = 8192
    """Most unacknowledged nonces ahead of the oldest one (upstream's reorder buffer size)."""
    gap_skip_after: float | None = GAP_SKIP_AFTER
    """Seconds (plus the smoothed RTT) a hole in the peer's nonces may stay open, counted from
    the arrival of the first datagram past it, before it is given up and reported as
    :class:`DataLost` (None: never). An upstream peer gives up on a datagram about 1.6 s after
    sending it (spec §7.2); ours never does and fills every hole long before."""
    idle_timeout: float = 25.0
    """Terminate after this long without a valid datagram from the peer."""
    keepalive_interval: float | None = 5.0
    """Client: send Ping and KeepAlive on stream 0 this often (None: never)."""
    handshake_timeout: float = 1.2
    """Client: wait this long for message 2 before a fresh handshake (spec §10.1)."""
    handshake_attempts: int = 4
    """Client: handshakes tried before giving up."""
    send_buffer_limit: int = 1 << 20
    """Bytes queued for sending above which :attr:`writable` turns False (backpressure).
    Bytes of streams waiting for the peer's credit do not count (see ``stream_send_limit``)."""
    reliable_transport: bool = False
    """Datagrams travel over a reliable stream (TCP, spec §10.6): no retransmission on timers
    or ACK gaps, so the ARQ does not fight TCP. ACKs are still sent (upstream peers need them)
    and NACKs still answered; :attr:`Connection.reliable_transport` changes it on a live
    connection when the path changes."""
    extensions: bool = True
    """Offer (client) or accept (server) ostp-py's extension hello, which turns on per-stream
    flow control between two ostp-py peers (docs/flow-control.md). Upstream peers never see
    it: an upstream server takes the hello for a KeepAlive, an upstream client sends none."""
    stream_window: int = 256 * 1024
    """Initial receive window of every stream (bytes), announced in the hello."""
    max_stream_window: int = 16 * 1024 * 1024
    """Ceiling of a stream's receive window; it doubles while the reader drains it in less
    than about two round trips (auto-tuning), so one fast stream reaches full speed."""
    stream_send_limit: int = 256 * 1024
    """Bytes queued for one stream above which :meth:`Connection.stream_writable` is False."""

    def __post_init__(self) -> None:
        if self.stream_window < MIN_STREAM_WINDOW:
            raise LocalProtocolError(f"stream_window must be at least {MIN_STREAM_WINDOW}")
        if self.stream_window >= 1 << 32:
            raise LocalProtocolError("stream_window must fit in 32 bits")
        if self.max_stream_window < self.stream_window:
            raise LocalProtocolError("max_stream_window must be at least stream_window")


SERVER_DEFAULTS = ConnectionConfig(
    padding=PaddingPolicy.upstream_server(),
    idle_timeout=600.0,
    keepalive_interval=None,
)


@dataclass(slots=True)
class ConnectionStats:
    """Counters; ``*_drop`` fields count datagrams dropped and why."""

    datagrams_received: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    datagram_session_drop: int = 0
    datagram_auth_drop: int = 0
    frame_decode_drop: int = 0
    relay_decode_drop: int = 0
    handshake_drop: int = 0
    state_drop: int = 0
    paused_drop: int = 0
    flow_violation: int = 0
    """Data messages beyond the credit this side granted (accepted; a peer bug, never ours)."""
    window_updates_sent: int = 0
    window_updates_received: int = 0
    probes_abandoned: int = 0
    """Lost path MTU probes whose nonces were given up towards the peer (Abandoned)."""
    abandoned_received: int = 0
    """Nonces the peer gave up (lost probes) that closed a hole here."""


class _SendQueue(deque[bytes | memoryview]):
    """Relay messages of one stream waiting to be sent, and their total size (encoded).

    Stream bytes (Data) wait as a memoryview of immutable bytes, without their 3-byte relay
    header: the frame is built around them in one copy when they are sent (``_build_data``).
    Every other message waits encoded, as bytes.
    """

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0


class _Flow:
    """Credit of one stream, both directions (only while flow control is negotiated).

    Offsets count stream bytes (Data payloads) from the start of the stream. Receive side:
    ``received`` arrived, ``consumed`` handed on by the owner, ``granted`` the largest offset
    announced to the peer. Send side: ``sent`` taken from the queue, ``limit`` the peer's grant.
    """

    __slots__ = (
        "consumed",
        "epoch_offset",
        "epoch_time",
        "granted",
        "limit",
        "received",
        "sent",
        "window",
    )

    def __init__(self, window: int, limit: int, now: float) -> None:
        self.received = 0
        self.consumed = 0
        self.window = window
        self.granted = window
        self.epoch_time = now
        self.epoch_offset = 0
        self.sent = 0
        self.limit = limit


class Connection:
    """Behaviour shared by both roles once keys exist."""

    def __init__(
        self,
        secrets: Secrets,
        config: ConnectionConfig,
        random_bytes: RandomBytes,
    ) -> None:
        self._secrets = secrets
        self.config = config
        self._random = random_bytes
        self.state = State.IDLE
        self.session_id = 0
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        self._queues: dict[int, _SendQueue] = {}
        self._rr: deque[int] = deque()  # streams with queued messages they may send now
        self.send_buffer_bytes = 0
        # per-stream flow control (docs/flow-control.md)
        self._fc = _FC_OFF
        self._flows: dict[int, _Flow] = {}
        self._blocked: set[int] = set()  # streams whose next Data waits for the peer's credit
        self._blocked_bytes = 0
        self._grants_due: set[int] = set()
        self._urgent: deque[tuple[int, bytes]] = deque()  # WindowUpdates, ahead of all queues
        self._peer_window = MIN_STREAM_WINDOW  # send credit a new stream starts with
        self._now = 0.0  # the latest time passed in (for state created by send())
        self.peer_extensions: ExtensionHello | None = None
        """What the peer's extension hello said, once negotiated (None: upstream peer or
        extension not in use). ``flags`` are the extensions in use on this connection."""
        self._sealer: DataSealer | None = None
        self._opener: DataOpener | None = None
        self.sender = Sender(
            mss=config.max_datagram_size,
            initial_rtt=config.initial_rtt,
            max_in_flight=config.max_in_flight,
            min_rto=config.min_rto,
            max_rto=config.max_rto,
            max_mss=config.max_datagram_size,
        )
        self.receiver = Receiver(
            ack_delay=config.ack_delay,
            ack_frequency=config.ack_frequency,
        )
        self.sender.reliable = config.reliable_transport
        self.stats = ConnectionStats()
        self._stream_floor: dict[int, int] = {}
        """Per open stream id, a nonce below every datagram of it the peer may send: the
        highest peer nonce seen when we first sent on it, or one below the first we got from
        it. A Close either way forgets it."""
        self._receive_paused = False
        self._dropped_while_paused = False
        self.last_receive = 0.0
        self._reserved_pool = b""
        self._pool_at = 0
        self._pad_randint: Callable[[int], int] = self._randint
        self._padding = config.padding
        self.datagram_size = config.max_datagram_size
        """The largest datagram built for stream data now (path MTU discovery moves it)."""
        self.max_stream_chunk = 0
        # path MTU discovery (RFC 8899): one probe at a time
        self._pmtud: PathMtuDiscovery | None = None
        self._probe_nonce = -1
        self._probe_size = 0
        self._probe_sent = 0.0
        self._probe_loss_at: float | None = None  # lost then, unless acknowledged first
        self._ext_flags = 0  # extensions in use with this peer (flags of the hello)
        self._ext_settled = not config.extensions  # known whether the peer has any
        self._unabandoned: list[int] = []  # lost probes' nonces while that is not known
        self._apply_size(config.max_datagram_size)
        if config.pmtud is not None:
            self.set_path_mtu(0.0, config.max_datagram_size)

    # -- public API ------------------------------------------------------------------------

    @property
    def established(self) -> bool:
        return self.state is State.ESTABLISHED

    @property
    def writable(self) -> bool:
        """False while more than ``send_buffer_limit`` bytes wait to be sent.

        Bytes of streams that wait for the peer's credit are not counted: each of them is
        bounded by ``stream_send_limit`` and none of them holds up any other stream.
        """
        return self.send_buffer_bytes - self._blocked_bytes < self.config.send_buffer_limit

    @property
    def flow_control(self) -> bool:
        """True once per-stream flow control is negotiated with the peer."""
        return self._fc == _FC_ON

    def stream_send_buffered(self, stream_id: int) -> int:
        """Bytes (encoded relay messages) queued for ``stream_id`` and not yet sent."""
        queue = self._queues.get(stream_id)
        return queue.size if queue is not None else 0

    def stream_writable(self, stream_id: int) -> bool:
        """True if the owner may queue more data for ``stream_id`` now.

        False while the stream's own queue holds ``stream_send_limit`` bytes (it waits for the
        peer's credit, or its turn) or the connection as a whole is not :attr:`writable`.
        A shell blocks the stream's producer until this turns True again after a flush.
        """
        if not self.writable:
            return False
        queue = self._queues.get(stream_id)
        return queue is None or queue.size < self.config.stream_send_limit

    def stream_consumed(self, stream_id: int, n: int) -> bool:
        """The owner handed ``n`` bytes of ``stream_id`` on (to its socket or its remote).

        With flow control this opens credit for the peer; returns True when a WindowUpdate is
        now due (call :meth:`datagrams_to_send` soon). Without flow control it does nothing.
        """
        flow = self._flows.get(stream_id)
        if flow is None:
            return False
        flow.consumed += n
        if (
            self._fc == _FC_ON
            and flow.granted - flow.consumed <= flow.window >> 1
            and stream_id not in self._grants_due
        ):
            self._grants_due.add(stream_id)
            return True
        return False

    def stream_receive_window(self, stream_id: int) -> int | None:
        """The current receive window of ``stream_id`` (None: no flow-control state)."""
        flow = self._flows.get(stream_id)
        return flow.window if flow is not None else None

    def forget_stream(self, stream_id: int) -> None:
        """Drop the flow-control state of a stream that ended both ways.

        The connection does this itself when a Close is sent or received on the stream (and an
        Error from the server); data of the stream still waiting for credit is discarded.
        """
        self._forget(stream_id)

    @property
    def receive_paused(self) -> bool:
        """While True, Data frames are dropped unacknowledged (receive-side backpressure).

        ACK, NACK and the other control frames are still processed, so the connection's own
        sending never waits on the pause. On resume a NACK asks the peer to re-send at once
        instead of after its retransmission timeout.
        """
        return self._receive_paused

    @receive_paused.setter
    def receive_paused(self, value: bool) -> None:
        if self._receive_paused and not value and self._dropped_while_paused:
            self._dropped_while_paused = False
            self.receiver.request_resend()
        self._receive_paused = value

    @property
    def reliable_transport(self) -> bool:
        """True while the path is a reliable stream (see ``ConnectionConfig``)."""
        return self.sender.reliable

    @reliable_transport.setter
    def reliable_transport(self, value: bool) -> None:
        self.sender.reliable = value

    @property
    def smoothed_rtt(self) -> float:
        return self.sender.rtt.srtt

    @property
    def pmtud(self) -> PathMtuDiscovery | None:
        """This side's path MTU discovery, or None when it is off (fixed datagram size)."""
        return self._pmtud

    def set_path_mtu(self, now: float, ceiling: int | None, ip_overhead: int | None = None) -> None:
        """Tell the connection what the path to the peer allows (the shell calls this).

        ``ceiling``: the largest UDP payload the first hop carries (its MTU minus
        ``ip_overhead``); path MTU discovery searches up to the smaller of it and
        ``max_datagram_size``, starting from the base size. None: the path is a stream (TCP):
        no discovery, datagrams of ``max_datagram_size``. Without ``config.pmtud`` the size
        is fixed at the smaller of ``ceiling`` and ``max_datagram_size``.
        """
        self._forget_probe(now)
        config = self.config
        top = config.max_datagram_size
        template = config.pmtud
        self._pmtud = None
        if ceiling is None or template is None or not template.enabled:
            self._apply_size(top if ceiling is None else min(top, ceiling))
            return
        cap = min(top, ceiling, template.max_plpmtu)
        if cap <= template.base_plpmtu:
            self._apply_size(cap)  # no room to search above the base
            return
        pm_config = replace(template, max_plpmtu=cap)
        if ip_overhead is not None:
            pm_config = replace(pm_config, ip_overhead=ip_overhead)
        self._pmtud = PathMtuDiscovery(pm_config)
        self.sender.loss_log = []
        self._apply_size(self._pmtud.max_datagram_size)

    def datagram_refused(self, size: int, now: float) -> None:
        """The shell could not send a datagram of ``size`` bytes: larger than the first hop's
        MTU (``EMSGSIZE`` with DF set). A probe of that size fails at once; a data datagram
        means the first hop shrank below the current size (a Packet Too Big hint)."""
        pmtud = self._pmtud
        if pmtud is None:
            return
        if self._probe_nonce >= 0 and size == self._probe_size:
            nonce = self._probe_nonce
            self._probe_nonce = -1
            pmtud.on_probe_refused(size, now)
            self._abandon(nonce)
        elif size > pmtud.config.min_plpmtu:
            pmtud.on_packet_too_big(size - 1, now)
        if pmtud.max_datagram_size != self.datagram_size:
            self._apply_size(pmtud.max_datagram_size)

    def next_event(self) -> Event | None:
        """The next event, or None."""
        return self._events.popleft() if self._events else None

    def send(self, stream_id: int, message: RelayMessage) -> None:
        """Queue a relay message on ``stream_id``; long Data is split into several frames."""
        if not 0 <= stream_id <= 0xFFFF:
            raise LocalProtocolError("stream id must fit in 16 bits")
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        if isinstance(message, Data):
            self.send_data(stream_id, message.data)
            return
        relay = encode_relay(message)
        if isinstance(message, Close):  # the stream is over (its id may come back)
            self._stream_floor.pop(stream_id, None)
        elif relay[0] in _OPENING_TAGS or stream_id not in self._stream_floor:
            self._stream_floor[stream_id] = self.receiver.highest
        if self._fc and isinstance(message, Connect):
            self._open_flow(stream_id)
        self._enqueue(stream_id, relay)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue stream bytes as Data relay messages (the hot path: no message objects).

        ``bytes`` are queued without a copy (they are immutable): the frames are built around
        views of them when they are sent. Anything else is copied once first, so the caller
        may reuse or change its buffer at once.
        """
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        if not 0 <= stream_id <= 0xFFFF:
            raise LocalProtocolError("stream id must fit in 16 bits")
        if stream_id not in self._stream_floor:
            self._stream_floor[stream_id] = self.receiver.highest
        view = memoryview(data if type(data) is bytes else bytes(data))
        chunk = self.max_stream_chunk
        n = len(view)
        if n <= chunk:
            self._queue(stream_id, view, n + DATA_RELAY_HEADER)  # empty too: an empty Data
            return
        for start in range(0, n, chunk):
            piece = view[start : start + chunk]
            self._queue(stream_id, piece, len(piece) + DATA_RELAY_HEADER)

    def path_changed(self, now: float) -> None:
        """Tell the connection the peer's address changed (roaming, NAT rebinding).

        In-flight datagrams are re-sent at once instead of after a backed-off timeout, behind
        a datagram with a fresh nonce (an empty Handshake frame, a no-op for every peer, spec
        §6): a server re-binds a session to a new path only on a datagram that is new to it,
        and re-sent ones it already holds are duplicates (over TCP, with no probes, nothing
        else might come).
        """
        if self.state is State.ESTABLISHED:
            self._build(FrameKind.HANDSHAKE, 0, b"", now, retransmittable=False)
            self.sender.on_path_changed()
        pmtud = self._pmtud
        if pmtud is not None:
            # RFC 8899 §5.2: a new path starts over at the base size
            self._forget_probe(now)
            if self.sender.loss_log:
                self.sender.loss_log.clear()
            pmtud.path_changed(now)
            self._apply_size(pmtud.max_datagram_size)

    def close(self, now: float) -> None:
        """Send a Close frame once (best effort) and stop. Upstream peers simply drop state."""
        if self.state is State.CLOSED:
            return
        if self.state is State.ESTABLISHED:
            self._build(FrameKind.CLOSE, 0, b"", now, retransmittable=False)
        self._terminate(Termination.CLOSED_LOCALLY, "closed locally")

    def get_timer(self) -> float | None:
        """Absolute time at which :meth:`handle_timer` must be called, or None."""
        if self.state is State.CLOSED:
            return None
        deadlines: list[float] = []
        extra = self._role_timer()
        if extra is not None:
            deadlines.append(extra)
        if self.state is State.ESTABLISHED:
            deadlines.append(self.last_receive + self.config.idle_timeout)
            receiver = self.receiver
            sender = self.sender
            bound = self._hole_bound()
            for t in (
                receiver.ack_deadline(),
                None if self._receive_paused else receiver.nack_deadline(),
                None if bound is None else receiver.hole_deadline(bound),
                None if self._receive_paused else receiver.tail_probe_deadline(),
                sender.probe_deadline(),
                sender.pacing_deadline(bool(self._rr or self._urgent)),
                None if self._pmtud is None else self._pmtud.get_timer(),
                self._probe_loss_at if self._probe_nonce >= 0 else None,
            ):
                if t is not None:
                    deadlines.append(t)
            if self._grants_due:
                deadlines.append(self._now)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        """Run whatever timers are due at ``now``."""
        if self.state is State.CLOSED:
            return
        self._now = now
        self._role_handle_timer(now)
        if self.state is not State.ESTABLISHED:
            return
        if now - self.last_receive >= self.config.idle_timeout:
            self._terminate(
                Termination.IDLE_TIMEOUT, "idle timeout: no valid datagram from the peer"
            )
            return
        receiver = self.receiver
        if receiver.holes:
            self._check_gap(now)
        tail = receiver.tail_probe_deadline()
        if tail is not None and now >= tail and not self._receive_paused:
            # an ack-eliciting frame: the peer's ACK shows its newest nonce (and our losses)
            receiver.tail_probe_sent(now)
            self._build(FrameKind.KEEPALIVE, 0, b"", now, retransmittable=False)
        deadline = self.sender.probe_deadline()
        pmtud = self._pmtud
        if deadline is not None and now >= deadline:
            self._out.extend(self.sender.on_probe_timeout(now))
            if pmtud is not None and self.sender.pto_count == PERSISTENT_PTO:
                # nothing acknowledged for three probe timeouts: full-size datagrams may be
                # falling into a black hole (RFC 8899 §4.3); a dead path loses nothing by it
                pmtud.on_persistent_timeout(now)
                if pmtud.max_datagram_size != self.datagram_size:
                    self._apply_size(pmtud.max_datagram_size)
        if pmtud is not None:
            lost_at = self._probe_loss_at
            if lost_at is not None and self._probe_nonce >= 0 and now >= lost_at:
                self._probe_lost(now)
            deadline = pmtud.get_timer()
            if deadline is not None and now >= deadline:
                nonce = self._probe_nonce
                pmtud.handle_timer(now)
                if nonce >= 0 and pmtud.probe_in_flight is None:
                    self._probe_nonce = -1  # no answer for PROBE_TIMER: lost
                    self._abandon(nonce)
                if pmtud.max_datagram_size != self.datagram_size:
                    self._apply_size(pmtud.max_datagram_size)

    def datagrams_to_send(self, now: float) -> list[bytes]:
        """Datagrams to put on the wire now, in order."""
        if self.state is State.ESTABLISHED:
            self._now = now
            if self._grants_due:
                self._send_grants(now)
            receiver = self.receiver
            if not self._receive_paused:
                deadline = receiver.nack_deadline()
                if deadline is not None and now >= deadline:
                    for nack in receiver.build_nacks(now):
                        self._build(FrameKind.NACK, 0, nack, now, retransmittable=False)
            if receiver.ack_due(now):
                ack = receiver.build_ack(now)
                if ack is not None:
                    self._build(FrameKind.ACK, 0, ack, now, retransmittable=False)
            pmtud = self._pmtud
            if (
                pmtud is not None
                and self.stats.datagrams_received  # the peer's address is proven
                and not self.sender.reliable
            ):
                if self._probe_nonce >= 0 and pmtud.probe_in_flight is None:
                    # the search moved on without it (fallback, Packet Too Big, base confirmed
                    # by data): it may still arrive, but nobody waits for it any more
                    self._abandon(self._probe_nonce)
                    self._probe_nonce = -1
                if self._probe_nonce < 0:
                    size = pmtud.probe_size_to_send(now)
                    if size is not None:
                        self._send_probe(size, now)
            if self.sender.has_lost:
                self._out.extend(self.sender.retransmissions(now))
            if self._rr or self._urgent:
                self._flush_queue(now)
        out = self._out
        if out:
            self._out = []
            for d in out:
                self.stats.bytes_sent += len(d)
        return out

    def receive_datagram(self, data: bytes, now: float) -> None:
        """Feed one datagram from the peer. Garbage is dropped and counted, never raised."""
        if self.state is State.CLOSED:
            self.stats.state_drop += 1
            return
        if self.state is State.HANDSHAKING:
            self._receive_handshake(data, now)
            return
        if self.state is not State.ESTABLISHED:
            self.stats.state_drop += 1
            return
        opener = self._opener
        assert opener is not None
        nonce = opener.unmask(data)
        if nonce is None:
            self.stats.datagram_session_drop += 1
            return
        receiver = self.receiver
        verdict = receiver.classify(nonce, now)
        if verdict == 1:
            return
        self._now = now
        plaintext = opener.decrypt(nonce, data)
        if plaintext is None:
            self.stats.datagram_auth_drop += 1
            return
        self.last_receive = now
        self.stats.datagrams_received += 1
        self.stats.bytes_received += len(data)
        try:
            # the payload stays in place (plaintext[FRAME_HEADER_LEN:end]): Data is sliced out
            # once, on delivery, and control frames slice their few bytes where they are read
            kind, stream_id, end = decode_frame_header(plaintext)
        except RemoteProtocolError:
            # Authenticated but undecodable: keep the nonce sequence whole, deliver nothing.
            self.stats.frame_decode_drop += 1
            if not verdict:
                self._deliver(receiver.accept(nonce, None, False, now), now)
            return
        if verdict:
            # Too far ahead to keep (spec §7.3 step 2), but a hole that forms below it later
            # is timed from now; and ACK and NACK still act: an unpaced peer far past a hole
            # must keep seeing our data acknowledged and its NACKs answered.
            receiver.sighted(nonce, now)
            if kind not in (FrameKind.ACK, FrameKind.NACK):
                return
        if kind in (FrameKind.DATA, FrameKind.RESUME):
            if self.receive_paused:
                # Not taken, not acknowledged: the peer sends it again once we resume. ACKs
                # and NACKs still get through, so our own sending never waits on this pause.
                self.stats.paused_drop += 1
                self._dropped_while_paused = True
                receiver.own_drop_at = now  # our drop, not the peer giving up
                return
            tag = plaintext[12] if end > 12 else -1  # the relay tag (12: FRAME_HEADER_LEN)
            floors = self._stream_floor
            floor = floors.get(stream_id)
            if floor is None or nonce <= floor or tag in _OPENING_TAGS:
                floors[stream_id] = nonce - 1
            if not stream_id and tag == _TAG_ABANDONED:
                # on arrival, not in order: the hole it closes may be what holds it back
                self._on_abandoned(plaintext[FRAME_HEADER_LEN:end], now)
            self._deliver(receiver.accept(nonce, (kind, stream_id, plaintext, end), True, now), now)
            if receiver.holes:
                self._check_gap(now)
        elif kind == FrameKind.ACK:
            try:
                ranges = decode_ack(plaintext[FRAME_HEADER_LEN:end])
            except RemoteProtocolError:
                self.stats.frame_decode_drop += 1
            else:
                self.sender.on_ack(ranges, now)
                if self._pmtud is not None:
                    self._pmtud_on_ack(ranges, now)
            # A new hole's first NACK waits two RTTs: a sender that reads loss from our ACKs
            # (ours: an RTT and 9/8 of one) has re-sent by then, so NACKs add nothing to its
            # work; upstream still holds the frame for ~1.5 s.
            receiver.nack_delay = min(2 * self.sender.rtt.srtt, NACK_REPEAT)
            if not verdict:
                self._deliver(receiver.accept(nonce, None, False, now), now)
        elif kind == FrameKind.NACK:
            try:
                again = self.sender.on_nack(decode_nack(plaintext[FRAME_HEADER_LEN:end]), now)
            except RemoteProtocolError:
                self.stats.frame_decode_drop += 1
                again = None
            if again is not None:
                self._out.append(again)
            if not verdict:
                self._deliver(receiver.accept(nonce, None, False, now), now)
        elif kind == FrameKind.CLOSE:
            self._terminate(Termination.CLOSED_BY_PEER, "closed by peer")
        else:  # KEEPALIVE (ack-eliciting) and HANDSHAKE (no-op), spec §6
            eliciting = kind == FrameKind.KEEPALIVE
            self._deliver(receiver.accept(nonce, None, eliciting, now), now)

    # -- internals -------------------------------------------------------------------------

    # -- path MTU discovery (RFC 8899) ------------------------------------------------------

    def _apply_size(self, size: int) -> None:
        """Build datagrams of at most ``size`` bytes from now on (queued Data is cut to fit
        when it is sent)."""
        self.datagram_size = size
        self.max_stream_chunk = max(size - DATAGRAM_OVERHEAD - DATA_RELAY_HEADER, 64)
        padding = self.config.padding
        if self._pmtud is not None and padding.mtu_hint > size - 2:
            # spec §6.1: padded datagrams stay within mtu_hint + 2 bytes
            padding = replace(padding, mtu_hint=max(size - 2, 0))
        self._padding = padding
        self.sender.cc.set_mss(size)

    def _send_probe(self, size: int, now: float) -> None:
        """A KeepAlive frame (ack-eliciting, no stream data, spec §6) padded to ``size`` bytes.

        Never retransmitted and not in the congestion window: a lost probe is too big for the
        path, and its loss says nothing about congestion (RFC 8899 §4.1)."""
        sender = self.sender
        nonce = sender.next_nonce
        if nonce > MAX_NONCE:
            return
        sealer = self._sealer
        assert sealer is not None
        pad = max(size - DATAGRAM_OVERHEAD, 0)
        frame = encode_frame(FrameKind.KEEPALIVE, 0, b"", pad, self._reserved())
        sender.next_nonce = nonce + 1
        sender.stats.datagrams_sent += 1
        self._probe_nonce = nonce
        self._probe_size = size
        self._probe_sent = now
        self._probe_loss_at = None
        self._out.append(sealer.seal(nonce, frame))
        # A small ack-eliciting datagram right behind it: the peer's ACK then shows within a
        # round trip whether the probe arrived, even on an idle connection, and before an
        # upstream receiver skips its hole (500 ms, spec §7.3), which would acknowledge it.
        self._build(FrameKind.KEEPALIVE, 0, b"", now, retransmittable=False)

    def _pmtud_on_ack(self, ranges: list[tuple[int, int]], now: float) -> None:
        """Probe acknowledged or lost (RFC 9002 §6.1 thresholds); feedback for black holes."""
        pmtud = self._pmtud
        assert pmtud is not None
        sender = self.sender
        nonce = self._probe_nonce
        if nonce >= 0:
            largest = -1
            for start, end in ranges:
                if start <= nonce <= end:
                    self._probe_nonce = -1
                    pmtud.on_probe_acked(self._probe_size, now)
                    break
                largest = max(largest, end)
            else:
                if largest > nonce:
                    # RFC 9002 §6.1: lost once 3 later nonces or 9/8 RTT later ones arrived
                    rtt = sender.rtt
                    lost_at = self._probe_sent + TIME_THRESHOLD * max(rtt.srtt, rtt.latest)
                    if largest - nonce >= PACKET_THRESHOLD or now >= lost_at:
                        self._probe_lost(now)
                    else:
                        self._probe_loss_at = lost_at
        newest = sender.newest_acked
        if newest is not None:
            sender.newest_acked = None
            pmtud.on_datagram_acked(newest.size, newest.sent_time, now)
        losses = sender.loss_log
        if losses:
            for size, sent_time in losses:
                pmtud.on_datagram_lost(size, sent_time, now)
            losses.clear()
        if pmtud.max_datagram_size != self.datagram_size:
            self._apply_size(pmtud.max_datagram_size)

    def _probe_lost(self, now: float) -> None:
        nonce = self._probe_nonce
        self._probe_nonce = -1
        self._probe_loss_at = None
        if self._pmtud is not None:
            self._pmtud.on_probe_lost(self._probe_size, now)
        self._abandon(nonce)

    def _forget_probe(self, now: float) -> None:
        """The probe in flight no longer counts (new path): its nonce may be a hole."""
        if self._probe_nonce >= 0:
            self._probe_lost(now)

    def _abandon(self, nonce: int) -> None:
        """Give up a probe's nonce towards the peer: with the extension it closes the hole at
        once (Abandoned); an upstream receiver skips it after 500 ms by itself (spec §7.3)."""
        if self._ext_flags & EXT_PATH_PROBES:
            self.stats.probes_abandoned += 1
            self._urgent.append((0, encode_abandoned(nonce)))
        elif not self._ext_settled and len(self._unabandoned) < 64:
            self._unabandoned.append(nonce)  # sent once the peer's extensions are known

    def _settle_extensions(self, flags: int) -> None:
        """The peer's extensions are known (``flags``; 0 for none)."""
        self._ext_flags = flags
        self._ext_settled = True
        pmtud = self._pmtud
        if pmtud is not None and not flags & EXT_PATH_PROBES:
            # Each lost probe stalls an upstream receiver for 500 ms (spec §7.3): one loss
            # rules a size out (a random one only delays the search to the next raise).
            pmtud.config = replace(pmtud.config, max_probes=1)
        pending = self._unabandoned
        if pending:
            self._unabandoned = []
            for nonce in pending:
                self._abandon(nonce)

    def _on_abandoned(self, payload: bytes, now: float) -> None:
        """The peer gave up a nonce (a lost probe): count it as received with no frame.

        Taken whenever this side offers the extension, even before the peer's answer is
        delivered: that answer may wait behind the very hole this closes, and only a peer that
        accepted the extension sends the message at all (an upstream peer never does)."""
        if not self.config.extensions:
            return
        nonce = parse_abandoned(payload)
        receiver = self.receiver
        if (
            nonce is None
            or nonce < receiver.expected
            or nonce in receiver.buffer
            or nonce > receiver.expected + receiver.max_reorder
        ):
            return
        self.stats.abandoned_received += 1
        self._deliver(receiver.accept(nonce, None, False, now), now)

    def _hole_bound(self) -> float | None:
        skip = self.config.gap_skip_after
        return None if skip is None else skip + self.sender.rtt.srtt

    def _check_gap(self, now: float) -> None:
        """Give up every hole that has been open too long, in one pass (see DataLost)."""
        bound = self._hole_bound()
        if bound is None:
            return
        deadline = self.receiver.hole_deadline(bound)
        if deadline is None or now < deadline:
            return
        floors = self._stream_floor
        for first, last, frames in self.receiver.expire_holes(now, bound):
            streams = frozenset(s for s, floor in floors.items() if floor < last)
            self._events.append(DataLost(first, last, streams))
            self._deliver(frames, now)

    def _take_random(self) -> int:
        """Two random bytes as an int, from a pool refilled 4 KiB at a time (no syscall each,
        and no copy of the rest of the pool: an index walks it)."""
        at = self._pool_at
        if at >= len(self._reserved_pool) - 1:
            self._reserved_pool = self._random(4096)
            at = 0
        self._pool_at = at + 2
        pool = self._reserved_pool
        return (pool[at] << 8) | pool[at + 1]

    def _randint(self, n: int) -> int:
        return self._take_random() % (n + 1) if n > 0 else 0

    def _reserved(self) -> int:
        return self._take_random()

    def _fresh_randint(self, n: int) -> int:
        """Uniform in [0, n] straight from ``random_bytes`` (handshakes: rare, scriptable)."""
        return int.from_bytes(self._random(2), "big") % (n + 1) if n > 0 else 0

    def _enqueue(self, stream_id: int, relay: bytes) -> None:
        """Queue an encoded relay message."""
        self._queue(stream_id, relay, len(relay))

    def _queue(self, stream_id: int, item: bytes | memoryview, size: int) -> None:
        """Queue an encoded relay message, or stream bytes for a Data message (a view of
        immutable bytes, ``size`` counting its 3-byte header: see ``_SendQueue``)."""
        queue = self._queues.get(stream_id)
        if queue is None:
            queue = self._queues[stream_id] = _SendQueue()
            self._rr.append(stream_id)
        queue.append(item)
        queue.size += size
        self.send_buffer_bytes += size
        if self._blocked and stream_id in self._blocked:
            self._blocked_bytes += size

    def _flush_queue(self, now: float) -> None:
        sender = self.sender
        if self._urgent and not self._flush_urgent(now):
            return
        queues = self._queues
        rr = self._rr
        flows = self._flows
        end_tags = self._end_tags
        max_chunk = self.max_stream_chunk
        while rr and sender.window_open(now):
            stream_id = rr[0]
            queue = queues[stream_id]
            relay = queue[0]
            forget = False
            if type(relay) is memoryview:  # stream bytes: a Data message (see _SendQueue)
                n = len(relay)
                if n > max_chunk:
                    relay = self._split_queued(queue, max_chunk)
                    n = max_chunk
                if flows:
                    flow = flows.get(stream_id)
                    if flow is not None:
                        # Data only within the peer's credit; what follows in this stream's
                        # queue waits behind it, other streams go on (docs/flow-control.md)
                        if flow.sent + n > flow.limit:
                            rr.popleft()
                            self._blocked.add(stream_id)
                            self._blocked_bytes += queue.size
                            continue
                        flow.sent += n
                size = n + DATA_RELAY_HEADER
            else:
                if flows and relay[0] in end_tags:
                    forget = True
                size = len(relay)
            queue.popleft()
            queue.size -= size
            self.send_buffer_bytes -= size
            if queue:
                rr.rotate(-1)
            else:
                rr.popleft()
                del queues[stream_id]
            if forget:
                self._forget(stream_id)
            if type(relay) is memoryview:
                if not self._build_data(stream_id, relay, now):
                    return
            elif not self._build(FrameKind.DATA, stream_id, relay, now, retransmittable=True):
                return

    def _split_queued(self, queue: _SendQueue, max_chunk: int) -> memoryview:
        """Cut the stream bytes at the head of ``queue`` to ``max_chunk`` (they were queued
        while datagrams were larger); the rest stays at the head as a Data message of its own."""
        data = queue[0]
        assert type(data) is memoryview
        head = data[:max_chunk]
        queue[0] = head
        queue.insert(1, data[max_chunk:])
        queue.size += DATA_RELAY_HEADER
        self.send_buffer_bytes += DATA_RELAY_HEADER
        return head

    def _flush_urgent(self, now: float) -> bool:
        """WindowUpdates go before any queued message: a peer may be waiting for them."""
        urgent = self._urgent
        sender = self.sender
        while urgent and sender.window_open(now):
            stream_id, relay = urgent.popleft()
            if not self._build(FrameKind.DATA, stream_id, relay, now, retransmittable=True):
                return False
            if relay[0] != _TAG_ABANDONED:
                self.stats.window_updates_sent += 1
        return not urgent

    # -- flow control (docs/flow-control.md) --------------------------------------------

    @property
    def _end_tags(self) -> tuple[int, ...]:
        """Relay tags that end a stream when this side sends them."""
        return (_TAG_CLOSE,)

    def _open_flow(self, stream_id: int) -> None:
        if stream_id in self._flows:
            self._forget(stream_id)  # a stream id used again: the old stream is over
        self._flows[stream_id] = _Flow(self.config.stream_window, self._peer_window, self._now)

    def _forget(self, stream_id: int) -> None:
        if self._flows.pop(stream_id, None) is None:
            return
        self._grants_due.discard(stream_id)
        if stream_id in self._blocked:
            # the stream is over: what still waits for its credit can never be delivered
            self._blocked.discard(stream_id)
            queue = self._queues.pop(stream_id)
            self._blocked_bytes -= queue.size
            self.send_buffer_bytes -= queue.size

    def _unblock(self, stream_id: int) -> None:
        self._blocked.discard(stream_id)
        self._blocked_bytes -= self._queues[stream_id].size
        self._rr.append(stream_id)

    def _drop_flows(self) -> None:
        """Flow control is not (or no longer) in use: no credit, no state."""
        self._fc = _FC_OFF
        for stream_id in list(self._blocked):
            self._unblock(stream_id)
        self._flows.clear()
        self._grants_due.clear()

    def _enable_flows(self, peer_window: int) -> None:
        self._fc = _FC_ON
        self._peer_window = peer_window
        for stream_id, flow in self._flows.items():
            if peer_window > flow.limit:
                flow.limit = peer_window
                if stream_id in self._blocked:
                    self._unblock(stream_id)
            if flow.granted - flow.consumed <= flow.window >> 1:
                self._grants_due.add(stream_id)

    def _send_grants(self, now: float) -> None:
        """Announce more credit for every stream whose reader drained half its window."""
        flows = self._flows
        ceiling = self.config.max_stream_window
        rtt = self.sender.rtt.srtt
        for stream_id in self._grants_due:
            flow = flows.get(stream_id)
            if flow is None:
                continue
            # Auto-tuning as in quic-go: a window drained in less than about two round trips
            # is what limits the stream's speed, so it doubles (up to the ceiling).
            window = flow.window
            if window < ceiling:
                drained = flow.consumed - flow.epoch_offset
                if now - flow.epoch_time < 4 * rtt * drained / window:
                    flow.window = window = min(window * 2, ceiling)
            flow.epoch_time = now
            flow.epoch_offset = flow.consumed
            flow.granted = flow.consumed + window
            self._urgent.append((stream_id, encode_window_update(flow.granted)))
        self._grants_due.clear()

    def _on_window_update(self, stream_id: int, max_offset: int) -> None:
        self.stats.window_updates_received += 1
        flow = self._flows.get(stream_id)
        if flow is not None and max_offset > flow.limit:
            flow.limit = max_offset
            if stream_id in self._blocked:
                self._unblock(stream_id)

    def _build(
        self, kind: int, stream_id: int, payload: bytes, now: float, *, retransmittable: bool
    ) -> bool:
        sender = self.sender
        nonce = sender.next_nonce
        if nonce > MAX_NONCE:
            self._nonce_exhausted()
            return False
        sealer = self._sealer
        assert sealer is not None
        padding = self._padding
        if len(payload) + PADDING_CLAMP_OVERHEAD >= padding.mtu_hint:
            pad = 0  # spec §6.1's final clamp: full datagrams get none (no call to find that)
        else:
            pad = padding.pad_len(len(payload), self._pad_randint)
        frame = encode_frame(kind, stream_id, payload, pad, self._take_random())
        datagram = sealer.seal(nonce, frame)
        sender.next_nonce = nonce + 1
        sender.record(nonce, datagram, now, retransmittable)
        self._out.append(datagram)
        return True

    def _build_data(self, stream_id: int, data: memoryview, now: float) -> bool:
        """``_build`` of a Data frame carrying one relay Data message of ``data`` (the hot
        path): frame header, relay header, the bytes and any padding joined in one copy."""
        sender = self.sender
        nonce = sender.next_nonce
        if nonce > MAX_NONCE:
            self._nonce_exhausted()
            return False
        sealer = self._sealer
        assert sealer is not None
        n = len(data)
        relay_len = n + DATA_RELAY_HEADER
        padding = self._padding
        if relay_len + PADDING_CLAMP_OVERHEAD >= padding.mtu_hint:
            pad = 0  # spec §6.1's final clamp, as in _build
        else:
            pad = padding.pad_len(relay_len, self._pad_randint)
        head = encode_data_frame_header(stream_id, n, pad, self._take_random())
        frame = b"".join((head, data, bytes(pad))) if pad else head + data
        datagram = sealer.seal(nonce, frame)
        sender.next_nonce = nonce + 1
        sender.record(nonce, datagram, now, True)
        self._out.append(datagram)
        return True

    def _nonce_exhausted(self) -> None:
        self._terminate(
            Termination.NONCE_EXHAUSTED,
            "nonce space exhausted: the session must be re-established",
        )

    def _deliver(self, frames: list[Frame], now: float) -> None:
        events = self._events
        flows = self._flows
        for _kind, stream_id, plaintext, end in frames:
            # The hot path first: a whole Data message decoded in place (decode_relay's rules:
            # tag, u16 length, the bytes; anything after them ignored), no isinstance chain;
            # its bytes are the one copy taken of the plaintext.
            # (offsets as literals, FRAME_HEADER_LEN 12 and DATA_FRAME_HEADER_LEN 15: no global
            # lookups per datagram)
            if (
                end >= 15
                and plaintext[12] == _TAG_DATA
                and (stop := 15 + ((plaintext[13] << 8) | plaintext[14])) <= end
            ):
                data = plaintext[15:stop]
                if flows:
                    flow = flows.get(stream_id)
                    if flow is not None:
                        flow.received += len(data)
                        if flow.received > flow.granted:
                            self.stats.flow_violation += 1
                events.append(RelayMessageReceived(stream_id, Data(data)))
                continue
            payload = plaintext[FRAME_HEADER_LEN:end]
            try:
                message = decode_relay(payload)
            except RemoteProtocolError:
                self.stats.relay_decode_drop += 1
                continue
            if isinstance(message, Ping):
                self._enqueue(stream_id, encode_relay(Pong(message.timestamp)))
            elif isinstance(message, Pong):
                self._on_pong(message, now)
            elif isinstance(message, KeepAlive):
                if len(payload) > 1:
                    self._on_keepalive_trailer(stream_id, payload)
            elif isinstance(message, WindowUpdate):
                if not self._fc:
                    # not negotiated: a tag this session does not know, as for upstream
                    self.stats.relay_decode_drop += 1
                    continue
                self._on_window_update(stream_id, message.max_offset)
            elif isinstance(message, Abandoned):
                if not self.config.extensions:
                    self.stats.relay_decode_drop += 1  # as for WindowUpdate
                # else acted on when it arrived (_on_abandoned)
            else:
                if isinstance(message, Close):  # the stream is over (its id may come back)
                    self._stream_floor.pop(stream_id, None)
                if isinstance(message, (Close, Error, Connect, UdpAssociate)):
                    self._on_stream_boundary(stream_id, message)
                events.append(RelayMessageReceived(stream_id, message))

    def _on_pong(self, message: Pong, now: float) -> None:
        """Client hook; the server ignores Pongs (spec §8)."""

    def _on_keepalive_trailer(self, stream_id: int, payload: bytes) -> None:
        """A KeepAlive with bytes after it: maybe an extension hello (role hook)."""

    def _on_stream_boundary(self, stream_id: int, message: RelayMessage) -> None:
        """Connect/UdpAssociate/Close/Error received (role hook for flow-control state)."""
        if self._flows and isinstance(message, Close):
            self._forget(stream_id)

    def _establish(self, secrets: Secrets, send_key: bytes, recv_key: bytes, now: float) -> None:
        self._sealer = DataSealer(secrets.obfuscation_key, send_key, self.session_id)
        self._opener = DataOpener(secrets.obfuscation_key, recv_key, self.session_id)
        self.state = State.ESTABLISHED
        self.last_receive = now

    def _terminate(self, cause: Termination, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._events.append(ConnectionTerminated(reason, cause))

    def _role_timer(self) -> float | None:
        return None

    def _role_handle_timer(self, now: float) -> None:
        return None

    def _receive_handshake(self, data: bytes, now: float) -> None:
        self.stats.state_drop += 1


# ------------------------------------------------------------------------------------ client


@dataclass(slots=True)
class _Attempt:
    session_id: int
    noise: NoiseHandshake
    sent_at: float


class ClientConnection(Connection):
    """The initiator (spec §3, §10.1).

    Call :meth:`connect` with the current monotonic time and the Unix time; every handshake
    retry is a fresh handshake (new ephemeral key and session id), since an upstream server
    rejects an identical first datagram as a replay (spec §9.2).
    """

    def __init__(
        self,
        *,
        access_key: str | bytes,
        session_id: int | None = None,
        config: ConnectionConfig | None = None,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        key = access_key.encode() if isinstance(access_key, str) else bytes(access_key)
        if not key:
            raise LocalProtocolError("the access key must not be empty")
        if len(key) > 964:
            raise LocalProtocolError("the access key must be at most 964 bytes (spec §3)")
        super().__init__(derive_secrets(key), config or ConnectionConfig(), random_bytes)
        self._key = key
        self._first_session_id = session_id
        self._attempts: list[_Attempt] = []
        self._unix_offset = 0.0
        self._next_keepalive: float | None = None
        self.ping_rtt: float | None = None
        self.handshake_rtt: float | None = None
        self.rtt_sampled_at: float | None = None
        """When the latest of ``handshake_rtt``/``ping_rtt`` was measured: a Pong answering
        the keepalive Ping renews it every ``keepalive_interval`` on a live session."""

    def connect(self, now: float, unix_time: float) -> None:
        """Start the handshake: message 1 is ready in :meth:`datagrams_to_send`."""
        if self.state is not State.IDLE:
            raise LocalProtocolError("connect() may be called once")
        self._unix_offset = unix_time - now
        self.state = State.HANDSHAKING
        self.last_receive = now
        self._start_attempt(now)

    def _start_attempt(self, now: float) -> None:
        if self._first_session_id is not None and not self._attempts:
            sid = self._first_session_id
        else:
            sid = int.from_bytes(self._random(4), "big")
        noise = NoiseHandshake(
            initiator=True, ephemeral_private=self._random(32), psk=self._secrets.psk
        )
        ts = int(now + self._unix_offset)
        payload = ts.to_bytes(8, "big") + sid.to_bytes(4, "big") + self._key
        message = noise.write_message_1(payload)
        s = self._secrets
        pad = s.handshake_pad_min + self._fresh_randint(s.handshake_pad_max - s.handshake_pad_min)
        self._out.append(
            build_handshake_datagram(s.obfuscation_key, sid, message, self._random(pad))
        )
        self._attempts.append(_Attempt(sid, noise, now))
        self.session_id = sid

    def _receive_handshake(self, data: bytes, now: float) -> None:
        try:
            sid, message = parse_handshake_datagram(self._secrets.obfuscation_key, data)
        except RemoteProtocolError:
            self.stats.handshake_drop += 1
            return
        for attempt in self._attempts:
            if attempt.session_id != sid:
                continue
            try:
                attempt.noise.read_message_2(message)
            except RemoteProtocolError:
                break
            self.session_id = sid
            send_key, recv_key = split_transport_keys(attempt.noise.handshake_hash)
            self._establish(self._secrets, send_key, recv_key, now)
            self._attempts = []
            rtt = now - attempt.sent_at
            self.handshake_rtt = rtt
            self.rtt_sampled_at = now
            self.sender.rtt.sample(rtt, now)
            self._events.append(HandshakeCompleted(sid, rtt))
            if self.config.extensions:
                # The hello goes first, the Ping right behind it: an ostp-py server answers
                # the hello before it answers the Ping (both on stream 0, in order), so a Pong
                # before any answer means the server does not know the extension.
                self._fc = _FC_PENDING
                hello = ExtensionHello(
                    EXTENSION_VERSION, SUPPORTED_EXTENSIONS, self.config.stream_window
                )
                self._enqueue(0, encode_extension_hello(hello))
                self._send_keepalive(now, with_keepalive=False)
            elif self.config.keepalive_interval is not None:
                self._send_keepalive(now, with_keepalive=False)  # spec §10.1: Ping at once
            return
        self.stats.handshake_drop += 1

    def _send_keepalive(self, now: float, *, with_keepalive: bool = True) -> None:
        ts = round((now + self._unix_offset) * 1000)
        self._enqueue(0, encode_relay(Ping(ts)))
        if with_keepalive:
            self._enqueue(0, encode_relay(KeepAlive()))
        interval = self.config.keepalive_interval
        self._next_keepalive = now + interval if interval is not None else None

    def _on_pong(self, message: Pong, now: float) -> None:
        if self._fc == _FC_PENDING:
            self._drop_flows()  # the server answered our Ping, not our hello: upstream
            self._settle_extensions(0)
        rtt = (now + self._unix_offset) * 1000 - message.timestamp
        if 0 <= rtt < 600_000:
            self.ping_rtt = rtt / 1000
            self.rtt_sampled_at = now

    def _on_keepalive_trailer(self, stream_id: int, payload: bytes) -> None:
        if self._fc != _FC_PENDING or stream_id != 0:
            return
        hello = parse_extension_hello(payload)
        if hello is None:
            return
        flags = hello.flags & SUPPORTED_EXTENSIONS
        self.peer_extensions = ExtensionHello(
            min(hello.version, EXTENSION_VERSION), flags, hello.stream_window
        )
        if flags & EXT_FLOW_CONTROL:
            self._enable_flows(hello.stream_window)
        else:
            self._drop_flows()
        self._settle_extensions(flags)
        self._events.append(ExtensionsNegotiated(flags, hello.stream_window))

    def _on_stream_boundary(self, stream_id: int, message: RelayMessage) -> None:
        # the server ends a stream with Close, or with Error when the connect failed (spec §8)
        if self._flows and isinstance(message, (Close, Error)):
            self._forget(stream_id)

    def _role_timer(self) -> float | None:
        if self.state is State.HANDSHAKING and self._attempts:
            return self._attempts[-1].sent_at + self.config.handshake_timeout
        if self.state is State.ESTABLISHED:
            return self._next_keepalive
        return None

    def _role_handle_timer(self, now: float) -> None:
        if self.state is State.HANDSHAKING and self._attempts:
            if now >= self._attempts[-1].sent_at + self.config.handshake_timeout:
                if len(self._attempts) >= self.config.handshake_attempts:
                    self._terminate(
                        Termination.HANDSHAKE_TIMED_OUT,
                        f"handshake timed out after {len(self._attempts)} attempts",
                    )
                else:
                    self._start_attempt(now)
        elif self._next_keepalive is not None and now >= self._next_keepalive:
            self._send_keepalive(now)


# ------------------------------------------------------------------------------------ server


class ServerConnection(Connection):
    """The responder side of one session, created by :class:`~ostp_proto.ServerAcceptor`."""

    key_index: int
    """Index of the access key (in the acceptor's list) the client authenticated with."""

    def __init__(
        self,
        secrets: Secrets,
        config: ConnectionConfig,
        random_bytes: RandomBytes,
        *,
        session_id: int,
        key_index: int,
        noise: NoiseHandshake,
        now: float,
    ) -> None:
        super().__init__(secrets, config, random_bytes)
        self.session_id = session_id
        self.key_index = key_index
        self._hello_closed = False  # a stream was opened or a hello answered: no (more) hello
        noise.set_ephemeral(random_bytes(32))
        message = noise.write_message_2(b"")
        pad = secrets.handshake_pad_min + self._fresh_randint(
            secrets.handshake_pad_max - secrets.handshake_pad_min
        )
        self._out.append(
            build_handshake_datagram(
                secrets.obfuscation_key, session_id, message, random_bytes(pad)
            )
        )
        recv_key, send_key = split_transport_keys(noise.handshake_hash)
        self._establish(secrets, send_key, recv_key, now)
        self._events.append(HandshakeCompleted(session_id, None))

    def matches(self, data: bytes) -> bool:
        """True if ``data`` is a data datagram of this session (for roaming lookups)."""
        return self._opener is not None and self._opener.unmask(data) is not None

    @property
    def _end_tags(self) -> tuple[int, ...]:
        return (_TAG_CLOSE, _TAG_ERROR)  # Error: the connect failed, the stream is over

    def _on_keepalive_trailer(self, stream_id: int, payload: bytes) -> None:
        # Only a hello that comes before any stream: credit counts from a stream's first byte.
        if not self.config.extensions or self._hello_closed or stream_id != 0:
            return
        hello = parse_extension_hello(payload)
        if hello is None:
            return
        self._hello_closed = True
        flags = hello.flags & SUPPORTED_EXTENSIONS
        version = min(hello.version, EXTENSION_VERSION)
        self.peer_extensions = ExtensionHello(version, flags, hello.stream_window)
        answer = ExtensionHello(version, flags, self.config.stream_window)
        self._enqueue(0, encode_extension_hello(answer))  # before the Pong to the Ping behind
        if flags & EXT_FLOW_CONTROL:
            self._enable_flows(hello.stream_window)
        self._settle_extensions(flags)
        self._events.append(ExtensionsNegotiated(flags, hello.stream_window))

    def _on_stream_boundary(self, stream_id: int, message: RelayMessage) -> None:
        if isinstance(message, (Connect, UdpAssociate)):
            self._hello_closed = True
            if not self._ext_settled:
                self._settle_extensions(0)
            if self._fc and isinstance(message, Connect):
                self._open_flow(stream_id)
        elif self._flows and isinstance(message, Close):
            self._forget(stream_id)
