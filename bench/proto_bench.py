"""ostp_proto speed next to the crypto floor (the bare ChaCha20-Poly1305 call) on this machine.

(a) Sealing and opening 1200-byte frames (DataSealer.seal; DataOpener.unmask + decrypt) against
    the bare `cryptography` encrypt and decrypt of the same bytes; the goal is seal+open at
    most 3x bare encrypt+decrypt. Then the whole per-datagram path through two connections
    (send_data + datagrams_to_send; receive_datagram + next_event) with the same frame size.
(b) An in-memory 50 MB client-to-server transfer: datagrams are moved directly between the two
    cores (no loss, no padding) with a fake clock that advances a little per step.
(c) CPU seconds (``time.process_time``, so other load on a shared machine does not count) per
    GiB of stream data on the send path and the receive path of the same transfer, for the
    datagram sizes of ``--sizes`` (a real path's 1,400 bytes; 65,507, what path MTU discovery
    reaches on loopback, where per-byte costs such as copies of the payload show).

Prints a table and writes JSON to bench/results/proto_bench.json. Best of several repetitions.
Usage: ``hatch run python bench/proto_bench.py [--mb 50] [--reps 5] [--sizes 1400,65507]
[--only-gib] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import __version__ as cryptography_version
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ostp_proto import (
    ClientConnection,
    ConnectionConfig,
    Data,
    PaddingPolicy,
    RelayMessageReceived,
    ServerAcceptor,
    ServerConnection,
    derive_secrets,
)
from ostp_proto.frames import FrameKind, encode_frame
from ostp_proto.obfuscation import NONCE_PREFIX, DataOpener, DataSealer

FRAME_LEN = 1200
KEY = "bench-key-0123456789abcdef"
UNIX = 1_700_000_000.0
RESULTS = Path(__file__).resolve().parent / "results" / "proto_bench.json"


def _best(samples: list[float]) -> float:
    return min(samples)


# ------------------------------------------------------------------ (a) seal/open vs bare AEAD


def crypto_floor(n: int, reps: int) -> dict[str, float]:
    """Seconds per operation (best of ``reps``) for seal, open, bare encrypt, bare decrypt."""
    rng = random.Random(1)
    key, obf, sid = rng.randbytes(32), derive_secrets(KEY).obfuscation_key, 0x01020304
    payload = rng.randbytes(FRAME_LEN - 12)
    frame = encode_frame(FrameKind.DATA, 1, payload)
    assert len(frame) == FRAME_LEN
    sealer, opener = DataSealer(obf, key, sid), DataOpener(obf, key, sid)
    aead = ChaCha20Poly1305(key)
    aad = sid.to_bytes(4, "big")
    nonces = [NONCE_PREFIX + i.to_bytes(8, "big") for i in range(n)]
    seal_t, open_t, enc_t, dec_t, mask_t = [], [], [], [], []
    for _ in range(reps):
        seal = sealer.seal
        t0 = time.perf_counter()
        datagrams = [seal(i, frame) for i in range(n)]
        seal_t.append((time.perf_counter() - t0) / n)

        unmask, decrypt = opener.unmask, opener.decrypt
        t0 = time.perf_counter()
        for d in datagrams:
            nonce = unmask(d)
            assert nonce is not None
            decrypt(nonce, d)
        open_t.append((time.perf_counter() - t0) / n)

        encrypt = aead.encrypt
        t0 = time.perf_counter()
        cts = [encrypt(iv, frame, aad) for iv in nonces]
        enc_t.append((time.perf_counter() - t0) / n)

        sample = cts[0][:32]
        t0 = time.perf_counter()
        for _i in range(n):
            hmac.digest(obf, sample, "sha256")
        mask_t.append((time.perf_counter() - t0) / n)

        bare_decrypt = aead.decrypt
        t0 = time.perf_counter()
        for iv, ct in zip(nonces, cts, strict=True):
            bare_decrypt(iv, ct, aad)
        dec_t.append((time.perf_counter() - t0) / n)
    assert opener.decrypt(0, datagrams[0]) == frame
    return {
        "seal": _best(seal_t),
        "open": _best(open_t),
        "bare_encrypt": _best(enc_t),
        "bare_decrypt": _best(dec_t),
        "hmac_mask": _best(mask_t),
    }


# ------------------------------------------------------------ connections moved in memory


@dataclass
class Transfer:
    wall: float
    send: float  # send_data + datagrams_to_send on the client
    receive: float  # receive_datagram + next_event on the server
    feedback: float  # the server's ACKs back into the client, and timers
    data_datagrams: int
    send_cpu: float  # the same three parts in CPU seconds (time.process_time)
    receive_cpu: float
    loop_cpu: float
    datagrams_up: int
    datagrams_down: int
    retransmissions: int
    nbytes: int


def _pair(max_datagram_size: int) -> tuple[ClientConnection, ServerConnection]:
    rnd = random.Random(2).randbytes
    client = ClientConnection(
        access_key=KEY,
        config=ConnectionConfig(
            padding=PaddingPolicy.none(),
            max_datagram_size=max_datagram_size,
            keepalive_interval=None,
        ),
        random_bytes=rnd,
    )
    server_config = ConnectionConfig(
        padding=PaddingPolicy.none(), max_datagram_size=max_datagram_size, keepalive_interval=None
    )
    acceptor = ServerAcceptor([KEY], config=server_config, random_bytes=rnd)
    client.connect(0.0, UNIX)
    [first] = client.datagrams_to_send(0.0)
    server = acceptor.accept(first, 0.0, UNIX)
    assert server is not None
    for d in server.datagrams_to_send(0.0):
        client.receive_datagram(d, 0.0)
    while client.next_event() is not None:
        pass
    while server.next_event() is not None:
        pass
    return client, server


def transfer(total: int, max_datagram_size: int, step: float = 2e-6) -> Transfer:
    """Move ``total`` bytes client→server; the fake clock advances ``step`` per datagram."""
    client, server = _pair(max_datagram_size)
    chunk = bytes(random.Random(3).randbytes(1 << 20))
    offset = received = 0
    data_datagrams = up = down = 0
    t_send = t_recv = t_fb = 0.0
    c_send = c_recv = 0.0
    now = 0.001
    perf = time.perf_counter
    cpu = time.process_time
    start = perf()
    cpu_start = cpu()
    while received < total:
        c0 = cpu()
        t0 = perf()
        while offset < total and client.writable:
            n = min(len(chunk), total - offset)
            client.send_data(1, chunk[:n])
            offset += n
        out = client.datagrams_to_send(now)
        t1 = perf()
        c1 = cpu()
        for d in out:
            server.receive_datagram(d, now)
        while (ev := server.next_event()) is not None:
            if isinstance(ev, RelayMessageReceived) and isinstance(ev.message, Data):
                received += len(ev.message.data)
                data_datagrams += 1
        t2 = perf()
        c2 = cpu()
        up += len(out)
        back = server.datagrams_to_send(now)
        down += len(back)
        for d in back:
            client.receive_datagram(d, now)
        now += step * max(len(out), 1)
        if not out:
            # nothing allowed out (pacing, window): jump to the next deadline
            timers = [t for t in (client.get_timer(), server.get_timer()) if t is not None]
            if timers:
                now = max(now, min(timers))
        for conn in (client, server):
            timer = conn.get_timer()
            if timer is not None and timer <= now:
                conn.handle_timer(now)
        t3 = perf()
        t_send += t1 - t0
        t_recv += t2 - t1
        t_fb += t3 - t2
        c_send += c1 - c0
        c_recv += c2 - c1
    wall = perf() - start
    loop_cpu = cpu() - cpu_start
    assert received == total
    return Transfer(
        wall,
        t_send,
        t_recv,
        t_fb,
        data_datagrams,
        c_send,
        c_recv,
        loop_cpu,
        up,
        down,
        client.sender.stats.retransmissions,
        total,
    )


def cpu_per_gib(sizes: list[int], total: int, reps: int) -> dict[str, dict[str, float]]:
    """(c): best-of-``reps`` CPU seconds per GiB of stream data, per datagram size."""
    out: dict[str, dict[str, float]] = {}
    for size in sizes:
        runs = [transfer(total, size) for _ in range(reps)]
        scale = (1 << 30) / total
        out[str(size)] = {
            "send": min(r.send_cpu for r in runs) * scale,
            "receive": min(r.receive_cpu for r in runs) * scale,
            "whole_loop": min(r.loop_cpu for r in runs) * scale,
            "data_datagrams": float(runs[0].data_datagrams),
        }
    return out


def print_gib(gib: dict[str, dict[str, float]]) -> None:
    print("CPU seconds per GiB of stream data (best of the repetitions; time.process_time)")
    print(f"  {'datagram':>9}  {'send':>7}  {'receive':>7}  {'whole loop':>10}  data datagrams")
    for size, row in gib.items():
        print(
            f"  {size:>9}  {row['send']:7.3f}  {row['receive']:7.3f}  "
            f"{row['whole_loop']:10.3f}  {row['data_datagrams']:,.0f}"
        )


# --------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="size of the transfer (MB)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each measurement")
    parser.add_argument("--ops", type=int, default=20_000, help="datagrams per crypto repetition")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the results")
    parser.add_argument(
        "--sizes", default="1400,65507", help="datagram sizes of the CPU-per-GiB table (c)"
    )
    parser.add_argument("--gib-mb", type=float, default=32.0, help="MB per transfer of (c)")
    parser.add_argument("--only-gib", action="store_true", help="only (c), no JSON written")
    args = parser.parse_args()

    gib = cpu_per_gib(
        [int(x) for x in args.sizes.split(",")], int(args.gib_mb * 1_000_000), args.reps
    )
    print_gib(gib)
    if args.only_gib:
        return

    floor = crypto_floor(args.ops, args.reps)
    bare = floor["bare_encrypt"] + floor["bare_decrypt"]
    ratio = (floor["seal"] + floor["open"]) / bare

    # the whole path with 1200-byte frames: datagram = 12 + 1200 + 16 bytes
    path_runs = [transfer(10_000_000, FRAME_LEN + 28) for _ in range(max(args.reps - 2, 2))]
    path = min(path_runs, key=lambda r: r.send + r.receive)
    per_send = path.send / path.data_datagrams
    per_recv = path.receive / path.data_datagrams
    per_all = path.wall / path.data_datagrams

    total = int(args.mb * 1_000_000)
    runs = [transfer(total, 1400) for _ in range(3)]
    rates = [r.nbytes / r.wall / 1e6 for r in runs]
    best = max(runs, key=lambda r: r.nbytes / r.wall)

    def us(x: float) -> str:
        return f"{x * 1e6:8.2f} us"

    def per_s(x: float) -> str:
        return f"{1 / x:>10,.0f}/s"

    rows = [
        (
            "bare ChaCha20-Poly1305 encrypt, 1200 B",
            us(floor["bare_encrypt"]),
            per_s(floor["bare_encrypt"]),
        ),
        (
            "bare ChaCha20-Poly1305 decrypt, 1200 B",
            us(floor["bare_decrypt"]),
            per_s(floor["bare_decrypt"]),
        ),
        ("HMAC-SHA256 header mask alone", us(floor["hmac_mask"]), per_s(floor["hmac_mask"])),
        ("DataSealer.seal (mask + AEAD)", us(floor["seal"]), per_s(floor["seal"])),
        ("DataOpener.unmask + decrypt", us(floor["open"]), per_s(floor["open"])),
        ("ratio (seal+open) / (encrypt+decrypt)", f"{ratio:8.2f} x", "goal <= 3x"),
        ("connection send path per datagram", us(per_send), per_s(per_send)),
        ("connection receive path per datagram", us(per_recv), per_s(per_recv)),
        ("ratio (send+receive path) / bare AEAD", f"{(per_send + per_recv) / bare:8.2f} x", ""),
        ("whole loop per datagram (incl. ACKs)", us(per_all), per_s(per_all)),
        (
            f"in-memory {args.mb:g} MB client->server",
            f"{max(rates):8.1f} MB/s",
            f"median {statistics.median(rates):.1f} MB/s",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(
        f"ostp_proto benchmark (Python {platform.python_version()}, "
        f"cryptography {cryptography_version}, {os.cpu_count()} CPUs)"
    )
    for name, a, b in rows:
        print(f"  {name:<{width}}  {a:>12}  {b}")
    print(
        f"  transfer: {best.data_datagrams:,} data datagrams, {best.datagrams_up:,} up, "
        f"{best.datagrams_down:,} down (ACKs), {best.retransmissions} retransmissions; "
        f"split send {best.send:.2f} s, receive {best.receive:.2f} s, "
        f"ACKs/timers {best.feedback:.2f} s"
    )

    result = {
        "python": platform.python_version(),
        "cpu_seconds_per_gib": gib,
        "cryptography": cryptography_version,
        "frame_bytes": FRAME_LEN,
        "seconds_per_op": floor,
        "per_second": {k: 1 / v for k, v in floor.items()},
        "seal_open_over_bare_ratio": ratio,
        "goal_ratio": 3.0,
        "connection_path": {
            "datagram_bytes": FRAME_LEN + 28,
            "send_seconds_per_datagram": per_send,
            "receive_seconds_per_datagram": per_recv,
            "whole_loop_seconds_per_datagram": per_all,
            "send_receive_over_bare_ratio": (per_send + per_recv) / bare,
        },
        "transfer": {
            "bytes": total,
            "mb_per_s_best": max(rates),
            "mb_per_s_median": statistics.median(rates),
            "mb_per_s_all": rates,
            "data_datagrams": best.data_datagrams,
            "datagrams_up": best.datagrams_up,
            "datagrams_down": best.datagrams_down,
            "retransmissions": best.retransmissions,
            "send_seconds": best.send,
            "receive_seconds": best.receive,
            "feedback_seconds": best.feedback,
        },
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"  written: {args.json}")


if __name__ == "__main__":
    main()
