"""The daemon's sockets towards the outside world.

`bypass` marks or binds a socket so its packets leave beside the TUN device instead of looping
into it (SO_MARK on Linux, IP_UNICAST_IF on Windows); `batch` sends and receives many UDP
datagrams per system call (GSO/GRO). Every outbound socket goes through here.
"""
