"""Selective-repeat reliability: nonces, ACK/NACK, retransmission, congestion (spec §7).

On the wire this is exactly upstream's ARQ: one nonce per datagram and direction, contiguous
from 0; ACK payload ``count:u8`` + inclusive ``(start, end)`` u64 ranges (cumulative range first,
then at most the last 7 runs of the reorder buffer); NACK payload = the receiver's next expected
nonce. Inside, it differs from upstream where that helps users and an upstream peer still
interoperates (each deviation is listed in docs/protocol-deviations.md):

* RTO from measured RTT (RFC 6298 / RFC 9002 style) instead of a fixed 100 ms, one probe timer
  with back-off, and ACK-based loss detection (packet and time thresholds) instead of a
  10 ms walk over the whole history.
* A delivery-rate congestion window with pacing (BBR-like) that random loss does not collapse,
  instead of a fixed per-tick retransmit budget.
* Flow control: never more than ``max_in_flight`` unacknowledged nonces ahead of the oldest
  one, so an upstream peer's reorder buffer (8192) is never overrun.
* A frame is never given up while the session lives. An upstream peer gives up on a frame
  about 1.6 s after sending it (spec §7.2), so the receiver NACKs every missing nonce (two RTTs
  after its hole appears, then every 300 ms: upstream re-sends whatever it still holds), and a
  hole still open ``gap_skip_after`` (2 s) plus an RTT after the first datagram past it arrived
  is given up on a timer: the owner is told which nonces were lost and resets the streams they
  may belong to, instead of delivering a stream with a hole in it (or waiting behind it).
"""

from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TypeAlias

from .congestion import PACING_BURST, PEER_ACK_ALLOWANCE, CongestionController
from .errors import RemoteProtocolError

# spec §7.1 (values shared with upstream where they are visible to the peer)
MAX_REORDER = 16384
MAX_REORDER_BUFFER = 8192
ACK_DELAY = 0.005
MAX_ACK_RANGES = 8  # spec §7.3: cumulative range + last 7 runs

PACKET_THRESHOLD = 3  # RFC 9002 §6.1.1
TIME_THRESHOLD = 9 / 8  # RFC 9002 §6.1.2
GRANULARITY = 0.001  # RFC 9002 kGranularity

_RANGE = struct.Struct(">QQ")
_U64 = struct.Struct(">Q")

Frame: TypeAlias = tuple[int, int, bytes, int]
"""A decrypted frame held for in-order delivery: ``(kind, stream_id, plaintext, end)``, its
payload being ``plaintext[12:end]`` (frames.FRAME_HEADER_LEN). The payload is not sliced out on
arrival, so stream bytes are copied once, on delivery; the receiver never looks inside."""


def encode_ack(ranges: list[tuple[int, int]]) -> bytes:
    """ACK payload (spec §7.3)."""
    return bytes((len(ranges),)) + b"".join(_RANGE.pack(s, e) for s, e in ranges)


def decode_ack(payload: bytes) -> list[tuple[int, int]]:
    """Ranges of an ACK payload; RemoteProtocolError when truncated (spec §7.3)."""
    if not payload:
        raise RemoteProtocolError("empty ACK")
    count = payload[0]
    if len(payload) < 1 + 16 * count:
        raise RemoteProtocolError("truncated ACK")
    return [_RANGE.unpack_from(payload, 1 + 16 * i) for i in range(count)]


def encode_nack(nonce: int) -> bytes:
    return _U64.pack(nonce)


def decode_nack(payload: bytes) -> int:
    if len(payload) < 8:
        raise RemoteProtocolError("truncated NACK")
    return int(_U64.unpack_from(payload)[0])


def ack_ranges(expected: int, buffered: list[int]) -> list[tuple[int, int]]:
    """The ranges upstream would send for ``expected`` and the sorted buffered nonces."""
    ranges: list[tuple[int, int]] = []
    if expected > 0:
        ranges.append((0, expected - 1))
    runs: list[tuple[int, int]] = []
    start = prev = -2
    for n in buffered:
        if n != prev + 1:
            if prev >= 0:
                runs.append((start, prev))
            start = n
        prev = n
    if prev >= 0:
        runs.append((start, prev))
    if len(ranges) + len(runs) > MAX_ACK_RANGES:
        runs = runs[-(MAX_ACK_RANGES - len(ranges)) :]
    return ranges + runs


# ------------------------------------------------------------------------------------ sender


class SentDatagram:
    """A retransmittable datagram waiting for its ACK."""

    __slots__ = (
        "datagram",
        "delivered",
        "delivered_time",
        "in_flight",
        "nonce",
        "retries",
        "sent_time",
        "size",
        "tx_seq",
    )

    def __init__(
        self, nonce: int, datagram: bytes, now: float, tx_seq: int, delivered: int, dtime: float
    ) -> None:
        self.nonce = nonce
        self.datagram = datagram
        self.size = len(datagram)
        self.sent_time = now
        self.tx_seq = tx_seq
        self.retries = 0
        self.in_flight = True
        self.delivered = delivered
        self.delivered_time = dtime


class RttEstimator:
    """RFC 6298 smoothed RTT, variance and minimum."""

    __slots__ = ("_first", "latest", "min_rtt", "min_rtt_time", "rttvar", "srtt")

    def __init__(self, initial_rtt: float) -> None:
        self.srtt = initial_rtt
        self.rttvar = initial_rtt / 2
        self.latest = initial_rtt
        self.min_rtt = float("inf")
        self.min_rtt_time = 0.0
        self._first = True

    def sample(self, rtt: float, now: float) -> None:
        rtt = max(rtt, 1e-6)
        self.latest = rtt
        if rtt <= self.min_rtt or now - self.min_rtt_time > 10.0:
            self.min_rtt = rtt
            self.min_rtt_time = now
        if self._first:
            self._first = False
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt


@dataclass(slots=True)
class SenderStats:
    datagrams_sent: int = 0
    retransmissions: int = 0
    nack_retransmissions: int = 0
    probe_timeouts: int = 0
    spurious_nacks: int = 0


class Sender:
    """Nonce assignment, history, loss detection and retransmission for one direction."""

    def __init__(
        self,
        *,
        mss: int,
        initial_rtt: float,
        max_in_flight: int,
        min_rto: float,
        max_rto: float,
        control_history: int = 4096,
        max_mss: int | None = None,
    ) -> None:
        self.next_nonce = 0
        self.outstanding: OrderedDict[int, SentDatagram] = OrderedDict()  # by last transmission
        self._order: deque[int] = deque()  # nonces of retransmittable datagrams, ascending
        self._control: OrderedDict[int, bytes] = OrderedDict()
        self._control_cap = control_history
        self._lost: deque[int] = deque()
        self.max_in_flight = max_in_flight
        self.bytes_in_flight = 0
        self.rtt = RttEstimator(initial_rtt)
        self.cc = CongestionController(
            mss, initial_window=32, max_window=max_in_flight, max_mss=max_mss
        )
        self.min_rto = min_rto
        self.max_rto = max_rto
        self.pto_count = 0
        self._tx_seq = 0
        self.delivered = 0
        self.delivered_time = 0.0
        self.largest_acked_tx = -1
        self._last_probe = 0.0
        self.cumulative_acked = -1
        self._control_resends: list[bytes] = []
        self._last_control_resend = -1.0
        self._prev_ranges: dict[int, int] = {}
        self.reliable = False
        """The path is a reliable stream (TCP): no probe timer, no loss from ACK gaps."""
        self.stats = SenderStats()
        self.newest_acked: SentDatagram | None = None
        """The most recently sent datagram the last ACK acknowledged (for path MTU discovery;
        the owner reads and clears it)."""
        self.loss_log: list[tuple[int, float]] | None = None
        """If a list: ``(size, sent time)`` of every datagram declared lost is appended (for
        path MTU discovery's black-hole detection; the owner drains it)."""

    # -- sending ---------------------------------------------------------------------------

    def window_open(self, now: float) -> bool:
        """True when congestion window, pacing and the in-flight span allow a new datagram."""
        cc = self.cc
        if self.bytes_in_flight >= cc.cwnd:
            return False
        order = self._order
        # order[0] is at most the oldest outstanding nonce (acknowledged ones leave lazily),
        # so only a span that looks full needs the exact (pruning) look
        if (
            order
            and self.next_nonce - order[0] >= self.max_in_flight
            and self.next_nonce - self._oldest() >= self.max_in_flight
        ):
            return False
        return cc.next_send <= now

    def _oldest(self) -> int:
        order = self._order
        outstanding = self.outstanding
        while order and order[0] not in outstanding:
            order.popleft()
        return order[0] if order else self.next_nonce

    def record(self, nonce: int, datagram: bytes, now: float, retransmittable: bool) -> None:
        """Remember a datagram just built with ``nonce`` (spec §7.2)."""
        self.stats.datagrams_sent += 1
        if retransmittable:
            if not self.bytes_in_flight:
                self.delivered_time = now  # idle until now: rate samples start here
            self._tx_seq += 1
            entry = SentDatagram(
                nonce, datagram, now, self._tx_seq, self.delivered, self.delivered_time or now
            )
            self.outstanding[nonce] = entry
            self._order.append(nonce)
            size = entry.size
            self.bytes_in_flight += size
            # CongestionController.on_sent inlined (once per datagram sent)
            cc = self.cc
            rate = max(cc.btl_bw, cc.cwnd / max(self.rtt.srtt, 1e-4))
            pace = size / (rate * (2.0 if cc.startup else 1.25))
            cc.next_send = max(cc.next_send, now - PACING_BURST) + pace
        else:
            control = self._control
            control[nonce] = datagram
            if len(control) > self._control_cap:
                control.popitem(last=False)

    def _retransmit(self, entry: SentDatagram, now: float) -> bytes:
        self._tx_seq += 1
        entry.tx_seq = self._tx_seq
        entry.sent_time = now
        entry.retries += 1
        if not entry.in_flight:
            entry.in_flight = True
            self.bytes_in_flight += entry.size
        self.outstanding.move_to_end(entry.nonce)
        self.stats.datagrams_sent += 1
        self.stats.retransmissions += 1
        self.cc.on_sent(entry.size, now, self.rtt.srtt)
        return entry.datagram

    @property
    def has_lost(self) -> bool:
        return bool(self._lost or self._control_resends)

    def pacing_deadline(self, new_data: bool) -> float | None:
        """When pacing next lets a datagram go, or None if nothing could go then.

        It must agree with :meth:`retransmissions` and :meth:`window_open`: a deadline at
        which nothing is sendable makes a shell spin on it for ever. Lost datagrams keep their
        nonces, so only new data (``new_data``: some is queued) waits on the in-flight span;
        an ACK or the probe timer frees the window or the span.
        """
        if self._control_resends:
            return 0.0  # sent unconditionally by the next datagrams_to_send()
        if self.bytes_in_flight >= self.cc.cwnd:
            return None
        if self._lost:
            return self.cc.next_send
        if new_data and not (
            self._order and self.next_nonce - self._oldest() >= self.max_in_flight
        ):
            return self.cc.next_send
        return None

    def retransmissions(self, now: float) -> list[bytes]:
        """Datagrams declared lost, re-sent with their original nonce and bytes.

        They go before new data but within the congestion window and pacing.
        """
        out: list[bytes] = []
        if self._control_resends:
            out.extend(self._control_resends)  # tiny, and the peer is blocked on them
            self._control_resends.clear()
        lost = self._lost
        cc = self.cc
        while lost and self.bytes_in_flight < cc.cwnd and cc.next_send <= now:
            entry = self.outstanding.get(lost.popleft())
            if entry is not None and not entry.in_flight:
                out.append(self._retransmit(entry, now))
        return out

    # -- feedback --------------------------------------------------------------------------

    def on_ack(self, ranges: list[tuple[int, int]], now: float) -> None:
        """Remove acknowledged datagrams; sample RTT and rate; detect losses (spec §7.2)."""
        outstanding = self.outstanding
        control = self._control
        newest: SentDatagram | None = None
        acked_bytes = 0
        prev = self._prev_ranges
        self._prev_ranges = {s: e for s, e in ranges}
        if ranges and ranges[0][0] == 0 and ranges[0][1] > self.cumulative_acked:
            self.cumulative_acked = ranges[0][1]
        self._resend_blocking_control(ranges, now)
        for first, end in ranges:
            start = first
            if end < start:
                continue
            done = prev.get(start)
            if done is not None and start > 0:
                # upstream repeats its last 7 runs in every ACK: only the growth is news
                if done >= end:
                    continue
                start = done + 1
            if start == 0:
                # cumulative range: walk our own ascending list instead of the range
                order = self._order
                while order and order[0] <= end:
                    entry = outstanding.pop(order.popleft(), None)
                    if entry is not None:
                        acked_bytes += self._acked(entry)
                        if newest is None or entry.tx_seq > newest.tx_seq:
                            newest = entry
                while control:
                    oldest = next(iter(control))
                    if oldest > end:
                        break
                    control.popitem(last=False)
                continue
            span = end - start + 1
            if span > len(outstanding) + len(control):
                candidates = [n for n in outstanding if start <= n <= end]
                for n in [n for n in control if start <= n <= end]:
                    del control[n]
            else:
                candidates = list(range(start, end + 1))
                for n in candidates:
                    control.pop(n, None)
            for n in candidates:
                entry = outstanding.pop(n, None)
                if entry is not None:
                    acked_bytes += self._acked(entry)
                    if newest is None or entry.tx_seq > newest.tx_seq:
                        newest = entry
        if newest is None:
            return
        self.newest_acked = newest
        self.pto_count = 0
        rate: float | None = None
        if newest.retries == 0:
            self.rtt.sample(now - newest.sent_time, now)
        self.delivered += acked_bytes
        interval = now - newest.delivered_time
        if interval > 0:
            rate = (self.delivered - newest.delivered) / max(interval, self.rtt.min_rtt, 1e-4)
        self.delivered_time = now
        self.cc.on_ack(acked_bytes, rate, self.rtt, now)
        self.largest_acked_tx = max(self.largest_acked_tx, newest.tx_seq)
        self._detect_losses(now)

    def _resend_blocking_control(self, ranges: list[tuple[int, int]], now: float) -> None:
        """The peer waits for one of our ACK/NACK datagrams that got lost: send it again.

        Control datagrams consume nonces, so a lost one holds up everything behind it at the
        peer; its ACK shows the hole (the cumulative range stops just before it while later
        nonces arrived), which is sooner than waiting for the peer's NACK.
        """
        control = self._control
        blocking = self.cumulative_acked + 1
        if blocking not in control or not ranges or ranges[-1][1] <= blocking:
            return
        if now - self._last_control_resend < max(self.rtt.srtt, GRANULARITY):
            return
        self._last_control_resend = now
        # every control datagram in the holes the ranges show, not only the first one
        budget = 64
        previous_end = self.cumulative_acked
        for start, end in ranges:
            if start > previous_end + 1:
                for nonce in range(previous_end + 1, min(start, previous_end + 1 + budget)):
                    datagram = control.get(nonce)
                    if datagram is not None:
                        self._control_resends.append(datagram)
                        self.stats.datagrams_sent += 1
                        budget -= 1
                if budget <= 0:
                    break
            previous_end = max(previous_end, end)

    def _acked(self, entry: SentDatagram) -> int:
        if entry.in_flight:
            self.bytes_in_flight -= entry.size
        return entry.size

    def _detect_losses(self, now: float) -> None:
        if self.reliable:
            return  # the stream delivers every datagram in order: a gap is not a loss
        rtt = self.rtt
        loss_delay = max(TIME_THRESHOLD * max(rtt.srtt, rtt.latest), GRANULARITY)
        threshold_tx = self.largest_acked_tx - PACKET_THRESHOLD
        lost_before = now - loss_delay
        for entry in self.outstanding.values():
            if entry.tx_seq >= self.largest_acked_tx:
                break
            if not entry.in_flight:
                continue
            if entry.tx_seq <= threshold_tx or entry.sent_time <= lost_before:
                self._declare_lost(entry)
            else:
                break

    def _declare_lost(self, entry: SentDatagram) -> None:
        entry.in_flight = False
        self.bytes_in_flight -= entry.size
        self._lost.append(entry.nonce)
        if self.loss_log is not None:
            self.loss_log.append((entry.size, entry.sent_time))

    def on_path_changed(self) -> None:
        """The peer moved: what was in flight went to the old path; re-send it without back-off."""
        self.pto_count = 0
        for entry in self.outstanding.values():
            if entry.in_flight:
                self._declare_lost(entry)

    def on_nack(self, nonce: int, now: float) -> bytes | None:
        """The peer asks for ``nonce`` again: its bytes if we still have them (spec §7.2)."""
        entry = self.outstanding.get(nonce)
        if entry is not None:
            fresh = max(self.rtt.srtt / 2, GRANULARITY)
            if now - entry.sent_time < fresh:
                return None  # just re-sent; the NACK crossed it
            self.stats.nack_retransmissions += 1
            if self.reliable:
                # Over a reliable stream nothing is lost in transit: the peer dropped this one
                # on purpose (its receive side paused) and everything after it as well.
                # Send them all again now (go-back-N) instead of one per NACK.
                for later in self.outstanding.values():
                    if later.nonce > nonce and later.in_flight and now - later.sent_time >= fresh:
                        self._declare_lost(later)
            return self._retransmit(entry, now)
        control = self._control.get(nonce)
        if control is not None:
            self.stats.nack_retransmissions += 1
            self.stats.datagrams_sent += 1
            return control
        self.stats.spurious_nacks += 1
        return None

    # -- timers ----------------------------------------------------------------------------

    def rto(self) -> float:
        rtt = self.rtt
        base = rtt.srtt + max(4 * rtt.rttvar, GRANULARITY) + PEER_ACK_ALLOWANCE
        return min(max(base, self.min_rto) * (1 << min(self.pto_count, 6)), self.max_rto)

    def probe_deadline(self) -> float | None:
        if self.reliable:
            return None  # retransmitting into TCP only fights TCP's own recovery
        for entry in self.outstanding.values():
            return max(entry.sent_time, self._last_probe) + self.rto()
        return None

    def on_probe_timeout(self, now: float) -> list[bytes]:
        """No ACK for a whole RTO: re-send the oldest datagrams and back off (RFC 9002 §6.2)."""
        self.stats.probe_timeouts += 1
        self._last_probe = now
        self.pto_count += 1
        if self.pto_count >= 3:
            self.cc.on_probe_timeout()
        # The datagram the peer waits for (right after its cumulative ACK) first, then the
        # oldest one: with only 8 ACK ranges the sender cannot see the middle of a lossy window.
        probes: list[SentDatagram] = []
        blocking = self.outstanding.get(self.cumulative_acked + 1)
        if blocking is not None:
            probes.append(blocking)
        for entry in self.outstanding.values():
            if entry is not blocking:
                probes.append(entry)
            break
        return [self._retransmit(entry, now) for entry in probes]


# ---------------------------------------------------------------------------------- receiver

# spec §7.2: upstream re-sends an unacknowledged frame at +100 ... +800, +900, +1100 and +1500 ms
# after its first transmission, each step on a 10 ms tick that can add up to 10 ms, and evicts
# it on the tick after the last: 1.5 s + 12 ticks after it was first sent, it is gone for good
# and NACKs for it are ignored.
UPSTREAM_GIVE_UP = 1.5 + 12 * 0.010
GAP_SKIP_AFTER = 2.0
"""Default bound (plus the smoothed RTT) on how long a hole may stay open: above
``UPSTREAM_GIVE_UP`` with ~0.4 s to spare for timer and scheduling jitter on both sides."""
NACK_REPEAT = 0.3  # a nonce still missing is NACKed again this long after its last NACK
HOLE_MERGE = 0.010  # neighbouring parts of a hole passed within 10 ms are timed as one
NACK_BURST = 64  # NACK datagrams per round
NACK_PACE = 0.005  # between rounds while more NACKs wait
NACK_SCAN = 4096  # nonces looked at per round, so one call does bounded work
TAIL_PROBE_INTERVAL = 0.1
TAIL_PROBE_FOR = GAP_SKIP_AFTER
"""After a hole appeared, ask the peer for an ACK this often for this long: datagrams lost
after the last one that arrived leave no hole until something newer arrives, and upstream
forgets them ~1.5 s after sending (its ACK carries its newest nonce and so shows them)."""


@dataclass(slots=True)
class ReceiverStats:
    datagrams_received: int = 0
    duplicate_drop: int = 0
    window_drop: int = 0
    reorder_buffer_drop: int = 0
    holes_opened: int = 0
    gap_skips: int = 0
    skipped_nonces: int = 0
    nacks_sent: int = 0


class Hole:
    """Nonces ``start``..``end`` (inclusive) not received although later ones were.

    ``born`` is when the first datagram past the hole arrived (or one of the hole's own, if we
    dropped it for room). The peer had sent every nonce of the hole by then, so an upstream
    peer gives up on the whole hole by ``born + UPSTREAM_GIVE_UP`` (give or take the path's
    delay variation).
    """

    __slots__ = ("born", "end", "start")

    def __init__(self, start: int, end: int, born: float) -> None:
        self.start = start
        self.end = end
        self.born = born

    def __repr__(self) -> str:
        return f"Hole({self.start}..{self.end}, born={self.born})"


def _hole_start(hole: Hole) -> int:
    return hole.start


def _sighted_nonce(sighting: tuple[int, float]) -> int:
    return sighting[0]


class Receiver:
    """Reordering, duplicate suppression, ACK/NACK generation and hole expiry, one direction.

    Missing nonces are kept as holes (ascending, so their birth times are ascending too). Every
    missing nonce is NACKed as soon as its hole appears and again every ``NACK_REPEAT`` while it
    is still missing: an upstream peer re-sends at once whatever its history still holds
    (spec §7.2). A hole still open a bound after it appeared (the owner's choice, see
    ``GAP_SKIP_AFTER``) is given up: :meth:`expire_holes` steps over it and the owner reports
    the loss.
    """

    def __init__(
        self,
        *,
        ack_delay: float,
        ack_frequency: int,
        max_reorder: int = MAX_REORDER,
        max_buffer: int = MAX_REORDER_BUFFER,
    ) -> None:
        self.expected = 0
        self.highest = -1  # the highest nonce accepted so far
        self.buffer: dict[int, Frame | None] = {}
        self.holes: list[Hole] = []
        self.ack_delay = ack_delay
        self.ack_frequency = ack_frequency
        self.max_reorder = max_reorder
        self.max_buffer = max_buffer
        self.ack_pending = 0
        self.ack_pending_since = 0.0
        self.ack_now = False
        self.last_ack_sent = -1.0
        self.last_nack_sent = -1.0
        self.resend_asked = False
        self.loss_at: float | None = None  # when a hole last appeared
        self._last_tail_probe = float("-inf")
        self.own_drop_at = float("-inf")
        """When the owner last dropped the peer's Data itself (receive pause): no hole counts as
        given up by the peer until ``gap_skip_after`` after that."""
        self.nack_delay = 0.0
        """How long a new hole waits for its first NACK (the owner sets it to two RTTs: a
        sender that detects loss from ACKs, as ours does, has re-sent by then)."""
        self._fresh: deque[tuple[float, int, int]] = deque()  # (due, start, end): new holes
        self._sightings: list[tuple[int, float]] = []
        """(nonce, arrival) of datagrams too far ahead to keep, ascending: a hole that forms
        later below one of them is timed from that arrival."""
        self._nack_queue: deque[list[int]] = deque()  # [next, end]: to NACK now
        self._nacked: deque[tuple[float, int, int]] = deque()  # (when, start, end), by time
        self._last_round = float("-inf")
        self.stats = ReceiverStats()

    def classify(self, nonce: int, now: float) -> int:
        """0: new and acceptable, 1: duplicate, 2: too far ahead (spec §7.3 steps 1-2)."""
        expected = self.expected
        if nonce < expected or nonce in self.buffer:
            self.stats.duplicate_drop += 1
            # spec §7.3 step 1 ACKs at once; rate-limited here so replays cannot make us talk
            if now - self.last_ack_sent >= self.ack_delay:
                self.ack_now = True
            return 1
        if nonce > expected + self.max_reorder:
            return 2  # counted by sighted() once it proves authentic
        return 0

    def accept(self, nonce: int, frame: Frame | None, eliciting: bool, now: float) -> list[Frame]:
        """Take a decrypted frame; return the frames now deliverable in order (spec §7.3)."""
        if eliciting:
            if not self.ack_pending:
                self.ack_pending_since = now
            self.ack_pending += 1
        self.stats.datagrams_received += 1
        if nonce != self.expected:
            buffer = self.buffer
            highest = self.highest
            if nonce > highest:
                if len(buffer) >= self.max_buffer:
                    # No room: dropped, but as a hole from now on (it and any before it), so
                    # it is asked for again and timed from when it came, not from later.
                    self.stats.reorder_buffer_drop += 1
                    self._open_hole(highest + 1, nonce, now)
                    self.highest = nonce
                    return []
                if nonce > highest + 1:
                    self._open_hole(highest + 1, nonce - 1, now)
                self.highest = nonce
            else:
                # A hole filled: always taken (the buffer stays within the reorder window),
                # since dropping it would keep everything behind the hole waiting.
                self._fill(nonce)
            buffer[nonce] = frame
            return []
        out: list[Frame] = []
        if frame is not None:
            out.append(frame)
        self.expected = nonce + 1
        if self.holes:
            self._fill(nonce)  # it was the first missing nonce
            self._drain(out)
        else:
            self.highest = nonce
        return out

    def sighted(self, nonce: int, now: float) -> None:
        """An authenticated datagram ``nonce`` was too far ahead to keep (spec §7.3 step 2)."""
        self.stats.window_drop += 1
        sightings = self._sightings
        if not sightings or nonce > sightings[-1][0]:
            sightings.append((nonce, now))

    def _born(self, end: int, now: float) -> float:
        """When ``end`` or a datagram past it came: now, or an earlier sighting."""
        sightings = self._sightings
        if not sightings:
            return now
        stale = bisect_left(sightings, self.expected, key=_sighted_nonce)
        if stale:
            del sightings[:stale]  # no hole can end below ``expected`` any more
        i = bisect_left(sightings, end, key=_sighted_nonce)
        return min(now, sightings[i][1]) if i < len(sightings) else now

    def _open_hole(self, start: int, end: int, now: float) -> None:
        first = start
        holes = self.holes
        if not holes:
            self.ack_now = True  # a new gap: tell the sender at once (fast recovery)
        sightings = self._sightings
        if sightings:
            # Datagrams seen (and dropped) inside the hole were sent after the nonces up to
            # them: time each part from the first one seen at or past it (parts seen within
            # HOLE_MERGE of each other go together, timed from the later).
            self._born(end, now)  # drops stale sightings
            i = bisect_left(sightings, start, key=_sighted_nonce)
            part_first = None  # when the first piece of the part being built was passed
            while True:
                if i < len(sightings) and sightings[i][0] < end:
                    piece_end, seen = sightings[i]
                else:
                    piece_end = end
                    seen = min(now, sightings[i][1]) if i < len(sightings) else now
                if part_first is not None and seen - part_first < HOLE_MERGE:
                    holes[-1].end = piece_end
                    holes[-1].born = seen
                else:
                    holes.append(Hole(start, piece_end, seen))
                    part_first = seen
                if piece_end == end:
                    break
                start = piece_end + 1
                i += 1
        else:
            holes.append(Hole(start, end, now))
        self.loss_at = now
        self._fresh.append((now + self.nack_delay, first, end))  # all of it, soon
        self.stats.holes_opened += 1

    def _fill(self, nonce: int) -> None:
        """``nonce`` (missing until now) arrived: shrink or split its hole."""
        holes = self.holes
        i = bisect_right(holes, nonce, key=_hole_start) - 1
        if i < 0:
            return
        hole = holes[i]
        if nonce > hole.end:
            return
        if hole.start == hole.end:
            del holes[i]
            if not holes:
                self._forget_nacks()
        elif nonce == hole.start:
            hole.start = nonce + 1
        else:
            if nonce != hole.end:
                holes.insert(i + 1, Hole(nonce + 1, hole.end, hole.born))
            hole.end = nonce - 1
            if self._sightings:  # what is left may have been passed sooner
                hole.born = self._born(hole.end, hole.born)

    def _drain(self, out: list[Frame]) -> None:
        buffer = self.buffer
        expected = self.expected
        while expected in buffer:
            frame = buffer.pop(expected)
            if frame is not None:
                out.append(frame)
            expected += 1
        self.expected = expected

    def _forget_nacks(self) -> None:
        self._fresh.clear()
        self._nack_queue.clear()
        self._nacked.clear()

    # -- holes the peer gave up on ---------------------------------------------------------

    def hole_deadline(self, bound: float) -> float | None:
        """When the oldest hole is given up if still open (``bound``: seconds after birth)."""
        if not self.holes:
            return None
        return max(self.holes[0].born, self.own_drop_at) + bound

    def expire_holes(self, now: float, bound: float) -> list[tuple[int, int, list[Frame]]]:
        """Step over every hole open for ``bound`` seconds, in one pass.

        Returns ``(first nonce, last nonce, frames now deliverable)`` per hole, in order: the
        frames after a hole come right after it, before the next hole's entry.
        """
        holes = self.holes
        out: list[tuple[int, int, list[Frame]]] = []
        # the same sums as hole_deadline(), or a rounding gap spins the caller's loop
        if self.own_drop_at + bound > now:
            return out
        while holes and holes[0].born + bound <= now:
            hole = holes.pop(0)
            self.stats.gap_skips += 1
            self.stats.skipped_nonces += hole.end - hole.start + 1
            self.expected = hole.end + 1
            frames: list[Frame] = []
            self._drain(frames)
            out.append((hole.start, hole.end, frames))
        if out:
            self.ack_now = True
            if not holes:
                self._forget_nacks()
        return out

    def tail_probe_deadline(self) -> float | None:
        """When to ask the peer for an ACK (see ``TAIL_PROBE_FOR``), or None."""
        if self.loss_at is None:
            return None
        due = max(self._last_tail_probe + TAIL_PROBE_INTERVAL, self.loss_at)
        return due if due <= self.loss_at + TAIL_PROBE_FOR else None

    def tail_probe_sent(self, now: float) -> None:
        self._last_tail_probe = now

    # -- ACK -------------------------------------------------------------------------------

    def ack_deadline(self) -> float | None:
        if self.ack_now:
            return 0.0
        if self.ack_pending:
            return max(self.ack_pending_since, self.last_ack_sent) + self.ack_delay
        return None

    def ack_due(self, now: float) -> bool:
        if self.ack_now:
            return True
        if not self.ack_pending:
            return False
        if self.ack_pending >= self.ack_frequency:
            return True
        deadline = self.ack_deadline()
        return deadline is not None and now >= deadline

    def build_ack(self, now: float) -> bytes | None:
        self.ack_now = False
        self.ack_pending = 0
        ranges = ack_ranges(self.expected, sorted(self.buffer) if self.buffer else [])
        if not ranges:
            return None
        self.last_ack_sent = now
        return encode_ack(ranges)

    # -- NACK ------------------------------------------------------------------------------

    def request_resend(self) -> None:
        """Ask again at once for what we dropped ourselves (receive pause): the first nonce past
        what we have, and every missing nonce."""
        self.resend_asked = True
        for pending in (self._fresh, self._nacked):
            self._nack_queue.extend([s, e] for _t, s, e in pending)
            pending.clear()
        self._last_round = float("-inf")

    def nack_deadline(self) -> float | None:
        """When the next NACK round is due (spec §7.3 payload; timing is ours)."""
        if self.resend_asked:
            return self.last_nack_sent  # at once (already due)
        due: float | None = None
        if self._nack_queue:
            due = self._last_round + NACK_PACE
        else:
            if self._fresh:
                due = self._fresh[0][0]
            if self._nacked:
                again = self._nacked[0][0] + NACK_REPEAT
                if due is None or again < due:
                    due = again
        return due

    def build_nacks(self, now: float) -> list[bytes]:
        """NACK payloads due now: new holes in full (``nack_delay`` after they appeared), then
        every nonce still missing ``NACK_REPEAT`` after its last NACK; at most ``NACK_BURST``
        per round."""
        out: list[bytes] = []
        if self.resend_asked:
            self.resend_asked = False
            out.append(encode_nack(self.highest + 1))
        queue = self._nack_queue
        nacked = self._nacked
        expected = self.expected
        fresh = self._fresh
        while fresh and fresh[0][0] <= now:
            _, start, end = fresh.popleft()
            if end >= expected:
                queue.append([max(start, expected), end])
        while nacked and nacked[0][0] + NACK_REPEAT <= now:
            _, start, end = nacked.popleft()
            if end >= expected:
                queue.append([max(start, expected), end])
        # compare exactly as nack_deadline() does, or a rounding gap spins the caller's loop
        if queue and now >= self._last_round + NACK_PACE:
            self._last_round = now
            buffer = self.buffer
            budget = NACK_BURST
            scan = NACK_SCAN
            while queue and budget and scan:
                span = queue[0]
                first = n = max(span[0], expected)
                end = span[1]
                while n <= end and budget and scan:
                    scan -= 1
                    if n not in buffer:
                        out.append(encode_nack(n))
                        budget -= 1
                    n += 1
                if n > first:
                    nacked.append((now, first, n - 1))
                if n > end:
                    queue.popleft()
                else:
                    span[0] = n
        if out:
            self.last_nack_sent = now
            self.stats.nacks_sent += len(out)
        return out
