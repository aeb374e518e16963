"""Fuzz target: arbitrary bytes as a packet from the TUN device into a NetStack.

atheris-compatible (``atheris.Setup(sys.argv, test_one_input); atheris.Fuzz()``); the hypothesis
test in ``tests/netstack/test_garbage.py`` calls it too. Garbage may only be dropped and
counted, never raise.
"""

from __future__ import annotations

from ostp_netstack import NetStack, NetStackConfig

_CONFIG = NetStackConfig(icmp_echo_reply=True)


def test_one_input(data: bytes) -> None:
    stack = NetStack(_CONFIG, random=bytes)
    # The first byte picks whether the rest is fed as one packet or split in two.
    if data and data[0] & 1 and len(data) > 2:
        cut = data[1] % len(data)
        stack.receive_packet(data[2:cut], 0.0)
        stack.receive_packet(data[cut:], 0.5)
    else:
        stack.receive_packet(data, 0.0)
    while (event := stack.next_event()) is not None:
        conn_id = getattr(event, "conn_id", None)
        if conn_id is not None and stack.tcp_state(conn_id) == "PENDING":
            stack.tcp_accept(conn_id)
    stack.packets_to_send(1.0)
    timer = stack.get_timer()
    if timer is not None:
        stack.handle_timer(timer)
    stack.packets_to_send(timer or 2.0)


if __name__ == "__main__":
    import importlib
    import sys

    atheris = importlib.import_module("atheris")  # optional, untyped

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
