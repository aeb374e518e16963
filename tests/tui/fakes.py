"""Deterministic data for the dashboard: a fake control link and fixed protocol messages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ostp_client.control.protocol import (
    ActionResult,
    ConnectionInfo,
    ConnectionList,
    DaemonStatus,
    Event,
    Hello,
    InboundStatus,
    LogBatch,
    LogLine,
    OutboundStatus,
    RouteRule,
    RouteTable,
    SessionStatus,
    SubscribeResult,
)
from ostp_tui.source import Connector, DaemonLink

T0 = 1_790_000_000.0
RATES = [0, 40_000, 350_000, 1_200_000, 2_600_000, 2_100_000, 2_900_000, 3_300_000, 1_800_000]


def status(step: int) -> DaemonStatus:
    down = float(RATES[step % len(RATES)])
    up = down / 12
    ostp = OutboundStatus(
        id="proxy",
        type="ostp",
        state="connected",
        server="vpn.example.net:8443",
        rtt_ms=23.4,
        bytes_up=9_871_234,
        bytes_down=312_456_789,
        rate_up=up,
        rate_down=down,
        uptime=3725.0,
        reconnects=2,
        mapped_address="198.51.100.7:40123",
        can_reconnect=True,
        connections=3,
        transport="auto",
        sessions=[
            SessionStatus(
                id="0", state="connected", transport="tcp", rtt_ms=23.4, uptime=3725.0, reconnects=1
            ),
            SessionStatus(id="1", state="connecting", transport="udp", reconnects=1),
        ],
    )
    direct = OutboundStatus(
        id="direct",
        type="direct",
        state="ready",
        rate_down=down / 4,
        rate_up=down / 40,
        bytes_down=1_234_567,
        connections=1,
    )
    block = OutboundStatus(id="block", type="block", state="ready")
    return DaemonStatus(
        state="running",
        version="0.1.0",
        pid=4242,
        uptime=3731.0,
        config_path="/etc/ostp/config.json",
        inbounds=[InboundStatus(tag="proxy-in", type="local_proxy", listen=["127.0.0.1:1080"])],
        outbounds=[ostp, direct, block],
        connections_live=4,
        connections_closed=117,
        time=T0,
    )


CONNECTIONS = ConnectionList(
    time=T0,
    connections=[
        ConnectionInfo(
            id=7,
            inbound="proxy-in",
            destination="github.com:443",
            rule=1,
            outbound="proxy",
            bytes_up=12_345,
            bytes_down=2_345_678,
            started_at=T0 - 75,
        ),
        ConnectionInfo(
            id=12,
            inbound="proxy-in",
            destination="192.168.1.10:22",
            rule=0,
            outbound="direct",
            bytes_up=3_400,
            bytes_down=81_000,
            started_at=T0 - 610,
        ),
        ConnectionInfo(
            id=15,
            inbound="proxy-in",
            destination="example.org:80",
            rule=None,
            outbound="proxy",
            bytes_up=420,
            bytes_down=1_048_576,
            started_at=T0 - 4,
        ),
        ConnectionInfo(
            id=16,
            inbound="proxy-in",
            network="udp",
            destination="1.1.1.1:53",
            rule=None,
            outbound="proxy",
            bytes_up=96,
            bytes_down=256,
            started_at=T0 - 1,
        ),
    ],
)

ROUTES = RouteTable(
    default_outbound="proxy",
    rules=[
        RouteRule(index=0, match="ip_cidr=192.168.0.0/16,10.0.0.0/8", outbound="direct", hits=41),
        RouteRule(index=1, match="domain_suffix=github.com", outbound="proxy", hits=9),
        RouteRule(index=2, match="domain_keyword=ads", outbound="block", hits=3),
        RouteRule(index=None, match="(default)", outbound="proxy", hits=64),
    ],
)

LOGS = LogBatch(
    lines=[
        LogLine(
            seq=1,
            time=T0 - 3700,
            level="info",
            logger="ostp_client.daemon",
            message="ostp-client running: 1 inbound(s), 3 outbound(s), 3 rule(s)",
        ),
        LogLine(
            seq=2,
            time=T0 - 3690,
            level="debug",
            logger="ostp_client.connections",
            message="#1 tcp 127.0.0.1:50122 -> github.com:443 via proxy (rule 1)",
        ),
        LogLine(
            seq=3,
            time=T0 - 600,
            level="warning",
            logger="ostp_client.outbounds.ostp",
            message="session 1: no answer to keepalive, reconnecting",
        ),
        LogLine(
            seq=4,
            time=T0 - 590,
            level="info",
            logger="ostp_client.outbounds.ostp",
            message="outbound proxy: connected",
        ),
        LogLine(
            seq=5,
            time=T0 - 2,
            level="error",
            logger="ostp_client.inbounds.local_proxy",
            message="#14 proxy handler failed: upstream refused",
        ),
    ]
)


class FakeLink:
    """Plays a fixed script of events, then idles; records the actions it is asked for."""

    def __init__(self, steps: int = len(RATES)) -> None:
        self.hello = Hello(version="0.1.0", pid=4242)
        self.subscriptions: list[tuple[str, dict[str, Any]]] = []
        self.reconnects: list[str] = []
        self.closed: list[int] = []
        self.steps = steps
        self.closed_link = False

    async def subscribe(self, topic: str, **params: Any) -> SubscribeResult:
        self.subscriptions.append((topic, params))
        return SubscribeResult(subscription=len(self.subscriptions), topic=topic)  # type: ignore[arg-type]

    async def events(self) -> AsyncIterator[Event]:
        for step in range(self.steps):
            yield Event(subscription=1, topic="status", data=status(step).model_dump())
        yield Event(subscription=2, topic="connections", data=CONNECTIONS.model_dump())
        yield Event(subscription=3, topic="routes", data=ROUTES.model_dump())
        yield Event(subscription=4, topic="logs", data=LOGS.model_dump())
        await asyncio.Event().wait()

    async def select(self, group: str, outbound: str) -> ActionResult:
        return ActionResult(message=f"{group}: {outbound} selected")

    async def reconnect(self, outbound: str) -> ActionResult:
        self.reconnects.append(outbound)
        return ActionResult(message=f"reconnecting {outbound}")

    async def close_connection(self, conn_id: int) -> ActionResult:
        self.closed.append(conn_id)
        return ActionResult(message=f"closed #{conn_id}")

    async def aclose(self) -> None:
        self.closed_link = True


def fake_connector(link: FakeLink) -> Connector:
    async def connect() -> DaemonLink:
        return link

    return connect


def offline_connector(path: str) -> Connector:
    async def connect() -> DaemonLink:
        raise ConnectionRefusedError(f"cannot connect to {path}: [Errno 2] No such file")

    return connect
