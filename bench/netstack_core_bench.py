"""Push bytes through the sans-IO netstack in memory and print MB/s (no TUN, no sockets).

A minimal fake kernel TCP peer (struct only, no checksum checks of its own) plays the local
application: it downloads (stack sends) or uploads (stack receives) one stream at MSS 65480
and 1460. "stack" time counts only the time spent inside NetStack calls; "wall" includes the
fake peer. Usage: ``hatch run python bench/netstack_core_bench.py [--mb 200] [--json out]``.
"""

from __future__ import annotations

import argparse
import json
import struct
import time

from ostp_netstack import NetStack, NetStackConfig, TcpConnectionRequested, TcpDataReceived
from ostp_netstack.checksum import finish, sum16

SRC, DST = bytes([10, 0, 0, 2]), bytes([93, 184, 216, 34])
SPORT, DPORT = 40000, 80
ACK, PSH, SYN = 0x10, 0x08, 0x02
WSCALE = 7


def kernel_packet(
    seq: int, ack: int, flags: int, payload: bytes, payload_sum: int, opts: bytes = b""
) -> bytes:
    tcp_len = 20 + len(opts) + len(payload)
    hdr = (
        struct.pack(
            "!HHIIBBHHH", SPORT, DPORT, seq, ack, (5 + len(opts) // 4) << 4, flags, 0xFFFF, 0, 0
        )
        + opts
    )
    csum = finish(sum16(SRC) + sum16(DST) + 6 + tcp_len + sum16(hdr) + payload_sum)
    hdr = hdr[:16] + struct.pack("!H", csum) + hdr[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + tcp_len, 0, 0x4000, 64, 6, 0, SRC, DST)
    ip = ip[:10] + struct.pack("!H", finish(sum16(ip))) + ip[12:]
    return b"".join((ip, hdr, payload))


def connect(stack: NetStack, mss: int) -> tuple[int, int, int]:
    opts = struct.pack("!BBHBBBB", 2, 4, mss, 1, 3, 3, WSCALE)
    stack.receive_packet(kernel_packet(1000, 0, SYN, b"", 0, opts), 0.0)
    event = stack.next_event()
    assert isinstance(event, TcpConnectionRequested)
    stack.tcp_accept(event.conn_id)
    [synack] = stack.packets_to_send(0.0)
    their_seq = struct.unpack_from("!I", synack, 24)[0]
    stack.receive_packet(kernel_packet(1001, their_seq + 1, ACK, b"", 0), 0.0)
    stack.next_event()
    return event.conn_id, 1001, their_seq + 1


def download(total: int, mss: int) -> tuple[float, float]:
    stack = NetStack(NetStackConfig())
    conn, seq, rcv_nxt = connect(stack, mss)
    chunk = bytes(range(256)) * 1024  # not zeros: CPython sums zero bytes much faster
    queued = received = 0
    in_stack = 0.0
    clock = time.perf_counter
    start = clock()
    now = 0.0
    while received < total:
        t0 = clock()
        while queued < total and stack.tcp_send_capacity(conn) >= len(chunk):
            queued += stack.tcp_send(conn, chunk)
        packets = stack.packets_to_send(now)
        in_stack += clock() - t0
        acks = []
        for i, pkt in enumerate(packets):
            pseq = struct.unpack_from("!I", pkt, 24)[0]
            size = len(pkt) - 20 - (pkt[32] >> 4) * 4
            if pseq == rcv_nxt:
                rcv_nxt = (rcv_nxt + size) & 0xFFFFFFFF
                received += size
            if i & 1 or i == len(packets) - 1:  # the kernel ACKs every second segment
                acks.append(kernel_packet(seq, rcv_nxt, ACK, b"", 0))
        t0 = clock()
        for ack in acks:
            stack.receive_packet(ack, now)
        while stack.next_event() is not None:
            pass
        in_stack += clock() - t0
        now += 0.0001
    return clock() - start, in_stack


def upload(total: int, mss: int) -> tuple[float, float]:
    stack = NetStack(NetStackConfig())
    conn, seq, our_seq = connect(stack, mss)
    payload = (bytes(range(1, 256)) * (mss // 255 + 1))[:mss]
    payload_sum = sum16(payload)
    sent = delivered = 0
    in_stack = 0.0
    window = 65535
    acked = seq
    clock = time.perf_counter
    start = clock()
    now = 0.0
    while delivered < total:
        burst: list[bytes] = []
        while sent < total and ((seq - acked) & 0xFFFFFFFF) + mss <= window and len(burst) < 64:
            burst.append(kernel_packet(seq, our_seq, ACK | PSH, payload, payload_sum))
            seq = (seq + mss) & 0xFFFFFFFF
            sent += mss
        t0 = clock()
        for pkt in burst:
            stack.receive_packet(pkt, now)
        consumed = 0
        while (event := stack.next_event()) is not None:
            if isinstance(event, TcpDataReceived):
                consumed += len(event.data)
        stack.tcp_consumed(conn, consumed)
        out = stack.packets_to_send(now)
        in_stack += clock() - t0
        delivered += consumed
        for pkt in out:
            acked = struct.unpack_from("!I", pkt, 28)[0]
            window = struct.unpack_from("!H", pkt, 34)[0] << 7
        now += 0.0001
    return clock() - start, in_stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=200, help="MB per run at MSS 65480")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    results = {}
    for direction, run in (("download", download), ("upload", upload)):
        for mss in (65480, 1460):
            total = args.mb * 1_000_000 if mss > 1460 else args.mb * 1_000_000 // 8
            wall, in_stack = run(total, mss)
            key = f"{direction}_mss{mss}"
            figures = {
                "MB": total / 1e6,
                "wall_MBps": total / wall / 1e6,
                "stack_MBps": total / in_stack / 1e6,
            }
            results[key] = figures
            print(
                f"{key:22s} {figures['MB']:6.0f} MB  wall {figures['wall_MBps']:7.1f} MB/s"
                f"  stack {figures['stack_MBps']:7.1f} MB/s"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
