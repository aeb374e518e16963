"""Helpers for the outbound-group tests: a UDP relay that delays every datagram."""

from __future__ import annotations

import heapq
import select
import socket
import threading
import time


class DelayRelay:
    """Forwards UDP between one client and a server, holding each datagram `delay` seconds
    (an impaired path: a member whose checks are slow). A thread with plain sockets; it stops
    by itself after `limit` seconds."""

    def __init__(self, server_port: int, delay: float, limit: float = 300.0) -> None:
        self.delay = delay
        self.limit = limit
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.connect(("127.0.0.1", server_port))
        self.port = int(self.front.getsockname()[1])
        self.client: tuple[str, int] | None = None
        self._queue: list[tuple[float, int, bool, bytes]] = []
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> DelayRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.front.close()
        self.back.close()

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self._stop.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            while self._queue and self._queue[0][0] <= now:
                _, _, upstream, data = heapq.heappop(self._queue)
                try:
                    if upstream:
                        self.back.send(data)
                    elif self.client is not None:
                        self.front.sendto(data, self.client)
                except OSError:
                    pass
            wait = min(0.05, self._queue[0][0] - now) if self._queue else 0.05
            ready, _, _ = select.select([self.front, self.back], [], [], max(0.0, wait))
            for sock in ready:
                for _ in range(256):
                    try:
                        if sock is self.front:
                            data, addr = self.front.recvfrom(65535, socket.MSG_DONTWAIT)
                            self.client = addr
                            upstream = True
                        else:
                            data = self.back.recv(65535, socket.MSG_DONTWAIT)
                            upstream = False
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    self._seq += 1
                    heapq.heappush(
                        self._queue, (time.monotonic() + self.delay, self._seq, upstream, data)
                    )
