"""The browser-like load of the soak test: operations, how each one ended, and the figures.

Every operation goes through the daemon's one proxy port to the origin of the proxy tests
(`tests/client/origin_server.py`) and is recorded as an :class:`Op` with one outcome:

- ``ok``: completed, every byte checked (downloads against the seeded body, uploads by the
  SHA-256 the origin computed of what arrived);
- ``aborted``: the client gave up on purpose (RST or FIN mid-transfer, curl ``--max-time``);
- ``error``: it failed in a way its client sees as a failure (reset, a SOCKS/CONNECT refusal,
  no answer at all, curl's exit status): allowed only while the server was being restarted;
- ``short``: a clean end (FIN) before the body was complete: a truncated transfer that looks
  like a success to a client that reads to the end. Never allowed;
- ``mismatch``: a byte differs, or more bytes than sent. Never allowed;
- ``hang``: still running at its deadline. Never allowed;
- ``wrong``: an answer of the wrong kind (a SOCKS success for a port nobody listens on, a
  malformed reply). Never allowed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import anyio
import anyio.abc

from ostp_client.flow import Address
from ostp_client.inbounds.proxy.socks5 import encode_address
from tests.client.origin_server import SEEDED_BLOCK, seeded_block
from tests.client.proxy_helpers import CURL, proxy_args

FAILURES = ("short", "mismatch", "hang", "wrong")
"""Outcomes that fail the soak wherever they happen (an ``error`` fails it outside restarts)."""

SHORT_GET_LIMIT = 30.0
"""Seconds for one short GET (or one control/junk client) before it counts as hung."""
DRAIN_LIMIT = 30.0
"""Seconds that operations still running when the mix ends have to end (or they hung)."""
MIN_RATE = 256 * 1024
"""Bytes per second below which a big transfer counts as hung: deadline = 30 s + size / rate."""


@dataclass
class Op:
    """One operation of the mix and how it ended."""

    kind: str
    via: str
    size: int
    phase: str
    start: float = 0.0
    end: float = 0.0
    outcome: str = "running"
    error: str = ""
    moved: int = 0
    """Payload bytes that went through the proxy (either way)."""
    during_pause: bool = False
    """A paused reader was in its pause when this (short GET) started or ended."""

    @property
    def latency(self) -> float:
        return self.end - self.start

    def describe(self) -> str:
        return (
            f"{self.kind} via {self.via}, {self.size} bytes, {self.phase} "
            f"t={self.start:.1f}..{self.end:.1f}: {self.outcome} {self.error}".rstrip()
        )


class Finished(Exception):
    """Ends an operation with ``outcome`` (and what went wrong)."""

    def __init__(self, outcome: str, error: str = "") -> None:
        super().__init__(f"{outcome}: {error}")
        self.outcome = outcome
        self.error = error


def error_name(exc: BaseException) -> str:
    """ECONNRESET, EPIPE, ... for socket errors (anyio wraps them in BrokenResourceError)."""
    cause = exc.__cause__ if isinstance(exc, anyio.BrokenResourceError) else exc
    if isinstance(cause, OSError) and cause.errno is not None:
        return errno.errorcode.get(cause.errno, str(cause.errno))
    if cause is None:
        return type(exc).__name__
    return type(cause).__name__


class SeededCheck:
    """Compares a body piece by piece with the origin's seeded bytes, storing none of it."""

    def __init__(self, seed: int, size: int) -> None:
        self.seed = seed
        self.size = size
        self.offset = 0
        self._index = -1
        self._block = memoryview(b"")

    def feed(self, data: bytes) -> None:
        if self.offset + len(data) > self.size:
            raise Finished("mismatch", f"more than the {self.size} bytes sent")
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            index, within = divmod(self.offset, SEEDED_BLOCK)
            if index != self._index:
                self._block = memoryview(seeded_block(self.seed, index))
                self._index = index
            take = min(len(view) - pos, SEEDED_BLOCK - within)
            if view[pos : pos + take] != self._block[within : within + take]:
                raise Finished("mismatch", f"bytes differ after offset {self.offset}")
            pos += take
            self.offset += take

    @property
    def complete(self) -> bool:
        return self.offset == self.size


def seeded_chunks(seed: int, size: int, chunk: int = SEEDED_BLOCK) -> Iterable[bytes]:
    sent = 0
    index = 0
    while sent < size:
        block = seeded_block(seed, index)[: size - sent]
        for part in range(0, len(block), chunk):
            yield block[part : part + chunk]
        sent += len(block)
        index += 1


@dataclass
class Head:
    status: int
    headers: dict[str, str]

    @property
    def length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None else None


class HttpConn:
    """A client connection through the proxy, with the little HTTP/1.1 a browser needs."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def receive(self) -> bytes:
        """Raises anyio.EndOfStream at a clean end, BrokenResourceError at a reset."""
        if self.buffer:
            data, self.buffer = self.buffer, b""
            return data
        return await self.stream.receive(65536)

    async def exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            try:
                self.buffer += await self.stream.receive(65536)
            except anyio.EndOfStream:
                raise Finished("error", "eof-before-response") from None
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    async def head(self) -> Head:
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > 65536:
                raise Finished("wrong", "a response head over 64 KiB")
            try:
                self.buffer += await self.stream.receive(65536)
            except anyio.EndOfStream:
                raise Finished("error", "eof-before-response") from None
        raw, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise Finished("wrong", f"not an HTTP response: {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Head(int(parts[1]), headers)

    async def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if len(self.buffer) > 4096:
                raise Finished("wrong", "a chunk line over 4 KiB")
            self.buffer += await self.stream.receive(65536)  # EndOfStream: the caller's
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    async def body(self, head: Head, check: SeededCheck, paced: Pacer | None) -> None:
        """Read and check the body in whatever framing the response has (Content-Length,
        chunked, or until the connection ends). ``short`` when it ends cleanly before
        ``check.size`` bytes: EOF before the announced end, or a complete message that is
        shorter than what the origin sent."""
        try:
            if "chunked" in head.headers.get("transfer-encoding", "").lower():
                await self._chunked(check, paced)
            else:
                while not check.complete:
                    check.feed(await self.receive())
                    if paced is not None:
                        await paced.account(check.offset)
                if head.length is None:  # close-delimited: the connection must end here
                    with contextlib.suppress(anyio.EndOfStream):
                        extra = await self.receive()
                        raise Finished("mismatch", f"{len(extra)} bytes after the body")
        except anyio.EndOfStream:
            raise Finished(
                "short", f"clean end after {check.offset} of {check.size} bytes"
            ) from None

    async def _chunked(self, check: SeededCheck, paced: Pacer | None) -> None:
        while True:
            size_text = (await self.line()).split(b";")[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise Finished("wrong", f"chunk size {size_text[:20]!r}") from None
            if size == 0:
                while await self.line():
                    pass  # trailers
                if not check.complete:
                    raise Finished(
                        "short",
                        f"a complete chunked body of {check.offset} of {check.size} bytes",
                    )
                return
            while size:
                data = await self.receive()
                if len(data) > size:
                    self.buffer = data[size:] + self.buffer
                    data = data[:size]
                size -= len(data)
                check.feed(data)
                if paced is not None:
                    await paced.account(check.offset)
            if await self.line():
                raise Finished("wrong", "no CRLF after a chunk")

    def abort(self) -> None:
        """The next aclose() sends RST instead of FIN (SO_LINGER 0)."""
        raw = self.stream.extra(anyio.abc.SocketAttribute.raw_socket)
        with contextlib.suppress(OSError):  # EBADF: the peer's reset closed it already
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def aclose(self) -> None:
        await self.stream.aclose()


class Pacer:
    """Reads at ``rate`` bytes/s, or stops reading once for ``pause`` s at ``pause_at`` bytes."""

    def __init__(self, mix: Mix, rate: float | None, pause_at: int | None, pause: float) -> None:
        self.mix = mix
        self.rate = rate
        self.pause_at = pause_at
        self.pause = pause
        self.began = time.monotonic()

    async def account(self, total: int) -> None:
        if self.rate is not None:  # pacing, not waiting for anything
            ahead = total / self.rate - (time.monotonic() - self.began)
            if ahead > 0:
                await anyio.sleep(ahead)
        if self.pause_at is not None and total >= self.pause_at:
            self.pause_at = None
            self.mix.paused += 1
            try:
                await anyio.sleep(self.pause)  # a reader that stops reading for a while
            finally:
                self.mix.paused -= 1


@dataclass
class Mix:
    """The load generator: workers that keep starting operations until ``end``."""

    proxy_port: int
    origin_port: int
    closed_port: int
    """A port on 127.0.0.1 where nothing listens."""
    control_path: str
    seed: int
    handshake_timeout: float
    min_transfer: int = 1 << 20
    max_transfer: int = 20 << 20
    phase: str = "warmup"
    end: float = 0.0
    ops: list[Op] = field(default_factory=list)
    windows: list[tuple[float, float]] = field(default_factory=list)
    """(stopped, recovered) times of each server restart: errors are allowed across them."""
    paused: int = 0
    """Paused readers in their pause now."""
    t0: float = field(default_factory=time.monotonic)

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- bookkeeping ---------------------------------------------------------------------

    def new_op(self, kind: str, via: str, size: int) -> Op:
        op = Op(kind, via, size, self.phase)
        self.ops.append(op)
        return op

    async def guarded(self, op: Op, limit: float, work: Callable[[], Awaitable[None]]) -> bool:
        """Run ``work`` for ``op``: its outcome from what happened; True when ``ok``."""
        op.start = self.now()
        op.during_pause = self.paused > 0
        with anyio.move_on_after(limit) as scope:
            try:
                await work()
                if op.outcome == "running":
                    op.outcome = "ok"
            except Finished as finished:
                op.outcome, op.error = finished.outcome, finished.error
            except anyio.EndOfStream:
                op.outcome, op.error = "error", "eof-before-response"
            except (anyio.BrokenResourceError, OSError) as exc:
                op.outcome, op.error = "error", error_name(exc)
        if scope.cancelled_caught:
            op.outcome, op.error = "hang", f"still running after {limit:.0f} s ({op.error})"
        op.end = self.now()
        op.during_pause = op.during_pause or self.paused > 0
        return op.outcome == "ok"

    def disrupted(self, op: Op) -> bool:
        return any(op.start < recovered and op.end > stopped for stopped, recovered in self.windows)

    def failures(self) -> list[Op]:
        return [
            op
            for op in self.ops
            if op.outcome in FAILURES or (op.outcome == "error" and not self.disrupted(op))
        ]

    # -- connections through the proxy -----------------------------------------------------

    def target(self) -> str:
        return f"127.0.0.1:{self.origin_port}"

    async def open(self, via: str, port: int | None = None) -> tuple[HttpConn, str]:
        """A connection through the daemon to the origin (or ``port``); the request prefix."""
        port = port or self.origin_port
        stream = await anyio.connect_tcp("127.0.0.1", self.proxy_port)
        conn = HttpConn(stream)
        try:
            if via == "socks5":
                await stream.send(
                    b"\x05\x01\x00\x05\x01\x00" + encode_address(Address("127.0.0.1", port))
                )
                if (greeting := await conn.exactly(2)) != b"\x05\x00":
                    raise Finished("wrong", f"SOCKS5 greeting answered {greeting!r}")
                reply = await conn.exactly(4)
                if reply[1] != 0:
                    raise Finished("error", f"socks-reply-{reply[1]}")
                size = {1: 4, 4: 16}.get(reply[3]) or (await conn.exactly(1))[0]
                await conn.exactly(size + 2)
                return conn, ""
            if via == "connect":
                where = f"127.0.0.1:{port}"
                await stream.send(f"CONNECT {where} HTTP/1.1\r\nHost: {where}\r\n\r\n".encode())
                head = await conn.head()
                if head.status != 200:
                    raise Finished("error", f"connect-{head.status}")
                return conn, ""
            return conn, f"http://127.0.0.1:{port}"
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise

    def request(self, prefix: str, path: str, *, keep_alive: bool = True, body: int = -1) -> bytes:
        method = "GET" if body < 0 else "POST"
        lines = [f"{method} {prefix}{path} HTTP/1.1", f"Host: {self.target()}"]
        if not keep_alive:
            lines.append("Connection: close")
        if body >= 0:
            lines.append(f"Content-Length: {body}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def get(
        self,
        conn: HttpConn,
        prefix: str,
        op: Op,
        seed: int,
        *,
        close_delimited: bool = False,
        keep_alive: bool = True,
        paced: Pacer | None = None,
        query: str = "",
    ) -> None:
        path = f"/{'seeded-close' if close_delimited else 'seeded'}/{seed}/{op.size}{query}"
        await conn.stream.send(self.request(prefix, path, keep_alive=keep_alive))
        head = await conn.head()
        if head.status != 200:
            raise Finished("error", f"http-{head.status}")
        if head.length is not None and head.length != op.size:  # (re-framing is allowed)
            raise Finished("wrong", f"Content-Length {head.length}, expected {op.size}")
        check = SeededCheck(seed, op.size)
        try:
            await conn.body(head, check, paced)
        finally:
            op.moved += check.offset

    # -- the kinds of operation ------------------------------------------------------------

    async def short_gets(self, rng: random.Random) -> None:
        """One connection, one to six small GETs (keep-alive or not)."""
        via = rng.choice(("socks5", "connect", "http"))
        keep_alive = rng.random() < 0.5
        count = rng.randint(2, 6) if keep_alive else 1
        close_delimited = not keep_alive and rng.random() < 0.3
        conn: HttpConn | None = None
        prefix = ""
        try:
            for _ in range(count):
                size = min(int(rng.expovariate(1 / 12000)), 256 * 1024)
                label = f"{via}{'/keep-alive' if keep_alive else ''}"
                label += "/close-delimited" if close_delimited else ""
                op = self.new_op("get", label, size)
                seed = rng.getrandbits(32)

                async def one(op: Op = op, seed: int = seed) -> None:
                    nonlocal conn, prefix
                    if conn is None:
                        conn, prefix = await self.open(via)
                    await self.get(
                        conn,
                        prefix,
                        op,
                        seed,
                        close_delimited=close_delimited,
                        keep_alive=keep_alive,
                    )

                if not await self.guarded(op, SHORT_GET_LIMIT, one):
                    break
        finally:
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.aclose()

    def transfer_limit(self, size: int, rate: float = MIN_RATE) -> float:
        return 30.0 + size / min(rate, MIN_RATE)

    async def download(self, rng: random.Random, style: str = "plain") -> None:
        """A 1-20 MB download; ``slow`` reads at 1-2 MB/s, ``paused`` stops for 2-6 s,
        ``slow-origin`` gets 64 KB-2 MB that the origin sends at 100-500 kB/s."""
        via = rng.choice(("socks5", "connect", "http"))
        close_delimited = rng.random() < 0.25
        high = self.max_transfer if style == "plain" else min(self.max_transfer, 10 << 20)
        size = rng.randint(self.min_transfer, high)
        query = ""
        origin_rate = MIN_RATE
        if style == "slow-origin":
            size = rng.randint(64 * 1024, 2 << 20)
            origin_rate = rng.randint(100_000, 500_000)
            query = f"?rate={origin_rate}"
        rate = rng.uniform(1e6, 2e6) if style == "slow" else None
        pause_at = rng.randint(size // 10, size // 2) if style == "paused" else None
        pacer = Pacer(self, rate, pause_at, rng.uniform(2.0, 6.0))
        label = f"{via}/close-delimited" if close_delimited else via
        op = self.new_op(f"download-{style}" if style != "plain" else "download", label, size)
        seed = rng.getrandbits(32)

        async def work() -> None:
            conn, prefix = await self.open(via)
            try:
                await self.get(
                    conn,
                    prefix,
                    op,
                    seed,
                    close_delimited=close_delimited,
                    paced=pacer,
                    query=query,
                )
            finally:
                with anyio.CancelScope(shield=True):
                    await conn.aclose()

        limit = self.transfer_limit(size, min(rate or MIN_RATE, origin_rate))
        limit += pacer.pause if pause_at else 0
        await self.guarded(op, limit, work)

    async def _send_body(self, conn: HttpConn, op: Op, seed: int, stop_at: int) -> str:
        digest = hashlib.sha256()
        for chunk in seeded_chunks(seed, op.size):
            if op.moved >= stop_at:
                break
            await conn.stream.send(chunk)
            digest.update(chunk)
            op.moved += len(chunk)
        return digest.hexdigest()

    async def upload(self, rng: random.Random) -> None:
        """A 1-20 MB POST; the origin answers the SHA-256 of what arrived."""
        via = rng.choice(("socks5", "connect", "http"))
        size = rng.randint(self.min_transfer, self.max_transfer)
        op = self.new_op("upload", via, size)
        seed = rng.getrandbits(32)

        async def work() -> None:
            conn, prefix = await self.open(via)
            try:
                await conn.stream.send(self.request(prefix, "/upload", body=size))
                sha = await self._send_body(conn, op, seed, size)
                head = await conn.head()
                if head.status != 200 or head.length is None:
                    raise Finished("error", f"http-{head.status}")
                answer = json.loads(await conn.exactly(head.length))
                if answer != {"length": size, "sha256": sha}:
                    raise Finished("mismatch", f"origin received {answer['length']} bytes")
            finally:
                with anyio.CancelScope(shield=True):
                    await conn.aclose()

        await self.guarded(op, self.transfer_limit(size), work)

    async def abort(self, rng: random.Random) -> None:
        """A download or upload the client abandons mid-transfer with RST or with FIN."""
        via = rng.choice(("socks5", "connect", "http"))
        how = rng.choice(("rst", "fin"))
        direction = rng.choice(("download", "upload"))
        size = rng.randint(2 << 20, self.max_transfer)
        stop_at = 0 if rng.random() < 0.15 else rng.randint(64 * 1024, size // 2)
        op = self.new_op(f"abort-{how}-{direction}", via, size)
        seed = rng.getrandbits(32)

        async def work() -> None:
            conn, prefix = await self.open(via)
            try:
                if direction == "upload":
                    await conn.stream.send(self.request(prefix, "/upload", body=size))
                    await self._send_body(conn, op, seed, stop_at)
                else:
                    await conn.stream.send(self.request(prefix, f"/seeded/{seed}/{size}"))
                    if stop_at:
                        head = await conn.head()
                        if head.status != 200:
                            raise Finished("error", f"http-{head.status}")
                        check = SeededCheck(seed, size)
                        while check.offset < stop_at:
                            try:
                                check.feed(await conn.receive())
                            except anyio.EndOfStream:
                                raise Finished(
                                    "short", f"clean end after {check.offset} of {size} bytes"
                                ) from None
                        op.moved = check.offset
                op.outcome = "aborted"
            finally:
                if how == "rst":
                    conn.abort()
                with anyio.CancelScope(shield=True):
                    await conn.aclose()

        await self.guarded(op, self.transfer_limit(size), work)

    async def curl(self, rng: random.Random) -> None:
        """Real curl through SOCKS5 (socks5h) or the HTTP proxy; some give up (--max-time)."""
        mode = rng.choice(("socks5h", "http"))
        kind = rng.choices(("get", "close-delimited", "give-up"), (6, 3, 1))[0]
        size = rng.randint(0, 256 * 1024) if rng.random() < 0.6 else rng.randint(1, 4 << 20)
        seed = rng.getrandbits(32)
        body = "seeded-close" if kind == "close-delimited" else "seeded"
        path = f"/{body}/{seed}/{size}"
        extra: list[str] = []
        if kind == "give-up":
            size = 20 << 20
            path = f"/seeded/{seed}/{size}"
            extra = ["--limit-rate", "300k", "--max-time", f"{rng.uniform(0.5, 2.0):.2f}"]
        op = self.new_op("curl" if kind != "give-up" else "curl-give-up", f"{mode}/{kind}", size)
        url = f"http://{self.target()}{path}"

        async def work() -> None:
            proxy = proxy_args(mode, self.proxy_port)
            done = await anyio.run_process(
                [CURL, "-sS", "--fail", "--noproxy", "", *proxy, *extra, url], check=False
            )
            op.moved = len(done.stdout)
            if kind == "give-up":
                if done.returncode == 28:  # curl's "operation timed out": the client gave up
                    op.outcome = "aborted"
                    return
                if done.returncode == 0:
                    raise Finished("wrong", "a 20 MB body at 300 kB/s within 2 s")
            if done.returncode != 0:
                raise Finished("error", f"curl-{done.returncode}")
            check = SeededCheck(seed, size)
            check.feed(done.stdout)
            if not check.complete:
                raise Finished("short", f"curl exit 0 with {check.offset} of {size} bytes")

        await self.guarded(op, self.transfer_limit(size), work)

    async def junk(self, rng: random.Random) -> None:
        """Proxy clients that say nothing, half a greeting, garbage, or ask for a dead port."""
        kind = rng.choice(
            (
                "close-at-once",
                "silent-hold",
                "silent-until-closed",
                "half-greeting",
                "half-request",
                "garbage",
                "bad-request-line",
                "socks-refused",
                "connect-refused",
            )
        )
        op = self.new_op("junk", kind, 0)

        async def until_closed(conn: HttpConn) -> None:
            """The daemon must end a client that never completes its handshake."""
            while True:
                try:
                    await conn.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return

        async def work() -> None:
            if kind in ("socks-refused", "connect-refused"):
                try:
                    via = "socks5" if kind == "socks-refused" else "connect"
                    conn, _ = await self.open(via, port=self.closed_port)
                except Finished as finished:
                    if finished.error.startswith(("socks-reply-", "connect-5")):
                        return  # refused, as it must be
                    raise
                await conn.aclose()
                raise Finished("wrong", "success reported for a port nobody listens on")
            conn = HttpConn(await anyio.connect_tcp("127.0.0.1", self.proxy_port))
            try:
                if kind == "silent-hold":
                    await anyio.sleep(rng.uniform(0.2, 3.0))  # a client that says nothing
                elif kind == "silent-until-closed":
                    await until_closed(conn)
                elif kind == "half-greeting":
                    await conn.stream.send(b"\x05\x02\x00")
                    await anyio.sleep(rng.uniform(0.0, 2.0))
                    if rng.random() < 0.5:
                        conn.abort()
                elif kind == "half-request":
                    await conn.stream.send(b"\x05\x01\x00\x05\x01\x00\x01\x7f")
                    await anyio.sleep(rng.uniform(0.0, 2.0))
                elif kind == "garbage":
                    await conn.stream.send(bytes([rng.randrange(6, 256)]) + rng.randbytes(200))
                    await until_closed(conn)
                elif kind == "bad-request-line":
                    await conn.stream.send(b"NONSENSE\r\n\r\n")
                    await until_closed(conn)
            finally:
                with anyio.CancelScope(shield=True):
                    await conn.aclose()

        limit = self.handshake_timeout + SHORT_GET_LIMIT
        await self.guarded(op, limit, work)

    async def control(self, rng: random.Random) -> None:
        """Control-socket clients that vanish at every point of a conversation."""
        kind = rng.choice(
            (
                "vanish",
                "hello-vanish",
                "half-line",
                "request-vanish",
                "garbage-line",
                "status",
                "subscribe-read",
                "subscribe-no-read",
                "oversized-line",
            )
        )
        op = self.new_op("control", kind, 0)

        async def work() -> None:
            stream = await anyio.connect_unix(self.control_path)
            buffer = b""

            async def line() -> dict[str, object]:
                nonlocal buffer
                while b"\n" not in buffer:
                    try:
                        buffer += await stream.receive()
                    except anyio.EndOfStream:
                        raise Finished("error", "control socket closed") from None
                text, _, buffer = buffer.partition(b"\n")
                message: dict[str, object] = json.loads(text)
                return message

            async def response() -> dict[str, object]:
                while (message := await line()).get("type") != "response":
                    pass
                return message

            try:
                if kind == "vanish":
                    return
                hello = await line()
                if hello.get("type") != "hello":
                    raise Finished("wrong", f"first line {hello}")
                if kind == "half-line":
                    await stream.send(b'{"id": 1, "meth')
                elif kind == "request-vanish":
                    await stream.send(b'{"id": 1, "method": "connections"}\n')
                elif kind == "garbage-line":
                    await stream.send(b"not json\n")
                    answer = await response()
                    if answer.get("ok") is not False:
                        raise Finished("wrong", f"garbage answered {answer}")
                elif kind == "status":
                    await stream.send(b'{"id": 2, "method": "status"}\n')
                    answer = await response()
                    result = answer.get("result")
                    if not answer.get("ok") or not isinstance(result, dict):
                        raise Finished("wrong", f"status answered {answer}")
                elif kind == "subscribe-read":
                    await stream.send(
                        b'{"id": 3, "method": "subscribe",'
                        b' "params": {"topic": "connections", "interval_ms": 100}}\n'
                    )
                    events = 0
                    while events < 3:
                        if (await line()).get("type") == "event":
                            events += 1
                elif kind == "subscribe-no-read":
                    topic = rng.choice(("logs", "status", "connections"))
                    await stream.send(
                        b'{"id": 4, "method": "subscribe", "params": {"topic": "%s",'
                        b' "interval_ms": 50, "level": "debug", "backlog": 200}}\n' % topic.encode()
                    )
                    await anyio.sleep(rng.uniform(0.5, 4.0))  # a client that stopped reading
                elif kind == "oversized-line":
                    # the daemon may hang up before all of it arrived
                    with contextlib.suppress(anyio.BrokenResourceError, OSError):
                        await stream.send(b"x" * (2 << 20))
            finally:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()

        await self.guarded(op, SHORT_GET_LIMIT, work)

    # -- workers ---------------------------------------------------------------------------

    async def worker(
        self, name: str, action: Callable[[random.Random], Awaitable[None]], pace: float = 0.0
    ) -> None:
        """Start operations one after the other until ``end``; ``pace`` s apart at most."""
        n = 0
        while self.now() < self.end:
            rng = random.Random(f"{self.seed}/{name}/{self.phase}/{n}")
            await action(rng)
            n += 1
            if pace:
                await anyio.sleep(rng.uniform(0, pace))  # spacing, not synchronisation

    async def run(self, seconds: float) -> None:
        """Every worker for ``seconds``; operations under way then have ``DRAIN_LIMIT`` s to
        end (each also has its own deadline), or they are stopped and count as hung."""
        self.end = self.now() + seconds
        with anyio.move_on_after(seconds + DRAIN_LIMIT):
            await self._workers()
        for op in self.ops:
            if op.outcome == "running":
                op.end = self.now()
                op.outcome = "hang"
                op.error = f"still running {DRAIN_LIMIT:.0f} s after the mix ended"

    async def _workers(self) -> None:
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(self.worker, f"get{i}", self.short_gets)
            for i in range(2):
                tg.start_soon(self.worker, f"down{i}", self.download)
                tg.start_soon(self.worker, f"up{i}", self.upload)
            tg.start_soon(self.worker, "slow", lambda rng: self.download(rng, "slow"))
            tg.start_soon(self.worker, "paused", lambda rng: self.download(rng, "paused"))
            tg.start_soon(self.worker, "slow-origin", lambda rng: self.download(rng, "slow-origin"))
            tg.start_soon(self.worker, "abort", self.abort, 0.5)
            tg.start_soon(self.worker, "curl", self.curl, 0.2)
            tg.start_soon(self.worker, "junk", self.junk, 0.3)
            tg.start_soon(self.worker, "control", self.control, 0.3)


# -- figures --------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def figures(mix: Mix) -> list[str]:
    """Operations by kind and outcome, bytes, errors by kind, latency of short GETs."""
    lines = []
    by_kind: dict[str, Counter[str]] = {}
    for op in mix.ops:
        by_kind.setdefault(op.kind, Counter())[op.outcome] += 1
    outcomes = ["ok", "aborted", "error", *FAILURES, "running"]
    lines.append(f"{'operation':22}" + "".join(f"{o:>9}" for o in outcomes))
    for kind in sorted(by_kind):
        counts = by_kind[kind]
        lines.append(f"{kind:22}" + "".join(f"{counts[o]:>9}" for o in outcomes))
    total: Counter[str] = sum(by_kind.values(), Counter())
    lines.append(f"{'all':22}" + "".join(f"{total[o]:>9}" for o in outcomes))
    moved = sum(op.moved for op in mix.ops)
    lines.append(f"bytes through the proxy: {moved / 1e6:.1f} MB")
    errors = Counter(op.error for op in mix.ops if op.outcome == "error")
    if errors:
        lines.append("errors by kind: " + ", ".join(f"{k} {v}" for k, v in errors.most_common()))
        where = Counter(f"{op.kind}:{op.error}" for op in mix.ops if op.outcome == "error")
        lines.append("  by operation: " + ", ".join(f"{k} {v}" for k, v in sorted(where.items())))
    gets = [op for op in mix.ops if op.kind == "get" and op.outcome == "ok"]
    for label, chosen in (
        ("short GETs (a slow reader always runs)", gets),
        ("  while a paused reader had stopped reading", [op for op in gets if op.during_pause]),
        ("  while none had", [op for op in gets if not op.during_pause]),
    ):
        ms = [op.latency * 1000 for op in chosen]
        lines.append(
            f"{label}: {len(ms)}, p50 {percentile(ms, 0.5):.0f} ms, "
            f"p90 {percentile(ms, 0.9):.0f} ms, max {max(ms, default=float('nan')):.0f} ms"
        )
    return lines
