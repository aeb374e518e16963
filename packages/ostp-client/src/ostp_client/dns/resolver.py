"""A small stub resolver whose queries carry the routing mark (the `direct` outbound's names).

With a TUN inbound's ``auto_route`` every unmarked packet enters the tunnel, the system
resolver's DNS queries included (glibc's sockets carry no mark), and with ``fake_ip`` the TUN
answers them with fake addresses: a name routed to `direct` would loop back into the tunnel.
So while a mark is in effect, `direct` resolves names here instead, as glibc would with
``hosts: files dns``: the hosts file first, then the ``nameserver`` lines of resolv.conf with
its ``search`` list and ``ndots``; A and AAAA asked in parallel over UDP sockets given
`ostp_client.net.bypass.apply_bypass` before they send, a random 16-bit id per query and a
kernel-chosen (randomised) source port per socket, answers accepted only from the server asked,
with the id and question echoed (RFC 5452 §9.1), a truncated answer asked again over TCP
(RFC 7766 §5) on a marked socket, CNAME chains followed within the answer, one retry per
server, and a small cache that keeps records no longer than their TTL. ``localhost`` is
answered here (RFC 6761 §6.3); names are encoded with IDNA 2008 (UTS #46).

What is dnspython's and what is ours:

- dnspython does the message work: building queries, parsing answers (anything malformed is a
  dropped reply), matching a reply to its query (id, flags, question), following CNAME chains
  (`resolve_chaining`), and IDNA (through the ``idna`` package).
- The sockets are ours: they must be marked or bound to the physical interface before the
  first packet (`apply_bypass`) and driven by anyio. ``dns.query.udp``/``tcp`` take a
  pre-made socket but block a thread per query; ``dns.asyncquery`` makes its own sockets
  through its own backend, with no hook between socket() and connect(). The UDP exchange and
  the TCP framing (a two-byte length, RFC 1035 §4.2.2) are a few lines each.
- The hosts file is ours: dnspython does not read it (its maintainers declined, as it is not
  DNS), and ``dns.resolver.Resolver`` would read resolv.conf but refuses a file without a
  nameserver, where we fall back to the system resolver; so resolv.conf's three keywords
  (``nameserver``, ``search``/``domain``, ``options ndots``) are read here too.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import anyio.abc

from ostp_client.dns.codec import TYPE_A, TYPE_AAAA
from ostp_client.errors import OstpClientError
from ostp_client.net.bypass import apply_bypass
from ostp_client.net.tcp import connect_marked

if TYPE_CHECKING:
    import dns.message

__all__ = [
    "TYPE_A",
    "TYPE_AAAA",
    "DnsCache",
    "ResolvConf",
    "ResolveError",
    "StubResolver",
    "candidate_names",
    "read_hosts",
    "read_nameservers",
    "read_resolv_conf",
]

logger = logging.getLogger(__name__)

RESOLV_CONF = "/etc/resolv.conf"
HOSTS_FILE = "/etc/hosts"
DNS_PORT = 53
MAXNS = 3  # resolv.conf(5): at most three nameservers are used
MAXDNSRCH = 6  # resolv.conf(5): at most six search domains
NEGATIVE_TTL = 30  # seconds an NXDOMAIN or NODATA is kept
MAX_TTL = 3600
MAX_TCP_RESPONSE = 65535
RCODE_NOERROR = 0  # RFC 1035 §4.1.1
RCODE_NXDOMAIN = 3
FLAG_TC = 0x0200  # truncated
_TCP_LENGTH = struct.Struct("!H")

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


@dataclass(frozen=True, slots=True)
class ResolvConf:
    """What the stub resolver reads of a resolv.conf."""

    nameservers: list[str]
    search: list[str]
    ndots: int = 1


def read_resolv_conf(path: str | Path = RESOLV_CONF) -> ResolvConf:
    """``nameserver`` (via `read_nameservers`), the last ``search``/``domain`` line and
    ``options ndots:n`` (resolv.conf(5)); empty when unreadable."""
    search: list[str] = []
    ndots = 1
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith(("#", ";")):
            continue
        if fields[0] in ("search", "domain"):
            search = [d.strip(".").lower() for d in fields[1:] if d.strip(".")][:MAXDNSRCH]
        elif fields[0] == "options":
            for option in fields[1:]:
                key, _, value = option.partition(":")
                if key == "ndots" and value.isdigit():
                    ndots = min(int(value), 15)
    return ResolvConf(read_nameservers(path), search, ndots)


def read_hosts(path: str | Path = HOSTS_FILE) -> dict[str, list[IPAddress]]:
    """name (lower-case, no trailing dot) → its addresses in file order; {} when unreadable."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return {}
    table: dict[str, list[IPAddress]] = {}
    for line in text.splitlines():
        fields = line.partition("#")[0].split()
        if len(fields) < 2:
            continue
        try:
            address = ipaddress.ip_address(fields[0].partition("%")[0])
        except ValueError:
            continue
        for name in fields[1:]:
            entry = table.setdefault(name.rstrip(".").lower(), [])
            if address not in entry:
                entry.append(address)
    return table


def candidate_names(name: str, search: Sequence[str], ndots: int) -> list[str]:
    """The names to ask for ``name``, in order (resolv.conf(5) ``search`` and ``ndots``).

    A name ending in a dot is absolute: asked as it is only.
    """
    if name.endswith("."):
        return [name.rstrip(".")]
    expanded = [f"{name}.{domain}" for domain in search]
    if name.count(".") >= ndots:
        return [name, *expanded]
    return [*expanded, name]


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
    """This server gave no usable answer (timeout, SERVFAIL, no TCP after truncation...)."""


class StubResolver:
    """Resolve names over marked sockets (see the module docstring).

    ``nameservers`` given explicitly win (with ``search``/``ndots``); else resolv.conf
    (``resolv_conf``) is read at every lookup that misses the cache, and with no nameserver
    there, the system resolver is used. ``hosts_file`` is read before asking DNS (None: not
    read). ``port`` is for tests. Counters: ``dropped_replies`` (wrong source, id, question or
    malformed), ``timeouts``, ``server_failures``, ``tcp_fallbacks``.
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        *,
        resolv_conf: str | Path = RESOLV_CONF,
        hosts_file: str | Path | None = HOSTS_FILE,
        search: Sequence[str] = (),
        ndots: int = 1,
        timeout: float = 2.0,
        attempts: int = 2,
        port: int = DNS_PORT,
        cache: DnsCache | None = None,
    ) -> None:
        self.nameservers = list(nameservers) if nameservers is not None else None
        self.resolv_conf = resolv_conf
        self.hosts_file = hosts_file
        self.search = [d.strip(".").lower() for d in search]
        self.ndots = ndots
        self.timeout = timeout
        self.attempts = attempts
        self.port = port
        self.cache = cache if cache is not None else DnsCache()
        self.counters = {
            "dropped_replies": 0,
            "timeouts": 0,
            "server_failures": 0,
            "tcp_fallbacks": 0,
        }

    def _config(self) -> ResolvConf:
        if self.nameservers is not None:
            return ResolvConf(self.nameservers, self.search, self.ndots)
        return read_resolv_conf(self.resolv_conf)

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
        config = self._config()
        if not config.nameservers:
            return await self._system(host, family)
        if self.hosts_file is not None:
            listed = read_hosts(self.hosts_file).get(name)
            if listed:
                versions = {TYPE_AAAA: 6, TYPE_A: 4}
                found = [str(a) for q in qtypes for a in listed if a.version == versions[q]]
                if found:
                    return found
        first_error: ResolveError | None = None
        absolute = host.lower() if host.endswith(".") else name
        for candidate in candidate_names(absolute, config.search, config.ndots):
            try:
                return await self._resolve_name(candidate, qtypes, config.nameservers, mark)
            except ResolveError as exc:
                first_error = first_error or exc
        assert first_error is not None  # candidate_names is never empty
        raise first_error

    async def _resolve_name(
        self, name: str, qtypes: list[int], servers: Sequence[str], mark: int | None
    ) -> list[str]:
        results: dict[int, list[IPAddress] | BaseException] = {}

        async def ask(qtype: int) -> None:
            try:
                results[qtype] = await self._lookup(name, qtype, servers, mark)
            except ResolveError as exc:
                results[qtype] = exc
            except OSError as exc:  # its socket failed before sending: no descriptor, no mark
                results[qtype] = ResolveError(f"{name}: {exc.strerror or exc}")

        async with anyio.create_task_group() as tg:
            for qtype in qtypes:
                tg.start_soon(ask, qtype)
        addresses = [str(a) for q in qtypes if isinstance(found := results[q], list) for a in found]
        if addresses:
            return addresses
        errors = [r for r in results.values() if isinstance(r, ResolveError)]
        if errors:
            raise errors[0]
        raise ResolveError(f"{name}: no address")

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
        for server in servers:
            for _ in range(self.attempts):
                # dnspython is imported with the first query, not with the daemon (start-up time)
                from ostp_client.dns import messages  # noqa: PLC0415

                try:
                    query = messages.make_query(name, qtype)  # a fresh random id
                except ValueError as exc:
                    raise ResolveError(str(exc)) from None
                try:
                    response = await self._ask(server, query, mark)
                except _Failed:
                    continue
                rcode = int(response.rcode())
                if rcode == RCODE_NXDOMAIN:
                    self.cache.put(name, qtype, [], NEGATIVE_TTL, anyio.current_time())
                    raise ResolveError(f"{name}: no such domain")
                if rcode != RCODE_NOERROR:
                    self.counters["server_failures"] += 1
                    break  # SERVFAIL, REFUSED...: the next server
                addresses, ttl = messages.addresses_in(response, qtype)
                # no record of this type (NODATA) is kept like NXDOMAIN, briefly
                self.cache.put(
                    name, qtype, addresses, ttl if addresses else NEGATIVE_TTL, anyio.current_time()
                )
                return addresses
        raise ResolveError(f"{name}: no answer from {', '.join(servers)}")

    async def _ask(
        self, server: str, query: dns.message.QueryMessage, mark: int | None
    ) -> dns.message.Message:
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
        truncated = False
        async with sock:
            try:
                await sock.sendto(query.to_wire(), server, self.port)
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
                    response = self._check(data, peer, peer_port, ip, query)
                    if response is None:
                        self.counters["dropped_replies"] += 1
                        continue
                    if not response.flags & FLAG_TC:
                        return response
                    truncated = True  # the whole answer comes over TCP
                    break
        if truncated:
            return await self._ask_tcp(server, family, query, mark)
        self.counters["timeouts"] += 1
        raise _Failed

    async def _ask_tcp(
        self, server: str, family: int, query: dns.message.QueryMessage, mark: int | None
    ) -> dns.message.Message:
        """Ask again over TCP on a marked socket (RFC 7766 §5: after a truncated answer)."""
        self.counters["tcp_fallbacks"] += 1
        wire = query.to_wire()
        sockaddr = (server, self.port, 0, 0) if family == socket.AF_INET6 else (server, self.port)
        with anyio.move_on_after(self.timeout):
            try:
                stream = await connect_marked(family, sockaddr, None, mark)
                async with stream:
                    await stream.send(_TCP_LENGTH.pack(len(wire)) + wire)
                    head = await _receive_exactly(stream, _TCP_LENGTH.size)
                    data = await _receive_exactly(stream, _TCP_LENGTH.unpack(head)[0])
            except (OSError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
                logger.debug("DNS over TCP to %s failed: %s", server, exc)
                self.counters["server_failures"] += 1
                raise _Failed from None
            response = _read_response(query, data)
            if response is None or response.flags & FLAG_TC:
                self.counters["dropped_replies"] += 1
                raise _Failed
            return response
        self.counters["timeouts"] += 1
        raise _Failed

    def _check(
        self, data: bytes, peer: str, port: int, server: IPAddress, query: dns.message.Message
    ) -> dns.message.Message | None:
        """The response when it answers our query from the server asked, else None."""
        try:
            source = ipaddress.ip_address(peer.partition("%")[0])
        except ValueError:
            return None
        if source != server or port != self.port:
            return None
        return _read_response(query, data)


def _read_response(query: dns.message.Message, data: bytes) -> dns.message.Message | None:
    from ostp_client.dns import messages  # noqa: PLC0415 (imported by the query already)

    return messages.read_response(query, data)


async def _receive_exactly(stream: anyio.abc.ByteStream, size: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        buffer += await stream.receive(size - len(buffer))
    return bytes(buffer)
