"""A small HTTP/1.1 origin for the proxy tests, run as a subprocess on loopback.

`python origin_server.py` prints its port on the first line of stdout and serves until killed:
- `GET /bytes/<n>`: n bytes of `body_bytes(n)` (deterministic), with Content-Length.
- `POST|PUT /upload`: reads the body (Content-Length or chunked) and answers
  `{"length": n, "sha256": hex}`.
- `GET /close-delimited/<n>`: n bytes as an HTTP/1.0 body without Content-Length, ended by
  closing the connection (FIN).
- `GET /forever`: the same kind of body that never ends (until the client goes away).
- `GET /reset-after/<n>`: n bytes the same way, then, once the client's side acknowledged them,
  a reset (RST) instead of the FIN.
- `GET /seeded/<seed>/<n>`: n bytes of `seeded_bytes(seed, ...)` with Content-Length: pseudo-random
  and not periodic, so a client can check every byte without storing the body; `?rate=<bytes/s>`
  sends it slowly; `/seeded-close/<seed>/<n>` sends it as a close-delimited HTTP/1.0 body.
- `GET /whoami`: `{"client": ip, "host": Host, "headers": {...}}`.
- `GET /_log`: every request seen so far (client ip, method, path, host, headers) as JSON;
  `POST /_clear` empties it. Those two are not logged.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import random
import socket
import struct
import sys
import termios
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_BLOCK_COUNT = 32768
BLOCK = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(_BLOCK_COUNT))
"""1 MiB of pseudo-random bytes; bodies repeat it."""


def _unacked(sock: socket.socket) -> int:
    """Bytes in the socket's send queue not yet acknowledged by the peer (Linux SIOCOUTQ)."""
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0" * 4))[0])


def body_bytes(n: int) -> bytes:
    whole, rest = divmod(n, len(BLOCK))
    return BLOCK * whole + BLOCK[:rest]


def body_sha256(n: int) -> str:
    digest = hashlib.sha256()
    whole, rest = divmod(n, len(BLOCK))
    for _ in range(whole):
        digest.update(BLOCK)
    digest.update(BLOCK[:rest])
    return digest.hexdigest()


SEEDED_BLOCK = 65536


def seeded_block(seed: int, index: int) -> bytes:
    """Block ``index`` (of ``SEEDED_BLOCK`` bytes) of the body for ``seed``."""
    return random.Random(f"{seed}/{index}").randbytes(SEEDED_BLOCK)


def seeded_bytes(seed: int, start: int, end: int) -> bytes:
    """Bytes ``start:end`` of the body for ``seed``."""
    first, last = start // SEEDED_BLOCK, (end - 1) // SEEDED_BLOCK
    data = b"".join(seeded_block(seed, i) for i in range(first, last + 1))
    return data[start - first * SEEDED_BLOCK : end - first * SEEDED_BLOCK]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    log: list[dict[str, Any]]
    lock: threading.Lock

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went away (tests abort transfers on purpose)
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _record(self) -> None:
        if self.path in ("/_log", "/_clear"):
            return
        entry = {
            "client": self.client_address[0],
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host"),
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }
        with self.server.lock:
            self.server.log.append(entry)

    def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value: Any) -> None:
        self._reply(200, json.dumps(value).encode())

    def do_GET(self) -> None:
        self._record()
        path = self.path.split("?", 1)[0]
        if path.startswith("/bytes/"):
            n = int(path.removeprefix("/bytes/"))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            if self.command == "HEAD":
                return
            view = memoryview(BLOCK)
            left = n
            while left:
                chunk = view[: min(left, len(BLOCK))]
                self.wfile.write(chunk)
                left -= len(chunk)
        elif path.startswith("/seeded/"):
            seed, n = (int(part) for part in path.removeprefix("/seeded/").split("/"))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            if self.command != "HEAD":
                self._seeded(seed, n)
        elif path.startswith("/seeded-close/"):
            seed, n = (int(part) for part in path.removeprefix("/seeded-close/").split("/"))
            self.close_connection = True
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
            self._seeded(seed, n)
        elif path.startswith("/close-delimited/"):
            self._close_delimited(int(path.removeprefix("/close-delimited/")))
        elif path == "/forever":
            self._close_delimited(None)
        elif path.startswith("/reset-after/"):
            self._close_delimited(int(path.removeprefix("/reset-after/")))
            self.wfile.flush()
            sock = self.connection
            deadline = time.monotonic() + 10
            # wait until the peer acknowledged everything: the reset then ends a whole body
            while _unacked(sock) and time.monotonic() < deadline:
                time.sleep(0.001)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST; the server's shutdown(SHUT_WR) afterwards fails quietly
        elif path == "/whoami":
            self._json(
                {
                    "client": self.client_address[0],
                    "host": self.headers.get("Host"),
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            )
        elif path == "/generate_204":  # what urltest groups fetch (their health check)
            self.send_response(204)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/_log":
            with self.server.lock:
                self._json(list(self.server.log))
        else:
            self._reply(404, b"not found\n", "text/plain")

    do_HEAD = do_GET

    def _seeded(self, seed: int, n: int) -> None:
        query = self.path.partition("?")[2]
        rate = float(query.removeprefix("rate=")) if query.startswith("rate=") else None
        began = time.monotonic()
        sent = 0
        try:
            for index in range(-(-n // SEEDED_BLOCK)):
                block = seeded_block(seed, index)[: n - sent]
                for part in range(0, len(block), 16384):
                    self.wfile.write(block[part : part + 16384])
                    sent += len(block[part : part + 16384])
                    if rate is not None:  # pacing a slow body, not waiting for anything
                        ahead = sent / rate - (time.monotonic() - began)
                        if ahead > 0:
                            time.sleep(ahead)
        except OSError:
            self.close_connection = True  # the client went away

    def _close_delimited(self, n: int | None) -> None:
        """An HTTP/1.0 response whose body ends when the connection does (RFC 9112 §6.3)."""
        self.close_connection = True
        self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
        view = memoryview(BLOCK)
        left = n
        try:
            while left is None or left > 0:
                size = len(BLOCK) if left is None else min(left, len(BLOCK))
                self.wfile.write(view[:size])
                if left is not None:
                    left -= size
        except OSError:
            pass  # the client went away

    def _read_body(self) -> tuple[int, str]:
        digest = hashlib.sha256()
        length = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    data = self.rfile.read(min(left, 1 << 20))
                    digest.update(data)
                    left -= len(data)
                    length += len(data)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                data = self.rfile.read(min(left, 1 << 20))
                if not data:
                    break
                digest.update(data)
                left -= len(data)
                length += len(data)
        return length, digest.hexdigest()

    def do_POST(self) -> None:
        self._record()
        if self.path == "/_clear":
            with self.server.lock:
                self.server.log.clear()
            self._json({"ok": True})
            return
        length, sha = self._read_body()
        self._json({"length": length, "sha256": sha})

    do_PUT = do_POST


def main() -> None:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.log = []
    server.lock = threading.Lock()
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
