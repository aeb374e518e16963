"""The `ostp` outbound's status: typed per session, the same JSON keys as before."""

from __future__ import annotations

import json

from ostp_client.outbounds.ostp import OstpOutbound, SessionState, SessionStatus
from tests.proto.harness import KEY


def test_status_keys_values_and_ipv6_server() -> None:
    outbound = OstpOutbound("proxy", server=("2001:db8::1", 9000), access_key=KEY, sessions=2)
    status = outbound.status()
    assert status["server"] == "[2001:db8::1]:9000"  # host:port formatted by ostp_proto.address
    assert status["state"] == "idle"
    wire = json.loads(json.dumps(status))  # what the control socket sends
    assert wire["state"] == "idle"
    assert [s["index"] for s in wire["sessions"]] == [0, 1]
    assert set(wire["sessions"][0]) == set(SessionStatus.__dataclass_fields__)
    snapshot = outbound.sessions[0].snapshot()
    assert snapshot.state is SessionState.IDLE
    assert snapshot.session_id is None and snapshot.rtt_ms is None
    assert snapshot.as_dict() == status["sessions"][0]
