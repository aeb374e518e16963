"""The TUN inbound: a TUN device, the user-space netstack and the daemon's router.

`ostp_client.inbounds.tun.inbound` registers the `tun` inbound type when imported.
"""
