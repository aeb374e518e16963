"""A small stub resolver whose queries carry the routing mark (the `direct` outbound's names).

With a TUN inbound's ``auto_route`` every unmarked packet enters the tunnel, the system
resolver's DNS queries included (glibc's sockets carry no mark), and with ``fake_ip`` the TUN
answers them with fake addresses: a name routed to `direct` would loop back into the tunnel.
So while a mark is in effect, `direct` resolves names here instead: the ``nameserver`` lines of
resolv.conf, A and AAAA asked in parallel over UDP sockets given
`ostp_client.net.bypass.apply_bypass` before they send, a random 16-bit id per query and a
kernel-chosen (randomised) source port per socket, answers accepted only from the server asked,
with the id and question echoed (RFC 5452 §9.1), CNAME chains followed within the answer, one
retry per server, and a small cache that keeps records no longer than their TTL.

The wire format is `ostp_client.dns.codec`'s. No TCP fallback: a truncated answer counts as a
failure of that server. Names are asked as given (no ``search`` list, no /etc/hosts), except
``localhost`` (RFC 6761 §6.3).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import socket
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.abc

from ostp_client.dns.codec import (
    RCODE_NXDOMAIN,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    DnsFormatError,
    DnsResponse,
    build_query,
    parse_response,
)
from ostp_client.errors import OstpClientError
from ostp_client.net.bypass import apply_bypass

__all__ = [
    "DnsCache",
    "ResolveError",
    "StubResolver",
    "addresses_in",
    "read_nameservers",
]

logger = logging.getLogger(__name__)

RESOLV_CONF = "/etc/resolv.conf"
DNS_PORT = 53
MAXNS = 3  # resolv.conf(5): at most three nameservers are used
MAX_CNAME_CHAIN = 16
NEGATIVE_TTL = 30  # seconds an NXDOMAIN is kept (no SOA is read for RFC 2308 §5)
MAX_TTL = 3600

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ResolveError(OstpClientError, OSError):
    """A name could not be resolved (NXDOMAIN, no address, no server answered)."""


def read_nameservers(path: str | Path = RESOLV_CONF) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf (at most `MAXNS`); [] if none/unreadable."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    servers: list[str] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        address, _, scope = fields[1].partition("%")
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        servers.append(f"{ip}%{scope}" if scope and ip.version == 6 else str(ip))
    return servers[:MAXNS]


def addresses_in(response: DnsResponse, name: str, qtype: int) -> tuple[list[IPAddress], int]:
    """The ``qtype`` addresses of ``name`` in the answer, CNAMEs followed, and the smallest TTL
    along the chain (0 when there is nothing)."""
    current = name
    ttls: list[int] = []
    seen = {current}
    for _ in range(MAX_CNAME_CHAIN):
        alias = next(
            (r for r in response.answers if r.rtype == TYPE_CNAME and r.name == current), None
        )
        if alias is None or alias.target is None or alias.target in seen:
            break
        ttls.append(alias.ttl)
        current = alias.target
        seen.add(current)
    records = [r for r in response.answers if r.rtype == qtype and r.name == current]
    addresses = [r.address for r in records if r.address is not None]
    if not addresses:
        return [], 0
    return addresses, min([*ttls, *(r.ttl for r in records)])


class DnsCache:
    """(name, qtype) → addresses until their TTL runs out; least recently used dropped first.

    An empty list is a cached NXDOMAIN or NODATA. ``now`` is passed in (a monotonic clock).
    """

    def __init__(self, capacity: int = 256, max_ttl: int = MAX_TTL) -> None:
        self.capacity = capacity
        self.max_ttl = max_ttl
        self._entries: OrderedDict[tuple[str, int], tuple[float, list[IPAddress]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, qtype: int, now: float) -> list[IPAddress] | None:
        key = (name, qtype)
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, addresses = entry
        if now >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return addresses

    def put(self, name: str, qtype: int, addresses: list[IPAddress], ttl: int, now: float) -> None:
        ttl = min(ttl, self.max_ttl)
        if ttl <= 0 or self.capacity <= 0:
            return
        key = (name, qtype)
        self._entries[key] = (now + ttl, addresses)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)


class _Failed(OstpClientError):
    """This server gave no usable answer (timeout, SERVFAIL, truncated...)."""


class StubResolver:
    """Resolve names over marked UDP sockets (see the module docstring).

    ``nameservers`` given explicitly win; else resolv.conf (``resolv_conf``) is read at every
    lookup that misses the cache, and with no nameserver there, the system resolver is used.
    ``port`` is for tests. Counters: ``dropped_replies`` (wrong source, id, question or
    malformed), ``timeouts``, ``server_failures``.
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        *,
        resolv_conf: str | Path = RESOLV_CONF,
        timeout: float = 2.0,
        attempts: int = 2,
        port: int = DNS_PORT,
        cache: DnsCache | None = None,
    ) -> None:
        self.nameservers = list(nameservers) if nameservers is not None else None
        self.resolv_conf = resolv_conf
        self.timeout = timeout
        self.attempts = attempts
        self.port = port
        self.cache = cache if cache is not None else DnsCache()
        self.counters = {"dropped_replies": 0, "timeouts": 0, "server_failures": 0}

    def _servers(self) -> list[str]:
        if self.nameservers is not None:
            return self.nameservers
        return read_nameservers(self.resolv_conf)

    async def resolve(self, host: str, family: int = 0, mark: int | None = None) -> list[str]:
        """The addresses of ``host`` (IPv6 first, then IPv4; ``family`` AF_INET/AF_INET6 keeps
        one), asked with sockets marked with ``mark`` (else the process-wide mark).

        An address literal is returned as it is. Raises `ResolveError`.
        """
        name = host.rstrip(".").lower()
        try:
            return [str(ipaddress.ip_address(name))]
        except ValueError:
            pass
        qtypes = {int(socket.AF_INET): [TYPE_A], int(socket.AF_INET6): [TYPE_AAAA]}.get(
            int(family), [TYPE_AAAA, TYPE_A]
        )
        if name == "localhost" or name.endswith(".localhost"):
            loopback = {TYPE_AAAA: "::1", TYPE_A: "127.0.0.1"}
            return [loopback[q] for q in qtypes]
        servers = self._servers()
        if not servers:
            return await self._system(host, family)
        results: dict[int, list[IPAddress] | BaseException] = {}

        async def ask(qtype: int) -> None:
            try:
                results[qtype] = await self._lookup(name, qtype, servers, mark)
            except ResolveError as exc:
                results[qtype] = exc

        async with anyio.create_task_group() as tg:
            for qtype in qtypes:
                tg.start_soon(ask, qtype)
        addresses = [str(a) for q in qtypes if isinstance(found := results[q], list) for a in found]
        if addresses:
            return addresses
        errors = [r for r in results.values() if isinstance(r, ResolveError)]
        if errors:
            raise errors[0]
        raise ResolveError(f"{host}: no address")

    async def _system(self, host: str, family: int) -> list[str]:
        try:
            infos = await anyio.getaddrinfo(host, None, family=family, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ResolveError(f"{host}: {exc}") from None
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    async def _lookup(
        self, name: str, qtype: int, servers: Sequence[str], mark: int | None
    ) -> list[IPAddress]:
        now = anyio.current_time()
        cached = self.cache.get(name, qtype, now)
        if cached is not None:
            return cached
        try:
            query_wire = build_query(0, name, qtype)
        except ValueError as exc:
            raise ResolveError(f"{name}: {exc}") from None
        for server in servers:
            for _ in range(self.attempts):
                try:
                    response = await self._ask(server, query_wire, mark)
                except _Failed:
                    continue
                if response.rcode == RCODE_NXDOMAIN:
                    self.cache.put(name, qtype, [], NEGATIVE_TTL, anyio.current_time())
                    raise ResolveError(f"{name}: no such domain")
                if response.rcode != 0:
                    self.counters["server_failures"] += 1
                    break  # SERVFAIL, REFUSED...: the next server
                addresses, ttl = addresses_in(response, name, qtype)
                # no record of this type (NODATA) is kept like NXDOMAIN, briefly
                self.cache.put(
                    name, qtype, addresses, ttl if addresses else NEGATIVE_TTL, anyio.current_time()
                )
                return addresses
        raise ResolveError(f"{name}: no answer from {', '.join(servers)}")

    async def _ask(self, server: str, query_wire: bytes, mark: int | None) -> DnsResponse:
        ident = secrets.randbits(16)
        wire = ident.to_bytes(2, "big") + query_wire[2:]
        question = query_wire[12:]
        address, _, _scope = server.partition("%")
        ip = ipaddress.ip_address(address)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        raw = socket.socket(family, socket.SOCK_DGRAM)
        try:
            apply_bypass(raw, mark)  # before the first packet: it is routed by the mark
            raw.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            raw.setblocking(False)
            sock = await anyio.abc.UDPSocket.from_socket(raw)
        except BaseException:
            raw.close()
            raise
        async with sock:
            try:
                await sock.sendto(wire, server, self.port)
            except OSError as exc:
                logger.debug("DNS query to %s failed: %s", server, exc)
                self.counters["server_failures"] += 1
                raise _Failed from None
            with anyio.move_on_after(self.timeout):
                while True:
                    try:
                        data, (peer, peer_port, *_) = await sock.receive()
                    except OSError:  # ICMP port unreachable: this server is not there
                        self.counters["server_failures"] += 1
                        raise _Failed from None
                    response = self._check(data, peer, peer_port, ip, ident, question)
                    if response is None:
                        self.counters["dropped_replies"] += 1
                        continue
                    if response.truncated:
                        self.counters["server_failures"] += 1
                        raise _Failed
                    return response
        self.counters["timeouts"] += 1
        raise _Failed

    def _check(
        self, data: bytes, peer: str, port: int, server: IPAddress, ident: int, question: bytes
    ) -> DnsResponse | None:
        """The response when it answers our query from the server asked, else None."""
        try:
            source = ipaddress.ip_address(peer.partition("%")[0])
        except ValueError:
            return None
        if source != server or port != self.port:
            return None
        try:
            response = parse_response(data)
        except DnsFormatError:
            return None
        if response.id != ident or response.question.lower() != question.lower():
            return None
        return response
