"""NatMux / TurnClient / Binding state machines in memory, with a virtual clock and a scripted
TURN server made of the codec (timing rules that a real coturn cannot show quickly)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ostp_client.nat import (
    AllocationSucceeded,
    BindingFailed,
    BindingSucceeded,
    LocalNatError,
    NatConfig,
    NatEvent,
    NatMux,
    RelayReady,
    StunParseError,
    TurnClosed,
    TurnConfig,
    TurnFailed,
    TurnFailure,
    TurnRefreshed,
)
from ostp_client.nat.stun import (
    Attr,
    MessageClass,
    Method,
    StunMessage,
    decode_channel_data,
    decode_message,
    decode_u32,
    decode_xor_address,
    encode_channel_data,
    encode_error_code,
    encode_message,
    encode_u32,
    encode_xor_address,
    long_term_key,
)

SERVER = ("198.51.100.1", 3478)
CLIENT = ("192.0.2.10", 40000)  # our public mapping, as the server sees it
PEER = ("203.0.113.5", 9000)
RELAYED = ("198.51.100.1", 50000)
REALM = "test"
KEY = long_term_key("u", REALM, "p")


def counter_urandom() -> Callable[[int], bytes]:
    counter = itertools.count(1)
    return lambda n: next(counter).to_bytes(n, "big")


def make_mux(password: str = "p", *, refresh: tuple[float, float] = (240.0, 480.0)) -> NatMux:
    turn = TurnConfig(
        server=SERVER,
        username="u",
        password=password,
        permission_refresh=refresh[0],
        channel_refresh=refresh[1],
    )
    return NatMux(NatConfig(turn=turn), urandom=counter_urandom())


def events(mux: NatMux) -> list[NatEvent]:
    out = []
    while (event := mux.next_event()) is not None:
        out.append(event)
    return out


class FakeTurnServer:
    """Answers the TURN requests it is given, the way RFC 8656 describes (and coturn does)."""

    def __init__(self, lifetime: int = 600, refuse: int | None = None) -> None:
        self.nonce = b"nonce-1"
        self.lifetime = lifetime
        self.refuse = refuse
        self.requests: list[StunMessage] = []

    def answer(self, data: bytes) -> bytes | None:
        request = decode_message(data)
        assert request.cls is MessageClass.REQUEST
        self.requests.append(request)
        tid = request.transaction_id
        if not request.verify_integrity(KEY):  # no credentials yet, or wrong ones
            return self._error(request, 401, "Unauthorized", with_realm=True)
        if request.get(Attr.NONCE) != self.nonce:
            return self._error(request, 438, "Stale Nonce", with_realm=True)
        if self.refuse is not None and request.method == Method.ALLOCATE:
            return self._error(request, self.refuse, "Refused", integrity=True)
        attrs: list[tuple[int, bytes]] = []
        if request.method == Method.ALLOCATE:
            attrs = [
                (Attr.XOR_RELAYED_ADDRESS, encode_xor_address(RELAYED, tid)),
                (Attr.XOR_MAPPED_ADDRESS, encode_xor_address(CLIENT, tid)),
                (Attr.LIFETIME, encode_u32(self.lifetime)),
            ]
        elif request.method == Method.REFRESH:
            asked = request.get(Attr.LIFETIME)
            lifetime = decode_u32(asked) if asked is not None else self.lifetime
            attrs = [(Attr.LIFETIME, encode_u32(min(lifetime, self.lifetime)))]
        return encode_message(request.method, MessageClass.SUCCESS, tid, attrs, integrity_key=KEY)

    def _error(
        self,
        request: StunMessage,
        code: int,
        reason: str,
        *,
        with_realm: bool = False,
        integrity: bool = False,
    ) -> bytes:
        attrs = [(Attr.ERROR_CODE, encode_error_code(code, reason))]
        if with_realm:
            attrs += [(Attr.REALM, REALM.encode()), (Attr.NONCE, self.nonce)]
        return encode_message(
            request.method,
            MessageClass.ERROR,
            request.transaction_id,
            attrs,
            integrity_key=KEY if integrity else None,
        )


def pump(mux: NatMux, server: FakeTurnServer, now: float, *, lose: bool = False) -> int:
    """Deliver everything the mux wants to send to the fake server and its answers back."""
    delivered = 0
    for _ in range(20):
        out = mux.datagrams_to_send(now)
        if not out:
            break
        for data, addr in out:
            assert addr == SERVER
            if lose:
                continue
            answer = server.answer(data)
            if answer is not None:
                assert mux.receive_datagram(answer, SERVER, now) is None
                delivered += 1
    return delivered


def ready_mux() -> tuple[NatMux, FakeTurnServer, list[NatEvent]]:
    mux = make_mux()
    server = FakeTurnServer()
    mux.start_turn(PEER, now=0.0)
    pump(mux, server, 0.0)
    return mux, server, events(mux)


def test_allocate_challenge_permission_channel_ready() -> None:
    mux, server, evs = ready_mux()
    assert [type(e) for e in evs] == [AllocationSucceeded, RelayReady]
    allocated = evs[0]
    assert isinstance(allocated, AllocationSucceeded)
    assert allocated == AllocationSucceeded(RELAYED, CLIENT, 600)
    methods = [r.method for r in server.requests]
    assert methods == [
        Method.ALLOCATE,
        Method.ALLOCATE,
        Method.CREATE_PERMISSION,
        Method.CHANNEL_BIND,
    ]
    first, second = server.requests[0], server.requests[1]
    assert first.get(Attr.REQUESTED_TRANSPORT) == b"\x11\x00\x00\x00"  # UDP
    assert not first.has_integrity and first.get(Attr.USERNAME) is None
    assert second.get(Attr.USERNAME) == b"u" and second.get(Attr.REALM) == b"test"
    assert second.verify_integrity(KEY) and second.verify_fingerprint()
    bind = server.requests[3]
    assert bind.get(Attr.CHANNEL_NUMBER) == b"\x40\x00\x00\x00"
    peer_value = bind.get(Attr.XOR_PEER_ADDRESS)
    assert peer_value is not None
    assert decode_xor_address(peer_value, bind.transaction_id) == PEER
    assert mux.relaying
    assert mux.wrap(b"abcd", PEER) == (bytes.fromhex("4000000461626364"), SERVER)
    assert mux.wrap(b"abcd", ("203.0.113.6", 1)) == (b"abcd", ("203.0.113.6", 1))
    assert mux.receive_datagram(encode_channel_data(0x4000, b"back"), SERVER, 1.0) == (
        b"back",
        PEER,
    )
    # Padded ChannelData is accepted as well; a channel we never bound is dropped and counted.
    padded = encode_channel_data(0x4000, b"back!", pad=True)
    assert mux.receive_datagram(padded, SERVER, 1.0) == (b"back!", PEER)
    assert mux.receive_datagram(encode_channel_data(0x4001, b"x"), SERVER, 1.0) is None
    assert mux.counters.turn_channel_drop == 1


def test_wrap_before_ready_is_a_local_error() -> None:
    mux = make_mux()
    mux.start_turn(PEER, now=0.0)
    assert mux.wrap(b"x", PEER) == (b"x", PEER)  # not relaying yet: direct
    assert mux.turn is not None
    with pytest.raises(LocalNatError):
        mux.turn.wrap(b"x")
    with pytest.raises(LocalNatError):
        mux.turn.allocate(PEER, 0.0)


def test_retransmissions_follow_rfc8489_and_then_unreachable() -> None:
    mux = make_mux()
    mux.start_turn(PEER, now=0.0)
    sent_at = [0.0] if mux.datagrams_to_send(0.0) else []
    failed: NatEvent | None = None
    now = 0.0
    while failed is None:
        timer = mux.get_timer()
        assert timer is not None
        now = timer
        mux.handle_timer(now)
        if mux.datagrams_to_send(now):
            sent_at.append(now)
        for event in events(mux):
            failed = event
    # RTO 500 ms doubling, Rc = 7 transmissions, then Rm x RTO = 8 s.
    assert sent_at == [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert now == pytest.approx(39.5)
    assert isinstance(failed, TurnFailed)
    assert failed.reason is TurnFailure.UNREACHABLE
    assert "198.51.100.1:3478" in failed.message and "7 Allocate requests" in failed.message
    assert mux.get_timer() is None


def test_binding_success_ipv6_and_timeout() -> None:
    mux = NatMux(urandom=counter_urandom())
    stun = ("2001:db8::1", 3478)
    tid = mux.start_binding(stun, now=0.0)
    ((request, to),) = mux.datagrams_to_send(0.0)
    assert to == stun and decode_message(request).method == Method.BINDING
    mapped = ("2001:db8::99", 61000)
    answer = encode_message(
        Method.BINDING,
        MessageClass.SUCCESS,
        tid,
        [(Attr.XOR_MAPPED_ADDRESS, encode_xor_address(mapped, tid))],
    )
    # A copy with one bit flipped in the FINGERPRINT is dropped, the genuine one is taken.
    forged = answer[:-1] + bytes([answer[-1] ^ 0x80])
    assert mux.receive_datagram(forged, (*stun, 0, 0), 0.1) is None
    assert mux.counters.stun_fingerprint_drop == 1
    assert events(mux) == []
    assert mux.receive_datagram(answer, (*stun, 0, 0), 0.1) is None
    assert events(mux) == [BindingSucceeded(stun, mapped)]
    assert mux.mapped_address == mapped
    # The duplicate (a retransmitted answer) is now a stray.
    assert mux.receive_datagram(answer, stun, 0.2) is None
    assert mux.counters.stun_unknown_transaction_drop == 1

    mux.start_binding(stun, now=1.0)
    while (timer := mux.get_timer()) is not None:
        mux.handle_timer(timer)
        mux.datagrams_to_send(timer)
    (failed,) = events(mux)
    assert isinstance(failed, BindingFailed) and "did not answer" in failed.message


def test_wrong_password_is_reported_once_with_text() -> None:
    mux = make_mux(password="nope")
    mux.start_turn(PEER, now=0.0)
    pump(mux, FakeTurnServer(), 0.0)
    (failed,) = events(mux)
    assert isinstance(failed, TurnFailed)
    assert failed.reason is TurnFailure.WRONG_CREDENTIALS and failed.error_code == 401
    assert "'u'" in failed.message and "nope" not in failed.message
    assert mux.get_timer() is None


@pytest.mark.parametrize(("code", "words"), [(486, "quota"), (508, "capacity"), (403, "policy")])
def test_allocation_refused(code: int, words: str) -> None:
    mux = make_mux()
    mux.start_turn(PEER, now=0.0)
    pump(mux, FakeTurnServer(refuse=code), 0.0)
    (failed,) = events(mux)
    assert isinstance(failed, TurnFailed)
    assert failed.reason is TurnFailure.ALLOCATION_REFUSED and failed.error_code == code
    assert words in failed.message and str(code) in failed.message


def test_answer_with_bad_integrity_is_ignored_and_the_genuine_one_taken() -> None:
    mux = make_mux()
    server = FakeTurnServer()
    mux.start_turn(PEER, now=0.0)
    ((first, _),) = mux.datagrams_to_send(0.0)
    challenge = server.answer(first)
    assert challenge is not None
    mux.receive_datagram(challenge, SERVER, 0.0)
    ((second, _),) = mux.datagrams_to_send(0.0)
    genuine = server.answer(second)
    assert genuine is not None
    request = decode_message(second)
    forged = encode_message(
        Method.ALLOCATE,
        MessageClass.SUCCESS,
        request.transaction_id,
        [(Attr.XOR_RELAYED_ADDRESS, encode_xor_address(("6.6.6.6", 6), request.transaction_id))],
        integrity_key=b"not the key",
    )
    assert mux.receive_datagram(forged, SERVER, 0.1) is None
    assert mux.counters.stun_rejected_drop == 1
    assert events(mux) == []
    mux.receive_datagram(genuine, SERVER, 0.2)
    (allocated,) = events(mux)
    assert isinstance(allocated, AllocationSucceeded) and allocated.relayed_address == RELAYED


def test_refreshes_happen_before_expiry() -> None:
    mux, server, _ = ready_mux()  # permission every 240 s, channel every 480 s
    server.requests.clear()
    now = 0.0
    log: list[tuple[float, int]] = []
    while now < 1300:
        timer = mux.get_timer()
        assert timer is not None
        now = timer
        mux.handle_timer(now)
        before = len(server.requests)
        pump(mux, server, now)
        log += [(now, r.method) for r in server.requests[before:]]
        assert not any(isinstance(e, TurnFailed) for e in events(mux))
    refreshes = [t for t, m in log if m == Method.REFRESH]
    permissions = [t for t, m in log if m == Method.CREATE_PERMISSION]
    channels = [t for t, m in log if m == Method.CHANNEL_BIND]
    assert refreshes[:2] == pytest.approx([480.0, 960.0])  # 80 % of 600 s
    assert permissions[:3] == pytest.approx([240.0, 480.0, 720.0])  # < 300 s apart
    assert channels[:2] == pytest.approx([480.0, 960.0])  # < 600 s apart
    assert mux.relaying


def test_stale_nonce_retry_uses_the_new_nonce_and_gives_up_eventually() -> None:
    mux, server, _ = ready_mux()
    server.nonce = b"nonce-2"
    server.requests.clear()
    mux.handle_timer(480.0)
    pump(mux, server, 480.0)
    assert [r.get(Attr.NONCE) for r in server.requests if r.method == Method.REFRESH] == [
        b"nonce-1",
        b"nonce-2",
    ]
    assert isinstance(events(mux)[-1], TurnRefreshed)
    # Refresh, CreatePermission and ChannelBind were all due at 480 s and each met the 438 once.
    assert mux.turn is not None and mux.turn.stale_nonce_retries == 3

    # A server that answers 438 forever: bounded retries, then a clear failure.
    class Stubborn(FakeTurnServer):
        def answer(self, data: bytes) -> bytes | None:
            self.nonce = b"n%d" % len(self.requests)
            return super().answer(data)

    mux, _, _ = ready_mux()
    stubborn = Stubborn()
    mux.handle_timer(480.0)
    pump(mux, stubborn, 480.0)
    failed = events(mux)[-1]
    assert isinstance(failed, TurnFailed)
    assert failed.reason is TurnFailure.ALLOCATION_LOST and failed.error_code == 438


def test_close_deallocates_with_lifetime_zero() -> None:
    mux, server, _ = ready_mux()
    server.requests.clear()
    mux.close(now=10.0)
    pump(mux, server, 10.0)
    (refresh,) = server.requests
    assert refresh.method == Method.REFRESH and refresh.get(Attr.LIFETIME) == encode_u32(0)
    assert events(mux) == [TurnClosed(deallocated=True)]
    assert not mux.relaying and mux.get_timer() is None


def test_close_gives_up_when_the_server_is_silent() -> None:
    mux, server, _ = ready_mux()
    mux.close(now=10.0)
    while (timer := mux.get_timer()) is not None:
        mux.handle_timer(timer)
        pump(mux, server, timer, lose=True)
    assert events(mux) == [TurnClosed(deallocated=False)]


def test_data_indication_from_the_server_is_delivered() -> None:
    mux, _, _ = ready_mux()
    tid = b"\x09" * 12
    indication = encode_message(
        Method.DATA,
        MessageClass.INDICATION,
        tid,
        [(Attr.XOR_PEER_ADDRESS, encode_xor_address(PEER, tid)), (Attr.DATA, b"hello")],
    )
    assert mux.receive_datagram(indication, SERVER, 1.0) == (b"hello", PEER)
    # The same indication from anyone else, or naming another peer, is dropped.
    assert mux.receive_datagram(indication, ("203.0.113.99", 3478), 1.0) is None
    other = encode_message(
        Method.DATA,
        MessageClass.INDICATION,
        tid,
        [(Attr.XOR_PEER_ADDRESS, encode_xor_address(("1.2.3.4", 5), tid)), (Attr.DATA, b"x")],
    )
    assert mux.receive_datagram(other, SERVER, 1.0) is None
    assert mux.counters.turn_indication_drop == 1
    assert mux.counters.stun_unexpected_drop == 1


def test_ostp_datagrams_pass_through_untouched() -> None:
    mux, _, _ = ready_mux()
    datagram = bytes(range(256)) * 4
    assert mux.receive_datagram(datagram, PEER, 1.0) == (datagram, PEER)
    assert mux.counters.as_dict() == dict.fromkeys(mux.counters.as_dict(), 0)


@given(st.binary(max_size=40), st.integers(0x40, 0x7F))
def test_relayed_fast_path_agrees_with_the_codec(tail: bytes, first: int) -> None:
    mux, _, _ = ready_mux()
    data = bytes([first]) + tail
    got = mux.receive_datagram(data, SERVER, 1.0)
    try:
        channel, payload = decode_channel_data(data)
    except StunParseError:
        assert got == (data, SERVER)  # not ChannelData: handed on as "other"
        return
    if channel == 0x4000:
        assert got == (payload, PEER)
    else:
        assert got is None and mux.counters.turn_channel_drop == 1
