"""Spec §10.6 against upstream's own bytes (``vectors/upstream-transport-vectors.json``).

Each value is checked twice: once through ``ostp_proto.transport`` and once by an independent
computation in this file (hmac/hashlib/base64/struct by hand, HKDF per RFC 5869 on hmac,
ChaCha20-Poly1305 from pycryptodome, X25519 from ``cryptography`` directly).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from typing import Any

import pytest
from Crypto.Cipher import ChaCha20_Poly1305
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from ostp_proto import RemoteProtocolError
from ostp_proto.transport import (
    DatagramStream,
    Framing,
    LenU16Decoder,
    StreamAccepted,
    StreamAcceptor,
    StreamRefused,
    WsDecoder,
    encode_len_u16_many,
    encode_ws_frame,
    make_token,
    verify_token,
)
from ostp_proto.transport import reality as R
from ostp_proto.transport import xhttp as X

from .transport_vectors import TRANSPORT, h

UOT = TRANSPORT["uot_xhttp"]
REALITY = TRANSPORT["reality"]
FIXED = REALITY["fixed_inputs"]
FRAMING = TRANSPORT["stream_framing"]
KEY = UOT["access_key"].encode()


def pattern(n: int) -> bytes:
    return bytes(i % 256 for i in range(n))


# ------------------------------------------------------------------ independent primitives


def hkdf_sha256(ikm: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 with an absent salt (HashLen zero bytes), on hmac only."""
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes((i,)), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def aead_seal(key: bytes, nonce: bytes, plaintext: bytes) -> bytes:
    cipher = ChaCha20_Poly1305.new(key=key, nonce=nonce)
    ct, tag = cipher.encrypt_and_digest(plaintext)
    return bytes(ct + tag)


def x25519(private: bytes, public: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public)
    )


def token_by_hand(key: bytes, ts: int) -> str:
    raw = struct.pack(">Q", ts) + hmac.new(key, struct.pack(">Q", ts), hashlib.sha256).digest()
    return base64.b64encode(raw).decode().rstrip("=")


# -------------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("vec", UOT["tokens"], ids=lambda v: str(v["timestamp"]))
def test_tokens_and_requests(vec: dict[str, Any]) -> None:
    ts = vec["timestamp"]
    assert make_token(KEY, ts) == vec["token"] == token_by_hand(KEY, ts)
    assert base64.b64decode(vec["token"] + "==")[:40] == h(vec["token_decoded_hex"])
    host = UOT["host"]
    stream = X.build_request(Framing.STREAM, host, vec["token"])
    wss = X.build_request(Framing.WSS, host, vec["token"])
    assert stream == h(vec["requests"]["stream"]["request_hex"])
    assert wss == h(vec["requests"]["wss"]["request_hex"])
    assert stream.decode() == vec["requests"]["stream"]["request_text"]
    assert h(vec["requests"]["stream"]["response_hex"]) == X.STREAM_RESPONSE
    assert h(vec["requests"]["wss"]["response_hex"]) == X.WSS_RESPONSE


@pytest.mark.parametrize("vec", UOT["tokens"], ids=lambda v: str(v["timestamp"]))
@pytest.mark.parametrize("framing", [Framing.STREAM, Framing.WSS])
def test_server_answers_upstream_requests_byte_for_byte(
    vec: dict[str, Any], framing: Framing
) -> None:
    name = framing.value
    request = h(vec["requests"][name]["request_hex"])
    acceptor = StreamAcceptor([b"other", KEY])
    verdict = acceptor.receive(request, vec["timestamp"])
    assert isinstance(verdict, StreamAccepted)
    assert verdict.framing is framing and verdict.key_index == 1 and verdict.leftover == b""
    assert acceptor.data_to_send() == h(vec["requests"][name]["response_hex"])


@pytest.mark.parametrize("case", UOT["server_replay_window"], ids=lambda c: str(c["server_now"]))
def test_token_window(case: dict[str, Any]) -> None:
    token = make_token(KEY, case["token_ts"]).encode()
    assert (verify_token(token, [KEY], case["server_now"]) == 0) is case["accepted"]
    request = X.build_request(Framing.STREAM, "h", token.decode())
    acceptor = StreamAcceptor([KEY])
    verdict = acceptor.receive(request, case["server_now"])
    if case["accepted"]:
        assert isinstance(verdict, StreamAccepted)
        assert acceptor.data_to_send() == case["response_text"].encode()
    else:
        assert isinstance(verdict, StreamRefused) and verdict.forwardable
        assert verdict.answer == case["response_text"].encode() == X.NOT_FOUND
        assert verdict.received == request


def test_token_of_another_key_is_refused() -> None:
    other = UOT["server_with_other_key"]
    token = make_token(KEY, 1_700_000_000).encode()
    assert verify_token(token, [other["server_key"].encode()], 1_700_000_000) is None
    assert not other["accepted"]


def test_token_must_be_canonical_unpadded_base64() -> None:
    token = make_token(KEY, 1_700_000_000)
    assert verify_token(token.encode(), [KEY], 1_700_000_000) == 0
    assert verify_token((token + "=").encode(), [KEY], 1_700_000_000) is None
    # the last character carries 2 spare bits: a non-zero one is refused (Rust's decoder does)
    last = token[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    other = alphabet[alphabet.index(last) ^ 1]
    assert verify_token((token[:-1] + other).encode(), [KEY], 1_700_000_000) is None


# -------------------------------------------------------------------------------- framing


def test_len_u16_frames() -> None:
    vec = FRAMING["len_u16"]
    datagrams = [pattern(n) for n in vec["datagram_lengths"]]
    wire = encode_len_u16_many(datagrams)
    assert wire == h(vec["c2s_wire_hex"]) == h(vec["s2c_wire_hex"])
    assert wire == b"".join(struct.pack(">H", len(d)) + d for d in datagrams)
    assert LenU16Decoder().feed(wire) == datagrams
    decoder = LenU16Decoder()
    got = [d for b in wire for d in decoder.feed(bytes((b,)))]  # byte by byte
    assert got == datagrams and decoder.buffered == 0


def ws_by_hand(payload: bytes, mask: bytes | None) -> bytes:
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((0x82, bit | n))
    elif n < 65536:
        head = bytes((0x82, bit | 126)) + struct.pack(">H", n)
    else:
        head = bytes((0x82, bit | 127)) + struct.pack(">Q", n)
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _frame_of(entry: dict[str, Any]) -> tuple[bytes | None, str | None, int | None]:
    frame = entry["frame"]
    if isinstance(frame, str):
        return h(frame), None, None
    return None, frame["sha256"], frame["len"]


@pytest.mark.parametrize("vec", FRAMING["wss"]["frames"], ids=lambda v: str(v["payload_len"]))
def test_websocket_frames(vec: dict[str, Any]) -> None:
    payload = pattern(vec["payload_len"])
    mask = h(vec["c2s_masked"]["mask_hex"])
    for entry, m in ((vec["s2c_unmasked"], None), (vec["c2s_masked"], mask)):
        ours = encode_ws_frame(payload, mask=m)
        assert ours == ws_by_hand(payload, m)
        exact, digest, length = _frame_of(entry)
        if exact is not None:
            assert ours == exact
        else:
            assert hashlib.sha256(ours).hexdigest() == digest and len(ours) == length
            assert ours.hex().startswith(entry["frame"]["first_64_hex"])
            assert ours.hex().endswith(entry["frame"]["last_32_hex"])
        assert ours.startswith(h(entry["header_hex"]))
        assert WsDecoder().feed(ours) == [payload]
        decoder = WsDecoder()
        got: list[bytes] = []
        for start in range(0, len(ours), 997):
            got += decoder.feed(ours[start : start + 997])
        assert got == [payload]


def test_server_stream_frames_are_upstreams() -> None:
    datagrams = [pattern(5), pattern(200)]
    server = DatagramStream(Framing.WSS, client=False)
    assert server.encode(datagrams) == b"".join(ws_by_hand(d, None) for d in datagrams)
    masks = iter([b"\x11\x22\x33\x44" * 1024])
    client = DatagramStream(Framing.WSS, client=True, random_bytes=lambda n: next(masks)[:n])
    wire = client.encode(datagrams)
    frames = FRAMING["wss"]["frames"]
    assert wire == h(frames[0]["c2s_masked"]["frame"]) + h(frames[1]["c2s_masked"]["frame"])
    assert server.receive(wire) == datagrams


# -------------------------------------------------------------------------------- Reality


def test_reality_key_schedule() -> None:
    server_private = h(FIXED["server_private_hex"])
    client_private = h(FIXED["client_private_hex"])
    assert R.decode_key(FIXED["server_private_b64url (server config private_key)"]) == (
        server_private
    )
    assert R.public_key(server_private) == h(REALITY["server_public_hex"])
    assert R.encode_key(R.public_key(server_private)) == REALITY["pbk"]
    assert R.public_key(client_private) == h(REALITY["client_public_hex"])
    shared = R.shared_secret(client_private, h(REALITY["server_public_hex"]))
    assert shared == h(REALITY["shared_secret_hex"])
    assert shared == x25519(server_private, h(REALITY["client_public_hex"]))
    keys = R.derive_keys(shared)
    okm = hkdf_sha256(shared, b"ostp-reality-v1", 64)
    assert keys.auth_key == okm[:32] == h(REALITY["hkdf"]["auth_key_hex"])
    assert keys.v1_data_key == okm[32:] == h(REALITY["hkdf"]["data_key_hex"])
    # ours: one data key per direction, under their own labels (docs/protocol-deviations.md)
    assert keys.c2s_key == hkdf_sha256(shared, b"ostp-reality-v2 c2s", 32)
    assert keys.s2c_key == hkdf_sha256(shared, b"ostp-reality-v2 s2c", 32)
    assert len({keys.auth_key, keys.c2s_key, keys.s2c_key, keys.v1_data_key}) == 4


def test_reality_session_id() -> None:
    keys = R.derive_keys(h(REALITY["shared_secret_hex"]))
    vec = REALITY["session_id"]
    plain = h(vec["plaintext_hex (short_id || ts:u64be)"])
    assert plain == h(FIXED["short_id"]) + struct.pack(">Q", FIXED["timestamp"])
    sealed = R.seal_session_id(keys.auth_key, h(FIXED["short_id"]), FIXED["timestamp"])
    assert sealed == h(vec["encrypted_hex"]) == aead_seal(keys.auth_key, bytes(12), plain)
    assert R.open_session_id(keys.auth_key, sealed) == (h(FIXED["short_id"]), FIXED["timestamp"])
    assert R.open_session_id(keys.auth_key, bytes(32)) is None


def test_reality_client_hello_is_upstreams() -> None:
    vec = REALITY["client_hello"]
    hello = R.build_client_hello(
        FIXED["sni"],
        h(REALITY["session_id"]["encrypted_hex"]),
        h(REALITY["client_public_hex"]),
        h(FIXED["client_random_hex"]),
    )
    assert hello == h(vec["hex"]) and len(hello) == vec["len"]
    parsed = R.parse_client_hello(hello)
    assert parsed.sni == FIXED["sni"]
    assert parsed.key_share == h(REALITY["client_public_hex"])
    assert parsed.session_id == h(REALITY["session_id"]["encrypted_hex"])
    assert h(vec["ccs_appended_hex"]) == R.CCS_RECORD
    # and the client role builds exactly that from the same fixed inputs
    draws = iter([h(FIXED["client_private_hex"]), h(FIXED["client_random_hex"])])
    client = R.RealityClient(
        server_public=h(REALITY["server_public_hex"]),
        short_id=h(FIXED["short_id"]),
        sni=FIXED["sni"],
        random_bytes=lambda n: next(draws),
    )
    assert client.hello(FIXED["timestamp"] + 0.9) == h(vec["hex"]) + R.CCS_RECORD


@pytest.mark.parametrize(
    "case", REALITY["session_id"]["server_verify_window (accept iff |now-ts| <= 60)"]
)
def test_reality_timestamp_window(case: dict[str, Any]) -> None:
    acceptor = R.RealityAcceptor(
        private_key=h(FIXED["server_private_hex"]),
        short_ids=[h(FIXED["short_id"])],
        server_names=[FIXED["sni"]],
    )
    session = acceptor.accept(h(REALITY["client_hello"]["hex"]), case["server_now"])
    assert (session is not None) is case["accepted"]


def test_server_flight_with_the_fixed_length() -> None:
    vec = REALITY["server_flight"]
    upstream = h(vec["hex"])
    assert h(vec["records"][0]["hex"]) == R.UPSTREAM_SERVER_HELLO
    ours = R.SERVER_FLIGHT
    assert len(ours) == len(upstream) == vec["len"] == 1125
    # only the two lengths of the ServerHello differ: record 0x7a -> 0x7f, handshake 0x76 -> 0x7b
    diff = [i for i in range(len(ours)) if ours[i] != upstream[i]]
    assert diff == [4, 8]
    assert (ours[4], ours[8]) == (0x7F, 0x7B)
    # a record parser now walks exactly the five records upstream meant
    pos, kinds = 0, []
    for record in vec["records"]:
        n = struct.unpack_from(">H", ours, pos + 3)[0]
        assert n == record["actual_payload_len"]
        expected = h(record["hex"])[5:]
        if pos == 0:
            expected = expected[:3] + b"\x7b" + expected[4:]  # the handshake length
        assert ours[pos + 5 : pos + 5 + n] == expected
        kinds.append(ours[pos])
        pos += 5 + n
    assert pos == len(ours) and kinds == [0x16, 0x14, 0x17, 0x17, 0x17]
    assert int.from_bytes(ours[6:9], "big") == 127 - 4


def test_record_format_and_upstream_keystream_reuse() -> None:
    """Upstream's records (v1 key, both directions alike) are reproduced by the record layer;
    ours use one key per direction, so the same plaintext gives different records."""
    vec = REALITY["data_records"]
    keys = R.derive_keys(h(REALITY["shared_secret_hex"]))
    plain = vec["plaintext"].encode()
    v1 = R.RecordSealer(keys.v1_data_key)
    assert v1.seal(plain) == h(vec["c2s_ctr0_hex"]) == h(vec["s2c_ctr0_hex"])
    assert v1.seal(plain) == h(vec["c2s_ctr1_hex"])
    nonce1 = h(vec["nonce_ctr1_hex"])
    assert h(vec["c2s_ctr1_hex"])[5:] == aead_seal(keys.v1_data_key, nonce1, plain)
    c2s = R.RecordSealer(keys.c2s_key).seal(plain)
    s2c = R.RecordSealer(keys.s2c_key).seal(plain)
    assert c2s[:5] == s2c[:5] == h(vec["c2s_ctr0_hex"])[:5]
    assert c2s != s2c and c2s[5:] == aead_seal(keys.c2s_key, bytes(12), plain)
    assert s2c[5:] == aead_seal(keys.s2c_key, bytes(12), plain)
    opener = R.RecordOpener(keys.c2s_key)
    assert opener.feed(c2s) == [plain]
    with pytest.raises(RemoteProtocolError):
        R.RecordOpener(keys.s2c_key).feed(c2s)


def test_live_transcript_inner_records_under_v1() -> None:
    """The live transcript's inner request/response decrypt as the vectors say (the record
    layer reads upstream's records), and a v2 server refuses a v1 client's first record."""
    live = REALITY["live_deterministic"]["ch_then_ccs_separately"]
    keys = R.derive_keys(h(REALITY["shared_secret_hex"]))
    opener = R.RecordOpener(keys.v1_data_key)
    request, frame = opener.feed(
        h(live["c2s_record_ctr0_http_request_hex"]) + h(live["c2s_record_ctr1_uot_frame_hex"])
    )
    assert request == X.build_request(
        Framing.STREAM, FIXED["sni"], make_token(KEY, FIXED["timestamp"])
    )
    assert frame == h("000d") + b"hello reality"
    response = R.RecordOpener(keys.v1_data_key).feed(h(live["s2c_record_ctr0_http_response_hex"]))
    assert response == [X.STREAM_RESPONSE]
    # our server (v2) receiving upstream's v1 client: flight sent, then the record fails
    acceptor = StreamAcceptor(
        [KEY],
        R.RealityAcceptor(
            private_key=h(FIXED["server_private_hex"]),
            short_ids=[h(FIXED["short_id"])],
            server_names=[FIXED["sni"]],
        ),
    )
    first = h(REALITY["client_hello"]["hex"]) + R.CCS_RECORD
    assert acceptor.receive(first, FIXED["timestamp"]) is None
    assert acceptor.data_to_send() == R.SERVER_FLIGHT
    verdict = acceptor.receive(h(live["c2s_record_ctr0_http_request_hex"]), FIXED["timestamp"])
    assert isinstance(verdict, StreamRefused)
    assert not verdict.forwardable and verdict.answer == b""
