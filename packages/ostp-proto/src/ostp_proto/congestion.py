"""Congestion control of the ARQ sender (spec §7; docs/protocol-deviations.md): a delivery-rate
window with pacing instead of upstream's fixed per-tick retransmit budget."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .arq import RttEstimator

__all__ = ["PACING_BURST", "PEER_ACK_ALLOWANCE", "CongestionController"]

PEER_ACK_ALLOWANCE = 0.015  # upstream ACKs after 5 ms on a 10 ms tick (spec §7.1)
PACING_BURST = 0.002  # pacing lets 2 ms worth of datagrams leave back to back


class CongestionController:
    """Delivery-rate window with pacing (BBR-like, loss-tolerant).

    Startup doubles the window every round trip until the delivery rate stops growing; then the
    window is twice the bandwidth-delay product (plus room for the peer's delayed ACKs) and
    sending is paced at 1.25x the measured bandwidth. Random loss does not shrink the window;
    a probe timeout (nothing acknowledged for a whole RTO) does.
    """

    __slots__ = (
        "_bw_samples",
        "_full_bw",
        "_full_bw_rounds",
        "_max_window",
        "_round_end",
        "btl_bw",
        "cwnd",
        "min_cwnd",
        "mss",
        "next_send",
        "startup",
    )

    def __init__(
        self, mss: int, initial_window: int, max_window: int, max_mss: int | None = None
    ) -> None:
        self.mss = mss
        self.cwnd = initial_window * mss
        self.min_cwnd = 4 * mss
        self.btl_bw = 0.0  # bytes per second
        self.startup = True
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self._round_end = 0.0
        self._bw_samples: deque[tuple[float, float]] = deque()  # (time, rate), max-monotonic
        self.next_send = 0.0
        self._max_window = max_window * max(mss, max_mss or 0)

    def set_mss(self, mss: int) -> None:
        """The datagram size changed (path MTU discovery): the floor follows it."""
        self.mss = mss
        self.min_cwnd = 4 * mss
        self.cwnd = max(self.cwnd, self.min_cwnd)

    def on_ack(self, acked_bytes: int, rate: float | None, rtt: RttEstimator, now: float) -> None:
        if rate is not None and rate > 0:
            window = max(10 * rtt.srtt, 0.25)
            samples = self._bw_samples
            while samples and samples[-1][1] <= rate:
                samples.pop()
            samples.append((now, rate))
            while samples[0][0] < now - window:
                samples.popleft()
            self.btl_bw = samples[0][1]
        if self.startup:
            self.cwnd = min(self.cwnd + acked_bytes, self._max_window)
            if now >= self._round_end:
                self._round_end = now + rtt.srtt
                if self.btl_bw >= self._full_bw * 1.25:
                    self._full_bw = self.btl_bw
                    self._full_bw_rounds = 0
                else:
                    self._full_bw_rounds += 1
                    if self._full_bw_rounds >= 3:
                        self.startup = False
        if not self.startup:
            bdp = self.btl_bw * (rtt.min_rtt + PEER_ACK_ALLOWANCE)
            target = max(int(2 * bdp), self.min_cwnd)
            # grow gently towards the target, follow it down at once
            if target > self.cwnd:
                self.cwnd = min(self.cwnd + acked_bytes, target)
            else:
                self.cwnd = target
            self.cwnd = min(self.cwnd, self._max_window)

    def on_probe_timeout(self) -> None:
        self.cwnd = max(self.cwnd // 2, self.min_cwnd)
        self.startup = True
        self._full_bw = 0.0
        self._full_bw_rounds = 0
        self._bw_samples.clear()
        self.btl_bw = 0.0

    def pacing_delay(self, size: int, srtt: float) -> float:
        # Never pace below a window per round trip: a rate measured while idle or in loss
        # recovery must not throttle the sender into measuring an even lower rate.
        rate = max(self.btl_bw, self.cwnd / max(srtt, 1e-4))
        gain = 2.0 if self.startup else 1.25
        return size / (rate * gain)

    def on_sent(self, size: int, now: float, srtt: float) -> None:
        """Pace the next datagram (``Sender.record`` has this inlined: keep them equal)."""
        self.next_send = max(self.next_send, now - PACING_BURST) + self.pacing_delay(size, srtt)
