"""TCP connect with socket options set before ``connect()`` (a routing mark), happy eyeballs.

`anyio.connect_tcp` creates and connects its sockets in one step, so an option that must be
set before the SYN leaves (``SO_MARK``: the SYN is already routed) cannot be applied through
it. This connects itself: RFC 8305 ordering and staggering over the resolved addresses, each
socket marked (`ostp_client.net.bypass.apply_bypass`) and bound before its ``connect()``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.abc

from ostp_client.net.tcp import connect_marked

__all__ = ["CONNECTION_ATTEMPT_DELAY", "connect_tcp", "interleave"]

CONNECTION_ATTEMPT_DELAY = 0.25  # RFC 8305 §8: recommended 250 ms

_Target = tuple[int, tuple[Any, ...]]


def interleave(targets: Sequence[_Target]) -> list[_Target]:
    """Alternate address families, starting with the first one's (RFC 8305 §4); no duplicates."""
    unique = list(dict.fromkeys((family, tuple(addr)) for family, addr in targets))
    if not unique:
        return []
    first = unique[0][0]
    preferred = [t for t in unique if t[0] == first]
    other = [t for t in unique if t[0] != first]
    out: list[_Target] = []
    for i in range(max(len(preferred), len(other))):
        out.extend(group[i] for group in (preferred, other) if i < len(group))
    return out


def _literal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> _Target:
    if ip.version == 6:
        return (socket.AF_INET6, (str(ip), port, 0, 0))
    return (socket.AF_INET, (str(ip), port))


async def _resolve(host: str, port: int, family: int) -> list[_Target]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = await anyio.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        return interleave([(int(info[0]), tuple(info[4])) for info in infos])
    return [_literal(ip, port)]


async def _connect_one(
    family: int, sockaddr: tuple[Any, ...], local_host: str | None, mark: int | None
) -> anyio.abc.SocketStream:
    return await connect_marked(family, sockaddr, local_host, mark)


async def connect_tcp(
    host: str,
    port: int,
    *,
    local_host: str | None = None,
    mark: int | None = None,
    attempt_delay: float = CONNECTION_ATTEMPT_DELAY,
    addresses: Sequence[str] | None = None,
) -> anyio.abc.SocketStream:
    """Connect to ``host:port``; ``mark`` (else the process-wide one) is set on every socket.

    A name with addresses of both families is tried RFC 8305 style: addresses alternate by
    family, a new attempt starts every ``attempt_delay`` seconds or as soon as the previous one
    failed, the first connection wins and the others are cancelled. The caller bounds the
    whole with a deadline. ``addresses`` (IP texts) skips resolving ``host``: the caller
    resolved it (the stub resolver, whose queries carry the mark). Raises the attempt's
    OSError when there was one, else
    ``OSError("All connection attempts failed")`` caused by the group of errors (as
    `anyio.connect_tcp` does).
    """
    family = 0
    if local_host is not None:
        family = socket.AF_INET6 if ":" in local_host else socket.AF_INET
    if addresses is not None:
        targets = interleave([_literal(ipaddress.ip_address(a), port) for a in addresses])
    else:
        targets = await _resolve(host, port, family)
    if local_host is not None:
        targets = [t for t in targets if t[0] == family]
    if not targets:
        raise OSError(f"{host}: no address to connect to")
    winner: anyio.abc.SocketStream | None = None
    errors: list[OSError] = []

    async with anyio.create_task_group() as tg:

        async def attempt(target: _Target, failed: anyio.Event) -> None:
            nonlocal winner
            try:
                stream = await _connect_one(target[0], target[1], local_host, mark)
            except OSError as exc:
                errors.append(exc)
                failed.set()
                return
            if winner is None:
                winner = stream
                tg.cancel_scope.cancel()
            else:  # pragma: no cover - two attempts won in the same loop iteration
                await stream.aclose()

        for target in targets:
            failed = anyio.Event()
            tg.start_soon(attempt, target, failed)
            with anyio.move_on_after(attempt_delay):
                await failed.wait()

    if winner is not None:
        return winner
    if len(errors) == 1:
        raise errors[0]
    raise OSError("All connection attempts failed") from ExceptionGroup("connect", errors)
