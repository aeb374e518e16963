"""Local remotes for the server tests (TCP echo, HTTP, UDP echo) and a server factory."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc

from ostp_server import OstpServer, ServerConfig, running_server

KEY = "00112233445566778899aabbccddeeff"
OTHER_KEY = "ffeeddccbbaa99887766554433221100"


def make_config(**overrides: Any) -> ServerConfig:
    raw: dict[str, Any] = {"listen": "127.0.0.1:0", "access_keys": [KEY]}
    raw.update(overrides)
    return ServerConfig.model_validate(raw)


@asynccontextmanager
async def server(**overrides: Any) -> AsyncIterator[OstpServer]:
    async with running_server(make_config(**overrides)) as srv:
        yield srv


async def _echo(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        try:
            while True:
                await stream.send(await stream.receive(65536))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


@asynccontextmanager
async def tcp_echo() -> AsyncIterator[int]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, _echo)
        yield int(listener.extra(anyio.abc.SocketAttribute.local_port))
        tg.cancel_scope.cancel()


HTTP_BODY = b"hello from the origin\n" * 1000


async def _http(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        request = b""
        while b"\r\n\r\n" not in request:
            try:
                request += await stream.receive()
            except anyio.EndOfStream:
                return
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(HTTP_BODY)
        )
        await stream.send(head + HTTP_BODY)


@asynccontextmanager
async def http_origin() -> AsyncIterator[int]:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, _http)
        yield int(listener.extra(anyio.abc.SocketAttribute.local_port))
        tg.cancel_scope.cancel()


@asynccontextmanager
async def udp_echo() -> AsyncIterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)

    async def loop() -> None:
        while True:
            await anyio.wait_readable(sock)
            try:
                data, addr = sock.recvfrom(65535)
            except BlockingIOError:
                continue
            sock.sendto(b"echo:" + data, addr)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(loop)
            yield int(sock.getsockname()[1])
            tg.cancel_scope.cancel()
    finally:
        sock.close()


async def no_reply(sock: socket.socket, wait: float = 0.5) -> bool:
    """True if nothing arrives on ``sock`` within ``wait`` seconds."""
    with anyio.move_on_after(wait):
        await anyio.wait_readable(sock)
        return False
    return True


async def poll_until(cond: Callable[[], bool], limit: float = 5.0) -> None:
    """Wait until ``cond()`` holds (state owned by the server has no event to wait on)."""
    with anyio.fail_after(limit):
        while not cond():  # noqa: ASYNC110
            await anyio.sleep(0.01)
