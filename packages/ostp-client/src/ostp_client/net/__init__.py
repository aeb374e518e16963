"""The daemon's sockets towards the outside world.

`bypass` marks or binds a socket so its packets leave beside the TUN device instead of looping
into it (SO_MARK on Linux, IP_UNICAST_IF on Windows); `tcp` connects marked TCP sockets. Every
outbound socket goes through here. Sending and receiving many UDP datagrams per system call
(GSO/GRO) and the path-MTU socket options are the `ostp_sockets` package, which the server
shares.
"""
