"""Send buffer and out-of-order reassembly of one TCP connection.

Offsets are absolute stream positions (unbounded ints), not 32-bit sequence numbers, so no
wrap-around arithmetic happens outside the conversions in :mod:`ostp_netstack.tcp`.
"""

from __future__ import annotations

from bisect import bisect_right

__all__ = ["Assembler", "SendBuffer"]

_COMPACT_AFTER = 32


class SendBuffer:
    """Bytes queued by the application, from the oldest unacknowledged one to the last queued.

    Chunks are kept as the application handed them (no copy); segments are cut out of them as
    memoryview slices, and only a segment that spans two chunks is joined.
    """

    __slots__ = ("_chunks", "_first", "_starts", "end", "start")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._starts: list[int] = []
        self._first = 0
        self.start = 0
        """Offset of the first byte held (the oldest unacknowledged one)."""
        self.end = 0
        """Offset just past the last byte queued."""

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._starts.append(self.end)
            self.end += len(data)

    def view(self, offset: int, size: int) -> bytes | memoryview:
        """``size`` bytes from ``offset`` (both within ``start..end``)."""
        i = bisect_right(self._starts, offset, self._first) - 1
        chunk = self._chunks[i]
        rel = offset - self._starts[i]
        if rel + size <= len(chunk):
            if rel == 0 and size == len(chunk):
                return chunk
            return memoryview(chunk)[rel : rel + size]
        parts: list[bytes | memoryview] = [memoryview(chunk)[rel:]]
        need = size - (len(chunk) - rel)
        while need > 0:
            i += 1
            chunk = self._chunks[i]
            parts.append(chunk if need >= len(chunk) else memoryview(chunk)[:need])
            need -= len(chunk)
        return b"".join(parts)

    def release(self, offset: int) -> int:
        """Forget everything before ``offset`` (acknowledged); returns the bytes released."""
        offset = min(offset, self.end)
        if offset <= self.start:
            return 0
        released = offset - self.start
        self.start = offset
        chunks, starts = self._chunks, self._starts
        first = self._first
        while first < len(chunks) and starts[first] + len(chunks[first]) <= offset:
            chunks[first] = b""
            first += 1
        if first > _COMPACT_AFTER and first * 2 > len(chunks):
            del chunks[:first]
            del starts[:first]
            first = 0
        self._first = first
        return released


class Assembler:
    """Out-of-order segments waiting for the gap before them to fill (RFC 9293 §3.10.7.4)."""

    __slots__ = ("_segments", "size")

    def __init__(self) -> None:
        self._segments: dict[int, bytes] = {}
        self.size = 0
        """Bytes held."""

    def __len__(self) -> int:
        return len(self._segments)

    def add(self, offset: int, data: bytes) -> bool:
        """Keep a segment; returns False when one at the same offset already covers it."""
        old = self._segments.get(offset)
        if old is not None:
            if len(old) >= len(data):
                return False
            self.size -= len(old)
        self._segments[offset] = data
        self.size += len(data)
        return True

    def pop_contiguous(self, offset: int) -> list[bytes]:
        """Remove and return the bytes that continue the stream at ``offset``, in order."""
        out: list[bytes] = []
        segments = self._segments
        for start in sorted(segments):
            if start > offset:
                break
            data = segments.pop(start)
            self.size -= len(data)
            end = start + len(data)
            if end > offset:
                out.append(data[offset - start :] if start < offset else data)
                offset = end
        return out

    def clear(self) -> int:
        """Drop everything; returns the bytes dropped."""
        size = self.size
        self._segments.clear()
        self.size = 0
        return size
