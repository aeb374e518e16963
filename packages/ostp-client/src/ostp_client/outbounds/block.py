"""The `block` outbound: refuses every connection (SOCKS5 reply 0x02, HTTP 403)."""

from __future__ import annotations

import anyio.abc

from ostp_client.config import BlockOutboundConfig
from ostp_client.flow import Address, Blocked, ConnContext, Outbound, UdpOutboundSession

__all__ = ["BlockOutbound"]


class BlockOutbound(Outbound):
    type = "block"

    @classmethod
    def from_config(cls, config: BlockOutboundConfig) -> BlockOutbound:
        return cls(config.tag)

    async def connect_tcp(self, target: Address, ctx: ConnContext) -> anyio.abc.ByteStream:
        raise Blocked(f"{target} blocked by outbound {self.tag!r}")

    async def open_udp(self, ctx: ConnContext) -> UdpOutboundSession:
        raise Blocked(f"UDP blocked by outbound {self.tag!r}")
