"""The local proxy inbound: one listener that speaks SOCKS5 and HTTP (CONNECT and plain).

`local_proxy` owns the listening socket and sniffs the first byte; `socks5` and `http` each turn
one accepted connection into a `ConnContext` for the dispatcher and relay its bytes.
"""
