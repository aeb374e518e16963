"""The upstream-behaviour server core on a real UDP socket, for end-to-end tests.

    python -m tests.upstream.server --key KEY --listen 127.0.0.1:0
        [--drop-nonce N ...] [--mute-after N] [--ignore-connect] [--faulty-sessions N]

Prints ``listening on HOST:PORT`` as its first line and serves until SIGINT/SIGTERM. Like the
upstream server (spec §9.1, §9.5, §16): one UDP socket asking for 32 MiB buffers, one 10 ms
ticker for all sessions, every remote read of at most 4,096 bytes sent at once as a datagram,
data for a remote queued without bound, a remote connect given 10 s. The fault options apply
to every session, or with ``--faulty-sessions N`` to the first N (see
:class:`tests.upstream.core.Faults`).
"""

from __future__ import annotations

import argparse
import math
import socket
import sys
import time
from collections.abc import Sequence
from contextlib import suppress

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .core import (
    REMOTE_READ,
    TICK,
    CloseTcp,
    Effect,
    Faults,
    OpenTcp,
    UpstreamServer,
    WriteTcp,
)

SOCKET_BUFFER = 32 * 1024 * 1024  # spec §9.1
CONNECT_TIMEOUT = 10.0  # spec §9.5
READ_BATCH = 16 * REMOTE_READ


def split_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (Rust socket-address text, spec §8)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


class Remote:
    """One relayed TCP connection: its task scope and its unbounded write queue."""

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.send: MemoryObjectSendStream[bytes]
        self.receive: MemoryObjectReceiveStream[bytes]
        self.send, self.receive = anyio.create_memory_object_stream[bytes](math.inf)


class Shell:
    def __init__(self, core: UpstreamServer, sock: socket.socket) -> None:
        self.core = core
        self.sock = sock
        self.remotes: dict[tuple[int, int], Remote] = {}
        self.tg: anyio.abc.TaskGroup | None = None

    def flush(self) -> None:
        """Send what the core has, then carry out its effects (unpaced, as upstream)."""
        for datagram, address in self.core.datagrams_to_send():
            with suppress(OSError):  # a full buffer drops, an ICMP error is ignored
                self.sock.sendto(datagram, address)
        for effect in self.core.take_effects():
            self._effect(effect)

    def _effect(self, effect: Effect) -> None:
        key = (effect.token, effect.stream_id)
        if isinstance(effect, OpenTcp):
            assert self.tg is not None
            remote = self.remotes[key] = Remote()
            self.tg.start_soon(self._relay, key, remote, effect.address)
        elif isinstance(effect, WriteTcp):
            target = self.remotes.get(key)
            if target is not None:
                target.send.send_nowait(effect.data)
        elif isinstance(effect, CloseTcp):
            gone = self.remotes.pop(key, None)
            if gone is not None:
                gone.scope.cancel()

    async def _relay(self, key: tuple[int, int], remote: Remote, address: str) -> None:
        token, stream_id = key
        core = self.core
        with remote.scope:
            try:
                with anyio.fail_after(CONNECT_TIMEOUT):
                    host, port = split_address(address)
                    stream = await anyio.connect_tcp(host, port)
            except (OSError, TimeoutError, ValueError) as exc:
                self.remotes.pop(key, None)
                core.tcp_failed(token, stream_id, str(exc) or type(exc).__name__, time.monotonic())
                self.flush()
                return
            core.tcp_connected(token, stream_id, time.monotonic())
            self.flush()
            async with stream, anyio.create_task_group() as tg:
                tg.start_soon(self._writer, stream, remote)
                try:
                    while True:
                        # What the remote has, up to READ_BATCH: the core cuts it into reads
                        # of 4,096 bytes, each sent at once, as upstream's read loop would do
                        # with that much waiting; one event-loop turn instead of sixteen keeps
                        # this shell as fast as an unpaced Rust sender on loopback.
                        data = await stream.receive(READ_BATCH)
                        core.tcp_data(token, stream_id, data, time.monotonic())
                        self.flush()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    pass
                tg.cancel_scope.cancel()
        if self.remotes.pop(key, None) is not None:  # EOF or error, not our CloseTcp
            core.tcp_closed(token, stream_id, time.monotonic())
            self.flush()

    async def _writer(self, stream: anyio.abc.SocketStream, remote: Remote) -> None:
        with suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            async for data in remote.receive:
                await stream.send(data)

    async def receive_loop(self) -> None:
        sock = self.sock
        core = self.core
        while True:
            await anyio.wait_readable(sock)
            for _ in range(512):
                try:
                    data, address = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                core.receive_datagram(data, (address[0], address[1]), time.monotonic())
            self.flush()

    async def tick_loop(self) -> None:
        core = self.core
        while True:
            now = time.monotonic()
            deadline = core.get_timer()
            if deadline is not None and deadline <= now:
                core.handle_timer(now)
                self.flush()
                continue
            await anyio.sleep(TICK if deadline is None else deadline - now)

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self.tg = tg
            tg.start_soon(self.receive_loop)
            tg.start_soon(self.tick_loop)


def bind(listen: str) -> socket.socket:
    host, port = split_address(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


async def serve(args: argparse.Namespace) -> None:
    faults = Faults(
        drop_nonces=set(args.drop_nonce),
        mute_after=args.mute_after,
        ignore_connect=args.ignore_connect,
        sessions=args.faulty_sessions,
    )
    core = UpstreamServer(args.key, unix_offset=time.time() - time.monotonic(), faults=faults)
    sock = bind(args.listen)
    host, port = sock.getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    with sock:
        await Shell(core, sock).run()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.upstream.server", description=__doc__)
    parser.add_argument("--key", action="append", required=True, help="an access key")
    parser.add_argument("--listen", default="127.0.0.1:0", help="UDP address to serve on")
    parser.add_argument("--drop-nonce", type=int, action="append", default=[])
    parser.add_argument("--mute-after", type=int, default=None)
    parser.add_argument("--ignore-connect", action="store_true")
    parser.add_argument("--faulty-sessions", type=int, default=None)
    args = parser.parse_args(argv)
    with suppress(KeyboardInterrupt):
        anyio.run(serve, args)
    sys.exit(0)


if __name__ == "__main__":
    main()
