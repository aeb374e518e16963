"""Internet checksum (RFC 1071) with big integers.

The ones' complement sum of a buffer of 16-bit words equals the buffer read as one big-endian
integer modulo 0xFFFF (because 2**16 == 1 mod 0xFFFF), which CPython computes in C at several
hundred MB/s, about four times faster than a word loop or ``dpkt.in_cksum`` (PERFORMANCE.md).
Sums here are kept as residues modulo 0xFFFF, so they can be added and folded later.
"""

from __future__ import annotations

__all__ = ["finish", "sum16", "verify"]


_CHUNK = 4096  # even, so every chunk starts on a 16-bit word boundary
_FOLD_BITS = 2048


def sum16(buf: bytes | bytearray | memoryview) -> int:
    """Ones' complement sum of ``buf`` as a residue modulo 0xFFFF (odd lengths padded)."""
    size = len(buf)
    if size <= 2 * _CHUNK:
        value = int.from_bytes(buf, "big")
        if size & 1:
            value <<= 8
        return value % 0xFFFF
    # Large buffers: a big-int division by 0xFFFF costs about twice the conversion, so add
    # word-aligned chunks (each equals its word sum modulo 0xFFFF) and fold the total by
    # halves (2**(16k) == 1 modulo 0xFFFF); together about 2.3 times faster at 64 KB.
    view = memoryview(buf)
    from_bytes = int.from_bytes
    last = size - (size - 1) % _CHUNK - 1
    total = 0
    for start in range(0, last, _CHUNK):
        total += from_bytes(view[start : start + _CHUNK], "big")
    tail = from_bytes(view[last:], "big")
    total += tail << 8 if size & 1 else tail
    bits = total.bit_length()
    while bits > _FOLD_BITS:
        half = ((bits >> 1) + 15) & ~15
        total = (total >> half) + (total & ((1 << half) - 1))
        bits = total.bit_length()
    return total % 0xFFFF


def finish(residue: int) -> int:
    """Checksum field for a sum residue: the ones' complement of the folded sum.

    A residue of 0 means a sum of 0xFFFF (a real sum is never zero here: every pseudo header
    holds a non-zero protocol), whose complement 0 is written as 0xFFFF, the other zero: valid
    for every protocol and required for UDP, where 0 means "no checksum" (RFC 768).
    """
    return 0xFFFF - (residue % 0xFFFF)


def verify(residue: int) -> bool:
    """True when a sum that includes the checksum field folds to 0xFFFF (RFC 1071)."""
    return residue % 0xFFFF == 0
