"""A real ostp-server child process and an in-process lossy UDP relay for tunnel tests."""

from __future__ import annotations

import json
import random
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SERVER_EXE = Path(sys.executable).with_name("ostp-server")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_server_port() -> int:
    """A port free for UDP and for TCP: the server listens on both (spec §10.6); a UDP port
    whose TCP twin is some other socket's leaves the server without TCP there."""
    for _ in range(100):
        port = free_udp_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for both UDP and TCP")


@dataclass
class ServerProcess:
    """`ostp-server run -c server.json` on 127.0.0.1; stop() and start() keep port and key."""

    workdir: Path
    port: int = field(default_factory=free_server_port)
    key: str = field(default_factory=lambda: secrets.token_hex(16))
    process: subprocess.Popen[bytes] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    """More fields of server.json (e.g. ``{"extensions": False}`` to play an upstream server)."""

    def start(self, time_limit: float = 30) -> None:
        """Start the server and return once it logged that its UDP socket is bound."""
        config = self.workdir / "server.json"
        config.write_text(
            json.dumps(
                {"listen": f"127.0.0.1:{self.port}", "access_keys": [self.key], **self.settings}
            )
        )
        log = self.workdir / "server.log"
        ready = f"listening on udp 127.0.0.1:{self.port}"
        seen = log.read_text().count(ready) if log.exists() else 0  # the log survives restarts
        with log.open("ab") as stderr:
            self.process = subprocess.Popen(
                [str(SERVER_EXE), "run", "-c", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + time_limit
        while log.read_text().count(ready) <= seen:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"ostp-server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None

    def outbound(self, port: int | None = None, **extra: Any) -> dict[str, Any]:
        return {
            "type": "ostp",
            "tag": "proxy",
            "server": f"127.0.0.1:{port or self.port}",
            "access_key": self.key,
            **extra,
        }


@contextmanager
def ostp_server(workdir: Path, **settings: Any) -> Iterator[ServerProcess]:
    server = ServerProcess(workdir, settings=settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class LossyRelay:
    """Forwards UDP between one client and the server, dropping, duplicating and reordering.

    ``loss``, ``duplicate`` and ``reorder`` are fractions of datagrams per direction; a reordered
    datagram is held back and sent after the next one. Runs in a thread with plain sockets so
    the event loop under test is not involved.
    """

    def __init__(
        self,
        server_port: int,
        loss: float,
        seed: int = 1,
        *,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        allowed_host: str | None = None,
    ) -> None:
        self.loss = loss
        self.allowed_host = allowed_host
        """When set, datagrams towards the server from any other host are dropped (a
        firewall that lets only a TURN relay through)."""
        self.duplicate = duplicate
        self.reorder = reorder
        self._held: dict[bool, bytes | None] = {True: None, False: None}
        self.duplicated = 0
        self.reordered = 0
        self.rng = random.Random(seed)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.connect(("127.0.0.1", server_port))
        for s in (self.front, self.back):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.port = int(self.front.getsockname()[1])
        self.client: tuple[str, int] | None = None
        self.forwarded = 0
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LossyRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.front.close()
        self.back.close()

    def _run(self) -> None:
        deadline = time.monotonic() + 600  # bounded even if a test forgets to stop it
        while not self._stop.is_set() and time.monotonic() < deadline:
            ready, _, _ = select.select([self.front, self.back], [], [], 0.1)
            for sock in ready:
                for _ in range(256):
                    try:
                        if sock is self.front:
                            data, addr = self.front.recvfrom(65535, socket.MSG_DONTWAIT)
                            if self.allowed_host is not None and addr[0] != self.allowed_host:
                                self.dropped += 1
                                continue
                            self.client = addr
                            target: tuple[str, int] | None = None
                        else:
                            data = self.back.recv(65535, socket.MSG_DONTWAIT)
                            target = self.client
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    if self.rng.random() < self.loss:
                        self.dropped += 1
                        continue
                    upstream = target is None
                    out = [data]
                    if self.rng.random() < self.duplicate:
                        self.duplicated += 1
                        out.append(data)
                    held = self._held[upstream]
                    if held is not None:
                        out.append(held)
                        self._held[upstream] = None
                    elif self.rng.random() < self.reorder:
                        self.reordered += 1
                        self._held[upstream] = out.pop(0)
                    for item in out:
                        self.forwarded += 1
                        try:
                            if upstream:
                                self.back.send(item)
                            elif target is not None:
                                self.front.sendto(item, target)
                        except OSError:
                            pass
