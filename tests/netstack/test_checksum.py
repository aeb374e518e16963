"""The big-integer checksum agrees with a plain RFC 1071 word loop."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ostp_netstack.checksum import finish, sum16, verify


def reference(data: bytes) -> int:
    if len(data) & 1:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=20_000), st.integers(0, 3))
def test_sum16_matches_word_loop(data: bytes, skip: int) -> None:
    view = memoryview(data)[skip:]
    folded = reference(bytes(view))
    assert sum16(view) == folded % 0xFFFF
    field = finish(sum16(view))
    assert verify(sum16(view) + field)


def test_large_buffers_chunk_boundaries() -> None:
    for size in (8191, 8192, 8193, 12288, 12289, 65480, 65481):
        data = bytes((i * 7919 + 13) & 0xFF for i in range(size))
        assert sum16(data) == reference(data) % 0xFFFF
