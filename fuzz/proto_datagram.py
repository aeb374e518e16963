"""Fuzz target: arbitrary datagrams into established OSTP connections, the acceptor and decoders.

atheris-compatible (``atheris.Setup(sys.argv, test_one_input); atheris.Fuzz()``); the hypothesis
tests in ``tests/proto/test_fuzz.py`` call it too. The input is a list of records
``op:u8 | len:u16 | body``; by ``op % 7`` a body is fed

* 0, 1: as a raw datagram to the established client / server;
* 2: to the acceptor, to a client still handshaking and to every decoder;
* 3, 4: as frame plaintext sealed with the real keys (so it passes the AEAD) to the client /
  server, at a nonce chosen by ``op >> 3`` around the receiver's next expected one;
* 5: as a well-formed frame (kind, stream id from the body, the rest as payload), sealed;
* 6: advance the clock by ``body[0]`` ms, run the timers and exchange whatever both sides send.

The pair has negotiated ostp-py's flow-control extension and opened stream 1, so WindowUpdates
and hellos in the input reach real per-stream state.

Only documented behaviour is allowed: connections and the acceptor never raise; decoders raise
only RemoteProtocolError; unauthenticated bytes are dropped and counted, never delivered.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

from ostp_proto import (
    ClientConnection,
    Connect,
    Connection,
    ConnectionConfig,
    ConnectionTerminated,
    DataLost,
    ExtensionsNegotiated,
    HandshakeCompleted,
    PaddingPolicy,
    RelayMessageReceived,
    RemoteProtocolError,
    ServerAcceptor,
    ServerConnection,
    State,
    decode_relay,
    derive_secrets,
    parse_extension_hello,
)
from ostp_proto.arq import decode_ack, decode_nack
from ostp_proto.frames import decode_frame, encode_frame
from ostp_proto.obfuscation import (
    DataOpener,
    DataSealer,
    parse_handshake_datagram,
    unmask_data_header,
)

KEY = "fuzz-key-0123456789"
UNIX = 1_700_000_000.0
SESSION_ID = 0x0A0B0C0D
_SECRETS = derive_secrets(KEY)
_EVENTS = (
    HandshakeCompleted,
    RelayMessageReceived,
    DataLost,
    ExtensionsNegotiated,
    ConnectionTerminated,
)


def established_pair(
    *, busy: bool = True
) -> tuple[ClientConnection, ServerConnection, ServerAcceptor]:
    """A client and a server with a finished handshake (and, if ``busy``, data in flight)."""
    rnd = random.Random(0).randbytes
    config = ConnectionConfig(padding=PaddingPolicy.none())
    client = ClientConnection(
        access_key=KEY, session_id=SESSION_ID, config=config, random_bytes=rnd
    )
    client.connect(0.0, UNIX)
    acceptor = ServerAcceptor([KEY], random_bytes=rnd)
    [datagram1] = client.datagrams_to_send(0.0)
    server = acceptor.accept(datagram1, 0.0, UNIX)
    assert server is not None
    for d in server.datagrams_to_send(0.0):
        client.receive_datagram(d, 0.001)
    # the extension hello and its answer, then stream 1 opened: flow-control state exists
    for d in client.datagrams_to_send(0.001):
        server.receive_datagram(d, 0.0012)
    for d in server.datagrams_to_send(0.0012):
        client.receive_datagram(d, 0.0014)
    assert client.flow_control and server.flow_control
    client.send(1, Connect("127.0.0.1:1"))
    if not busy:
        for d in client.datagrams_to_send(0.001):
            server.receive_datagram(d, 0.002)
        for conn in (client, server):
            while conn.next_event() is not None:
                pass
        return client, server, acceptor
    client.send_data(1, b"u" * 5000)
    server.send_data(1, b"d" * 5000)
    up = client.datagrams_to_send(0.002)
    down = server.datagrams_to_send(0.002)
    for d in up[::2]:  # deliver half, so histories, ACK ranges and reorder buffers are busy
        server.receive_datagram(d, 0.003)
    for d in down[1::2]:
        client.receive_datagram(d, 0.003)
    for conn in (client, server):
        while conn.next_event() is not None:
            pass
    return client, server, acceptor


def _sealer(conn: Connection) -> DataSealer:
    sealer = conn._sealer  # the fuzzer plays the peer, so it borrows the peer's sealer
    assert sealer is not None
    return sealer


def _decoders(body: bytes) -> None:
    decoders: tuple[Callable[[bytes], object], ...] = (
        decode_relay,
        decode_frame,
        decode_ack,
        decode_nack,
    )
    for decode in decoders:
        with contextlib.suppress(RemoteProtocolError):
            decode(body)
    hello = parse_extension_hello(body)  # never raises: a hello or a plain KeepAlive
    assert hello is None or body[:6] == b"\x03OSTPX"
    with contextlib.suppress(RemoteProtocolError):
        parse_handshake_datagram(_SECRETS.obfuscation_key, body)
    if len(body) >= 12:
        unmask_data_header(_SECRETS.obfuscation_key, body)
    opener = DataOpener(_SECRETS.obfuscation_key, bytes(32), SESSION_ID)
    nonce = opener.unmask(body)
    if nonce is not None:
        opener.decrypt(nonce, body)


def _records(data: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    i = 0
    while i < len(data):
        op = data[i]
        length = int.from_bytes(data[i + 1 : i + 3].ljust(2, b"\0"), "big") % 1500
        out.append((op, data[i + 3 : i + 3 + length]))
        i += 3 + length
    return out


def _drain(conn: Connection) -> list[object]:
    events: list[object] = []
    while (ev := conn.next_event()) is not None:
        assert isinstance(ev, _EVENTS), ev
        events.append(ev)
    return events


def run(data: bytes) -> tuple[ClientConnection, ServerConnection, list[object], list[object]]:
    """Play ``data``; return both connections and the events each delivered."""
    client, server, acceptor = established_pair()
    client_events: list[object] = []
    server_events: list[object] = []
    sink = {id(client): client_events, id(server): server_events}
    handshaking = ClientConnection(access_key=KEY, random_bytes=random.Random(1).randbytes)
    handshaking.connect(0.0, UNIX)
    handshaking.datagrams_to_send(0.0)
    now = 0.01
    for op, body in _records(data):
        kind = op % 7
        if kind in (0, 1):
            conn: Connection = client if kind == 0 else server
            received = conn.stats.datagrams_received
            conn.receive_datagram(body, now)
            # unauthenticated bytes never count as received, let alone get delivered
            assert conn.stats.datagrams_received == received
            assert not any(isinstance(e, RelayMessageReceived) for e in _drain(conn))
            assert conn.next_event() is None
        elif kind == 2:
            assert acceptor.accept(body, now, UNIX) is None
            handshaking.receive_datagram(body, now)
            assert handshaking.state is State.HANDSHAKING
            _decoders(body)
        elif kind in (3, 4, 5):
            target: Connection = client if (kind == 3 or (kind == 5 and op & 8)) else server
            peer = server if target is client else client
            nonce = max(target.receiver.expected + (op >> 4) - 4, 0)
            if kind == 5:
                frame_kind = body[0] % 8 if body else 2
                stream_id = body[1] if len(body) > 1 else 0
                plaintext = encode_frame(frame_kind, stream_id, body[2:])
            else:
                plaintext = body
            target.receive_datagram(_sealer(peer).seal(nonce, plaintext), now)
            sink[id(target)].extend(_drain(target))
        else:
            now += (body[0] if body else 1) / 1000
            for conn in (client, server):
                timer = conn.get_timer()
                if timer is not None and timer <= now:
                    conn.handle_timer(now)
            for d in client.datagrams_to_send(now):
                server.receive_datagram(d, now)
            for d in server.datagrams_to_send(now):
                client.receive_datagram(d, now)
            client_events.extend(_drain(client))
            server_events.extend(_drain(server))
    for conn in (client, server, handshaking):
        conn.datagrams_to_send(now)
        timer = conn.get_timer()
        if timer is not None:
            conn.handle_timer(max(timer, now))
        conn.datagrams_to_send(max(timer or now, now))
        sink.get(id(conn), []).extend(_drain(conn))
    assert acceptor.stats.accepted == 1
    for conn in (client, server):  # the send queues' books balance, whatever came in
        queued = sum(q.size for q in conn._queues.values())
        assert queued == conn.send_buffer_bytes
        assert 0 <= conn._blocked_bytes <= conn.send_buffer_bytes
        assert conn._blocked <= set(conn._queues) and conn._blocked.isdisjoint(conn._rr)
    return client, server, client_events, server_events


def test_one_input(data: bytes) -> None:
    run(data)


if __name__ == "__main__":
    import importlib
    import sys

    atheris = importlib.import_module("atheris")  # optional, untyped

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
