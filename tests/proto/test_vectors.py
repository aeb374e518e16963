"""Byte-for-byte agreement with the upstream implementation's own output."""

from __future__ import annotations

from typing import Any

import pytest

from ostp_proto.frames import FrameKind, PaddingPolicy, Profile, decode_frame, encode_frame
from ostp_proto.keys import derive_secrets, split_transport_keys
from ostp_proto.noise import NoiseHandshake
from ostp_proto.obfuscation import (
    DataOpener,
    DataSealer,
    build_handshake_datagram,
    header_mask,
    parse_handshake_datagram,
)
from ostp_proto.relay import (
    Close,
    Connect,
    ConnectOk,
    Data,
    Error,
    KeepAlive,
    Ping,
    Pong,
    RelayMessage,
    UdpAssociate,
    UdpData,
    decode_relay,
    encode_relay,
)

from .vectors import NOISE, UPSTREAM, h

HS = UPSTREAM["handshake"]


def _secret_cases() -> list[tuple[bytes, dict[str, Any]]]:
    cases = [(UPSTREAM["access_key"].encode(), UPSTREAM["derive_all_secrets"])]
    cases += [(h(e["access_key_hex"]), e) for e in UPSTREAM["derive_all_secrets_extra"]]
    return cases


@pytest.mark.parametrize(("key", "expected"), _secret_cases())
def test_derived_secrets(key: bytes, expected: dict[str, Any]) -> None:
    s = derive_secrets(key)
    assert s.obfuscation_key.hex() == expected["obfuscation_key"]
    assert s.psk.hex() == expected["psk"]
    assert (s.handshake_pad_min, s.handshake_pad_max) == (
        expected["handshake_pad_min"],
        expected["handshake_pad_max"],
    )


def test_six_keys_are_covered() -> None:
    assert len(_secret_cases()) == 6


def test_secrets_repr_hides_keys() -> None:
    s = derive_secrets("test-key")
    assert s.psk.hex() not in repr(s) and s.obfuscation_key.hex() not in repr(s)


def test_key_split() -> None:
    v = UPSTREAM["split_keys"]
    i, r = split_transport_keys(h(v["handshake_hash"]))
    assert i.hex() == v["initiator_send"] == v["responder_recv"]
    assert r.hex() == v["initiator_recv"] == v["responder_send"]


def test_spec_mask_vectors() -> None:
    key = h("b0a37b23262920fb")
    assert header_mask(key, bytes(range(32))).hex() == (
        "7309cd04989db6d192fa779c384b11b5eacb25600ac81ba7ba99aeec8247825d"
    )
    assert header_mask(key, bytes(range(3))).hex() == (
        "0430fbf64efc52ea520cad5bd4fafe5740729cd1c490bc8ddef8de4ffe7c42fc"
    )


def _handshake() -> tuple[NoiseHandshake, NoiseHandshake, bytes, bytes]:
    s = derive_secrets(UPSTREAM["access_key"])
    ini = NoiseHandshake(
        initiator=True, ephemeral_private=h(HS["initiator_ephemeral_private"]), psk=s.psk
    )
    res = NoiseHandshake(
        initiator=False, ephemeral_private=h(HS["responder_ephemeral_private"]), psk=s.psk
    )
    msg1 = ini.write_message_1(h(HS["client_handshake_payload"]))
    assert res.read_message_1(msg1) == h(HS["client_handshake_payload"])
    msg2 = res.write_message_2(b"")
    assert ini.read_message_2(msg2) == b""
    return ini, res, msg1, msg2


def test_handshake_messages_and_keys() -> None:
    ini, res, msg1, msg2 = _handshake()
    assert msg1.hex() == HS["noise_msg1"]
    assert msg2.hex() == HS["noise_msg2"]
    assert ini.handshake_hash.hex() == res.handshake_hash.hex() == HS["handshake_hash"]
    i_key, r_key = split_transport_keys(ini.handshake_hash)
    assert i_key.hex() == HS["client_send_key"] == HS["server_recv_key"]
    assert r_key.hex() == HS["client_recv_key"] == HS["server_send_key"]


def test_client_payload_layout() -> None:
    payload = (
        HS["timestamp"].to_bytes(8, "big")
        + HS["session_id"].to_bytes(4, "big")
        + UPSTREAM["access_key"].encode()
    )
    assert payload.hex() == HS["client_handshake_payload"]


@pytest.mark.parametrize("which", ["msg1", "msg2"])
def test_handshake_datagrams(which: str) -> None:
    s = derive_secrets(UPSTREAM["access_key"])
    noise = h(HS[f"noise_{which}"])
    wire = build_handshake_datagram(
        s.obfuscation_key, HS["session_id"], noise, h(HS[f"{which}_pad"])
    )
    assert wire.hex() == HS[f"{which}_datagram_wire"]
    plain = HS["session_id"].to_bytes(4, "big") + len(noise).to_bytes(2, "big") + noise
    assert HS[f"{which}_datagram_plain"].startswith(plain.hex())
    assert parse_handshake_datagram(s.obfuscation_key, wire) == (HS["session_id"], noise)


@pytest.mark.parametrize("v", UPSTREAM["data_datagrams"], ids=lambda v: v["label"])
def test_data_datagrams(v: dict[str, Any]) -> None:
    s = derive_secrets(UPSTREAM["access_key"])
    sid = HS["session_id"]
    frame = encode_frame(v["frame_kind"], v["stream_id"], h(v["payload"]), 0, v["reserved"])
    frame = frame[:10] + len(h(v["padding"])).to_bytes(2, "big") + frame[12:] + h(v["padding"])
    assert frame.hex() == v["frame_plaintext"]
    wire = DataSealer(s.obfuscation_key, h(v["aead_key"]), sid).seal(v["nonce"], frame)
    assert wire.hex() == v["datagram_wire"]
    opener = DataOpener(s.obfuscation_key, h(v["aead_key"]), sid)
    nonce = opener.unmask(wire)
    assert nonce is not None and nonce == v["nonce"]
    plaintext = opener.decrypt(nonce, wire)
    assert plaintext is not None and plaintext.hex() == v["frame_plaintext"]
    assert decode_frame(plaintext) == (v["frame_kind"], v["stream_id"], h(v["payload"]))


def test_frame_padding_is_counted_in_header() -> None:
    frame = encode_frame(FrameKind.DATA, 7, b"abc", pad_len=5, reserved=0x1234)
    assert frame == bytes.fromhex("010212340007000000030005") + b"abc" + bytes(5)
    assert decode_frame(frame) == (FrameKind.DATA, 7, b"abc")
    assert len(frame) == 12 + 3 + 5


RELAY_OBJECTS: dict[str, RelayMessage] = {
    'Connect("example.com:443")': Connect("example.com:443"),
    "Data([1,2,3])": Data(b"\x01\x02\x03"),
    "KeepAlive": KeepAlive(),
    "Close": Close(),
    "ConnectOk": ConnectOk(),
    'Error("connect failed: Connection refused (os error 111)")': Error(
        "connect failed: Connection refused (os error 111)"
    ),
    "Ping(1700000000123)": Ping(1700000000123),
    "Pong(42)": Pong(42),
    "UdpAssociate": UdpAssociate(),
    'UdpData("8.8.8.8:53", [0xde,0xad])': UdpData("8.8.8.8:53", b"\xde\xad"),
}


@pytest.mark.parametrize("v", UPSTREAM["relay_messages"], ids=lambda v: v["message"])
def test_relay_encodings(v: dict[str, str]) -> None:
    message = RELAY_OBJECTS[v["message"]]
    assert encode_relay(message).hex() == v["encoded"]
    assert decode_relay(h(v["encoded"])) == message


def test_all_ten_relay_kinds_have_vectors() -> None:
    assert len({type(m) for m in RELAY_OBJECTS.values()}) == 10
    assert set(RELAY_OBJECTS) == {v["message"] for v in UPSTREAM["relay_messages"]}


def _policy(strategy: str, mtu: int, max_pad: int) -> PaddingPolicy:
    if strategy.startswith("Fixed("):
        return PaddingPolicy(mtu_hint=mtu, max_pad=max_pad, profile=None, fixed=int(strategy[6:-1]))
    profile = {
        "Profile(JsonRpc)": Profile.JSON_RPC,
        "Profile(HttpsBurst)": Profile.HTTPS_BURST,
        "Profile(VideoStream)": Profile.VIDEO_STREAM,
    }[strategy]
    return PaddingPolicy(mtu_hint=mtu, max_pad=max_pad, profile=profile)


@pytest.mark.parametrize("v", UPSTREAM["padding"], ids=lambda v: f"{v['strategy']}-{v['max_pad']}")
def test_padding_sizes(v: dict[str, Any]) -> None:
    policy = _policy(v["strategy"], v["mtu"], v["max_pad"])
    for length, pad in v["payload_len_to_pad_len"]:
        assert policy.pad_len(length) == pad, (length, pad)


def test_spec_v4_client_ping_padding() -> None:
    # spec §6.1: client Ping (L = 11, JsonRpc, mtu 1350) -> pad 245, UDP payload 296
    policy = PaddingPolicy.upstream_client(1350)
    assert policy.pad_len(11) == 245
    assert 11 + 245 + 40 == 296


def test_adaptive_padding_bounds() -> None:
    policy = PaddingPolicy.upstream_server()
    for length in (0, 1, 63, 64, 65, 500, 1300, 4096):
        lo = policy.pad_len(length, lambda n: 0)
        hi = policy.pad_len(length, lambda n: n)
        assert 0 <= lo <= hi <= 256


@pytest.mark.parametrize("v", NOISE["vectors"], ids=lambda v: v["protocol_name"])
def test_cacophony_vectors(v: dict[str, Any]) -> None:
    psk = h(v["init_psks"][0]) if v.get("init_psks") else None
    ini = NoiseHandshake(
        initiator=True,
        ephemeral_private=h(v["init_ephemeral"]),
        psk=psk,
        prologue=h(v["init_prologue"]),
    )
    res = NoiseHandshake(
        initiator=False,
        ephemeral_private=h(v["resp_ephemeral"]),
        psk=psk,
        prologue=h(v["resp_prologue"]),
    )
    m0, m1 = v["messages"][0], v["messages"][1]
    c0 = ini.write_message_1(h(m0["payload"]))
    assert c0.hex() == m0["ciphertext"]
    assert res.read_message_1(c0) == h(m0["payload"])
    c1 = res.write_message_2(h(m1["payload"]))
    assert c1.hex() == m1["ciphertext"]
    assert ini.read_message_2(c1) == h(m1["payload"])
    assert ini.handshake_hash.hex() == v["handshake_hash"] == res.handshake_hash.hex()
    # Transport messages use Noise's own split (OSTP does not; this checks the Noise code).
    from ostp_proto.noise import CipherState

    i_k1, i_k2 = ini.split()
    send = {True: CipherState(i_k1), False: CipherState(i_k2)}
    recv = {True: CipherState(i_k1), False: CipherState(i_k2)}
    for index, m in enumerate(v["messages"][2:]):
        from_initiator = index % 2 == 0
        ct = send[from_initiator].encrypt_with_ad(b"", h(m["payload"]))
        assert ct.hex() == m["ciphertext"]
        assert recv[from_initiator].decrypt_with_ad(b"", ct) == h(m["payload"])
