"""``ConnectionTerminated.cause``: code acts on the enum, people read ``reason``."""

from __future__ import annotations

from ostp_proto import ClientConnection, ConnectionConfig, ConnectionTerminated, Termination

from .harness import KEY, UNIX_EPOCH, Pair


def _terminated(conn: ClientConnection) -> list[ConnectionTerminated]:
    events = []
    while (event := conn.next_event()) is not None:
        if isinstance(event, ConnectionTerminated):
            events.append(event)
    return events


def test_an_unanswered_handshake_ends_with_handshake_timed_out() -> None:
    conn = ClientConnection(access_key=KEY, config=ConnectionConfig())
    conn.connect(0.0, UNIX_EPOCH)
    now = 0.0
    for _ in range(1000):
        conn.datagrams_to_send(now)  # sent into the void
        timer = conn.get_timer()
        if timer is None:
            break
        now = timer
        conn.handle_timer(now)
    [event] = _terminated(conn)
    assert event.cause is Termination.HANDSHAKE_TIMED_OUT
    assert event.reason.startswith("handshake timed out")


def test_close_and_idle_timeout_have_their_causes() -> None:
    pair = Pair()
    pair.handshake()
    pair.client.close(pair.now)
    assert [e.cause for e in _terminated(pair.client)] == [Termination.CLOSED_LOCALLY]
    pair.run_until(lambda: pair.speer.terminated is not None, pair.now + 5.0)
    assert pair.speer.terminated == "closed by peer"
    server_events = [e for e in pair.speer.events if isinstance(e, ConnectionTerminated)]
    assert [e.cause for e in server_events] == [Termination.CLOSED_BY_PEER]

    idle = Pair(client_config=ConnectionConfig(keepalive_interval=None, idle_timeout=2.0))
    idle.handshake()
    idle.s2c.blackhole = True  # the server goes silent
    idle.run_until(lambda: idle.cpeer.terminated is not None, idle.now + 30.0)
    causes = [e.cause for e in idle.cpeer.events if isinstance(e, ConnectionTerminated)]
    assert causes == [Termination.IDLE_TIMEOUT]
