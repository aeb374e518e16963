"""One TCP connection, answering as the remote host (RFC 9293, RFC 6298, RFC 5681, RFC 7323).

The kernel side (the local application) is the active opener; this side is always passive.
Internally positions are absolute stream offsets (unbounded ints): our SYN is offset -1, our
first data byte offset 0, our FIN the offset just past the last data byte; the same holds for
the peer's sequence space. ``_snd_seq``/``_rcv_seq`` convert to 32-bit sequence numbers.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Protocol

from ostp_netstack.buffers import Assembler, SendBuffer
from ostp_netstack.config import NetStackConfig
from ostp_netstack.events import (
    Endpoint,
    Event,
    TcpConnectionClosed,
    TcpConnectionEstablished,
    TcpConnectionReset,
    TcpDataReceived,
    TcpPeerClosed,
    TcpSendReady,
)
from ostp_netstack.packet import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    PacketBuilder,
    TcpSegment,
    icmp_unreachable,
)
from ostp_netstack.stats import Drop, NetStackStats

__all__ = ["State", "TcpConnection", "TcpHost"]

_MASK = 0xFFFFFFFF
_HALF = 0x80000000
_DEFAULT_MSS = {4: 536, 6: 1220}  # RFC 9293 §3.7.1, RFC 8200 §5
_K = 4  # RFC 6298 §2
_ALPHA = 1 / 8
_BETA = 1 / 4
_DUPACK_THRESHOLD = 3  # RFC 5681 §3.2


class State(enum.Enum):
    PENDING = "PENDING"  # SYN seen, waiting for the application to accept or refuse
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME-WAIT"
    CLOSE_WAIT = "CLOSE-WAIT"
    LAST_ACK = "LAST-ACK"
    CLOSED = "CLOSED"


_CAN_SEND = frozenset({State.ESTABLISHED, State.CLOSE_WAIT, State.SYN_RECEIVED})
_RECEIVES_DATA = frozenset({State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2})
_FIN_SENT_STATES = frozenset(
    {State.FIN_WAIT_1, State.FIN_WAIT_2, State.CLOSING, State.TIME_WAIT, State.LAST_ACK}
)
# Where a FIN from the peer leads (RFC 9293 §3.10.7.4, eighth step); FIN-WAIT-1 is special.
_ON_PEER_FIN = {
    State.ESTABLISHED: State.CLOSE_WAIT,
    State.FIN_WAIT_2: State.TIME_WAIT,
}
# Where the acknowledgment of our FIN leads.
_ON_FIN_ACKED = {
    State.FIN_WAIT_1: State.FIN_WAIT_2,
    State.CLOSING: State.TIME_WAIT,
    State.LAST_ACK: State.CLOSED,
}
# Where tcp_close leads.
_ON_CLOSE = {
    State.ESTABLISHED: State.FIN_WAIT_1,
    State.CLOSE_WAIT: State.LAST_ACK,
}


class TcpHost(Protocol):
    """What a connection needs from the stack that owns it."""

    config: NetStackConfig
    stats: NetStackStats
    out: list[bytes]
    events: deque[Event]

    def schedule(self, conn: TcpConnection) -> None:
        """The connection's timer deadline changed."""

    def mark_dirty(self, conn: TcpConnection) -> None:
        """The connection has something to send at the next flush."""

    def forget(self, conn: TcpConnection) -> None:
        """The connection is over; drop it from the tables."""


class TcpConnection:
    """State of one connection; driven by :class:`~ostp_netstack.stack.NetStack`."""

    def __init__(
        self,
        host: TcpHost,
        conn_id: int,
        syn: TcpSegment,
        src: Endpoint,
        dst: Endpoint,
        now: float,
    ) -> None:
        cfg = host.config
        self.host = host
        self.conn_id = conn_id
        self.key = (syn.src, syn.dst, syn.sport, syn.dport)
        self.src = src
        self.dst = dst
        self.state = State.PENDING
        self.syn_packet = syn.raw[:576]
        self.builder = PacketBuilder(syn.dst, syn.src, cfg.ttl, cfg.checksum_offload)
        self.lport = syn.dport  # our port (the remote host's)
        self.rport = syn.sport  # the application's port
        self.irs = syn.seq
        self.iss = 0
        ip_overhead = 40 if syn.version == 4 else 60
        self.rcv_mss = cfg.mtu - ip_overhead
        peer_mss = syn.mss if syn.mss else _DEFAULT_MSS[syn.version]
        self.mss = max(64, min(peer_mss, self.rcv_mss))
        # RFC 7323 §2.2: scale both ways only if the SYN carried the option.
        self.snd_wscale = syn.wscale if syn.wscale is not None else 0
        self.rcv_wscale = 0
        self.wscale_ok = syn.wscale is not None
        if self.wscale_ok:
            while (0xFFFF << self.rcv_wscale) < cfg.tcp_receive_buffer and self.rcv_wscale < 14:
                self.rcv_wscale += 1
        self.rcv_buffer = min(cfg.tcp_receive_buffer, 0xFFFF << self.rcv_wscale)
        # Send side.
        self.send_buf = SendBuffer()
        self.snd_una = -1
        self.snd_nxt = -1
        self.snd_max = -1
        self.snd_wnd = syn.window  # never scaled in a SYN (RFC 7323 §2.2)
        self.snd_wl1 = -1
        self.snd_wl2 = -1
        self.fin_queued = False
        self.want_send_ready = False
        self.cwnd = cfg.tcp_initial_window_segments * self.mss
        self.ssthresh = 1 << 62
        self.dupacks = 0
        self.recover = -1
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = cfg.tcp_rto_initial
        self.rtt_offset: int | None = None
        self.rtt_time = 0.0
        self.retries = 0
        self.persist = False
        self.probes = 0
        self.max_snd_wnd = syn.window
        self.rto_deadline: float | None = None
        self.state_deadline: float | None = now + cfg.tcp_accept_timeout
        # Receive side.
        self.rcv_nxt = 0
        self.rcv_adv = 0
        self.unconsumed = 0
        self.assembler = Assembler()
        self.peer_fin: int | None = None
        self.ack_pending = False
        self.reported = False  # Closed or Reset was reported: the application is done with it
        self.accepted = False
        self.scheduled: float | None = None  # the deadline last filed with the stack
        self.syn_ack_due = False

    # -- sequence numbers -------------------------------------------------------------------

    def _snd_seq(self, offset: int) -> int:
        return (self.iss + 1 + offset) & _MASK

    def _rcv_seq(self, offset: int) -> int:
        return (self.irs + 1 + offset) & _MASK

    def _snd_offset(self, seq: int) -> int:
        ref = self.snd_una
        return ref + (((seq - self._snd_seq(ref)) + _HALF) & _MASK) - _HALF

    def _rcv_offset(self, seq: int) -> int:
        ref = self.rcv_nxt
        return ref + (((seq - self._rcv_seq(ref)) + _HALF) & _MASK) - _HALF

    @property
    def deadline(self) -> float | None:
        a, b = self.rto_deadline, self.state_deadline
        if a is None:
            return b
        if b is None or a < b:
            return a
        return b

    # -- output -----------------------------------------------------------------------------

    def _window_field(self) -> int:
        ws = self.rcv_wscale
        edge = self.rcv_nxt + max(0, self.rcv_buffer - self.unconsumed)
        edge = max(edge, self.rcv_adv)  # never shrink the window (RFC 9293 §3.8.6.2.2)
        field = (edge - self.rcv_nxt + (1 << ws) - 1) >> ws
        field = min(field, 0xFFFF)
        self.rcv_adv = self.rcv_nxt + (field << ws)
        return field

    def _segment(self, offset: int, flags: int, payload: bytes | memoryview = b"") -> None:
        host = self.host
        host.out.append(
            self.builder.tcp(
                self.lport,
                self.rport,
                self._snd_seq(offset),
                self._rcv_seq(self.rcv_nxt),
                flags | ACK,
                self._window_field(),
                payload,
            )
        )
        self.ack_pending = False

    def send_syn_ack(self) -> None:
        options = b"\x02\x04" + min(self.rcv_mss, 0xFFFF).to_bytes(2, "big")
        if self.wscale_ok:
            options += b"\x01\x03\x03" + bytes([self.rcv_wscale])
        window = min(self.rcv_buffer, 0xFFFF)  # the SYN-ACK window is never scaled
        self.rcv_adv = self.rcv_nxt + window
        self.host.out.append(
            self.builder.tcp(
                self.lport,
                self.rport,
                self.iss,
                self._rcv_seq(0),
                SYN | ACK,
                window,
                options=options,
            )
        )
        self.snd_nxt = 0
        self.snd_max = max(self.snd_max, 0)

    def flush(self, now: float) -> None:
        """Send what the windows allow, a FIN when due, and a pending ACK."""
        state = self.state
        if state is State.CLOSED:
            return
        if self.syn_ack_due:
            self.syn_ack_due = False
            self.rtt_offset, self.rtt_time = -1, now
            self.send_syn_ack()
            self.rto_deadline = now + self.rto
        elif (state in _CAN_SEND or state in _FIN_SENT_STATES) and state is not State.SYN_RECEIVED:
            self._send_data(now)
        if self.ack_pending and state is not State.PENDING:
            self._segment(self.snd_nxt if self.snd_nxt >= 0 else 0, 0)
        self.host.schedule(self)

    def _send_data(self, now: float) -> None:
        buf = self.send_buf
        end = buf.end
        mss = self.mss
        limit = self.snd_una + min(self.snd_wnd, self.cwnd)
        nxt = self.snd_nxt
        stats = self.host.stats
        while nxt < end:
            size = min(mss, end - nxt, limit - nxt)
            if size <= 0:
                break
            if (
                size < mss
                and size < end - nxt
                and size * 2 < self.max_snd_wnd
                and self.snd_max > self.snd_una
            ):
                # Sender-side silly window avoidance (RFC 9293 §3.8.6.2.1): wait for a bigger
                # window while an ACK is still due; with nothing in flight, send (override).
                break
            flags = PSH if nxt + size == end else 0
            if flags and self.fin_queued:
                flags |= FIN
            if nxt < self.snd_max:
                stats.tcp_segments_retransmitted += 1
            elif self.rtt_offset is None:
                self.rtt_offset, self.rtt_time = nxt, now
            self._segment(nxt, flags, buf.view(nxt, size))
            stats.tcp_bytes_sent += size
            nxt += size + (1 if flags & FIN else 0)
            self.snd_max = max(self.snd_max, nxt)
        if self.fin_queued and nxt == end:
            self._segment(nxt, FIN)
            nxt += 1
            self.snd_max = max(self.snd_max, nxt)
        self.snd_nxt = nxt
        if self.snd_max > self.snd_una:
            if self.rto_deadline is None:
                self.rto_deadline = now + self.rto
        elif self.snd_wnd == 0 and end > self.snd_una and not self.persist:
            self.persist = True  # nothing in flight to clock the window open (§3.8.6.1)
            self.rto_deadline = now + self.rto

    # -- input ------------------------------------------------------------------------------

    def on_segment(self, seg: TcpSegment, now: float) -> None:
        handler = _SEGMENT_HANDLERS[self.state]
        handler(self, seg, now)

    def _on_segment_pending(self, seg: TcpSegment, now: float) -> None:
        if seg.flags & RST:
            self._reset("reset by peer")
        # A retransmitted SYN waits for the application's decision like the first one.

    def _on_segment_syn_received(self, seg: TcpSegment, now: float) -> None:
        flags = seg.flags
        if flags & RST:
            if self._rcv_offset(seg.seq) == self.rcv_nxt:
                self._reset("reset by peer")
            return
        if flags & SYN:
            if seg.seq == self.irs and not flags & ACK:
                self.send_syn_ack()  # our SYN-ACK was lost
            return
        if not flags & ACK:
            self.host.stats.count(Drop.TCP_UNEXPECTED)
            return
        if self._snd_offset(seg.ack) != 0:
            self.host.stats.count(Drop.TCP_BAD_ACK)
            self._send_rst_for(seg)
            return
        self.state = State.ESTABLISHED
        self.snd_una = 0
        self.snd_wnd = seg.window << self.snd_wscale
        self.max_snd_wnd = max(self.max_snd_wnd, self.snd_wnd)
        self.snd_wl1 = self._rcv_offset(seg.seq)
        self.snd_wl2 = 0
        self.retries = 0
        self.rto_deadline = None
        self.state_deadline = None
        if self.rtt_offset == -1:
            self._rtt_sample(now - self.rtt_time)
        self.rtt_offset = None
        self.host.events.append(TcpConnectionEstablished(self.conn_id))
        if self.fin_queued:
            self.state = State.FIN_WAIT_1
        self.host.mark_dirty(self)
        if seg.payload or flags & FIN:
            self._on_segment_synchronized(seg, now)

    def _on_segment_synchronized(self, seg: TcpSegment, now: float) -> None:
        host = self.host
        flags = seg.flags
        payload = seg.payload
        seq_off = self._rcv_offset(seg.seq)
        seg_len = len(payload) + (1 if flags & FIN else 0)
        wnd = self.rcv_adv - self.rcv_nxt
        rcv_nxt = self.rcv_nxt
        # RFC 9293 §3.10.7.4, first step: is the segment in the window?
        if seg_len == 0:
            ok = seq_off == rcv_nxt if wnd <= 0 else rcv_nxt <= seq_off <= rcv_nxt + wnd
        elif wnd <= 0:
            ok = False
        else:
            ok = seq_off < rcv_nxt + wnd and seq_off + seg_len > rcv_nxt
        if self.state is State.TIME_WAIT:
            if flags & RST:
                self._drop_silently()
            elif flags & FIN:
                self.ack_pending = True  # retransmitted FIN: acknowledge it again
                host.mark_dirty(self)
            return
        if not ok:
            if not flags & RST:
                self.ack_pending = True
                host.mark_dirty(self)
                host.stats.count(Drop.TCP_OUT_OF_WINDOW)
                if flags & ACK and seg_len and seq_off == rcv_nxt:
                    self._on_ack(seg, now, seq_off, probe=True)  # zero-window probe
            else:
                host.stats.count(Drop.TCP_OUT_OF_WINDOW)
            return
        if flags & RST:
            if seq_off == rcv_nxt:
                self._reset("reset by peer")
            else:
                self.ack_pending = True  # challenge ACK (RFC 5961 §3.2)
                host.mark_dirty(self)
            return
        if flags & SYN:
            self.ack_pending = True  # challenge ACK (RFC 5961 §4.2)
            host.mark_dirty(self)
            host.stats.count(Drop.TCP_UNEXPECTED)
            return
        if not flags & ACK:
            host.stats.count(Drop.TCP_UNEXPECTED)
            return
        if not self._on_ack(seg, now, seq_off, probe=False):
            return
        if self.state is State.FIN_WAIT_2:
            self.state_deadline = now + host.config.tcp_fin_wait_timeout  # the peer is alive
        if self.state is State.CLOSED:
            return
        if seg_len:
            self._on_data(seq_off, payload, bool(flags & FIN), now)

    def _on_ack(self, seg: TcpSegment, now: float, seq_off: int, probe: bool) -> bool:
        host = self.host
        ack_off = self._snd_offset(seg.ack)
        if ack_off > self.snd_max:
            host.stats.count(Drop.TCP_BAD_ACK)
            self.ack_pending = True
            host.mark_dirty(self)
            return False
        una = self.snd_una
        if ack_off < una:
            return True  # an old duplicate: its data may still be new
        window = seg.window << self.snd_wscale
        window_changed = window != self.snd_wnd
        if seq_off > self.snd_wl1 or (seq_off == self.snd_wl1 and ack_off >= self.snd_wl2):
            self.snd_wnd = window
            self.max_snd_wnd = max(self.max_snd_wnd, window)
            self.snd_wl1 = seq_off
            self.snd_wl2 = ack_off
            if window and self.persist:
                # What was in flight when the window closed was likely dropped: resend it now.
                self.persist = False
                self.probes = 0
                self.snd_nxt = self.snd_una
                self.rto_deadline = None
                host.mark_dirty(self)
            elif window_changed:
                host.mark_dirty(self)
        if ack_off > una:
            self._on_new_ack(ack_off, now)
        elif (
            not probe
            and not seg.payload
            and not seg.flags & FIN
            and not window_changed
            and self.snd_max > una
        ):
            self._on_duplicate_ack()
        return True

    def _on_new_ack(self, ack_off: int, now: float) -> None:
        host = self.host
        acked = ack_off - self.snd_una
        self.snd_una = ack_off
        self.snd_nxt = max(self.snd_nxt, ack_off)
        released = self.send_buf.release(ack_off)
        host.stats.buffered_bytes -= released
        if self.rtt_offset is not None and ack_off > self.rtt_offset:
            self._rtt_sample(now - self.rtt_time)
            self.rtt_offset = None
        self.retries = 0
        mss = self.mss
        if self.dupacks >= _DUPACK_THRESHOLD:
            if ack_off >= self.recover:
                self.cwnd = self.ssthresh  # full acknowledgment ends recovery (RFC 6582 §3.2)
                self.dupacks = 0
            else:
                # Partial acknowledgment: resend the next hole (NewReno).
                self.cwnd = max(self.cwnd - acked + mss, mss)
                self._retransmit_first()
        else:
            self.dupacks = 0
            if self.cwnd < self.ssthresh:
                self.cwnd += min(acked, 2 * mss)  # RFC 3465 with L = 2
            else:
                self.cwnd += max(1, mss * min(acked, mss) // self.cwnd)
        self.rto_deadline = now + self.rto if self.snd_max > ack_off else None
        if self.want_send_ready and self.send_capacity() * 2 >= host.config.tcp_send_buffer:
            self.want_send_ready = False
            host.events.append(TcpSendReady(self.conn_id))
        if self.fin_queued and ack_off == self.send_buf.end + 1:
            nxt_state = _ON_FIN_ACKED.get(self.state)
            if nxt_state is not None:
                self._enter(nxt_state, now)
        if self.send_buf.end > self.snd_nxt or self.fin_queued:
            host.mark_dirty(self)

    def _on_duplicate_ack(self) -> None:
        self.dupacks += 1
        mss = self.mss
        if self.dupacks == _DUPACK_THRESHOLD:
            flight = self.snd_max - self.snd_una
            self.ssthresh = max(flight // 2, 2 * mss)  # RFC 5681 §3.2
            self.recover = self.snd_max
            self.host.stats.tcp_fast_retransmits += 1
            self._retransmit_first()
            self.cwnd = self.ssthresh + _DUPACK_THRESHOLD * mss
        elif self.dupacks > _DUPACK_THRESHOLD:
            self.cwnd += mss
            self.host.mark_dirty(self)

    def _retransmit_first(self) -> None:
        una = self.snd_una
        end = self.send_buf.end
        self.rtt_offset = None  # Karn's algorithm (RFC 6298 §3)
        self.host.stats.tcp_segments_retransmitted += 1
        if una < end:
            size = min(self.mss, end - una)
            fin = FIN if self.fin_queued and una + size == end else 0
            self._segment(una, PSH | fin, self.send_buf.view(una, size))
        elif self.fin_queued:
            self._segment(una, FIN)

    def _rtt_sample(self, rtt: float) -> None:
        # RFC 6298 §2.2 and §2.3
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - _BETA) * self.rttvar + _BETA * abs(self.srtt - rtt)
            self.srtt = (1 - _ALPHA) * self.srtt + _ALPHA * rtt
        cfg = self.host.config
        rto = self.srtt + max(0.001, _K * self.rttvar)
        self.rto = min(max(rto, cfg.tcp_rto_min), cfg.tcp_rto_max)

    def _on_data(self, seq_off: int, payload: bytes, fin: bool, now: float) -> None:
        host = self.host
        stats = host.stats
        if fin:
            fin_off = seq_off + len(payload)
            if self.peer_fin is None or fin_off == self.peer_fin:
                self.peer_fin = fin_off
        if self.state not in _RECEIVES_DATA:
            payload = b""  # after the peer's FIN nothing more is data (RFC 9293 §3.10.7.4)
        rcv_nxt = self.rcv_nxt
        limit = self.rcv_adv
        if payload:
            end = seq_off + len(payload)
            if end > limit:
                payload = payload[: limit - seq_off]  # beyond the window: trimmed
                end = limit
            if seq_off < rcv_nxt:
                payload = payload[rcv_nxt - seq_off :]
                seq_off = rcv_nxt
            if payload and stats.buffered_bytes + len(payload) > host.config.tcp_max_total_buffer:
                stats.count(Drop.TCP_MEMORY_LIMIT)
                payload = b""
            if payload:
                if seq_off == rcv_nxt:
                    self._deliver(payload)
                    if self.assembler.size:
                        before = self.assembler.size
                        parts = self.assembler.pop_contiguous(self.rcv_nxt)
                        stats.buffered_bytes -= before - self.assembler.size
                        for part in parts:
                            self._deliver(part)
                elif len(self.assembler) >= host.config.tcp_max_out_of_order_segments:
                    stats.count(Drop.TCP_REASSEMBLY_LIMIT)
                else:
                    before = self.assembler.size
                    self.assembler.add(seq_off, payload)
                    stats.buffered_bytes += self.assembler.size - before
        if self.peer_fin is not None and self.peer_fin == self.rcv_nxt:
            self.rcv_nxt += 1
            self.peer_fin = -1  # consumed
            host.events.append(TcpPeerClosed(self.conn_id))
            self._on_peer_fin(now)
        # Out-of-order data is acknowledged at once so the sender sees duplicate ACKs.
        self.ack_pending = True
        if self.rcv_nxt == rcv_nxt:
            self._segment(self.snd_nxt, 0)
        host.mark_dirty(self)

    def _deliver(self, data: bytes) -> None:
        self.rcv_nxt += len(data)
        self.unconsumed += len(data)
        stats = self.host.stats
        stats.buffered_bytes += len(data)
        stats.tcp_bytes_received += len(data)
        self.host.events.append(TcpDataReceived(self.conn_id, data))

    def _on_peer_fin(self, now: float) -> None:
        state = self.state
        if state is State.FIN_WAIT_1:
            fin_acked = self.fin_queued and self.snd_una == self.send_buf.end + 1
            self._enter(State.TIME_WAIT if fin_acked else State.CLOSING, now)
            return
        nxt_state = _ON_PEER_FIN.get(state)
        if nxt_state is not None:
            self._enter(nxt_state, now)

    def _enter(self, state: State, now: float) -> None:
        cfg = self.host.config
        self.state = state
        if state is State.TIME_WAIT:
            # Bounded TIME-WAIT (RFC 9293 §3.10.7.4 allows a shorter one on one host).
            self.rto_deadline = None
            self.state_deadline = now + cfg.tcp_time_wait
            self._report(TcpConnectionClosed(self.conn_id))
            self._release_buffers()
            self.host.schedule(self)
        elif state is State.CLOSED:
            self._report(TcpConnectionClosed(self.conn_id))
            self._drop_silently()
        elif state is State.FIN_WAIT_2:
            self.state_deadline = now + cfg.tcp_fin_wait_timeout

    # -- timers -----------------------------------------------------------------------------

    def on_timer(self, now: float) -> None:
        if self.state_deadline is not None and self.state_deadline <= now:
            self.state_deadline = None
            if self.state is State.TIME_WAIT:
                self._drop_silently()
                return
            if self.state is State.PENDING:
                self.refuse(icmp=False)
                self._report(TcpConnectionReset(self.conn_id, "accept timeout"))
                return
            self.abort()
            self._report(TcpConnectionReset(self.conn_id, "FIN-WAIT-2 timeout"))
            return
        if self.rto_deadline is not None and self.rto_deadline <= now:
            self.rto_deadline = None
            self._on_rto(now)
        self.host.schedule(self)

    def _on_rto(self, now: float) -> None:
        cfg = self.host.config
        stats = self.host.stats
        if self.state is not State.SYN_RECEIVED and (
            self.persist or (self.snd_wnd == 0 and self.send_buf.end > self.snd_una)
        ):
            # Zero-window probe (RFC 9293 §3.8.6.1), the Linux way: an old sequence number
            # without data makes the peer answer with an ACK that carries its window, and
            # needs no bookkeeping of a probe byte. Probing backs off but never gives up.
            self.persist = True
            self._segment(self.snd_una - 1, 0)
            stats.tcp_window_probes += 1
            self.probes += 1
            self.rto_deadline = now + min(self.rto * (1 << min(self.probes, 16)), cfg.tcp_rto_max)
            return
        if self.snd_max <= self.snd_una:
            return
        self.retries += 1
        if self.retries > cfg.tcp_max_retransmissions:
            self.abort()
            self._report(TcpConnectionReset(self.conn_id, "retransmission timeout"))
            return
        stats.tcp_timeouts += 1
        self.rto = min(self.rto * 2, cfg.tcp_rto_max)  # RFC 6298 §5.5
        self.rto_deadline = now + self.rto
        self.rtt_offset = None
        if self.state is State.SYN_RECEIVED:
            stats.tcp_segments_retransmitted += 1
            self.send_syn_ack()
            return
        flight = self.snd_max - self.snd_una
        self.ssthresh = max(flight // 2, 2 * self.mss)  # RFC 5681 §3.1
        self.cwnd = self.mss
        self.dupacks = 0
        self.snd_nxt = self.snd_una  # go back N
        self._send_data(now)

    # -- application calls ------------------------------------------------------------------

    def accept(self, iss: int) -> None:
        self.iss = iss
        self.state = State.SYN_RECEIVED
        self.state_deadline = None
        self.syn_ack_due = True

    def refuse(self, icmp: bool) -> None:
        if icmp:
            self.host.out.append(icmp_unreachable(self.builder, self.syn_packet))
        else:
            self.host.out.append(
                self.builder.tcp(self.lport, self.rport, 0, self._rcv_seq(0), RST | ACK, 0)
            )
            self.host.stats.tcp_resets_sent += 1
        self._drop_silently()

    def send_capacity(self) -> int:
        cfg = self.host.config
        room = cfg.tcp_send_buffer - len(self.send_buf)
        total = cfg.tcp_max_total_buffer - self.host.stats.buffered_bytes
        return max(0, min(room, total))

    def send(self, data: bytes) -> int:
        n = min(len(data), self.send_capacity())
        if n < len(data):
            self.want_send_ready = True
        if n:
            self.send_buf.append(data if n == len(data) else data[:n])
            self.host.stats.buffered_bytes += n
            self.host.mark_dirty(self)
        return n

    def consumed(self, n: int) -> None:
        n = min(n, self.unconsumed)
        before = self.rcv_adv - self.rcv_nxt
        self.unconsumed -= n
        self.host.stats.buffered_bytes -= n
        room = self.rcv_buffer - self.unconsumed
        # Announce the opened window when it grew enough (RFC 9293 §3.8.6.2.2).
        if room - before >= min(self.rcv_buffer // 2, 2 * self.rcv_mss) and self.state in (
            _RECEIVES_DATA
        ):
            self.ack_pending = True
            self.host.mark_dirty(self)

    def close(self) -> None:
        self.fin_queued = True
        nxt_state = _ON_CLOSE.get(self.state)
        if nxt_state is not None:
            self.state = nxt_state
        self.host.mark_dirty(self)

    def abort(self) -> None:
        if self.state not in (State.PENDING, State.CLOSED, State.TIME_WAIT):
            seq = self._snd_seq(max(self.snd_max, 0))
            self.host.out.append(self.builder.tcp(self.lport, self.rport, seq, 0, RST, 0))
            self.host.stats.tcp_resets_sent += 1
        self._drop_silently()

    # -- teardown ---------------------------------------------------------------------------

    def _send_rst_for(self, seg: TcpSegment) -> None:
        self.host.out.append(self.builder.tcp(self.lport, self.rport, seg.ack, 0, RST, 0))
        self.host.stats.tcp_resets_sent += 1

    def _report(self, event: TcpConnectionClosed | TcpConnectionReset) -> None:
        if not self.reported:
            self.reported = True
            self.host.events.append(event)

    def _reset(self, reason: str) -> None:
        self._report(TcpConnectionReset(self.conn_id, reason))
        self._drop_silently()

    def _release_buffers(self) -> None:
        stats = self.host.stats
        stats.buffered_bytes -= self.send_buf.release(self.send_buf.end)
        stats.buffered_bytes -= self.assembler.clear()
        stats.buffered_bytes -= self.unconsumed
        self.unconsumed = 0

    def _drop_silently(self) -> None:
        self._release_buffers()
        self.state = State.CLOSED
        self.rto_deadline = None
        self.state_deadline = None
        self.host.forget(self)


def _on_segment_closed(conn: TcpConnection, seg: TcpSegment, now: float) -> None:
    conn.host.stats.count(Drop.TCP_NO_CONNECTION)


_SEGMENT_HANDLERS = {
    State.PENDING: TcpConnection._on_segment_pending,
    State.SYN_RECEIVED: TcpConnection._on_segment_syn_received,
    State.ESTABLISHED: TcpConnection._on_segment_synchronized,
    State.FIN_WAIT_1: TcpConnection._on_segment_synchronized,
    State.FIN_WAIT_2: TcpConnection._on_segment_synchronized,
    State.CLOSING: TcpConnection._on_segment_synchronized,
    State.TIME_WAIT: TcpConnection._on_segment_synchronized,
    State.CLOSE_WAIT: TcpConnection._on_segment_synchronized,
    State.LAST_ACK: TcpConnection._on_segment_synchronized,
    State.CLOSED: _on_segment_closed,
}
