"""DNS: the message codec (`codec`, sans-IO) and the stub resolver (`resolver`) whose sockets
bypass the TUN device.
"""
