"""The TCP transports: OSTP datagrams over one TCP connection (spec §10.6).

:func:`open_stream` connects, runs the opening (the xHTTP ``GET /stream`` or ``GET /wss``
request, inside Reality when configured: :class:`ostp_proto.transport.StreamConnector`) and
returns a :class:`StreamTransport`, which frames datagrams with
:class:`ostp_proto.transport.DatagramStream`.

Writes are batched: one ``send`` per flush of the session carries every datagram the core
produced. What the kernel does not take waits in a buffer that a writer task drains when the
socket is writable; above :data:`HIGH_WATER` bytes the transport is ``blocked`` and the session
takes nothing more from its core (backpressure to the streams through the core's ``writable``).
Reads are large (:data:`READ_SIZE`) and every complete datagram is handed on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import anyio

from ostp_client.net.bypass import apply_bypass
from ostp_client.transport import TransportError
from ostp_proto import LocalProtocolError, RemoteProtocolError
from ostp_proto.transport import (
    DatagramStream,
    Framing,
    RealityClient,
    StreamConnected,
    StreamConnector,
)

__all__ = [
    "HIGH_WATER",
    "LOW_WATER",
    "READ_SIZE",
    "RealityOptions",
    "StreamOptions",
    "StreamTransport",
    "open_stream",
]

READ_SIZE = 256 * 1024
"""Bytes asked for per ``recv``: a read carries dozens of datagrams."""
HIGH_WATER = 1 << 20
"""Bytes waiting for the kernel above which the session stops taking datagrams from its core
(the kernel's own send buffer, autotuned up to several MiB, is in front of this)."""
LOW_WATER = 256 * 1024
"""Bytes waiting below which a blocked session is woken to take datagrams again."""
OPENING_TIMEOUT = 10.0
"""Seconds for the request and the server's answer after the TCP connection is up."""


@dataclass(frozen=True, slots=True)
class RealityOptions:
    """Reality towards one server (spec §10.6)."""

    public_key: bytes
    """The server's X25519 public key (``pbk``), 32 bytes."""
    short_id: bytes
    """8 bytes (``sid``)."""
    server_name: str
    """SNI of the ClientHello."""


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """How to open a TCP transport."""

    framing: Framing
    """``/stream`` (``len:u16`` framing) or ``/wss`` (WebSocket frames)."""
    host: str
    """HTTP Host of the request (spec §10.6: the configured SNI, else the server's IP)."""
    reality: RealityOptions | None = None
    connect_timeout: float = 5.0
    """Seconds for the TCP connection to be established."""
    opening_timeout: float = OPENING_TIMEOUT

    @property
    def kind(self) -> str:
        """``reality``, ``wss`` or ``tcp`` (the status shows it)."""
        if self.reality is not None:
            return "reality"
        return "wss" if self.framing is Framing.WSS else "tcp"


class StreamTransport:
    """A :class:`~ostp_client.transport.DatagramTransport` over an opened TCP connection.

    :meth:`run` (the writer) must run in a task while the transport is in use; ``on_drained`` is
    called when a blocked transport can take datagrams again.
    """

    reliable = True

    def __init__(
        self,
        sock: socket.socket,
        codec: DatagramStream,
        kind: str,
        early: list[bytes] | None = None,
    ) -> None:
        self.sock = sock
        self.codec = codec
        self.kind = kind
        self.failure: str | None = None
        self.on_drained: Callable[[], None] | None = None
        self.bytes_written = 0
        self.writes = 0
        """``send`` calls that took bytes (the batching shows as bytes_written / writes)."""
        self._early = early or []
        self._out = bytearray()
        self._out_ready = anyio.Event()
        self._closed = False

    @property
    def blocked(self) -> bool:
        return len(self._out) > HIGH_WATER

    @property
    def pending(self) -> int:
        """Bytes waiting for the kernel."""
        return len(self._out)

    # -- receive ---------------------------------------------------------------------------

    def recv_batch(self, limit: int = 256) -> list[bytes]:
        out = self._early
        if out:
            self._early = []
        if self._closed:
            return out
        recv = self.sock.recv
        receive = self.codec.receive
        for _ in range(min(limit, 8)):
            try:
                data = recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._fail(f"the TCP connection failed: {exc.strerror or exc}")
                break
            if not data:
                self._fail("the server closed the TCP connection")
                break
            try:
                got = receive(data)
            except RemoteProtocolError as exc:
                self._fail(f"the server sent a bad frame: {exc}")
                break
            if got:
                if out:
                    out.extend(got)
                else:
                    out = got
            if len(data) < READ_SIZE:
                break  # drained: the next read would only say EAGAIN
        reply = self.codec.data_to_send()  # a WebSocket pong or close
        if reply:
            self._write(reply)
        if self.codec.closed and self.failure is None:
            self._fail("the server closed the WebSocket")
        return out

    # -- send ------------------------------------------------------------------------------

    def send_batch(self, datagrams: Sequence[bytes]) -> int:
        if self._closed or self.failure is not None:
            return 0
        batch = datagrams if isinstance(datagrams, list) else list(datagrams)
        try:
            wire = self.codec.encode(batch)
        except LocalProtocolError:  # over 65,535 bytes: cannot be framed (never ours)
            return 0
        self._write(wire)
        return sum(len(d) for d in batch)

    def _write(self, wire: bytes) -> None:
        if self._closed or self.failure is not None or not wire:
            return
        out = self._out
        if out:
            out += wire
            return
        try:
            n = self.sock.send(wire)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._fail(f"the TCP connection failed: {exc.strerror or exc}")
            return
        if n:
            self.bytes_written += n
            self.writes += 1
        if n < len(wire):
            out += memoryview(wire)[n:]
            self._out_ready.set()

    async def run(self) -> None:
        """Drain what the kernel did not take, whenever the socket is writable again."""
        out = self._out
        sock = self.sock
        wake_owed = False
        while not self._closed:
            if not out:
                self._out_ready = anyio.Event()
                await self._out_ready.wait()
                continue
            try:
                await anyio.wait_writable(sock)
            except (anyio.ClosedResourceError, OSError):
                return
            if len(out) > HIGH_WATER:
                wake_owed = True  # the session stopped taking datagrams: wake it at LOW_WATER
            try:
                n = sock.send(out)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                self._fail(f"the TCP connection failed: {exc.strerror or exc}")
                return
            self.bytes_written += n
            self.writes += 1
            del out[:n]
            if wake_owed and len(out) <= LOW_WATER:
                wake_owed = False
                if self.on_drained is not None:
                    self.on_drained()

    # -- end -------------------------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
        self._out.clear()
        if self.on_drained is not None:
            self.on_drained()  # a session waiting for the writer must see the failure

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._out.clear()
        self._out_ready.set()
        with contextlib.suppress(Exception):  # no event loop (a test), or never waited on
            anyio.notify_closing(self.sock)
        self.sock.close()


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


async def _connect(address: tuple[str, int], time_limit: float) -> socket.socket:
    host, port = address
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        apply_bypass(sock)  # with a TUN's policy routing, never route the tunnel into itself
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            raise OSError(code, os.strerror(code))
        with anyio.fail_after(time_limit):
            await anyio.wait_writable(sock)
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            raise OSError(code, os.strerror(code))
    except TimeoutError:
        sock.close()
        raise TransportError(errno.ETIMEDOUT, f"no TCP connection in {time_limit:g} s") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = sock.send(view)
        except (BlockingIOError, InterruptedError):
            await anyio.wait_writable(sock)
            continue
        view = view[n:]


async def _opening(
    sock: socket.socket, connector: StreamConnector, time_limit: float
) -> StreamConnected:
    connector.start(time.time())
    try:
        with anyio.fail_after(time_limit):
            await _send_all(sock, connector.data_to_send())
            while True:
                await anyio.wait_readable(sock)
                try:
                    data = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                if not data:
                    raise TransportError(
                        errno.ECONNRESET,
                        "the server closed the connection during the opening"
                        " (not an OSTP server, or it refused the token or the Reality key)",
                    )
                try:
                    connected = connector.receive(data)
                except RemoteProtocolError as exc:
                    raise TransportError(errno.EPROTO, f"the server refused: {exc}") from None
                out = connector.data_to_send()
                if out:
                    await _send_all(sock, out)
                if connected is not None:
                    return connected
    except TimeoutError:
        raise TransportError(
            errno.ETIMEDOUT, f"no answer to the opening request in {time_limit:g} s"
        ) from None


async def open_stream(
    address: tuple[str, int], access_key: str, options: StreamOptions
) -> StreamTransport:
    """Connect to ``address`` (an IP literal and port) and run the opening.

    Raises :class:`~ostp_client.transport.TransportError` (or another OSError) when the
    connection or the opening fails.
    """
    reality = None
    if options.reality is not None:
        r = options.reality
        try:
            reality = RealityClient(
                server_public=r.public_key, short_id=r.short_id, sni=r.server_name
            )
        except LocalProtocolError as exc:
            raise TransportError(errno.EINVAL, f"reality: {exc}") from None
    connector = StreamConnector(
        framing=options.framing, access_key=access_key, host=options.host, reality=reality
    )
    sock = await _connect(address, options.connect_timeout)
    try:
        try:
            connected = await _opening(sock, connector, options.opening_timeout)
        except LocalProtocolError as exc:  # e.g. a low-order Reality key
            raise TransportError(errno.EINVAL, str(exc)) from None
        codec = DatagramStream(options.framing, client=True, records=connected.reality)
        try:
            early = codec.receive_plaintext(connected.leftover)
        except RemoteProtocolError as exc:
            raise TransportError(errno.EPROTO, f"the server sent a bad frame: {exc}") from None
    except BaseException:
        sock.close()
        raise
    return StreamTransport(sock, codec, options.kind, early)
