"""Datagram packetization layer path MTU discovery (RFC 8899, as QUIC uses it: RFC 9000 §14.3).

A sans-IO state machine that tells one sending direction of a connection how large its datagrams
may be (:attr:`PathMtuDiscovery.max_datagram_size`, the PLPMTU, in UDP payload bytes) and when to
send a probe of which size. It starts at ``base_plpmtu``, which crosses every path, confirms it,
then searches upward with probes; datagrams grow only when a probe of that size is acknowledged,
so nothing ever depends on IP fragmentation. It falls back when full-size datagrams stop getting
through while smaller ones do (a black hole), and searches upward again every ``raise_interval``.

States (RFC 8899 §5.2)::

    DISABLED ── no probing; max_datagram_size stays base_plpmtu
    BASE ────── confirm base_plpmtu (a probe, or any acknowledged datagram of that size)
       │ confirmed                        │ max_probes losses
       ▼                                  ▼
    SEARCHING ─ probe larger sizes ─┐    ERROR ── min_plpmtu; retry base every error_retry_interval
       │ nothing left to try        │ black hole / PTB below the PLPMTU: back to BASE
       ▼                            │
    SEARCH_COMPLETE ── raise_interval ──► SEARCHING

Probe sizes: first ``max_plpmtu`` itself (the common case is a path as wide as the first hop,
and on loopback the largest datagram passes), then, if that fails, the common link MTUs of
``COMMON_LINK_MTUS`` (minus ``ip_overhead``) in ascending order until one fails. A size counts as
failed after ``max_probes`` probes of it are lost. A Packet Too Big report (ICMP through
``IP_RECVERR``, or ``EMSGSIZE`` from ``send`` when a probe exceeds the first hop's MTU) is taken
as a hint: the size it names is probed next, never used unconfirmed (RFC 8899 §4.6).

How a connection uses it (the shells and :mod:`ostp_proto.connection`):

* Sockets send with DF set and without the kernel's own PMTU limit (``IP_MTU_DISCOVER`` =
  ``IP_PMTUDISC_PROBE``; ``IPV6_MTU_DISCOVER`` = ``IPV6_PMTUDISC_PROBE``), so an oversized
  datagram is dropped (or refused with ``EMSGSIZE``), never fragmented. ``max_plpmtu`` is the
  smaller of the configured ceiling and the first hop's MTU (``IP_MTU`` of the connected
  socket) minus ``ip_overhead``.
* Stream data is cut to at most :attr:`~PathMtuDiscovery.max_datagram_size` bytes per datagram.
* When :meth:`~PathMtuDiscovery.probe_size_to_send` returns a size, the connection sends one
  KeepAlive frame (kind 4: ack-eliciting, no stream data, spec §6) padded so that the datagram
  is exactly that size. Upstream peers acknowledge it like any other KeepAlive; the wire format
  allows any datagram size, so toward an upstream peer only our sending side changes.
* The ACK that covers the probe's nonce calls :meth:`~PathMtuDiscovery.on_probe_acked`; the
  connection's loss detection (RFC 9002 thresholds) declaring it lost calls
  :meth:`~PathMtuDiscovery.on_probe_lost` (the probe timer here is only a backstop). Probes are
  not congestion-controlled data: their loss must not shrink the congestion window, and they
  are never retransmitted as they are (a lost probe is too big for the path).
* A lost probe still leaves a hole in the nonce sequence at the peer: OSTP delivers in nonce
  order (spec §7.3), and the only datagram that may carry that nonce is the probe itself
  (re-sealing another frame under it would reuse the AEAD nonce). Towards an ostp-py peer that
  accepted the extension flag ``EXT_PATH_PROBES`` the connection gives the nonce up explicitly
  (``Abandoned``, relay tag 0x41, on stream 0, docs/protocol-deviations.md): the peer counts it
  as received with no frame and its hole closes at once, without ``DataLost``. An upstream
  receiver skips the hole after 500 ms by itself (spec §7.3: it held a KeepAlive, so nothing is
  lost), so towards it one lost probe rules a size out (``max_probes`` = 1). Keeping
  ``max_plpmtu`` at the first hop's MTU means probes are lost only on paths narrower than the
  first hop, where the search tries at most two sizes.
* Acknowledged and lost data datagrams are reported with :meth:`on_datagram_acked` and
  :meth:`on_datagram_lost` (their size and the time they were last sent), for black-hole
  detection and to confirm the base size from data; once per ACK frame with the newest datagram
  of each kind is enough, so this adds no work per datagram.
* :meth:`path_changed` on a new peer address (roaming, NAT rebinding) starts over at BASE.

Nothing here reads a clock: ``now`` is passed in, and :meth:`get_timer` / :meth:`handle_timer`
follow the package's timer convention.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from .errors import LocalProtocolError

IPV4_UDP_OVERHEAD = 28  # 20-byte IPv4 header + 8-byte UDP header
IPV6_UDP_OVERHEAD = 48  # 40-byte IPv6 header + 8-byte UDP header
BASE_PLPMTU = 1232  # RFC 8899 §5.1.2: IPv6's minimum link MTU 1280 (RFC 8200 §5) - 48
MIN_PLPMTU = 1200  # RFC 9000 §14: the smallest UDP payload a QUIC path must carry
MAX_UDP_PAYLOAD = 65507  # 65535 - IPv4 and UDP headers
MAX_PROBES = 3  # RFC 8899 §5.1.2
PROBE_TIMER = 1.0  # RFC 8899 §5.1.1: not below 1 s; the ACK-based loss signal comes first
PMTU_RAISE_TIMER = 600.0  # RFC 8899 §5.1.1
ERROR_RETRY_TIMER = 30.0
BLACK_HOLE_THRESHOLD = 6

COMMON_LINK_MTUS = (1280, 1400, 1420, 1450, 1480, 1492, 1500, 4352, 9000, 16384, 65535)
"""Link MTUs probed in turn once ``max_plpmtu`` failed: IPv6 minimum, tunnels (WireGuard 1420,
VXLAN 1450, 6in4 1480), PPPoE 1492, Ethernet 1500, FDDI 4352, jumbo frames, large loopbacks."""


class PmtudState(enum.Enum):
    """RFC 8899 §5.2 search states."""

    DISABLED = "disabled"
    BASE = "base"
    SEARCHING = "searching"
    SEARCH_COMPLETE = "search_complete"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class PmtudConfig:
    """Tunables of path MTU discovery. Sizes are UDP payload bytes (the OSTP datagram)."""

    enabled: bool = True
    """False: the DISABLED state, datagrams stay at ``base_plpmtu``."""
    base_plpmtu: int = BASE_PLPMTU
    """Where the search starts; crosses every IPv6 path and IPv4 paths of MTU 1260 and more."""
    min_plpmtu: int = MIN_PLPMTU
    """Used in the ERROR state, when not even ``base_plpmtu`` gets through."""
    max_plpmtu: int = MAX_UDP_PAYLOAD
    """Largest size ever probed: the configured ceiling, capped by the first hop's MTU."""
    ip_overhead: int = IPV4_UDP_OVERHEAD
    """IP and UDP header bytes, to turn ``COMMON_LINK_MTUS`` into probe sizes."""
    max_probes: int = MAX_PROBES
    """Probes of one size lost in a row before that size counts as too big."""
    probe_timeout: float = PROBE_TIMER
    """Seconds after which a probe without an ACK counts as lost (backstop)."""
    raise_interval: float = PMTU_RAISE_TIMER
    """Seconds in SEARCH_COMPLETE before searching for a larger size again."""
    error_retry_interval: float = ERROR_RETRY_TIMER
    """Seconds in ERROR before ``base_plpmtu`` is probed again."""
    black_hole_threshold: int = BLACK_HOLE_THRESHOLD
    """Full-size datagrams lost, none acknowledged since, before falling back to the base."""

    def __post_init__(self) -> None:
        if not 0 < self.min_plpmtu <= self.base_plpmtu <= self.max_plpmtu <= MAX_UDP_PAYLOAD:
            raise LocalProtocolError(
                "need 0 < min_plpmtu <= base_plpmtu <= max_plpmtu <= 65507, got "
                f"{self.min_plpmtu}, {self.base_plpmtu}, {self.max_plpmtu}"
            )
        if self.max_probes < 1 or self.black_hole_threshold < 1:
            raise LocalProtocolError("max_probes and black_hole_threshold must be positive")


@dataclass(slots=True)
class PmtudStats:
    """Counters of one discovery."""

    probes_sent: int = 0
    probes_acked: int = 0
    probes_lost: int = 0
    searches: int = 0
    black_holes: int = 0
    ptb_received: int = 0
    ptb_ignored: int = 0
    stale_probe_reports: int = 0


class PathMtuDiscovery:
    """DPLPMTUD for one sending direction of one path (see the module docstring)."""

    def __init__(self, config: PmtudConfig | None = None) -> None:
        self.config = config = config or PmtudConfig()
        self.stats = PmtudStats()
        self._plpmtu = config.base_plpmtu
        self._state = PmtudState.BASE if config.enabled else PmtudState.DISABLED
        self._high = config.max_plpmtu + 1  # smallest size known not to pass (exclusive bound)
        self._try_max = True  # the first probe of a search goes straight to max_plpmtu
        self._ptb_hint: int | None = None
        self._probe_size: int | None = None  # the probe in flight, if any
        self._probe_sent = 0.0
        self._probe_count = 0  # probes of the current candidate lost in a row
        self._timer_at: float | None = None  # raise or error-retry deadline
        self._last_full_acked = -1.0  # send time of the newest acknowledged full-size datagram
        self._suspect_losses = 0
        self._suspect_since: float | None = None
        self._small_acked_since_suspect = False
        self._candidates = self._table()

    # -- what the connection reads -----------------------------------------------------------

    @property
    def state(self) -> PmtudState:
        return self._state

    @property
    def max_datagram_size(self) -> int:
        """The PLPMTU: the largest datagram to send now (probes excepted)."""
        return self._plpmtu

    @property
    def probe_in_flight(self) -> int | None:
        """Size of the probe sent and not yet acknowledged or lost, if any."""
        return self._probe_size

    def probe_size_to_send(self, now: float) -> int | None:
        """Size of a probe to send now, or None; a size returned counts as sent at ``now``."""
        if self._probe_size is not None:
            return None
        size = self._next_candidate()
        if size is None:
            return None
        self._probe_size = size
        self._probe_sent = now
        self.stats.probes_sent += 1
        return size

    def get_timer(self) -> float | None:
        """Absolute time at which :meth:`handle_timer` must be called, or None."""
        if self._probe_size is not None:
            return self._probe_sent + self.config.probe_timeout
        return self._timer_at

    def handle_timer(self, now: float) -> None:
        """Run what is due: a probe with no answer is lost; raise and error-retry timers."""
        if self._probe_size is not None:
            if now >= self._probe_sent + self.config.probe_timeout:
                self.on_probe_lost(self._probe_size, now)
            return
        if self._timer_at is None or now < self._timer_at:
            return
        self._timer_at = None
        if self._state is PmtudState.SEARCH_COMPLETE:
            # RFC 8899 §5.2: look for a larger PMTU again, one step above the current one
            self._high = self.config.max_plpmtu + 1
            self._start_search(now, try_max=False)
        elif self._state is PmtudState.ERROR:
            self._probe_count = 0
            self._state = PmtudState.BASE

    # -- feedback ----------------------------------------------------------------------------

    def on_probe_acked(self, size: int, now: float) -> None:
        """The probe of ``size`` bytes was acknowledged: the path carries that size."""
        base = self.config.base_plpmtu
        confirming = self._state in (PmtudState.BASE, PmtudState.ERROR)
        if size == self._probe_size:
            self._probe_size = None
        elif (size != base) if confirming else (size <= self._plpmtu):
            # a probe from before a fallback proves nothing about the path now
            self.stats.stale_probe_reports += 1
            return
        self.stats.probes_acked += 1
        self._probe_count = 0
        if self._ptb_hint is not None and size >= self._ptb_hint:
            self._ptb_hint = None
        if confirming:
            self._confirm_base(base, now)
            return
        if self._state is PmtudState.DISABLED:
            return
        if size > self._plpmtu:
            self._plpmtu = size
            self._high = max(self._high, size + 1)
        if self._state is PmtudState.SEARCHING and self._next_candidate() is None:
            self._complete(now)

    def on_probe_lost(self, size: int, now: float) -> None:
        """The probe of ``size`` bytes was declared lost (or its timer ran out)."""
        if size != self._probe_size:
            self.stats.stale_probe_reports += 1
            return
        self._probe_size = None
        self.stats.probes_lost += 1
        self._probe_count += 1
        if self._probe_count < self.config.max_probes:
            return  # probe the same size again
        self._probe_count = 0
        if self._state is PmtudState.BASE:
            # RFC 8899 §5.2: BASE_PLPMTU not confirmed -> ERROR at MIN_PLPMTU
            self._state = PmtudState.ERROR
            self._plpmtu = self.config.min_plpmtu
            self._timer_at = now + self.config.error_retry_interval
            return
        if self._state is not PmtudState.SEARCHING:
            return
        self._high = min(self._high, size)
        if self._ptb_hint is not None and self._ptb_hint >= size:
            self._ptb_hint = None
        if self._next_candidate() is None:
            self._complete(now)

    def on_probe_refused(self, size: int, now: float) -> None:
        """The probe of ``size`` bytes could not even leave (``EMSGSIZE``: above the first hop's
        MTU). Unlike a loss this is certain at once: the size fails without further probes."""
        if size != self._probe_size:
            self.stats.stale_probe_reports += 1
            return
        self._probe_count = self.config.max_probes - 1
        self.on_probe_lost(size, now)

    def on_datagram_acked(self, size: int, sent_time: float, now: float) -> None:
        """A datagram (not a probe) of ``size`` bytes, last sent at ``sent_time``, was acked."""
        if size > self.config.base_plpmtu:
            if sent_time > self._last_full_acked:
                self._last_full_acked = sent_time
                self._suspect_losses = 0
                self._suspect_since = None
            return
        if self._suspect_since is not None and sent_time >= self._suspect_since:
            self._small_acked_since_suspect = True
            if self._suspect_losses >= self.config.black_hole_threshold:
                self._black_hole(self._plpmtu, now)  # the losses were reported first
                return
        if size == self.config.base_plpmtu and self._state is PmtudState.BASE:
            # RFC 8899 §5.2: data of the base size confirms it as well as a probe
            self._confirm_base(size, now)

    def on_datagram_lost(self, size: int, sent_time: float, now: float) -> None:
        """A datagram (not a probe) of ``size`` bytes last sent at ``sent_time`` was lost.

        Full-size datagrams (above the base) lost after the newest one acknowledged while smaller
        ones still get through mean the path no longer carries the PLPMTU (RFC 8899 §4.3).
        """
        if size <= self.config.base_plpmtu or self._plpmtu <= self.config.base_plpmtu:
            return
        if sent_time <= self._last_full_acked:
            return  # a later full-size datagram arrived: ordinary loss
        if self._suspect_since is None:
            self._suspect_since = sent_time
            self._small_acked_since_suspect = False
        self._suspect_losses += 1
        if (
            self._suspect_losses >= self.config.black_hole_threshold
            and self._small_acked_since_suspect
        ):
            self._black_hole(self._plpmtu, now)

    def on_persistent_timeout(self, now: float) -> None:
        """Nothing was acknowledged for several probe timeouts in a row.

        With only full-size datagrams in flight (a bulk transfer) no small datagram may be
        acknowledged to tell a black hole from congestion; falling back costs a dead path
        nothing, and the search comes back to the largest size that still passes.
        """
        if self._plpmtu > self.config.base_plpmtu and self._state is not PmtudState.DISABLED:
            self._black_hole(self._plpmtu, now)

    def on_packet_too_big(self, size: int, now: float) -> None:
        """The path reported that datagrams above ``size`` bytes (UDP payload) do not pass.

        From an ICMP Packet Too Big / Fragmentation Needed (``IP_RECVERR``) converted to UDP
        payload bytes, or ``EMSGSIZE`` on sending a probe larger than the first hop's MTU. Only
        a hint (RFC 8899 §4.6): the size is probed before it is used.
        """
        cfg = self.config
        if self._state is PmtudState.DISABLED or size < cfg.min_plpmtu:
            self.stats.ptb_ignored += 1
            return
        self.stats.ptb_received += 1
        if self._probe_size is not None and self._probe_size > size:
            self._probe_size = None  # that probe cannot arrive: do not wait for its timer
            self._probe_count = 0
        if size < self._plpmtu:
            if size < cfg.base_plpmtu:
                self._state = PmtudState.ERROR
                self._plpmtu = cfg.min_plpmtu
                self._high = cfg.base_plpmtu
                self._timer_at = now + cfg.error_retry_interval
                return
            self._black_hole(size + 1, now)
            self._ptb_hint = size
            return
        if size < self._high:
            self._high = size + 1
            self._ptb_hint = size if size > self._plpmtu else None
            if self._state is PmtudState.SEARCHING and self._next_candidate() is None:
                self._complete(now)

    def path_changed(self, now: float, max_plpmtu: int | None = None) -> None:
        """The peer's address changed: start over at BASE (RFC 8899 §5.2), maybe a new ceiling."""
        cfg = self.config
        if max_plpmtu is not None:
            cap = min(max(max_plpmtu, cfg.base_plpmtu), MAX_UDP_PAYLOAD)
            self.config = cfg = replace(cfg, max_plpmtu=cap)
            self._candidates = self._table()
        self._plpmtu = cfg.base_plpmtu
        self._probe_size = None
        self._probe_count = 0
        self._ptb_hint = None
        self._timer_at = None
        self._high = cfg.max_plpmtu + 1
        self._try_max = True
        self._reset_black_hole()
        self._state = PmtudState.BASE if cfg.enabled else PmtudState.DISABLED
        del now

    # -- internals ---------------------------------------------------------------------------

    def _table(self) -> list[int]:
        cfg = self.config
        sizes = {m - cfg.ip_overhead for m in COMMON_LINK_MTUS}
        sizes.add(cfg.max_plpmtu)
        return sorted(s for s in sizes if cfg.base_plpmtu < s <= cfg.max_plpmtu)

    def _next_candidate(self) -> int | None:
        state = self._state
        if state is PmtudState.BASE:
            return self.config.base_plpmtu
        if state is not PmtudState.SEARCHING:
            return None
        low, high = self._plpmtu, self._high
        hint = self._ptb_hint
        if hint is not None and low < hint < high:
            return hint
        top = self.config.max_plpmtu
        if self._try_max and low < top < high:
            return top
        for size in self._candidates:
            if low < size < high:
                return size
        return None

    def _confirm_base(self, size: int, now: float) -> None:
        self._plpmtu = size
        self._probe_count = 0
        if self._probe_size is not None and self._probe_size <= size:
            self._probe_size = None  # a base probe still out (data confirmed it first)
        self._timer_at = None
        # straight to the ceiling unless a black hole or a PTB already ruled it out
        self._start_search(now, try_max=self._high > self.config.max_plpmtu)

    def _start_search(self, now: float, *, try_max: bool) -> None:
        self.stats.searches += 1
        self._state = PmtudState.SEARCHING
        self._try_max = try_max
        if self._next_candidate() is None:
            self._complete(now)

    def _complete(self, now: float) -> None:
        self._state = PmtudState.SEARCH_COMPLETE
        self._probe_size = None
        self._ptb_hint = None
        self._timer_at = now + self.config.raise_interval

    def _black_hole(self, high: int, now: float) -> None:
        """Back to BASE; sizes from ``high`` up are not tried until the next raise."""
        self.stats.black_holes += 1
        self._state = PmtudState.BASE
        self._plpmtu = self.config.base_plpmtu
        self._high = max(high, self.config.base_plpmtu + 1)
        self._probe_size = None
        self._probe_count = 0
        self._ptb_hint = None
        self._timer_at = None
        self._reset_black_hole()
        del now

    def _reset_black_hole(self) -> None:
        self._last_full_acked = -1.0
        self._suspect_losses = 0
        self._suspect_since = None
        self._small_acked_since_suspect = False
