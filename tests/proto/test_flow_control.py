"""ostp-py's flow-control extension between two cores, and its invisibility to upstream peers.

A client and a server core run against each other with a virtual clock (tests/proto/harness).
"Upstream" peers are played by cores with ``extensions=False``: they behave exactly as the
upstream implementation does towards the extension (a hello is a KeepAlive to them, they never
send one), so anything they receive must decode as one of upstream's ten messages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostp_proto import (
    EXT_FLOW_CONTROL,
    MIN_STREAM_WINDOW,
    Close,
    Connect,
    Connection,
    ConnectionConfig,
    ExtensionHello,
    ExtensionsNegotiated,
    KeepAlive,
    LocalProtocolError,
    PaddingPolicy,
    RelayMessage,
    RelayMessageReceived,
    RemoteProtocolError,
    WindowUpdate,
    decode_relay,
    encode_extension_hello,
    encode_relay,
    parse_extension_hello,
)
from ostp_proto.arq import Frame
from ostp_proto.connection import SERVER_DEFAULTS, ServerConnection
from ostp_proto.frames import FRAME_HEADER_LEN
from ostp_proto.relay import SUPPORTED_EXTENSIONS

from .harness import Faults, Pair

MB = 1024 * 1024
CLIENT = ConnectionConfig(padding=PaddingPolicy.none())
UPSTREAM_CLIENT = dataclasses.replace(CLIENT, extensions=False)
UPSTREAM_SERVER = dataclasses.replace(SERVER_DEFAULTS, extensions=False)
UPSTREAM_TAGS = set(range(1, 11))


def _payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def tap(conn: Connection) -> list[tuple[int, bytes]]:
    """Record every relay payload ``conn`` receives (in order, after the ARQ)."""
    seen: list[tuple[int, bytes]] = []
    deliver = conn._deliver

    def spy(frames: list[Frame], now: float) -> None:
        seen.extend(
            (stream_id, plain[FRAME_HEADER_LEN:end]) for _kind, stream_id, plain, end in frames
        )
        deliver(frames, now)

    conn._deliver = spy  # type: ignore[method-assign]
    return seen


def _server(pair: Pair) -> ServerConnection:
    assert pair.server is not None
    return pair.server


def _negotiated(pair: Pair) -> None:
    pair.run_until(
        lambda: (
            pair.server is not None
            and any(isinstance(e, ExtensionsNegotiated) for e in pair.cpeer.events)
        ),
        10.0,
    )


def _opened(pair: Pair) -> set[int]:
    return {
        e.stream_id
        for e in pair.speer.events
        if isinstance(e, RelayMessageReceived) and isinstance(e.message, Connect)
    }


def _open(pair: Pair, *streams: int) -> None:
    for stream_id in streams:
        pair.client.send(stream_id, Connect(f"127.0.0.1:{1000 + stream_id}"))
    pair.run_until(
        lambda: pair.server is not None and set(streams) <= _opened(pair), pair.now + 10.0
    )


class Pump:
    """Send ``down`` server→client and ``up`` client→server per stream, as the shells do:
    a stream queues more only while it is :meth:`~Connection.stream_writable`."""

    def __init__(
        self,
        pair: Pair,
        down: dict[int, bytes],
        up: dict[int, bytes] | None = None,
        *,
        chunk: int = 65536,
    ) -> None:
        self.pair = pair
        self.down = down
        self.up = up or {}
        self.chunk = chunk
        self.sent_down = dict.fromkeys(self.down, 0)
        self.sent_up = dict.fromkeys(self.up, 0)

    def feed(self) -> None:
        pair, chunk = self.pair, self.chunk
        server = _server(pair)
        for stream_id, body in self.down.items():
            offset = self.sent_down[stream_id]
            while offset < len(body) and server.stream_writable(stream_id):
                server.send_data(stream_id, body[offset : offset + chunk])
                offset = self.sent_down[stream_id] = offset + chunk
        for stream_id, body in self.up.items():
            offset = self.sent_up[stream_id]
            while offset < len(body) and pair.client.stream_writable(stream_id):
                pair.client.send_data(stream_id, body[offset : offset + chunk])
                offset = self.sent_up[stream_id] = offset + chunk

    def complete(self) -> bool:
        pair = self.pair
        return all(len(pair.cpeer.received[s]) >= len(b) for s, b in self.down.items()) and all(
            len(pair.speer.received[s]) >= len(b) for s, b in self.up.items()
        )

    def run(
        self,
        *,
        limit: float = 600.0,
        done: Callable[[], bool] | None = None,
        check: Callable[[], None] | None = None,
    ) -> None:
        pair = self.pair

        def finished() -> bool:
            self.feed()
            if check is not None:
                check()
            if pair.cpeer.terminated or pair.speer.terminated:
                return True
            return done() if done is not None else self.complete()

        pair.run_until(finished, pair.now + limit)


def _pump(
    pair: Pair,
    down: dict[int, bytes],
    up: dict[int, bytes] | None = None,
    *,
    limit: float = 600.0,
    done: Callable[[], bool] | None = None,
    check: Callable[[], None] | None = None,
) -> Pump:
    pump = Pump(pair, down, up)
    pump.run(limit=limit, done=done, check=check)
    return pump


def _credit_invariants(conn: Connection) -> None:
    for flow in conn._flows.values():
        assert flow.received <= flow.granted
        assert flow.received - flow.consumed <= flow.window
        assert flow.sent <= flow.limit


# -------------------------------------------------------------------------------- negotiation


def test_two_ostp_py_peers_negotiate_flow_control() -> None:
    pair = Pair(client_config=CLIENT)
    pair.handshake()
    assert pair.client._fc == 1  # offered; the answer is one round trip away
    _negotiated(pair)
    server = _server(pair)
    assert pair.client.flow_control and server.flow_control
    assert pair.client.peer_extensions == ExtensionHello(1, SUPPORTED_EXTENSIONS, 256 * 1024)
    assert server.peer_extensions == ExtensionHello(1, SUPPORTED_EXTENSIONS, 256 * 1024)
    [event] = [e for e in pair.speer.events if isinstance(e, ExtensionsNegotiated)]
    assert event == ExtensionsNegotiated(SUPPORTED_EXTENSIONS, 256 * 1024)


def test_windows_announced_in_the_hello_are_the_initial_credit() -> None:
    client_cfg = dataclasses.replace(CLIENT, stream_window=100_000)
    server_cfg = dataclasses.replace(SERVER_DEFAULTS, stream_window=300_000)
    pair = Pair(client_config=client_cfg, server_config=server_cfg)
    _negotiated(pair)
    _open(pair, 1)
    server = _server(pair)
    assert server._flows[1].limit == 100_000 and server._flows[1].granted == 300_000
    assert pair.client._flows[1].limit == 300_000 and pair.client._flows[1].granted == 100_000


def test_upstream_like_server_never_receives_an_unknown_tag() -> None:
    pair = Pair(client_config=CLIENT, server_config=UPSTREAM_SERVER)
    pair.handshake()
    seen_by_server = tap(_server(pair))
    seen_by_client = tap(pair.client)
    _open(pair, 1, 2)
    up, down = _payload(3 * MB, 1), _payload(3 * MB, 2)
    _pump(pair, {1: down, 2: down}, {1: up})
    server = _server(pair)
    assert bytes(pair.cpeer.received[1]) == down and bytes(pair.cpeer.received[2]) == down
    assert bytes(pair.speer.received[1]) == up
    assert not pair.client.flow_control and pair.client.peer_extensions is None
    assert not server.flow_control and server.peer_extensions is None
    assert not pair.client._flows  # the Pong ended the offer: no state kept
    assert server.stats.relay_decode_drop == 0
    assert {p[0] for _, p in seen_by_server} <= UPSTREAM_TAGS
    # nothing the upstream-like server sends carries a trailer either
    assert all(p == b"\x03" for _, p in seen_by_client if p[0] == 3)
    assert pair.client.stats.window_updates_sent == 0


def test_upstream_like_client_never_gets_a_trailer() -> None:
    pair = Pair(client_config=UPSTREAM_CLIENT)
    pair.handshake()
    seen_by_client = tap(pair.client)
    seen_by_server = tap(_server(pair))
    _open(pair, 1)
    down = _payload(2 * MB, 3)
    _pump(pair, {1: down}, {1: down})
    server = _server(pair)
    assert bytes(pair.cpeer.received[1]) == down and bytes(pair.speer.received[1]) == down
    assert not server.flow_control and not server._flows
    assert pair.client.stats.relay_decode_drop == 0
    assert {p[0] for _, p in seen_by_client} <= UPSTREAM_TAGS
    assert all(p == b"\x03" for _, p in seen_by_client if p[0] == 3)
    assert all(len(p) == 1 for _, p in seen_by_server if p[0] == 3)  # no hello sent


def test_a_hello_after_a_stream_was_opened_is_a_plain_keepalive() -> None:
    pair = Pair(client_config=UPSTREAM_CLIENT)
    pair.handshake()
    _open(pair, 1)
    hello = ExtensionHello(1, EXT_FLOW_CONTROL, MIN_STREAM_WINDOW)
    pair.client._enqueue(0, encode_extension_hello(hello))
    seen = tap(pair.client)
    pair.run_until(lambda: False, pair.now + 1.0)
    assert not _server(pair).flow_control
    assert all(len(p) == 1 for _, p in seen if p[0] == 3)  # no answer


def test_window_update_on_a_session_without_the_extension_is_an_unknown_tag() -> None:
    pair = Pair(client_config=UPSTREAM_CLIENT)
    pair.handshake()
    _open(pair, 1)
    pair.client._enqueue(1, encode_relay(WindowUpdate(1 << 20)))
    pair.run_until(lambda: _server(pair).stats.relay_decode_drop > 0, pair.now + 2.0)
    assert _server(pair).stats.relay_decode_drop == 1  # as upstream: dropped, nothing else


# ----------------------------------------------------------------------------- the trailer


def test_hello_round_trip_and_strict_parse() -> None:
    hello = ExtensionHello(1, EXT_FLOW_CONTROL, 1 << 20)
    encoded = encode_extension_hello(hello)
    assert decode_relay(encoded) == KeepAlive()  # upstream's decoder: a plain KeepAlive
    assert parse_extension_hello(encoded) == hello
    assert parse_extension_hello(encoded + b"later fields") == hello
    assert parse_extension_hello(encoded[:-1]) is None  # short
    assert parse_extension_hello(b"\x03") is None
    assert parse_extension_hello(b"\x03OSTPY" + encoded[6:]) is None  # magic
    assert parse_extension_hello(b"\x07" + encoded[1:]) is None  # not a KeepAlive
    assert parse_extension_hello(encoded[:6] + b"\x00" + encoded[7:]) is None  # version 0
    small = encode_extension_hello(ExtensionHello(1, 1, MIN_STREAM_WINDOW - 1))
    assert parse_extension_hello(small) is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40))
def test_hello_parse_of_arbitrary_trailers(trailer: bytes) -> None:
    payload = b"\x03" + trailer
    assert decode_relay(payload) == KeepAlive()
    hello = parse_extension_hello(payload)
    if hello is not None:
        assert trailer.startswith(b"OSTPX") and hello.version >= 1
        assert hello.stream_window >= MIN_STREAM_WINDOW
        assert payload.startswith(encode_extension_hello(hello))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.binary(max_size=10))
def test_window_update_codec(offset: int, trailing: bytes) -> None:
    encoded = encode_relay(WindowUpdate(offset))
    assert encoded[:3] == b"\x40\x00\x08" and len(encoded) == 11
    assert decode_relay(encoded + trailing) == WindowUpdate(offset)
    with pytest.raises(RemoteProtocolError):
        decode_relay(encoded[:-1])
    with pytest.raises(RemoteProtocolError):
        decode_relay(b"\x40\x00\x07" + encoded[3:10])


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=30))
def test_garbage_trailers_on_the_wire_change_nothing(trailer: bytes) -> None:
    """A KeepAlive with any trailer that is not a valid hello: a plain KeepAlive."""
    pair = Pair(client_config=UPSTREAM_CLIENT)
    pair.handshake()
    payload = b"\x03" + trailer
    pair.client._enqueue(0, payload)
    pair.run_until(lambda: False, pair.now + 0.5)
    server = _server(pair)
    assert server.flow_control == (parse_extension_hello(payload) is not None)
    assert server.stats.relay_decode_drop == 0
    assert not [e for e in pair.speer.events if hasattr(e, "message")]  # nothing surfaced


def test_config_rejects_windows_below_the_minimum() -> None:
    with pytest.raises(LocalProtocolError):
        ConnectionConfig(stream_window=MIN_STREAM_WINDOW - 1)
    with pytest.raises(LocalProtocolError):
        ConnectionConfig(stream_window=1 << 20, max_stream_window=1 << 19)


# ---------------------------------------------------------------------------------- credit


def test_a_reader_that_consumes_nothing_never_blocks_another_stream() -> None:
    pair = Pair(client_config=CLIENT, consume=False)
    _negotiated(pair)
    _open(pair, 1, 2)
    body = _payload(8 * MB, 4)
    consumed = {2: 0}

    def consume_stream_2() -> None:
        got = len(pair.cpeer.received[2])
        if got > consumed[2]:
            pair.client.stream_consumed(2, got - consumed[2])
            consumed[2] = got
        _credit_invariants(pair.client)
        _credit_invariants(_server(pair))

    pump = _pump(
        pair,
        {1: body, 2: body},
        check=consume_stream_2,
        done=lambda: len(pair.cpeer.received[2]) >= len(body),
    )
    server = _server(pair)
    assert bytes(pair.cpeer.received[2]) == body
    # stream 1 got exactly its initial window and waits; its queue is bounded and parked
    assert len(pair.cpeer.received[1]) == CLIENT.stream_window
    assert 1 in server._blocked and 1 not in server._rr
    assert server.stream_send_buffered(1) <= SERVER_DEFAULTS.stream_send_limit + 65536
    assert not server.stream_writable(1) and server.writable
    assert pair.client.stats.flow_violation == 0
    # the reader comes back: stream 1 completes byte-exact
    pair.consume = True
    pair.client.stream_consumed(1, len(pair.cpeer.received[1]))
    pump.run()
    assert bytes(pair.cpeer.received[1]) == body


def test_uploads_wait_for_the_servers_credit_too() -> None:
    pair = Pair(client_config=CLIENT, consume=False)
    _negotiated(pair)
    _open(pair, 1, 2)
    body = _payload(4 * MB, 5)
    server = _server(pair)
    consumed = {2: 0}

    def consume_stream_2() -> None:
        got = len(pair.speer.received[2])
        if got > consumed[2]:
            server.stream_consumed(2, got - consumed[2])
            consumed[2] = got
        _credit_invariants(pair.client)
        _credit_invariants(server)

    _pump(
        pair,
        {},
        {1: body, 2: body},
        check=consume_stream_2,
        done=lambda: len(pair.speer.received[2]) >= len(body),
    )
    assert bytes(pair.speer.received[2]) == body
    assert len(pair.speer.received[1]) == SERVER_DEFAULTS.stream_window
    assert server.stats.flow_violation == 0


def test_uploads_started_before_the_answer_stay_within_the_servers_credit() -> None:
    small = dataclasses.replace(SERVER_DEFAULTS, stream_window=MIN_STREAM_WINDOW)
    pair = Pair(client_config=CLIENT, server_config=small, latency=0.05)
    pair.handshake()
    assert pair.client._fc == 1  # offered, not answered yet
    _open(pair, 1)  # Connect and data leave before the answer arrives
    body = _payload(MB, 6)
    _pump(pair, {}, {1: body})
    assert bytes(pair.speer.received[1]) == body
    assert _server(pair).stats.flow_violation == 0


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3), st.floats(0.0, 1.0)), min_size=1, max_size=60),
    st.integers(0, 2**16),
)
def test_byte_exact_with_random_consumption_schedules(
    schedule: list[tuple[int, float]], seed: int
) -> None:
    loss = Faults(loss=0.02, reorder=0.05)
    pair = Pair(client_config=CLIENT, consume=False, seed=seed, s2c=loss, c2s=loss)
    _negotiated(pair)
    _open(pair, 1, 2, 3)
    bodies = {s: _payload(700_000 + s * 50_000, seed + s) for s in (1, 2, 3)}
    consumed = dict.fromkeys(bodies, 0)
    step = {"i": 0}

    def consume() -> None:
        stream_id, fraction = schedule[step["i"] % len(schedule)]
        step["i"] += 1
        todo = {stream_id: fraction}
        if step["i"] > 20 * len(schedule):
            todo = dict.fromkeys(bodies, 1.0)  # eventually every reader catches up
        for s, f in todo.items():
            n = int((len(pair.cpeer.received[s]) - consumed[s]) * f)
            if n:
                pair.client.stream_consumed(s, n)
                consumed[s] += n
        _credit_invariants(pair.client)
        _credit_invariants(_server(pair))

    _pump(pair, bodies, check=consume, limit=2000.0)
    for stream_id, body in bodies.items():
        got = bytes(pair.cpeer.received[stream_id])
        assert (
            len(got) == len(body) and hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
        )
    assert pair.client.stats.flow_violation == 0


# ------------------------------------------------------------------- window auto-tuning


def _virtual_time_of_download(latency: float, extensions: bool, size: int) -> float:
    config = dataclasses.replace(CLIENT, extensions=extensions)
    pair = Pair(client_config=config, latency=latency)
    pair.handshake()
    pair.run_until(lambda: False, pair.now + 4 * latency)  # the answer (or the Pong)
    _open(pair, 1)
    start = pair.now
    _pump(pair, {1: _payload(size, 7)})
    assert len(pair.cpeer.received[1]) == size
    assert pair.client.flow_control == extensions
    if extensions:
        window = pair.client.stream_receive_window(1)
        assert window is not None and window > CLIENT.stream_window  # it grew
    return pair.now - start


@pytest.mark.parametrize("latency", [0.0005, 0.05])
def test_a_fast_stream_is_not_slowed_by_its_window(latency: float) -> None:
    """Virtual time of a 10 MB download (loopback-like and a 100 ms round trip), with and
    without flow control: the growing window must not make it much slower."""
    with_fc = _virtual_time_of_download(latency, True, 10 * MB)
    without = _virtual_time_of_download(latency, False, 10 * MB)
    assert with_fc <= without * 1.25 + 0.05, (with_fc, without)


def test_a_slow_reader_keeps_its_initial_window() -> None:
    pair = Pair(client_config=CLIENT, consume=False)
    _negotiated(pair)
    _open(pair, 1)
    body = _payload(2 * MB, 8)
    consumed = [0]
    last = [pair.now]

    def trickle() -> None:  # 64 KB per 100 ms of virtual time
        if pair.now - last[0] >= 0.1:
            last[0] = pair.now
            n = min(65536, len(pair.cpeer.received[1]) - consumed[0])
            pair.client.stream_consumed(1, n)
            consumed[0] += n

    _pump(pair, {1: body}, check=trickle)
    assert bytes(pair.cpeer.received[1]) == body
    assert pair.client.stream_receive_window(1) == CLIENT.stream_window


# ----------------------------------------------------------------- state and violations


def test_state_of_1000_streams_is_freed_when_they_close() -> None:
    pair = Pair(client_config=CLIENT)
    _negotiated(pair)
    streams = list(range(1, 1001))
    _open(pair, *streams)
    small = {s: _payload(3000, s) for s in streams}
    _pump(pair, small, small)
    server = _server(pair)
    assert len(pair.client._flows) == len(server._flows) == 1000
    for s in streams[::2]:
        pair.client.send(s, Close())  # the client ends half of them ...
    for s in streams[1::2]:
        server.send(s, Close())  # ... the server the other half
    pair.run_until(lambda: not pair.client._flows and not server._flows, pair.now + 5.0)
    for conn in (pair.client, server):
        assert not conn._flows and not conn._blocked and not conn._grants_due
        assert not (set(conn._queues) - {0}) and conn._blocked_bytes == 0


def test_a_stream_closed_while_waiting_for_credit_frees_its_queue() -> None:
    pair = Pair(client_config=CLIENT, consume=False)
    _negotiated(pair)
    _open(pair, 1)
    server = _server(pair)
    _pump(pair, {1: _payload(2 * MB, 9)}, done=lambda: 1 in server._blocked)
    assert server.stream_send_buffered(1) > 0
    pair.client.send(1, Close())
    pair.run_until(lambda: not server._flows, pair.now + 2.0)
    assert not server._queues and server.send_buffer_bytes == 0 and server._blocked_bytes == 0


def test_a_peer_that_exceeds_its_credit_is_counted_and_nothing_is_lost() -> None:
    pair = Pair(client_config=CLIENT, consume=False)
    _negotiated(pair)
    _open(pair, 1)
    server = _server(pair)
    server._flows[1].limit = 1 << 60  # a buggy peer that ignores the client's credit
    body = _payload(2 * MB, 10)
    _pump(pair, {1: body})
    assert bytes(pair.cpeer.received[1]) == body  # accepted: the ARQ already acknowledged it
    assert pair.client.stats.flow_violation > 0
    # the credit is absolute: once the reader catches up, grants are normal again
    pair.client.stream_consumed(1, len(body))
    pair.run_until(lambda: False, pair.now + 1.0)
    flow = pair.client._flows[1]
    assert flow.granted == flow.consumed + flow.window


def test_only_relay_messages_upstream_knows_reach_the_owner() -> None:
    """WindowUpdates and hellos are handled by the cores, never surfaced as events."""
    pair = Pair(client_config=CLIENT)
    _negotiated(pair)
    _open(pair, 1)
    body = _payload(3 * MB, 11)
    _pump(pair, {1: body}, {1: body})
    assert pair.client.stats.window_updates_sent > 0
    assert _server(pair).stats.window_updates_received > 0
    messages: list[RelayMessage] = [
        e.message for e in pair.cpeer.events + pair.speer.events if hasattr(e, "message")
    ]
    assert not any(isinstance(m, (WindowUpdate, KeepAlive)) for m in messages)
