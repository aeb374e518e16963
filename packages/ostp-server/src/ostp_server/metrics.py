"""The server's Prometheus endpoint (`"metrics": {"listen": "127.0.0.1:9100"}` in server.json).

A custom collector reads the counters the server keeps anyway (`KeyStats` per access key,
`ServerStats`, the acceptor's drop counters, the live sessions' cores) when Prometheus scrapes;
nothing is added to the datagram path. Keys appear by their log-safe label (the user's name or
`key#N`), never by the key. `GET /metrics` is answered by a small HTTP/1.1 responder on anyio.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from .config import MetricsConfig

if TYPE_CHECKING:
    from .server import OstpServer

__all__ = ["MetricsConfig", "ServerCollector", "build_registry", "serve_metrics"]

log = logging.getLogger("ostp_server")

REQUEST_TIMEOUT = 10.0
MAX_REQUEST_HEAD = 16384
MAX_SCRAPERS = 32


class ServerCollector(Collector):
    """Reads a running `OstpServer` at scrape time."""

    def __init__(self, server: OstpServer) -> None:
        self.server = server

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        server = self.server
        labels = ["key", "direction"]
        key_bytes = CounterMetricFamily(
            "ostp_server_key_bytes",
            "Bytes of datagrams of an access key's sessions (up: from the clients)",
            labels=labels,
        )
        key_sessions = CounterMetricFamily(
            "ostp_server_key_sessions", "Handshakes accepted for an access key", labels=["key"]
        )
        key_active = GaugeMetricFamily(
            "ostp_server_key_active_sessions", "Live sessions of an access key", labels=["key"]
        )
        key_limit = GaugeMetricFamily(
            "ostp_server_key_limit_bytes", "limit_bytes of an access key", labels=["key"]
        )
        for ks in server.key_stats:
            key_bytes.add_metric([ks.label, "up"], ks.bytes_up)
            key_bytes.add_metric([ks.label, "down"], ks.bytes_down)
            key_sessions.add_metric([ks.label], ks.sessions)
            key_active.add_metric([ks.label], ks.active)
            if ks.limit is not None:
                key_limit.add_metric([ks.label], ks.limit)
        yield from (key_bytes, key_sessions, key_active, key_limit)

        stats = server.stats
        yield GaugeMetricFamily("ostp_server_sessions", "Live sessions", value=len(server.sessions))
        for name, help_text in (
            ("datagrams_received", "Datagrams read from the listen sockets"),
            ("datagrams_sent", "Datagrams sent"),
            ("sessions_started", "Sessions started"),
            ("sessions_ended", "Sessions ended"),
            ("half_open_evictions", "Sessions ended to make room (no datagram since handshake)"),
            ("roam_rebinds", "Sessions that moved to a new client address"),
        ):
            yield CounterMetricFamily(f"ostp_server_{name}", help_text, value=getattr(stats, name))
        drops = CounterMetricFamily(
            "ostp_server_dropped_datagrams",
            "Datagrams dropped, by reason (never answered)",
            labels=["reason"],
        )
        for field in dataclasses.fields(stats):
            if field.name.endswith("_drop"):
                drops.add_metric([field.name.removesuffix("_drop")], getattr(stats, field.name))
        for field in dataclasses.fields(server.acceptor.stats):
            if field.name.endswith("_drop"):
                value = getattr(server.acceptor.stats, field.name)
                drops.add_metric([f"handshake_{field.name.removesuffix('_drop')}"], value)
        yield drops
        yield from self._core_families()

    def _core_families(self) -> Iterable[Metric]:
        """Retransmissions and drops summed over the live sessions' cores, per key."""
        retx = CounterMetricFamily(
            "ostp_server_key_retransmissions",
            "Datagrams sent again by the live sessions of a key (reason: timeout or nack)",
            labels=["key", "reason"],
        )
        totals: dict[str, list[int]] = {ks.label: [0, 0] for ks in self.server.key_stats}
        for session in list(self.server.sessions.values()):
            sender = getattr(getattr(session.conn, "sender", None), "stats", None)
            label = session.key_stats.label
            if sender is None or label not in totals:
                continue
            totals[label][0] += int(getattr(sender, "retransmissions", 0))
            totals[label][1] += int(getattr(sender, "nack_retransmissions", 0))
        for label, (timeout, nack) in totals.items():
            retx.add_metric([label, "timeout"], timeout)
            retx.add_metric([label, "nack"], nack)
        yield retx


class _Constant(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def build_registry(server: OstpServer) -> CollectorRegistry:
    from . import __version__  # noqa: PLC0415

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))
    ProcessCollector(namespace="ostp_server", registry=registry)
    info = GaugeMetricFamily("ostp_server_build_info", "Version of the server", labels=["version"])
    info.add_metric([__version__], 1)
    registry.register(_Constant([info]))
    return registry


def _response(status: str, content_type: str, body: bytes, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


def render(registry: CollectorRegistry, request_head: bytes) -> bytes:
    """The whole HTTP response to one request head."""
    lines = request_head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response("400 Bad Request", "text/plain", b"bad request\n")
    method, target, _version = parts
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", "text/plain", b"GET /metrics\n")
    if target.split("?", 1)[0] != "/metrics":
        return _response("404 Not Found", "text/plain", b"not found; try /metrics\n")
    accept = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    encoder, content_type = choose_encoder(accept)
    return _response("200 OK", content_type, encoder(registry), method == "HEAD")


async def _serve_scraper(
    stream: anyio.abc.SocketStream, registry: CollectorRegistry, limit: anyio.Semaphore
) -> None:
    async with limit, stream:
        head = b""
        try:
            with anyio.fail_after(REQUEST_TIMEOUT):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive(4096)
                    if len(head) > MAX_REQUEST_HEAD:
                        await stream.send(_response("431 Too Large", "text/plain", b""))
                        return
                await stream.send(render(registry, head.split(b"\r\n\r\n", 1)[0]))
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            log.debug("metrics scraper dropped: %r", exc)
        except Exception:  # a failing collector answers 500, never ends the server
            log.exception("metrics: rendering failed")
            with anyio.move_on_after(1):
                await stream.send(_response("500 Internal Server Error", "text/plain", b""))


async def serve_metrics(
    server: OstpServer,
    config: MetricsConfig,
    *,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `GET /metrics` until cancelled; OSError before `started` if it cannot bind."""
    registry = build_registry(server)
    host, port = config.address
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot serve metrics on tcp {config.listen}: {exc.strerror}"
        ) from None
    bound = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_address)  # noqa: S610
    where = (str(bound[0]), int(bound[1]))
    log.info("metrics on http://%s/metrics", config.listen)
    limit = anyio.Semaphore(MAX_SCRAPERS)
    async with listener, anyio.create_task_group() as tg:
        task_status.started(where)

        async def accept_loop(sock: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
            assert isinstance(sock, anyio.abc.SocketListener)
            while True:
                try:
                    stream = await sock.accept()
                except OSError as exc:  # out of file descriptors: wait, never give up
                    log.warning("metrics: accept failed: %s", exc)
                    await anyio.sleep(0.5)
                    continue
                tg.start_soon(_serve_scraper, stream, registry, limit)

        for sock in listener.listeners:
            tg.start_soon(accept_loop, sock)
