"""The Linux TUN device (``/dev/net/tun``) and the routes ``auto_route`` installs.

The device is opened with ``IFF_TUN | IFF_NO_PI`` and, with offload, ``IFF_VNET_HDR``: every
packet then carries a 10-byte virtio-net header. On input it says whether the kernel already
vouches for the checksum (so the netstack need not verify it) and lets the kernel hand over
TCP segments larger than the MTU (``TUN_F_TSO4/6``). On output it asks the kernel to fill in
the transport checksum (``NEEDS_CSUM``), which the netstack then leaves as the pseudo-header
sum (``NetStackConfig.checksum_offload``). See PERFORMANCE.md, "TUN and checksums".

Addresses, MTU, routes and routing rules are set with the ``ip`` command (iproute2); every change
made is recorded and undone in reverse order on close. ``auto_route`` uses policy routing (see
:func:`plan_policy_routing`): rules left by a run that crashed are found by their table and
priority and removed before new ones are installed.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import logging
import os
import shutil
import struct
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ostp_client.errors import OstpClientError
from ostp_client.inbounds.tun.device import TunDevice

__all__ = [
    "RULE_PRIORITY",
    "IpCommandError",
    "LinuxTun",
    "RouteManager",
    "plan_policy_routing",
    "stale_rule_deletions",
]

logger = logging.getLogger(__name__)

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

# linux/virtio_net.h: struct virtio_net_hdr (10 bytes, little-endian on every Linux host that
# runs this without TUNSETVNETLE)
VNET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
_VNET_HDR = struct.Struct("<BBHHHH")
_PLAIN_HDR = bytes(VNET_HDR_LEN)
_TCP_CSUM_OFFSET = 16  # RFC 9293 §3.1: checksum at byte 16 of the TCP header
_UDP_CSUM_OFFSET = 6  # RFC 768
_PROTO_CSUM_OFFSET = {6: _TCP_CSUM_OFFSET, 17: _UDP_CSUM_OFFSET}

READ_BUFFER = 65535 + VNET_HDR_LEN


def vnet_header_for(packet: bytes) -> bytes:
    """The virtio-net header that asks the kernel to finish a TCP/UDP checksum."""
    if not packet:
        return _PLAIN_HDR
    version = packet[0] >> 4
    if version == 4:
        start = (packet[0] & 0x0F) * 4
        proto = packet[9]
    elif version == 6 and len(packet) >= 40:
        start = 40  # the netstack sends no extension headers
        proto = packet[6]
    else:
        return _PLAIN_HDR
    offset = _PROTO_CSUM_OFFSET.get(proto)
    if offset is None:
        return _PLAIN_HDR
    return _VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, start, offset)


class LinuxTun(TunDevice):
    """An open TUN interface. Non-blocking; use :attr:`fd` to wait for packets."""

    def __init__(self, name: str, *, offload: bool = True, path: str = "/dev/net/tun") -> None:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0)
            ifr = struct.pack("16sH22x", name.encode(), flags)
            result = fcntl.ioctl(fd, TUNSETIFF, ifr)
            self.name = result[:16].rstrip(b"\0").decode()
            self.offload = offload
            if offload:
                try:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
                except OSError as exc:
                    logger.debug("TUNSETOFFLOAD refused (%s); checksums only", exc)
                    fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.read_errors = 0
        self.write_drops = 0

    def read_batch(self, limit: int = 256) -> list[tuple[bytes, bool]]:
        """Packets waiting (at most ``limit``) with "checksum already verified" flags."""
        out: list[tuple[bytes, bool]] = []
        read = os.read
        fd = self.fd
        offload = self.offload
        for _ in range(limit):
            try:
                data = read(fd, READ_BUFFER)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    break
                self.read_errors += 1
                continue
            if offload:
                if len(data) <= VNET_HDR_LEN:
                    continue
                # NEEDS_CSUM: a local sender left only the pseudo-header sum; DATA_VALID: the
                # kernel checked it. Either way the netstack must not verify it again.
                verified = bool(
                    data[0] & (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID)
                )
                out.append((data[VNET_HDR_LEN:], verified))
            else:
                out.append((data, False))
        return out

    def write_batch(self, packets: Iterable[bytes]) -> None:
        fd = self.fd
        try:
            if self.offload:
                writev = os.writev
                for packet in packets:
                    writev(fd, (vnet_header_for(packet), packet))
            else:
                write = os.write
                for packet in packets:
                    write(fd, packet)
        except (BlockingIOError, InterruptedError):
            self.write_drops += 1  # the kernel's queue is full: TCP will retransmit
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EIO, errno.ENOBUFS):
                raise
            self.write_drops += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --------------------------------------------------------------------------------------------
# addresses and routes


class IpCommandError(OstpClientError, OSError):
    """An ``ip`` command failed; the message has its stderr."""


RULE_PRIORITY = 9020
"""Priority of the ``main suppress_prefixlength 0`` rule; the tunnel rule takes the next one.
Below the main table's 32766, like wg-quick's rules, and clear of sing-box's 9000 range."""
DEFAULT_ROUTES = {"-4": "0.0.0.0/0", "-6": "::/0"}


def plan_policy_routing(
    name: str,
    table: int,
    mark: int,
    excludes: Sequence[str],
    *,
    ipv6: bool = True,
    priority: int = RULE_PRIORITY,
) -> list[list[str]]:
    """The ``ip`` argument lists that ``auto_route`` runs, in order (wg-quick's scheme).

    Table ``table`` gets the default routes into the device plus a ``throw`` route for every
    network in ``excludes`` (a throw sends the lookup on to the main table: those networks keep
    whatever route the system has for them, now or later, and are unreachable rather than
    tunnelled when it has none). Then two rules per family:

    - ``priority``: ``lookup main suppress_prefixlength 0``: the main table's specific routes
      (LAN, the device's own networks, fake-IP ranges) still apply; its default routes do not;
    - ``priority + 1``: ``not fwmark MARK lookup TABLE``: everything else unmarked goes into the
      tunnel. The daemon's own sockets carry ``MARK`` (`ostp_client.net.bypass`), skip this rule
      and reach the main table's default routes at 32766.
    """
    families = ["-4", "-6"] if ipv6 else ["-4"]
    commands: list[list[str]] = []
    for family in families:
        commands.append(
            ["ip", family, "route", "add", DEFAULT_ROUTES[family], "dev", name, "table", str(table)]
        )
    for network in dict.fromkeys(excludes):
        net = ipaddress.ip_network(network, strict=False)
        family = "-6" if net.version == 6 else "-4"
        if family in families:
            commands.append(["ip", family, "route", "add", "throw", str(net), "table", str(table)])
    for family in families:
        rule = ["ip", family, "rule", "add", "pref"]
        commands.append([*rule, str(priority), "lookup", "main", "suppress_prefixlength", "0"])
        commands.append(
            [*rule, str(priority + 1), "not", "fwmark", f"{mark:#x}", "lookup", str(table)]
        )
    return commands


def stale_rule_deletions(
    family: str, rules_text: str, table: int, priority: int = RULE_PRIORITY
) -> list[list[str]]:
    """``ip rule del`` commands for rules a previous run left behind (it crashed).

    From ``ip FAMILY rule show``: every rule that looks up ``table`` (a dedicated table), and a
    ``lookup main suppress_prefixlength 0`` rule at ``priority``. Nothing else is touched.
    """
    out: list[list[str]] = []
    for line in rules_text.splitlines():
        pref_text, sep, selector = line.partition(":")
        if not sep or not pref_text.strip().isdigit():
            continue
        pref = int(pref_text)
        words = selector.split()
        lookup = words[words.index("lookup") + 1] if "lookup" in words[:-1] else None
        ours = lookup == str(table) or (
            pref == priority and lookup == "main" and "suppress_prefixlength" in words
        )
        if ours:
            out.append(["ip", family, "rule", "del", "pref", str(pref), *words])
    return out


def undo_command(command: Sequence[str]) -> list[str]:
    """``ip ... add ...`` → ``ip ... del ...``."""
    out = list(command)
    out[out.index("add")] = "del"
    return out


def _ip(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    ip = shutil.which("ip") or "/sbin/ip"
    result = subprocess.run(  # noqa: S603 (fixed program, argument list)
        [ip, *args[1:]], capture_output=True, text=True, timeout=10, check=False
    )
    if check and result.returncode != 0:
        raise IpCommandError(f"`{' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def ipv6_available() -> bool:
    return os.path.exists("/proc/sys/net/ipv6")


@dataclass
class RouteManager:
    """Configures the device and installs routes; :meth:`restore` undoes all of it."""

    name: str
    applied: list[list[str]] = field(default_factory=list)

    def configure(self, mtu: int, addresses: Sequence[str]) -> None:
        _ip(["ip", "link", "set", "dev", self.name, "mtu", str(mtu)])
        for address in addresses:
            iface = ipaddress.ip_interface(address)
            if iface.version == 6:
                # nodad: the address is usable at once (no duplicate detection on a TUN)
                _ip(["ip", "-6", "addr", "add", str(iface), "dev", self.name, "nodad"])
            else:
                _ip(["ip", "-4", "addr", "add", str(iface), "dev", self.name])
        _ip(["ip", "link", "set", "dev", self.name, "up"])

    def clean_stale(self, table: int, priority: int = RULE_PRIORITY) -> int:
        """Remove the rules and table entries a crashed earlier run left; how many rules."""
        removed = 0
        for family in ("-4", "-6") if ipv6_available() else ("-4",):
            shown = _ip(["ip", family, "rule", "show"], check=False)
            for command in stale_rule_deletions(family, shown.stdout, table, priority):
                if _ip(command, check=False).returncode == 0:
                    removed += 1
                    logger.warning("removed a stale routing rule: %s", " ".join(command[4:]))
            _ip(["ip", family, "route", "flush", "table", str(table)], check=False)
        return removed

    def install_policy(
        self, table: int, mark: int, excludes: Iterable[str], priority: int = RULE_PRIORITY
    ) -> None:
        """Install :func:`plan_policy_routing`; on any failure undo what was done and raise."""
        plan = plan_policy_routing(
            self.name, table, mark, list(excludes), ipv6=ipv6_available(), priority=priority
        )
        for command in plan:
            result = _ip(command, check=False)
            if result.returncode == 0:
                self.applied.append(command)
                logger.debug("auto_route: %s", " ".join(command[1:]))
            else:
                self.restore()
                raise IpCommandError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")

    def add_device_routes(self, networks: Iterable[str]) -> None:
        """Route ``networks`` (the fake-IP ranges) to the device, auto_route or not."""
        for network in networks:
            net = ipaddress.ip_network(network, strict=False)
            family = "-6" if net.version == 6 else "-4"
            command = ["ip", family, "route", "add", str(net), "dev", self.name]
            result = _ip(command, check=False)
            if result.returncode == 0:
                self.applied.append(command)
            else:
                logger.warning(
                    "could not route %s to %s: %s", net, self.name, result.stderr.strip()
                )

    def restore(self) -> None:
        while self.applied:
            command = undo_command(self.applied.pop())
            result = _ip(command, check=False)
            if result.returncode != 0:
                logger.warning(
                    "could not remove route (%s): %s", " ".join(command[1:]), result.stderr.strip()
                )
