"""The `ostp` outbound's status: a typed report, plain data (JSON-able) all the way down."""

from __future__ import annotations

import dataclasses
import json

from ostp_client.outbounds.ostp import OstpOutbound, OstpReport, SessionState, SessionStatus
from tests.proto.harness import KEY


def test_status_is_typed_and_serialises_and_formats_an_ipv6_server() -> None:
    outbound = OstpOutbound("proxy", server=("2001:db8::1", 9000), access_key=KEY, sessions=2)
    status = outbound.status()
    assert isinstance(status, OstpReport)
    assert status.server == "[2001:db8::1]:9000"  # host:port formatted by ostp_proto.address
    assert status.state == "idle"
    assert [s.index for s in status.sessions] == [0, 1]
    wire = json.loads(json.dumps(dataclasses.asdict(status)))  # plain data all the way down
    assert wire["state"] == "idle"
    assert set(wire["sessions"][0]) == set(SessionStatus.__dataclass_fields__)
    snapshot = outbound.sessions[0].snapshot()
    assert snapshot.state is SessionState.IDLE
    assert snapshot.session_id is None and snapshot.rtt_ms is None
    assert snapshot == status.sessions[0]
