"""The daemon's control socket: protocol models (`protocol`), server and client (`ctl` is the CLI).

Importing this package imports nothing else, so `ostp_client.control.protocol` and
`ostp_client.control.client` stay usable without the daemon runtime.
"""
