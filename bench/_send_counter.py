"""ostp-client with a count of its sessions' ``send_batch`` calls and their datagrams.

``bench/writers_bench.py --count`` starts the client as ``python bench/_send_counter.py run -c
CONFIG`` with ``OSTP_SEND_COUNTS=FILE`` in the environment; on SIGUSR1 the client writes
``{"calls": N, "datagrams": M}`` (totals since it started) to FILE. The count wraps
``send_batch`` of the UDP and the TCP transports, the one call every session flush makes (a few
Python operations per call, nothing per datagram).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from ostp_client.cli import main
from ostp_client.transport.stream import StreamTransport
from ostp_client.transport.udp import UdpTransport

_calls = 0
_datagrams = 0
_udp = UdpTransport.send_batch
_stream = StreamTransport.send_batch


def _counting_udp(self: UdpTransport, datagrams: Sequence[bytes]) -> int:
    global _calls, _datagrams
    _calls += 1
    _datagrams += len(datagrams)
    return _udp(self, datagrams)


def _counting_stream(self: StreamTransport, datagrams: Sequence[bytes]) -> int:
    global _calls, _datagrams
    _calls += 1
    _datagrams += len(datagrams)
    return _stream(self, datagrams)


def _dump(signum: int, frame: FrameType | None) -> None:
    path = Path(os.environ["OSTP_SEND_COUNTS"])
    part = path.with_suffix(".part")
    part.write_text(json.dumps({"calls": _calls, "datagrams": _datagrams}))
    part.replace(path)  # the reader never sees half a file


UdpTransport.send_batch = _counting_udp  # type: ignore[method-assign]
StreamTransport.send_batch = _counting_stream  # type: ignore[method-assign]
signal.signal(signal.SIGUSR1, _dump)

if __name__ == "__main__":
    sys.exit(main())
