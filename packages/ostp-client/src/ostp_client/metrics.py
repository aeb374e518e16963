"""The Prometheus endpoint of the daemon (`"metrics": {"listen": "127.0.0.1:9099"}`).

Nothing here sits on a hot path: a custom collector reads the numbers the daemon already keeps
(outbound and session status, the ostp cores' counters, the router's hit counters, the
connection registry) when Prometheus scrapes, and a one-second sampler turns byte counters into
rates. `GET /metrics` is served by a small HTTP/1.1 responder on anyio (no thread), rendered
by the prometheus-client library (text format, or OpenMetrics when the scraper asks for it).

Names follow the Prometheus conventions: `ostp_client_` prefix, base units (bytes, seconds),
`_total` on counters. Counters of one ostp session start again from zero when the session is
re-established (Prometheus' `rate()` handles such resets).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from ostp_client.config import MetricsConfig
from ostp_client.outbounds.ostp.status import OstpReport

if TYPE_CHECKING:
    from ostp_client.running import RunningDaemon

__all__ = ["ClientCollector", "build_registry", "serve_metrics"]

logger = logging.getLogger(__name__)

SAMPLE_INTERVAL = 1.0
"""Seconds between rate samples."""
REQUEST_TIMEOUT = 10.0
"""A scraper that has not sent its request head after this long is dropped."""
MAX_REQUEST_HEAD = 16384
MAX_SCRAPERS = 32
"""Scrapes served at once; more wait in the listen backlog."""

_DROP_FIELDS = (
    "datagram_session_drop",
    "datagram_auth_drop",
    "frame_decode_drop",
    "relay_decode_drop",
    "handshake_drop",
    "state_drop",
    "paused_drop",
)
_INBOUND_COUNTERS = {
    "accepted": ("ostp_client_inbound_accepted", "Connections accepted by an inbound"),
    "tcp_refused": ("ostp_client_inbound_refused", "TCP connections an inbound refused"),
    "udp_dropped": ("ostp_client_inbound_udp_dropped", "UDP datagrams an inbound dropped"),
    "dns_queries": ("ostp_client_dns_queries", "DNS queries answered by a TUN inbound"),
    "dns_fake_answers": ("ostp_client_dns_fake_answers", "DNS queries answered with a fake IP"),
    "dns_dropped": ("ostp_client_dns_dropped", "DNS queries dropped (malformed or failed)"),
}


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class _Rates:
    """Byte counters sampled every `SAMPLE_INTERVAL`; rate = delta / elapsed."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, ...], tuple[float, float, float]] = {}
        self.rates: dict[tuple[str, ...], tuple[float, float]] = {}

    def sample(self, key: tuple[str, ...], now: float, up: float, down: float) -> None:
        last = self._last.get(key)
        if last is not None and now > last[0]:
            elapsed = now - last[0]
            self.rates[key] = (max(0.0, up - last[1]) / elapsed, max(0.0, down - last[2]) / elapsed)
        self._last[key] = (now, up, down)

    def get(self, key: tuple[str, ...]) -> tuple[float, float]:
        return self.rates.get(key, (0.0, 0.0))


class ClientCollector(Collector):
    """Reads a running `Daemon` at scrape time."""

    def __init__(self, daemon: RunningDaemon) -> None:
        self.daemon = daemon
        self.rates = _Rates()

    def describe(self) -> Iterable[Metric]:
        return ()  # registration must not call collect() before the daemon runs

    # -- raw numbers -------------------------------------------------------------------------

    def _ostp_reports(self) -> Iterator[tuple[str, OstpReport]]:
        """Every outbound with sessions and its report (one broken status() is skipped)."""
        for tag, outbound in list(self.daemon.outbounds.items()):
            try:
                report = outbound.status()
            except Exception:  # one broken status() must not fail the scrape
                logger.debug("status() of outbound %s failed", tag, exc_info=True)
                continue
            if isinstance(report, OstpReport):
                yield tag, report

    def connection_bytes(self) -> dict[str, tuple[int, int, int]]:
        """Per outbound: (bytes up, bytes down, live connections), closed ones included."""
        registry = self.daemon.registry
        totals: dict[str, tuple[int, int, int]] = {
            tag: (up, down, 0)
            for tag, (up, down) in registry.closed_by_outbound.items()
            if tag is not None
        }
        for ctx in list(registry.live.values()):
            if ctx.outbound_tag is None:
                continue
            up, down, live = totals.get(ctx.outbound_tag, (0, 0, 0))
            totals[ctx.outbound_tag] = (up + ctx.bytes_up, down + ctx.bytes_down, live + 1)
        return totals

    def sample(self, now: float) -> None:
        """Record the byte counters for the rate gauges."""
        for tag, (up, down, _live) in self.connection_bytes().items():
            self.rates.sample((tag,), now, up, down)
        for tag, report in self._ostp_reports():
            for session in report.sessions:
                key = (tag, str(session.index))
                self.rates.sample(key, now, session.bytes_up, session.bytes_down)

    # -- families ----------------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        daemon = self.daemon
        direction = ["outbound", "direction"]
        ob_bytes = CounterMetricFamily(
            "ostp_client_outbound_bytes",
            "Payload bytes of the connections routed to an outbound (up: towards the destination)",
            labels=direction,
        )
        ob_rate = GaugeMetricFamily(
            "ostp_client_outbound_rate_bytes_per_second",
            "Payload bytes per second through an outbound over the last second",
            labels=direction,
        )
        ob_conns = GaugeMetricFamily(
            "ostp_client_outbound_connections",
            "Live connections of an outbound",
            labels=["outbound"],
        )
        totals = self.connection_bytes()
        for tag in daemon.outbounds:
            up, down, live = totals.get(tag, (0, 0, 0))
            ob_bytes.add_metric([tag, "up"], up)
            ob_bytes.add_metric([tag, "down"], down)
            rate_up, rate_down = self.rates.get((tag,))
            ob_rate.add_metric([tag, "up"], rate_up)
            ob_rate.add_metric([tag, "down"], rate_down)
            ob_conns.add_metric([tag], live)
        yield from (ob_bytes, ob_rate, ob_conns)
        yield from self._tunnel_families()
        yield from self._registry_families()
        yield from self._routing_families()
        yield from self._inbound_families()

    def _tunnel_families(self) -> Iterable[Metric]:
        """Outbounds with sessions (ostp): state, RTT, reconnects, and per-session counters."""
        up_g = GaugeMetricFamily(
            "ostp_client_outbound_up",
            "1 while at least one session of the outbound is connected",
            labels=["outbound"],
        )
        rtt_g = GaugeMetricFamily(
            "ostp_client_outbound_rtt_seconds",
            "Smallest round-trip time of the outbound's sessions",
            labels=["outbound"],
        )
        rec_c = CounterMetricFamily(
            "ostp_client_outbound_reconnects", "Sessions re-established", labels=["outbound"]
        )
        labels = ["outbound", "session"]
        s_up = GaugeMetricFamily("ostp_client_session_up", "1 while connected", labels=labels)
        s_rtt = GaugeMetricFamily(
            "ostp_client_session_rtt_seconds", "Round-trip time of a session", labels=labels
        )
        s_bytes = CounterMetricFamily(
            "ostp_client_session_bytes",
            "Bytes of a session's datagrams (up: sent to the server)",
            labels=[*labels, "direction"],
        )
        s_rate = GaugeMetricFamily(
            "ostp_client_session_rate_bytes_per_second",
            "Bytes per second of a session's datagrams over the last second",
            labels=[*labels, "direction"],
        )
        s_rec = CounterMetricFamily(
            "ostp_client_session_reconnects", "Times this session was re-established", labels=labels
        )
        s_streams = GaugeMetricFamily(
            "ostp_client_session_streams", "Streams open on a session", labels=labels
        )
        s_sent = CounterMetricFamily(
            "ostp_client_session_datagrams_sent",
            "Datagrams sent by the current connection of a session",
            labels=labels,
        )
        s_recv = CounterMetricFamily(
            "ostp_client_session_datagrams_received",
            "Datagrams received by the current connection of a session",
            labels=labels,
        )
        s_retx = CounterMetricFamily(
            "ostp_client_session_retransmissions",
            "Datagrams sent again (reason: timeout or nack) by the current connection",
            labels=[*labels, "reason"],
        )
        s_pto = CounterMetricFamily(
            "ostp_client_session_probe_timeouts",
            "Retransmission timeouts with nothing acknowledged (loss of a whole window)",
            labels=labels,
        )
        s_drop = CounterMetricFamily(
            "ostp_client_session_dropped_datagrams",
            "Received datagrams dropped by the protocol core, by reason",
            labels=[*labels, "reason"],
        )
        for tag, report in self._ostp_reports():
            up_g.add_metric([tag], 1.0 if report.state == "connected" else 0.0)
            if report.rtt_ms is not None:
                rtt_g.add_metric([tag], report.rtt_ms / 1000)
            rec_c.add_metric([tag], report.reconnects)
            for session in report.sessions:
                name = str(session.index)
                lv = [tag, name]
                s_up.add_metric(lv, 1.0 if session.state == "connected" else 0.0)
                if session.rtt_ms is not None:
                    s_rtt.add_metric(lv, session.rtt_ms / 1000)
                s_bytes.add_metric([*lv, "up"], session.bytes_up)
                s_bytes.add_metric([*lv, "down"], session.bytes_down)
                rate_up, rate_down = self.rates.get((tag, name))
                s_rate.add_metric([*lv, "up"], rate_up)
                s_rate.add_metric([*lv, "down"], rate_down)
                s_rec.add_metric(lv, session.reconnects)
                s_streams.add_metric(lv, session.streams)
                sender, counters = session.sender, session.counters
                if sender is not None:
                    s_sent.add_metric(lv, sender.datagrams_sent)
                    s_retx.add_metric([*lv, "timeout"], sender.retransmissions)
                    s_retx.add_metric([*lv, "nack"], sender.nack_retransmissions)
                    s_pto.add_metric(lv, sender.probe_timeouts)
                if counters is not None:
                    s_recv.add_metric(lv, counters.datagrams_received)
                    for field in _DROP_FIELDS:
                        s_drop.add_metric(
                            [*lv, field.removesuffix("_drop")], getattr(counters, field)
                        )
                for reason, count in (session.nat_drops or {}).items():
                    s_drop.add_metric([*lv, reason.removesuffix("_drop")], float(count))
        yield from (up_g, rtt_g, rec_c, s_up, s_rtt, s_bytes, s_rate, s_rec, s_streams)
        yield from (s_sent, s_recv, s_retx, s_pto, s_drop)

    def _registry_families(self) -> Iterable[Metric]:
        registry = self.daemon.registry
        yield GaugeMetricFamily(
            "ostp_client_connections", "Live connections", value=len(registry.live)
        )
        yield CounterMetricFamily(
            "ostp_client_connections_closed", "Connections ended", value=registry.closed_total
        )

    def _routing_families(self) -> Iterable[Metric]:
        router = self.daemon.router
        rules = self.daemon.config.routing.rules
        hits = CounterMetricFamily(
            "ostp_client_rule_hits",
            "Connections routed by a rule (rule=default: no rule matched)",
            labels=["rule", "outbound"],
        )
        for index, count in enumerate(list(router.rule_hits)):
            outbound = rules[index].outbound if index < len(rules) else ""
            hits.add_metric([str(index), outbound], count)
        hits.add_metric(["default", router.default_outbound], router.default_hits)
        yield hits

    def _inbound_families(self) -> Iterable[Metric]:
        families: dict[str, CounterMetricFamily] = {}

        def add(key: str, tag: str, value: int) -> None:
            name, help_text = _INBOUND_COUNTERS[key]
            family = families.get(name)
            if family is None:
                family = families[name] = CounterMetricFamily(name, help_text, labels=["inbound"])
            family.add_metric([tag], value)

        for tag, inbound in list(self.daemon.inbounds.items()):
            try:
                report = inbound.status()
            except Exception:  # one broken status() must not fail the scrape
                logger.debug("status() of inbound %s failed", tag, exc_info=True)
                continue
            if report.accepted is not None:
                add("accepted", tag, report.accepted)
            for key, value in report.counters.items():
                if key in _INBOUND_COUNTERS:
                    add(key, tag, value)
        yield from families.values()


def build_registry(daemon: RunningDaemon) -> tuple[CollectorRegistry, ClientCollector]:
    """A registry with the daemon's collector, the process' own metrics and a build info."""
    from ostp_client import __version__  # noqa: PLC0415

    registry = CollectorRegistry(auto_describe=False)
    collector = ClientCollector(daemon)
    registry.register(collector)
    ProcessCollector(namespace="ostp_client", registry=registry)
    info = GaugeMetricFamily("ostp_client_build_info", "Version of the daemon", labels=["version"])
    info.add_metric([__version__], 1)
    registry.register(_Constant([info]))
    return registry, collector


class _Constant(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


# --------------------------------------------------------------------------------------------
# the HTTP endpoint


def _response(status: str, content_type: str, body: bytes, head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body


def render(registry: CollectorRegistry, request_head: bytes) -> bytes:
    """The whole HTTP response to one request head (`GET /metrics` and little else)."""
    lines = request_head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response("400 Bad Request", "text/plain", b"bad request\n")
    method, target, _version = parts
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", "text/plain", b"GET /metrics\n")
    path = target.split("?", 1)[0]
    if path == "/":
        body = b"ostp-client metrics: GET /metrics\n"
        return _response("200 OK", "text/plain", body, method == "HEAD")
    if path != "/metrics":
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
                    chunk = await stream.receive(4096)
                    head += chunk
                    if len(head) > MAX_REQUEST_HEAD:
                        await stream.send(
                            _response("431 Request Header Fields Too Large", "text/plain", b"")
                        )
                        return
                response = render(registry, head.split(b"\r\n\r\n", 1)[0])
                await stream.send(response)
        except (TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError, OSError) as exc:
            logger.debug("metrics scraper dropped: %r", exc)
        except Exception:  # a failing collector answers 500, never ends the daemon
            logger.exception("metrics: rendering failed")
            with anyio.move_on_after(1):
                await stream.send(_response("500 Internal Server Error", "text/plain", b""))


async def serve_metrics(
    daemon: RunningDaemon,
    config: MetricsConfig,
    *,
    task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `GET /metrics` on `config.listen` until cancelled (raises OSError if it cannot
    bind, before `task_status.started`)."""
    registry, collector = build_registry(daemon)
    host, port = config.address
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot serve metrics on tcp {config.listen}: {exc.strerror}"
        ) from None
    bound = listener.listeners[0].extra(anyio.abc.SocketAttribute.local_address)  # noqa: S610
    where = (str(bound[0]), int(bound[1]))
    shown = f"[{where[0]}]" if ":" in where[0] else where[0]
    logger.info("metrics on http://%s:%d/metrics", shown, where[1])
    limit = anyio.Semaphore(MAX_SCRAPERS)
    async with listener, anyio.create_task_group() as tg:
        task_status.started(where)

        async def sampler() -> None:
            while True:
                collector.sample(time.monotonic())
                await anyio.sleep(SAMPLE_INTERVAL)

        async def accept_loop(sock: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
            assert isinstance(sock, anyio.abc.SocketListener)
            while True:
                try:
                    stream = await sock.accept()
                except OSError as exc:  # e.g. out of file descriptors: wait, never give up
                    logger.warning("metrics: accept failed: %s", exc)
                    await anyio.sleep(0.5)
                    continue
                tg.start_soon(_serve_scraper, stream, registry, limit)

        tg.start_soon(sampler)
        for sock in listener.listeners:
            tg.start_soon(accept_loop, sock)
