"""STUN/TURN codec: RFC 5769 vectors, spec §13 V10, the demux rule, property tests, fuzz."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from fuzz.stun_message import test_one_input as fuzz_stun_message
from hypothesis import given, settings
from hypothesis import strategies as st

from ostp_client.nat import DatagramKind, StunParseError, classify
from ostp_client.nat.stun import (
    MAGIC_COOKIE_BYTES,
    Attr,
    MessageClass,
    Method,
    decode_channel_data,
    decode_error_code,
    decode_message,
    decode_text,
    decode_xor_address,
    encode_channel_data,
    encode_error_code,
    encode_message,
    encode_xor_address,
    long_term_key,
    message_type,
    split_message_type,
)

# RFC 5769 §2: the published sample messages (short-term password for §2.1-2.3).
RFC5769_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74"
    "002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020"
    "000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf"
)
RFC5769_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220"
    "002000080001a147e112a643000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)
RFC5769_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed4180280004c8fb0b4c"
)
RFC5769_LONG_TERM_REQUEST = bytes.fromhex(
    "000100602112a44278ad3433c6ad72c029da412e00060012e3839ee38388e383aae38383e382afe382b9"
    "0000001500"
    "1c662f2f3439396b39353464364f4c33346f4c394653547679363473410014000b6578616d706c652e6f7267"
    "0000080014f67024656dd64a3e02b8e0712e85c9a28ca89666"
)


@pytest.mark.parametrize(
    ("raw", "mapped"),
    [
        (RFC5769_REQUEST, None),
        (RFC5769_IPV4_RESPONSE, ("192.0.2.1", 32853)),
        (RFC5769_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
)
def test_rfc5769_short_term_vectors_verify_and_reencode(
    raw: bytes, mapped: tuple[str, int] | None
) -> None:
    message = decode_message(raw)
    assert message.verify_fingerprint()
    assert message.verify_integrity(RFC5769_PASSWORD)
    assert not message.verify_integrity(RFC5769_PASSWORD + b"x")
    if mapped is not None:
        value = message.get(Attr.XOR_MAPPED_ADDRESS)
        assert value is not None
        assert decode_xor_address(value, message.transaction_id) == mapped
        assert encode_xor_address(mapped, message.transaction_id) == value
    # The vectors pad with spaces; re-encoding with that padding reproduces every byte,
    # which proves the length adjustment for MESSAGE-INTEGRITY and FINGERPRINT.
    again = encode_message(
        message.method,
        message.cls,
        message.transaction_id,
        message.attributes,
        integrity_key=RFC5769_PASSWORD,
        padding=b" ",
    )
    assert again == raw


def test_rfc5769_long_term_vector() -> None:
    message = decode_message(RFC5769_LONG_TERM_REQUEST)
    username = decode_text(message.get(Attr.USERNAME) or b"")
    realm = decode_text(message.get(Attr.REALM) or b"")
    assert (username, realm) == ("マトリックス", "example.org")
    assert message.get(Attr.NONCE) == b"f//499k954d6OL34oL9FSTvy64sA"
    # "TheMatrIX" is the password of the vector after SASLprep.
    assert message.verify_integrity(long_term_key(username, realm, "TheMatrIX"))
    assert not message.has_fingerprint


def test_spec_v10_vectors() -> None:
    assert long_term_key("user", "realm", "pass").hex() == "8493fbc53ba582fb4c044c456bdc40eb"
    assert encode_channel_data(0x4000, bytes.fromhex("61626364")).hex() == "4000000461626364"


def test_channel_data_padding_is_optional_on_receive() -> None:
    padded = encode_channel_data(0x4001, b"abcde", pad=True)
    assert padded == bytes.fromhex("400100056162636465000000")
    assert decode_channel_data(padded) == (0x4001, b"abcde")
    assert decode_channel_data(padded[:-3]) == (0x4001, b"abcde")
    with pytest.raises(StunParseError):
        decode_channel_data(padded + b"\x00")  # more than 3 bytes of slack
    with pytest.raises(StunParseError):
        decode_channel_data(padded[:-4])  # shorter than its length field


def test_message_type_bits() -> None:
    assert message_type(Method.BINDING, MessageClass.REQUEST) == 0x0001
    assert message_type(Method.BINDING, MessageClass.SUCCESS) == 0x0101
    assert message_type(Method.BINDING, MessageClass.ERROR) == 0x0111
    assert message_type(Method.ALLOCATE, MessageClass.ERROR) == 0x0113
    assert message_type(Method.SEND, MessageClass.INDICATION) == 0x0016
    assert message_type(Method.DATA, MessageClass.INDICATION) == 0x0017
    assert message_type(Method.CHANNEL_BIND, MessageClass.SUCCESS) == 0x0109


def test_error_code() -> None:
    value = encode_error_code(438, "Stale Nonce")
    assert value.hex() == "00000426" + b"Stale Nonce".hex()
    assert decode_error_code(value) == (438, "Stale Nonce")
    with pytest.raises(StunParseError):
        decode_error_code(b"\x00\x00\x02\x00")  # 200 is not an error


def test_attributes_after_integrity_are_ignored_but_fingerprint_must_be_last() -> None:
    tid = bytes(range(12))
    msg = encode_message(Method.BINDING, MessageClass.SUCCESS, tid, integrity_key=b"k")
    body = msg[20:-8]  # MESSAGE-INTEGRITY only
    extra = bytes.fromhex("80220004") + b"evil"
    forged = msg[:2] + (len(body) + len(extra)).to_bytes(2, "big") + msg[4:20] + body + extra
    parsed = decode_message(forged)
    assert parsed.get(Attr.SOFTWARE) is None
    assert parsed.verify_integrity(b"k")
    after_fp = msg + extra
    after_fp = after_fp[:2] + (len(after_fp) - 20).to_bytes(2, "big") + after_fp[4:]
    with pytest.raises(StunParseError):
        decode_message(after_fp)


# --- the demux rule -----------------------------------------------------------------------------

SERVER = ("127.0.0.1", 3478)
TID = b"\x01" * 12


def test_classify_ours_stray_and_other() -> None:
    ours = encode_message(Method.BINDING, MessageClass.SUCCESS, TID)
    assert classify(ours, SERVER, transactions={TID}).kind is DatagramKind.STUN
    stray = classify(ours, SERVER, transactions={b"\x02" * 12})
    assert stray.kind is DatagramKind.STRAY
    assert stray.drop_reason == "stun_unknown_transaction_drop"
    bad_fp = ours[:-1] + bytes([ours[-1] ^ 1])
    result = classify(bad_fp, SERVER, transactions={TID})
    assert (result.kind, result.drop_reason) == (DatagramKind.STRAY, "stun_fingerprint_drop")
    request = encode_message(Method.BINDING, MessageClass.REQUEST, TID)
    assert classify(request, SERVER, transactions={TID}).kind is DatagramKind.STRAY
    frame = encode_channel_data(0x4000, b"ostp")
    from_server = classify(frame, SERVER, transactions=set(), turn_server=SERVER)
    assert (from_server.kind, from_server.channel, from_server.payload) == (
        DatagramKind.CHANNEL_DATA,
        0x4000,
        b"ostp",
    )
    elsewhere = classify(frame, ("127.0.0.1", 1), transactions=set(), turn_server=SERVER)
    assert elsewhere.kind is DatagramKind.OTHER
    v6 = classify(frame, ("::1", 3478, 0, 0), transactions=set(), turn_server=("::1", 3478))
    assert v6.kind is DatagramKind.CHANNEL_DATA
    assert classify(b"\x00" * 40, SERVER, transactions={TID}).kind is DatagramKind.OTHER


# --- properties -----------------------------------------------------------------------------------

attributes = st.lists(
    st.tuples(
        st.integers(0, 0xFFFF).filter(
            lambda t: t not in (Attr.MESSAGE_INTEGRITY, Attr.FINGERPRINT)
        ),
        st.binary(max_size=64),
    ),
    max_size=8,
)
methods = st.integers(0, 0xFFF)
classes = st.sampled_from(list(MessageClass))
tids = st.binary(min_size=12, max_size=12)


@given(
    method=methods,
    cls=classes,
    tid=tids,
    attrs=attributes,
    key=st.one_of(st.none(), st.binary(max_size=32)),
    fingerprint=st.booleans(),
)
def test_encode_decode_round_trip(
    *,
    method: int,
    cls: MessageClass,
    tid: bytes,
    attrs: list[tuple[int, bytes]],
    key: bytes | None,
    fingerprint: bool,
) -> None:
    raw = encode_message(method, cls, tid, attrs, integrity_key=key, fingerprint=fingerprint)
    message = decode_message(raw)
    assert split_message_type(message_type(method, cls)) == (method, cls)
    assert (message.method, message.cls, message.transaction_id) == (method, cls, tid)
    assert list(message.attributes) == attrs
    assert message.has_fingerprint == fingerprint
    assert message.verify_fingerprint() == fingerprint
    if key is not None:
        assert message.verify_integrity(key)
        assert not message.verify_integrity(key + b"!")
    else:
        assert not message.has_integrity


@given(st.ip_addresses(), st.integers(0, 65535), tids)
def test_xor_address_round_trip(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, tid: bytes
) -> None:
    address = (str(ip), port)
    assert decode_xor_address(encode_xor_address(address, tid), tid) == address


@given(st.integers(0x4000, 0x7FFF), st.binary(max_size=300), st.booleans())
def test_channel_data_round_trip(channel: int, payload: bytes, pad: bool) -> None:
    assert decode_channel_data(encode_channel_data(channel, payload, pad=pad)) == (
        channel,
        payload,
    )


@given(st.binary(max_size=200))
def test_garbage_only_raises_parse_error(data: bytes) -> None:
    for parser in (decode_message, decode_channel_data):
        with contextlib.suppress(StunParseError):
            parser(data)


@given(
    st.binary(max_size=120).map(
        lambda b: b"\x01\x01" + len(b).to_bytes(2, "big") + MAGIC_COOKIE_BYTES + TID + b
    )
)
def test_stun_headed_garbage_only_raises_parse_error(data: bytes) -> None:
    try:
        message = decode_message(data)
    except StunParseError:
        return
    message.verify_fingerprint()
    message.verify_integrity(b"k")


@settings(max_examples=300)
@given(methods, classes, tids, attributes, st.data())
def test_mutated_messages_never_crash(
    method: int, cls: MessageClass, tid: bytes, attrs: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    raw = bytearray(encode_message(method, cls, tid, attrs, integrity_key=b"k"))
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] ^= data.draw(st.integers(1, 255))
    try:
        message = decode_message(bytes(raw))
    except StunParseError:
        return
    # A flipped bit is caught by FINGERPRINT or MESSAGE-INTEGRITY, never silently accepted.
    assert not (message.verify_fingerprint() and message.verify_integrity(b"k")) or (
        message.method,
        message.cls,
        message.transaction_id,
        message.attributes,
    ) == (method, cls, tid, tuple(attrs))


@given(st.binary(max_size=200))
def test_fuzz_entry_point(data: bytes) -> None:
    fuzz_stun_message(data)


def test_fuzz_entry_point_on_valid_messages() -> None:
    for raw in (RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE):
        fuzz_stun_message(raw)
    fuzz_stun_message(encode_channel_data(0x4000, b"x"))
